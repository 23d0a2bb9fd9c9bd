"""CLEAR over M >= 2 named modalities.

With item feature matrices ``X_m (N, d_m)`` for modalities ``m = 1..M`` (rows paired)::

    C_mj = (X_m - mu_m)^T (X_j - mu_j) / N        # (d_m, d_j) cross-covariance, every pair m < j
    w_j  = 1 / sqrt(trace Sigma_j)                 # Sigma_j: covariance of X_j; w_j = 1 / its total std
    B_m  = [w_j C_mj for j != m]                   # (d_m, sum_{j != m} d_j), blocks in declared order
    B_m  = U_m S_m V_m^T                           # SVD; U_m,k = U_m[:, :k_m]
    X_m' = X_m - lambda (X_m U_m,k) U_m,k^T        # P_m = I - lambda U_m,k U_m,k^T, never built

The top-k left singular vectors of ``B_m`` are the directions of modality m that it shares
with the others together; m loses ``lambda`` of its component along them. The weights put
modalities of very different scale on one footing (VGGish rows have norm ~1477, MiniLM rows
norm 1: unweighted, the largest modality's blocks would decide every other modality's
directions); scaling the block of m itself would only scale ``B_m``, so it is left out. For
M = 2 the weights only scale ``C_12`` (``B_1 = w_2 C_12``, ``B_2 = w_1 C_12^T``), leaving its
singular vectors, the k-or-ratio choice and so the projection exactly those of
:class:`~clearrec.models.clear.ClearProjector`.

Identity: ``P_m B_m`` has singular values ``(1 - lambda) s_i`` for ``i <= k_m`` and ``s_i``
beyond (``s`` = singular values of ``B_m``). After every modality is projected, the stacked
weighted cross-covariances of the projected features are ``P_m B_m diag(P_j)``, whose top-k
energy is at most that of ``P_m B_m``.

``center``, ``project_centered``, ``strength``, ``k`` / ``ratio`` (applied to each ``B_m``'s
singular values), ``directions`` and ``seed`` mean what they mean in
:class:`~clearrec.models.clear.ClearOptions`; the trace in ``w_j`` is that of the same second
moment as ``C`` (centred covariance, or the raw second moment when ``center`` is off).
Random directions (the ablation control) are drawn for the modalities in declared order
from one generator, as the two-modality projector draws visual then text.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from clearrec.models.clear import ClearOptions, CrossCovariance, _flip_signs, _svd, energy_share, random_orthonormal

STATE_FORMAT = "clearrec.clear_multi/1"
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
LEGACY = {"image": "visual", "text": "text"}  # modality name -> the ClearOptions switch that means it


class SecondMoment:
    """Streaming trace of one modality's covariance (or raw second moment), in float64.

    Rows are shifted by the first chunk's means, as :class:`CrossCovariance` does, so a large
    common mean does not cost precision; the shift is undone exactly in :meth:`trace`.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sum: np.ndarray | None = None  # (d,) float64, sum of rows
        self._sq: np.ndarray | None = None  # (d,) float64, sum of (x - c)^2
        self._shift: np.ndarray | None = None  # (d,) the shift c, as applied

    def update(self, x: np.ndarray, col_sum: np.ndarray) -> None:
        """Add rows ``x (n, d)`` whose column sums ``col_sum (d,)`` float64 are already known."""
        if self._sum is None:
            self._shift = (col_sum / len(x)).astype(x.dtype).astype(np.float64)
            self._sum = np.zeros_like(col_sum)
            self._sq = np.zeros_like(col_sum)
        xs = x - self._shift.astype(x.dtype)  # (n, d)
        self._sq += np.einsum("ij,ij->j", xs, xs, dtype=np.float64)
        self._sum += col_sum
        self.n += len(x)

    @property
    def mean(self) -> np.ndarray:
        return self._sum / self.n  # (d,)

    def trace(self, center: bool = True) -> float:
        mean = self.mean
        a = mean - self._shift
        centred = float(np.sum(self._sq / self.n - a * a))
        return centred if center else centred + float(mean @ mean)


