"""CLEAR: cross-modal null-space projection (Zhan et al., 2026).

With item feature matrices ``Xv (N, dv)`` (visual) and ``Xt (N, dt)`` (text)::

    C   = (Xv - mu_v)^T (Xt - mu_t) / N       # (dv, dt) cross-covariance
    C   = U S W^T                              # SVD; U_k = U[:, :k], W_k = W[:, :k]
    Xv' = Xv - lambda * (Xv U_k) U_k^T         # P_V = I - lambda U_k U_k^T, never built
    Xt' = Xt - lambda * (Xt W_k) W_k^T

The top-k singular directions of ``C`` are the subspace the two modalities share; each
modality loses ``lambda`` of its component along its own top-k directions. The
cross-covariance of the projected features has singular values ``(1 - lambda)^2 s_i`` for
``i <= k`` and ``s_i`` beyond (cross-covariance ignores means, so this holds for raw and
centred projection alike). ``k`` is fixed or the smallest rank whose energy
``sum_{i<=k} s_i^2 / sum_i s_i^2`` reaches ``ratio``.

:class:`CrossCovariance` accumulates ``C`` over row chunks in float64, so a catalog larger
than memory streams through :meth:`ClearProjector.partial_fit`. :class:`ClearOptions` holds every
setting once; the static projector here and the dynamic mode in ``models/clear_dynamic.py``
(refit once per epoch on a backbone's embeddings, project every step) both take it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Mapping

import numpy as np
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    import torch

STATE_FORMAT = "clearrec.clear/1"
Directions = Literal["shared", "random"]


class CrossCovariance:
    """Streaming cross-covariance of paired rows in float64 accumulators.

    Each chunk is shifted by the first chunk's means before its product, so the float32
    products of features with a large common mean keep their precision; the shift is
    undone exactly in :meth:`covariance`.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sum_v: np.ndarray | None = None  # (dv,) float64, sum of rows
        self._sum_t: np.ndarray | None = None  # (dt,)
        self._prod: np.ndarray | None = None  # (dv, dt) float64, sum of (xv - c_v)^T (xt - c_t)
        self._shift_v: np.ndarray | None = None  # (dv,) the shift c_v, as applied
        self._shift_t: np.ndarray | None = None

    @property
    def dims(self) -> tuple[int, int] | None:
        return None if self._sum_v is None else (len(self._sum_v), len(self._sum_t))

    def update(self, xv: np.ndarray, xt: np.ndarray) -> None:
        """Add the paired rows ``xv (n, dv)``, ``xt (n, dt)``."""
        check_pair(xv, xt, self.dims)
        if len(xv) == 0:
            return
        sum_v = np.sum(xv, axis=0, dtype=np.float64)  # (dv,)
        sum_t = np.sum(xt, axis=0, dtype=np.float64)  # (dt,)
        if not (np.isfinite(sum_v).all() and np.isfinite(sum_t).all()):
            raise ValueError(
                f"chunk of Xv {xv.shape} / Xt {xt.shape} (rows {self.n}..{self.n + len(xv) - 1} of the fit) "
                "contains NaN or infinite values; fix the features (rerun encode) before fitting CLEAR"
            )
        if self._sum_v is None:
            self._shift_v = (sum_v / len(xv)).astype(xv.dtype).astype(np.float64)
            self._shift_t = (sum_t / len(xt)).astype(xt.dtype).astype(np.float64)
            self._sum_v = np.zeros_like(sum_v)
            self._sum_t = np.zeros_like(sum_t)
            self._prod = np.zeros((len(sum_v), len(sum_t)), dtype=np.float64)
        xv_s = xv - self._shift_v.astype(xv.dtype)  # (n, dv), same dtype as xv
        xt_s = xt - self._shift_t.astype(xt.dtype)  # (n, dt)
        self._prod += xv_s.T @ xt_s  # (dv, dt) product in the input dtype, summed in float64
        self._sum_v += sum_v
        self._sum_t += sum_t
        self.n += len(xv)

    @property
    def mean_v(self) -> np.ndarray:
        self._require()
        return self._sum_v / self.n

    @property
    def mean_t(self) -> np.ndarray:
        self._require()
        return self._sum_t / self.n

    def covariance(self, center: bool = True) -> np.ndarray:
        """``(dv, dt)`` float64: centred ``(S - N mu_v mu_t^T) / N``, or the raw second moment."""
        self._require()
        a = self.mean_v - self._shift_v  # (dv,)
        b = self.mean_t - self._shift_t  # (dt,)
        centred = self._prod / self.n - np.outer(a, b)
        return centred if center else centred + np.outer(self.mean_v, self.mean_t)

    def _require(self) -> None:
        if self.n == 0:
            raise ValueError("no rows were added: call update() with at least one chunk first")


