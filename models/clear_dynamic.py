"""CLEAR's dynamic mode as a module a backbone holds: refit once per epoch, project every step.

:class:`DynamicClear` is the ``modality_hook`` of the backbones with modality embeddings
(VBPR, FREEDOM, LATTICE, ...) when CLEAR runs in dynamic mode. The backbone's ``pre_epoch``
calls :meth:`DynamicClear.refit` on its encoded modality embeddings ``{name: E_m (I, d_m)}``
(any M >= 2 names, e.g. ``{"image": W_v x_v, "text": W_t x_t, "audio": W_a x_a}``) for every
item: the shared directions ``U_m,k`` of each modality are recomputed (SVD without gradient).
Every training step and every evaluation then projects the embeddings with the directions
of the last refit, ``E_m - lambda (E_m U_m,k) U_m,k^T`` (differentiable in ``E_m``, not in
``U_m,k``).

The directions are those of the static projectors, computed in torch: for M = 2 the top-k
singular pairs of the cross-covariance ``C_12`` (:func:`~clearrec.models.clear.shared_directions`,
exactly the two-modality mode's ``U_k`` and ``W_k`` for ``image`` and ``text``); for M >= 3 the top-k left singular
vectors of ``B_m = [w_j C_mj, j != m]`` with ``w_j = 1 / sqrt(trace Sigma_j)``, as in
:mod:`clearrec.models.clear_multi` (whose docstring has the maths).

The directions and the means are buffers (``dirs_<name> (d_m, k_m)``, ``mean_<name> (d_m,)``),
so they are saved with the model, restored with the best epoch's weights and used unchanged
at serving time: a new item's content vector gets exactly the projection the catalog's items
got.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .clear import ClearOptions, random_orthonormal, shared_directions
from .clear_multi import LEGACY, check_names

_KINDS = ("dirs_", "mean_")  # buffer name prefixes, one buffer of each per modality


class DynamicClear(nn.Module):
    """Per-epoch CLEAR refit on a backbone's modality embeddings; see the module doc.

    Args:
        options: the CLEAR settings (:class:`clearrec.models.clear.ClearOptions`), as for the
            static projector: ``k`` or ``ratio``, ``strength``, ``center``, ``project_centered``,
            ``directions`` and ``seed``.
        project: per-modality on/off (``False``: that modality is returned unchanged; it still
            takes part in the others' directions). A name left out takes ``options.visual``
            for ``image``, ``options.text`` for ``text``, else ``True``.
    """

    def __init__(self, options: ClearOptions | None = None, project: Mapping[str, bool] | None = None):
        super().__init__()
        self.options = options if options is not None else ClearOptions()
        self.project = {str(m): bool(on) for m, on in (project or {}).items()}
        self.modalities: tuple[str, ...] = ()  # the names of the last refit (or of a loaded state)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # the device new buffers go to

    @property
    def fitted(self) -> bool:
        return bool(self.modalities)

    def projects(self, name: str) -> bool:
        """Whether modality ``name`` is projected (see ``project``)."""
        return self.project.get(name, getattr(self.options, LEGACY[name]) if name in LEGACY else True)

    @torch.no_grad()
    def refit(self, embeddings: Mapping[str, Tensor]) -> None:
        """Recompute the shared directions from ``{name: (N, d_m)}``, M >= 2 (no gradient)."""
        self._check(embeddings)
        dirs = directions(embeddings, self.options)
        for m in self.modalities:
            for kind in _KINDS:
                delattr(self, kind + m)
        for m, e in embeddings.items():
            # contiguous as a loaded state is, so that reloaded scores are bit-identical
            self.register_buffer("dirs_" + m, dirs[m].detach().contiguous().clone())  # (d_m, k_m)
            self.register_buffer("mean_" + m, e.detach().mean(0))  # (d_m,)
        self.modalities = tuple(embeddings)

    def forward(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Project the embeddings with the last refit's directions (fit on these first if never fit)."""
        if not self.fitted:
            self.refit(embeddings)
        if set(embeddings) != set(self.modalities):
            raise ValueError(f"dynamic CLEAR was fit on the modalities {sorted(self.modalities)}; "
                             f"got {sorted(embeddings)}")
        opts, out = self.options, {}
        for m, e in embeddings.items():
            mean = getattr(self, "mean_" + m) if opts.project_centered else None
            out[m] = _project_torch(e, getattr(self, "dirs_" + m), opts.strength, mean) if self.projects(m) else e
        return out

    def to_json(self) -> dict[str, Any]:
        """The settings for ``model.json``: :meth:`ClearOptions.to_json`, plus ``project`` when given."""
        return {**self.options.to_json(), **({"project": dict(self.project)} if self.project else {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DynamicClear":
        """Inverse of :meth:`to_json` (an unfitted hook; the directions come with the weights)."""
        return cls(ClearOptions.from_json(data), data.get("project"))

    def _check(self, embeddings: Mapping[str, Tensor]) -> None:
        names = list(embeddings)
        check_names(names)
        unknown = sorted(set(self.project) - set(names))
        if unknown:
            raise ValueError(f"dynamic CLEAR's project names {unknown}, which are not among the modalities {names}")
        rows = {m: tuple(e.shape) for m, e in embeddings.items()}
        if any(e.ndim != 2 for e in embeddings.values()) or len({e.shape[0] for e in embeddings.values()}) != 1:
            raise ValueError(f"modality embeddings have shapes {rows}: each must be 2-D with one row per item")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # the saved state decides the modalities and the shapes (k is known only after a refit)
        saved = [k[len(prefix) + len("dirs_"):] for k in state_dict
                 if k.startswith(prefix + "dirs_") and "." not in k[len(prefix):]]
        for m in self.modalities:
            if m not in saved:
                for kind in _KINDS:
                    delattr(self, kind + m)
        for m in saved:
            for kind in _KINDS:  # a mean absent from the state stays empty: a strict load reports it missing
                value = state_dict.get(prefix + kind + m, torch.empty(0))
                device = getattr(self, kind + m).device if m in self.modalities else self._anchor.device
                self.register_buffer(kind + m, torch.empty_like(value, device=device))
        self.modalities = tuple(saved)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return repr(self.options) + (f", project={self.project}" if self.project else "")


@torch.no_grad()
def directions(embeddings: Mapping[str, Tensor], options: ClearOptions) -> dict[str, Tensor]:
    """``{name: U_m,k (d_m, k_m)}`` of M >= 2 paired embeddings ``{name: (N, d_m)}``, in their dtypes.

    M = 2: :func:`~clearrec.models.clear.shared_directions` of the two, in the given order, except
    that ``image`` goes before ``text`` (the two-modality projector's order, whatever the
    declared one: the random directions are drawn in it and the signs follow its first).
    M >= 3: the top-k left singular vectors of ``B_m = [w_j C_mj, j != m]`` (float64), the
    k-or-ratio rule applied to each ``B_m``'s singular values; random directions (the
    ablation control) drawn for the modalities in the given order from one generator.
    """
    names = list(embeddings)
    check_names(names)
    if len(names) == 2:
        a, b = ("image", "text") if set(names) == {"image", "text"} else names
        ua, ub, _ = shared_directions(embeddings[a], embeddings[b], options)
        return {a: ua, b: ub}
    x = {m: e.detach().double() for m, e in embeddings.items()}  # (N, d_m)
    n = next(iter(x.values())).shape[0]
    if options.center:
        x = {m: v - v.mean(0) for m, v in x.items()}
    weights = {}
    for m, v in x.items():
        trace = float(v.square().sum()) / n  # trace of the covariance (or raw second moment)
        if not trace > 0:
            raise ValueError(f"modality {m!r} has zero variance over the {n} items: it shares nothing to remove")
        weights[m] = trace ** -0.5
    rng = np.random.default_rng(options.seed)
    out = {}
    for m in names:
        B = torch.cat([weights[j] * (x[m].T @ x[j]) / n for j in names if j != m], dim=1)  # (d_m, sum d_j)
        U, s, _ = torch.linalg.svd(B, full_matrices=False)
        idx = U.abs().argmax(0)
        U = U * torch.where(U[idx, torch.arange(U.shape[1], device=U.device)] < 0, -1.0, 1.0).to(U)
        k = options.rank(s.cpu().numpy())
        if options.directions == "random":
            U = torch.from_numpy(random_orthonormal(B.shape[0], k, rng)).to(U)
        out[m] = U[:, :k].to(embeddings[m].dtype)
    return out


def _project_torch(E: Tensor, U: Tensor, strength: float, mean: Tensor | None = None) -> Tensor:
    """``E - strength ((E - mean) U) U^T`` (``mean`` None: raw projection) -> (N, d)."""
    coef = E @ U  # (N, k)
    if mean is not None:
        coef = coef - mean @ U
    return E - strength * coef @ U.T  # (N, d)