class MultiClearProjector:
    """CLEAR null-space projector over any number M >= 2 of named modalities.

    Args:
        options: the settings (:class:`ClearOptions`); defaults to ``ClearOptions()``.
        modalities: the names, lowercase identifiers, at least two, in the order their blocks
            are stacked.
        project: per-modality on/off (``False``: that modality's transform is the identity;
            it still takes part in the other modalities' directions). A name left out takes
            ``options.visual`` for ``image``, ``options.text`` for ``text``, else ``True``.
    """

    def __init__(
        self,
        options: ClearOptions | None = None,
        modalities: Sequence[str] = ("image", "text"),
        project: Mapping[str, bool] | None = None,
    ) -> None:
        self.options = options if options is not None else ClearOptions()
        self.modalities = tuple(modalities)
        check_names(self.modalities)
        project = dict(project or {})
        unknown = sorted(set(project) - set(self.modalities))
        if unknown:
            raise ValueError(f"project names {unknown}, which are not among the modalities {list(self.modalities)}")
        self.project = {
            m: bool(project.get(m, getattr(self.options, LEGACY[m]) if m in LEGACY else True))
            for m in self.modalities
        }
        self.reset()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every pair ``(m, j)`` with ``m`` declared before ``j``."""
        ms = self.modalities
        return [(ms[a], ms[b]) for a in range(len(ms)) for b in range(a + 1, len(ms))]

    def reset(self) -> None:
        """Forget any fit (accumulated chunks and the finalised projector)."""
        self._pair_acc = {pair: CrossCovariance() for pair in self.pairs}
        self._moments = {m: SecondMoment() for m in self.modalities}
        self.dims_: dict[str, int] | None = None
        self.k_: dict[str, int] | None = None
        self.n_fit_ = 0
        self.means_: dict[str, np.ndarray] = {}  # name -> (d_m,) float64
        self.directions_: dict[str, np.ndarray] = {}  # name -> U_m,k (d_m, k_m) float64, orthonormal columns
        self.spectra_: dict[str, np.ndarray] = {}  # name -> singular values of B_m, descending
        self.weights_: dict[str, float] = {}  # name -> w_m = 1 / sqrt(trace Sigma_m)
        self.cross_covariances_: dict[tuple[str, str], np.ndarray] = {}  # (m, j) -> C_mj (d_m, d_j), m before j
        self._cast: dict[Any, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    # ---- fitting ---------------------------------------------------------------------
    def fit(self, features: Mapping[str, np.ndarray], chunk_rows: int = 65536) -> "MultiClearProjector":
        """Fit on in-memory features ``{name: X_m (N, d_m)}`` (in row chunks, as streaming would)."""
        self.reset()
        n = self._check_chunk(features)
        for lo in range(0, n, chunk_rows):
            self.partial_fit({m: features[m][lo : lo + chunk_rows] for m in self.modalities})
        return self.finalize()

    def partial_fit(self, chunk: Mapping[str, np.ndarray]) -> "MultiClearProjector":
        """Accumulate one chunk of paired rows ``{name: (n, d_m)}``; call :meth:`finalize` after the last."""
        if self.k_ is not None:
            raise ValueError("this projector is already finalised; call reset() before fitting again")
        n = self._check_chunk(chunk)
        if n == 0:
            return self
        sums = {}
        for m in self.modalities:
            sums[m] = np.sum(chunk[m], axis=0, dtype=np.float64)  # (d_m,)
            if not np.isfinite(sums[m]).all():
                rows = f"rows {self._moments[m].n}..{self._moments[m].n + n - 1}"
                raise ValueError(f"modality {m!r}: chunk of shape {chunk[m].shape} ({rows} of the fit) contains NaN "
                                 "or infinite values; fix the features (rerun encode) before fitting CLEAR")
        if self.dims_ is None:
            self.dims_ = {m: int(chunk[m].shape[1]) for m in self.modalities}
        for m in self.modalities:
            self._moments[m].update(chunk[m], sums[m])
        for (m, j), acc in self._pair_acc.items():
            acc.update(chunk[m], chunk[j])
        self.n_fit_ += n
        return self

    def finalize(self) -> "MultiClearProjector":
        """Weights, the stacked ``B_m`` per modality, their SVDs, k and the removed directions."""
        if self.n_fit_ < 2:
            raise ValueError(f"CLEAR needs at least 2 paired rows to fit, got {self.n_fit_}")
        opts = self.options
        weights = {}
        for m in self.modalities:
            tr = self._moments[m].trace(opts.center)
            if not tr > 0:
                raise ValueError(f"modality {m!r} has zero variance over the {self.n_fit_} fit rows (every row is "
                                 "the same vector): it shares nothing to remove; drop it from CLEAR")
            weights[m] = 1.0 / np.sqrt(tr)
        C = {pair: acc.covariance(opts.center) for pair, acc in self._pair_acc.items()}
        means = {m: self._moments[m].mean for m in self.modalities}
        rng = np.random.default_rng(opts.seed)
        directions, spectra = {}, {}
        for m in self.modalities:
            B = stacked(m, self.modalities, C, weights)  # (d_m, sum_{j != m} d_j)
            U, s, Vt = _svd(B)
            U, _ = _flip_signs(U, Vt)
            k = opts.rank(s)
            directions[m] = U[:, :k] if opts.directions == "shared" else random_orthonormal(B.shape[0], k, rng)
            spectra[m] = s
        self._set(means, directions, spectra, weights, C, self.n_fit_)
        return self

    def _set(self, means, directions, spectra, weights, C, n) -> None:
        self.means_ = {m: np.asarray(means[m], np.float64) for m in self.modalities}
        self.directions_ = {m: np.asarray(directions[m], np.float64) for m in self.modalities}
        self.spectra_ = {m: np.asarray(spectra[m], np.float64) for m in self.modalities}
        self.weights_ = {m: float(weights[m]) for m in self.modalities}
        self.cross_covariances_ = {pair: np.asarray(C[pair], np.float64) for pair in self.pairs}
        self.dims_ = {m: int(self.means_[m].shape[0]) for m in self.modalities}
        self.k_ = {m: int(self.directions_[m].shape[1]) for m in self.modalities}
        self.n_fit_ = int(n)
        self._cast = {}

    def _check_chunk(self, chunk: Mapping[str, np.ndarray]) -> int:
        """Raise unless ``chunk`` holds exactly the declared modalities as paired 2-D float arrays; the row count."""
        if set(chunk) != set(self.modalities):
            raise ValueError(f"features name {sorted(chunk)}, expected exactly the modalities {list(self.modalities)}")
        shapes = ", ".join(f"{m} {getattr(chunk[m], 'shape', None)}" for m in self.modalities)
        for m in self.modalities:
            x = chunk[m]
            if not isinstance(x, np.ndarray):
                raise TypeError(f"modality {m!r}: features must be a numpy array, got {type(x).__name__}")
            if x.ndim != 2:
                raise ValueError(f"modality {m!r} has shape {x.shape}: features must be 2-D (items x features)")
            if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
                raise TypeError(f"modality {m!r}: features must be float32 or float64, got {x.dtype}")
            if self.dims_ is not None and x.shape[1] != self.dims_[m]:
                raise ValueError(f"modality {m!r} has {x.shape[1]} features, earlier chunks had {self.dims_[m]}")
        if len({len(chunk[m]) for m in self.modalities}) != 1:
            raise ValueError(f"shapes {shapes}: every modality must have the same number of rows "
                             "(one row per item, same order)")
        return len(chunk[self.modalities[0]])

    # ---- projecting ------------------------------------------------------------------
    def transform(self, name: str, X: np.ndarray) -> np.ndarray:
        """Project modality ``name``'s features ``X (N, d_m)`` (or one ``(d_m,)`` vector); a new array."""
        self._require_fitted()
        if name not in self.dims_:
            raise ValueError(f"unknown modality {name!r}; the projector has {list(self.modalities)}")
        X = np.asarray(X)
        if not np.issubdtype(X.dtype, np.floating) or X.dtype.itemsize < 4:
            raise TypeError(f"{name} features must be float32 or float64, got {X.dtype} with shape {X.shape}")
        d = self.dims_[name]
        if X.ndim not in (1, 2) or X.shape[-1] != d:
            raise ValueError(f"{name} features have shape {X.shape}, expected (N, {d}) or ({d},): the projector "
                             f"was fit on dims {self.dims_}")
        opts = self.options
        if not self.project[name] or opts.strength == 0.0 or self.k_[name] == 0:
            return X.copy()
        if X.dtype not in self._cast:
            self._cast[X.dtype] = {m: (self.directions_[m].astype(X.dtype), self.means_[m].astype(X.dtype))
                                   for m in self.modalities}
        U, mu = self._cast[X.dtype][name]  # (d, k), (d,)
        coef = X @ U  # (N, k) or (k,)
        if opts.project_centered:
            coef -= mu @ U
        coef *= -opts.strength
        out = coef @ U.T  # (N, d): the only N x d allocation
        out += X
        return out

    def transform_all(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{name: X_m'}`` for every declared modality."""
        self._check_chunk(features)
        return {m: self.transform(m, features[m]) for m in self.modalities}

    # ---- inspection ------------------------------------------------------------------
    def stacked(self, name: str) -> np.ndarray:
        """``B_m (d_m, sum_{j != m} d_j)``: the weighted stacked cross-covariances of ``name``."""
        self._require_fitted()
        return stacked(name, self.modalities, self.cross_covariances_, self.weights_)

    def spectrum(self, name: str) -> np.ndarray:
        """Singular values of ``B_m``, descending."""
        self._require_fitted()
        return self.spectra_[name].copy()

    def energy_topk(self, name: str) -> float:
        """Share of ``B_m``'s energy ``sum s_i^2`` in its top-k singular values."""
        return energy_share(self.spectrum(name), self.k_[name])

    def pair_spectra(self, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        """Singular values of ``C_ab`` and of the projected features' ``P_a^T C_ab P_b`` (exact, from the fit)."""
        self._require_fitted()
        C = self.cross_covariances_[(a, b)] if (a, b) in self.cross_covariances_ else self.cross_covariances_[(b, a)].T
        after = C
        for side, name in ((0, a), (1, b)):
            lam = self.options.strength if self.project[name] else 0.0
            U = self.directions_[name]  # (d, k)
            after = after - lam * U @ (U.T @ after) if side == 0 else after - lam * (after @ U) @ U.T
        return _svd(C, compute_uv=False), _svd(after, compute_uv=False)

    def energy_removed(self, a: str, b: str) -> float:
        """``1 - ||P_a^T C_ab P_b||_F^2 / ||C_ab||_F^2``: the share of the pair's cross-covariance energy removed."""
        before, after = self.pair_spectra(a, b)
        total = float(np.sum(before**2))
        return 0.0 if total == 0 else 1.0 - float(np.sum(after**2)) / total

    def _require_fitted(self) -> None:
        if self.k_ is None:
            raise ValueError("the projector is not fitted: call fit(), or partial_fit() then finalize(), first")

    # ---- state -----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(tensors, meta)``: float64 arrays for safetensors, JSON-able settings for the JSON file.

        Tensors: ``mean.<m> (d_m,)``, ``directions.<m> (d_m, k_m)``, ``spectrum.<m>``,
        ``weights (M,)`` in declared order, ``cross_covariance.<m>.<j> (d_m, d_j)`` per pair.
        """
        self._require_fitted()
        tensors = {"weights": np.array([self.weights_[m] for m in self.modalities], np.float64)}
        for m in self.modalities:
            tensors[f"mean.{m}"] = self.means_[m]
            tensors[f"directions.{m}"] = self.directions_[m]
            tensors[f"spectrum.{m}"] = self.spectra_[m]
        for m, j in self.pairs:
            tensors[f"cross_covariance.{m}.{j}"] = self.cross_covariances_[(m, j)]
        meta = {
            "format": STATE_FORMAT,
            "modalities": list(self.modalities),
            "k": dict(self.k_),  # the rank used per modality
            **self.options.to_json(),
            "project": dict(self.project),
            "dims": dict(self.dims_),
            "n_fit": self.n_fit_,
        }
        return {name: np.ascontiguousarray(a) for name, a in tensors.items()}, meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "MultiClearProjector":
        """Rebuild a fitted projector from :meth:`state_dict`'s output (extra meta keys are ignored)."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"projector state has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        proj = cls(ClearOptions.from_json(meta), meta["modalities"], meta["project"])
        ms, dims, ks = proj.modalities, meta["dims"], meta["k"]
        expected = {"weights": (len(ms),)}
        for m in ms:
            rest = sum(dims[j] for j in ms if j != m)
            expected |= {f"mean.{m}": (dims[m],), f"directions.{m}": (dims[m], ks[m]),
                         f"spectrum.{m}": (min(dims[m], rest),)}
        expected |= {f"cross_covariance.{m}.{j}": (dims[m], dims[j]) for m, j in proj.pairs}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"projector state lacks tensors {missing}; it has {sorted(tensors)}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"projector tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                 f"(meta: dims {dims}, k {ks})")
        t = {n: np.asarray(tensors[n], dtype=np.float64) for n in expected}
        proj._set({m: t[f"mean.{m}"] for m in ms}, {m: t[f"directions.{m}"] for m in ms},
                  {m: t[f"spectrum.{m}"] for m in ms}, dict(zip(ms, t["weights"].tolist())),
                  {(m, j): t[f"cross_covariance.{m}.{j}"] for m, j in proj.pairs}, meta.get("n_fit", 0))
        return proj


def check_names(modalities: Sequence[str]) -> None:
    """Raise ``ValueError`` unless there are >= 2 distinct lowercase-identifier names."""
    if len(modalities) < 2:
        raise ValueError(f"CLEAR needs at least 2 modalities, got {list(modalities)}")
    bad = [m for m in modalities if not isinstance(m, str) or not NAME.match(m)]
    if bad:
        raise ValueError(f"modality names {bad} are not lowercase identifiers (a-z, then a-z, 0-9 or _)")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modality names repeat: {list(modalities)}")


def stacked(
    m: str, modalities: Sequence[str], C: Mapping[tuple[str, str], np.ndarray], weights: Mapping[str, float]
) -> np.ndarray:
    """``B_m = [w_j C_mj for j != m]`` (d_m, sum_{j != m} d_j), with ``C_jm = C_mj^T`` for j before m."""
    blocks = [weights[j] * (C[(m, j)] if (m, j) in C else C[(j, m)].T) for j in modalities if j != m]
    return np.concatenate(blocks, axis=1)