@dataclass(frozen=True)
class ClearOptions:
    """Every CLEAR setting, with its default and meaning (the static and the dynamic mode take it)."""

    k: int | None = 8  # rank of the removed shared subspace; ignored (stored as None) when ratio is set
    ratio: float | None = None  # "dynamic ratio": the smallest k whose cross-covariance energy share reaches it
    strength: float = 1.0  # lambda in [0, 1]: 1 = hard null-space projection, 0 = identity
    center: bool = True  # centre the features before the cross-covariance (else the raw second moment)
    project_centered: bool = False  # X' = mu + (X - mu) P (the fit mean is kept); False: X' = X P
    visual: bool = True  # project the visual (image) modality; False: its transform is the identity
    text: bool = True  # project the text modality
    directions: Directions = "shared"  # "random": remove k random orthonormal directions (ablation control)
    seed: int = 0  # seed of the random directions

    def __post_init__(self) -> None:
        if self.ratio is not None:
            object.__setattr__(self, "k", None)  # the energy ratio chooses k
        elif self.k is None:
            raise ValueError("give k (fixed rank) or ratio (energy share); both are None")
        elif self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not 0 <= self.strength <= 1:
            raise ValueError(f"strength (lambda) must be in [0, 1], got {self.strength}")
        if self.directions not in ("shared", "random"):
            raise ValueError(f"directions must be 'shared' or 'random', got {self.directions!r}")

    def rank(self, spectrum: np.ndarray) -> int:
        """The k-or-ratio rule: the rank to remove given the cross-covariance singular values.

        A fixed ``k`` is refused (``ValueError``) when it reaches the smaller feature dimension,
        which would erase that modality whole; the ratio picks the smallest k whose energy
        share ``sum_{i<=k} s_i^2 / sum_i s_i^2`` reaches ``ratio``.
        """
        r = len(spectrum)
        if self.ratio is None:
            if self.k >= r:
                raise ValueError(f"k = {self.k} is not below the smaller feature dimension {r}: removing {self.k} "
                                 f"directions would erase that modality's content; use k < {r}")
            return int(self.k)
        energy = np.asarray(spectrum, dtype=np.float64) ** 2
        total = energy.sum()
        if total <= 0:
            return 0
        cum = np.cumsum(energy) / total
        return int(min(np.searchsorted(cum, self.ratio - 1e-12) + 1, r))

    def to_json(self) -> dict[str, Any]:
        """The settings that decide the projection, for ``projector.json`` / ``model.json``.

        ``k`` is written as ``k_requested`` (None when ``ratio`` chooses it; the rank used is
        stored apart as ``k``), and ``seed`` only where it matters (random directions), so that
        changing a setting with no effect leaves the file byte-identical.
        """
        out = asdict(self)
        out["k_requested"] = out.pop("k")
        if self.directions == "shared":
            del out["seed"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ClearOptions":
        """Inverse of :meth:`to_json` (other keys of ``data`` are ignored)."""
        known = {f.name for f in fields(cls)} - {"k"}
        kwargs = {key: data[key] for key in known if key in data}
        return cls(k=data.get("k_requested"), **kwargs)


class ClearProjector:
    """CLEAR null-space projector between a visual and a text feature space.

    Args:
        options: the settings (:class:`ClearOptions`); defaults to ``ClearOptions()``.
    """

    def __init__(self, options: ClearOptions | None = None) -> None:
        self.options = options if options is not None else ClearOptions()
        self.reset()

    def reset(self) -> None:
        """Forget any fit (accumulated chunks and the finalised projector)."""
        self._acc = CrossCovariance()
        self.k_: int | None = None
        self.n_fit_ = 0
        self.mean_visual_: np.ndarray | None = None  # (dv,) float64
        self.mean_text_: np.ndarray | None = None  # (dt,)
        self.directions_visual_: np.ndarray | None = None  # U_k (dv, k) float64, orthonormal columns
        self.directions_text_: np.ndarray | None = None  # W_k (dt, k)
        self.spectrum_: np.ndarray | None = None  # (min(dv, dt),) singular values of C, descending
        self.cross_covariance_: np.ndarray | None = None  # C (dv, dt)
        self._cast: dict[Any, tuple[np.ndarray, ...]] = {}

    # ---- fitting ---------------------------------------------------------------------
    def fit(self, Xv: np.ndarray, Xt: np.ndarray, chunk_rows: int = 65536) -> "ClearProjector":
        """Fit on in-memory ``Xv (N, dv)``, ``Xt (N, dt)`` (in row chunks, as streaming would)."""
        check_pair(Xv, Xt)
        self.reset()
        for lo in range(0, len(Xv), chunk_rows):
            self.partial_fit(Xv[lo : lo + chunk_rows], Xt[lo : lo + chunk_rows])
        return self.finalize()

    def partial_fit(self, chunk_v: np.ndarray, chunk_t: np.ndarray) -> "ClearProjector":
        """Accumulate one chunk of paired rows; call :meth:`finalize` after the last one."""
        if self.k_ is not None:
            raise ValueError("this projector is already finalised; call reset() before fitting again")
        self._acc.update(chunk_v, chunk_t)
        return self

    def finalize(self) -> "ClearProjector":
        """SVD of the accumulated cross-covariance; pick k and the removed directions."""
        if self._acc.n < 2:
            raise ValueError(f"CLEAR needs at least 2 paired rows to fit, got {self._acc.n}")
        C = self._acc.covariance(self.options.center)  # (dv, dt)
        U, s, Wt = _svd(C)  # U (dv, r), s (r,), Wt (r, dt)
        U, Wt = _flip_signs(U, Wt)
        opts = self.options
        k = opts.rank(s)
        if opts.directions == "shared":
            Uk, Wk = U[:, :k], Wt[:k].T
        else:
            rng = np.random.default_rng(opts.seed)
            Uk, Wk = random_orthonormal(C.shape[0], k, rng), random_orthonormal(C.shape[1], k, rng)
        self._set(self._acc.mean_v, self._acc.mean_t, Uk, Wk, s, C, self._acc.n)
        return self

    def _set(self, mu_v, mu_t, Uk, Wk, s, C, n) -> None:
        self.mean_visual_, self.mean_text_ = np.asarray(mu_v, np.float64), np.asarray(mu_t, np.float64)
        self.directions_visual_, self.directions_text_ = np.asarray(Uk, np.float64), np.asarray(Wk, np.float64)
        self.spectrum_, self.cross_covariance_ = np.asarray(s, np.float64), np.asarray(C, np.float64)
        self.k_, self.n_fit_ = int(Uk.shape[1]), int(n)
        self._cast = {}

    # ---- projecting ------------------------------------------------------------------
    def transform_visual(self, X: np.ndarray) -> np.ndarray:
        """Project visual features ``X (N, dv)`` (or one ``(dv,)`` vector); returns a new array."""
        return self._transform(X, "visual")

    def transform_text(self, X: np.ndarray) -> np.ndarray:
        """Project text features ``X (N, dt)`` (or one ``(dt,)`` vector); returns a new array."""
        return self._transform(X, "text")

    def _transform(self, X: np.ndarray, which: str) -> np.ndarray:
        self._require_fitted()
        X = np.asarray(X)
        U, mu = self._params(which, X)  # U (d, k), mu (d,) in X's dtype
        d = U.shape[0]
        if X.ndim not in (1, 2) or X.shape[-1] != d:
            raise ValueError(
                f"{which} features have shape {X.shape}, expected (N, {d}) or ({d},): the projector was fit "
                f"on visual dim {self.directions_visual_.shape[0]} and text dim {self.directions_text_.shape[0]}"
            )
        opts = self.options
        if not getattr(opts, which) or opts.strength == 0.0 or self.k_ == 0:
            return X.copy()
        coef = X @ U  # (N, k) or (k,)
        if opts.project_centered:
            coef -= mu @ U
        coef *= -opts.strength
        out = coef @ U.T  # (N, d): the only N x d allocation
        out += X
        return out

    def _params(self, which: str, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not np.issubdtype(X.dtype, np.floating) or X.dtype.itemsize < 4:
            raise TypeError(f"{which} features must be float32 or float64, got {X.dtype} with shape {X.shape}")
        if X.dtype not in self._cast:
            self._cast[X.dtype] = tuple(
                a.astype(X.dtype)
                for a in (self.directions_visual_, self.mean_visual_, self.directions_text_, self.mean_text_)
            )
        Uv, mv, Ut, mt = self._cast[X.dtype]
        return (Uv, mv) if which == "visual" else (Ut, mt)

    # ---- inspection ------------------------------------------------------------------
    def spectrum(self) -> np.ndarray:
        """Singular values of the fitted cross-covariance ``C``, descending, ``(min(dv, dt),)``."""
        self._require_fitted()
        return self.spectrum_.copy()

    def projected_spectrum(self) -> np.ndarray:
        """Singular values of the projected features' cross-covariance ``P_V^T C P_T`` (exact)."""
        self._require_fitted()
        opts = self.options
        lam_v = opts.strength if opts.visual else 0.0
        lam_t = opts.strength if opts.text else 0.0
        U, W, C = self.directions_visual_, self.directions_text_, self.cross_covariance_
        C = C - lam_v * U @ (U.T @ C)  # P_V C
        C = C - lam_t * (C @ W) @ W.T  # (P_V C) P_T
        return _svd(C, compute_uv=False)

    def energy_topk(self) -> float:
        """Share of the cross-covariance energy ``sum s_i^2`` in the top-k singular values."""
        return energy_share(self.spectrum(), self.k_)

    def energy_removed(self) -> float:
        """``1 - ||P_V^T C P_T||_F^2 / ||C||_F^2``: the share of cross-covariance energy removed."""
        total = float(np.sum(self.spectrum() ** 2))
        return 0.0 if total == 0 else 1.0 - float(np.sum(self.projected_spectrum() ** 2)) / total

    def _require_fitted(self) -> None:
        if self.k_ is None:
            raise ValueError("the projector is not fitted: call fit(), or partial_fit() then finalize(), first")

    # ---- state -----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(tensors, meta)``: float64 arrays for safetensors, JSON-able settings for the JSON file."""
        self._require_fitted()
        tensors = {
            "mean_visual": self.mean_visual_,  # (dv,)
            "mean_text": self.mean_text_,  # (dt,)
            "directions_visual": self.directions_visual_,  # (dv, k)
            "directions_text": self.directions_text_,  # (dt, k)
            "spectrum": self.spectrum_,  # (r,)
            "cross_covariance": self.cross_covariance_,  # (dv, dt)
        }
        meta = {
            "format": STATE_FORMAT,
            "k": self.k_,  # the rank used
            **self.options.to_json(),  # the settings, "k_requested" among them
            "dims": {"visual": int(self.mean_visual_.shape[0]), "text": int(self.mean_text_.shape[0])},
            "n_fit": self.n_fit_,
        }
        return {name: np.ascontiguousarray(a) for name, a in tensors.items()}, meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "ClearProjector":
        """Rebuild a fitted projector from :meth:`state_dict`'s output (extra meta keys are ignored)."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"projector state has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        missing = [n for n in ("mean_visual", "mean_text", "directions_visual", "directions_text", "spectrum",
                               "cross_covariance") if n not in tensors]
        if missing:
            raise ValueError(f"projector state lacks tensors {missing}; it has {sorted(tensors)}")
        proj = cls(ClearOptions.from_json(meta))
        dv, dt, k = meta["dims"]["visual"], meta["dims"]["text"], meta["k"]
        expected = {"mean_visual": (dv,), "mean_text": (dt,), "directions_visual": (dv, k),
                    "directions_text": (dt, k), "spectrum": (min(dv, dt),), "cross_covariance": (dv, dt)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"projector tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                    f"(meta: dims {dv} / {dt}, k {k})"
                )
        t = {n: np.asarray(tensors[n], dtype=np.float64) for n in expected}
        proj._set(t["mean_visual"], t["mean_text"], t["directions_visual"], t["directions_text"], t["spectrum"],
                  t["cross_covariance"], meta.get("n_fit", 0))
        return proj


# ---- shared pieces -----------------------------------------------------------------------
def check_pair(xv: np.ndarray, xt: np.ndarray, dims: tuple[int, int] | None = None) -> None:
    """Raise ``ValueError``/``TypeError`` naming both shapes unless ``xv``, ``xt`` are paired 2-D float arrays."""
    shapes = f"Xv has shape {getattr(xv, 'shape', None)}, Xt has shape {getattr(xt, 'shape', None)}"
    if not isinstance(xv, np.ndarray) or not isinstance(xt, np.ndarray):
        raise TypeError(f"Xv and Xt must be numpy arrays, got {type(xv).__name__} / {type(xt).__name__}")
    if xv.ndim != 2 or xt.ndim != 2:
        raise ValueError(f"{shapes}: both must be 2-D (items x features)")
    if len(xv) != len(xt):
        raise ValueError(f"{shapes}: they must have the same number of rows (one row per item, same order)")
    for name, x in (("Xv", xv), ("Xt", xt)):
        if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
            raise TypeError(f"{shapes}; dtypes {xv.dtype} / {xt.dtype}: {name} must be float32 or float64")
    if dims is not None and (xv.shape[1], xt.shape[1]) != dims:
        raise ValueError(f"{shapes}: earlier chunks had feature dims {dims[0]} / {dims[1]}")


def energy_share(spectrum: np.ndarray, k: int) -> float:
    """``sum_{i<=k} s_i^2 / sum_i s_i^2`` (0 for an all-zero spectrum)."""
    energy = np.asarray(spectrum, dtype=np.float64) ** 2
    total = energy.sum()
    return 0.0 if total == 0 else float(energy[:k].sum() / total)


def random_orthonormal(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``(d, k)`` float64 with orthonormal columns, uniform over the Stiefel manifold."""
    q, r = np.linalg.qr(rng.standard_normal((d, k)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _svd(C: np.ndarray, compute_uv: bool = True):
    """Thin SVD of a small (dv, dt) matrix on one BLAS thread: a multi-threaded LAPACK SVD of a
    matrix this size gains nothing and, on a busy machine, was measured 40x slower."""
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.svd(C, full_matrices=False, compute_uv=compute_uv)


def _flip_signs(U: np.ndarray, Wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make each singular pair's sign deterministic: the largest-|.| entry of u_i is positive."""
    idx = np.argmax(np.abs(U), axis=0)  # (r,)
    signs = np.where(U[idx, np.arange(U.shape[1])] < 0, -1.0, 1.0)
    return U * signs, Wt * signs[:, None]


# ---- dynamic variant (torch) ---------------------------------------------------------------
def shared_directions(
    Ev: "torch.Tensor", Et: "torch.Tensor", options: ClearOptions
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``(U_k (dv, k), W_k (dt, k), s (r,))`` of the embeddings' cross-covariance, without gradient."""
    import torch

    if Ev.ndim != 2 or Et.ndim != 2 or Ev.shape[0] != Et.shape[0]:
        raise ValueError(f"Ev has shape {tuple(Ev.shape)}, Et has shape {tuple(Et.shape)}: "
                         "they must be 2-D with the same number of rows (one per item)")
    with torch.no_grad():
        ev, et = Ev.detach().double(), Et.detach().double()  # (N, dv), (N, dt)
        if options.center:
            ev, et = ev - ev.mean(0), et - et.mean(0)
        C = ev.T @ et / ev.shape[0]  # (dv, dt)
        U, s, Wh = torch.linalg.svd(C, full_matrices=False)
        idx = U.abs().argmax(0)
        signs = torch.where(U[idx, torch.arange(U.shape[1], device=U.device)] < 0, -1.0, 1.0).to(U)
        U, Wh = U * signs, Wh * signs[:, None]
        kk = options.rank(s.cpu().numpy())
        if options.directions == "random":
            rng = np.random.default_rng(options.seed)
            Uk = torch.from_numpy(random_orthonormal(C.shape[0], kk, rng)).to(U)
            Wk = torch.from_numpy(random_orthonormal(C.shape[1], kk, rng)).to(U)
        else:
            Uk, Wk = U[:, :kk], Wh[:kk].T
        return Uk.to(Ev.dtype), Wk.to(Et.dtype), s
