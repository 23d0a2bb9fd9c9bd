"""CLEAR's dynamic mode as a module a backbone holds: refit once per epoch, project every step.

:class:`DynamicClear` is the ``modality_hook`` of VBPR and FREEDOM when CLEAR runs in
dynamic mode. The backbone's ``pre_epoch`` calls :meth:`DynamicClear.refit` on its encoded
modality embeddings ``{"image": W_v x_v, "text": W_t x_t}`` for every item: the shared
directions ``U_k``, ``W_k`` of their cross-covariance are recomputed (SVD without gradient).
Every training step and every evaluation then projects the embeddings with the directions
of the last refit, ``E - lambda (E U_k) U_k^T`` (differentiable in ``E``, not in ``U_k``).

The directions and the means are buffers, so they are saved with the model, restored with
the best epoch's weights and used unchanged at serving time: a new item's content vector
gets exactly the projection the catalog's items got.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .clear import ClearOptions, shared_directions

_BUFFERS = ("visual_dirs", "text_dirs", "visual_mean", "text_mean")
VISUAL, TEXT = "image", "text"  # the modality names whose embeddings the hook projects


class DynamicClear(nn.Module):
    """Per-epoch CLEAR refit on a backbone's modality embeddings; see the module doc.

    Args:
        options: the CLEAR settings (:class:`clearrec.models.clear.ClearOptions`), as for the
            static projector: ``k`` or ``ratio``, ``strength``, ``center``, ``project_centered``,
            ``visual`` / ``text`` (which sides are projected), ``directions`` and ``seed``.
    """

    def __init__(self, options: ClearOptions | None = None):
        super().__init__()
        self.options = options if options is not None else ClearOptions()
        for name in _BUFFERS:  # empty until the first refit; sized by refit or by a loaded state
            self.register_buffer(name, torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.visual_dirs.numel() > 0

    @torch.no_grad()
    def refit(self, embeddings: Mapping[str, Tensor]) -> None:
        """Recompute the shared directions from ``{"image": (N, dv), "text": (N, dt)}`` (no gradient)."""
        ev, et = _pair(embeddings)
        uk, wk, _ = shared_directions(ev, et, self.options)
        # (dv, k), (dt, k), contiguous as a loaded state is, so that reloaded scores are bit-identical
        self.visual_dirs, self.text_dirs = uk.detach().contiguous().clone(), wk.detach().contiguous().clone()
        self.visual_mean, self.text_mean = ev.detach().mean(0), et.detach().mean(0)  # (dv,), (dt,)

    def forward(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Project the embeddings with the last refit's directions (fit on these first if never fit)."""
        if not self.fitted:
            self.refit(embeddings)
        ev, et = _pair(embeddings)
        opts = self.options
        mv = self.visual_mean if opts.project_centered else None
        mt = self.text_mean if opts.project_centered else None
        return {VISUAL: _project_torch(ev, self.visual_dirs, opts.strength, mv) if opts.visual else ev,
                TEXT: _project_torch(et, self.text_dirs, opts.strength, mt) if opts.text else et}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in _BUFFERS:  # take the saved shapes (k is known only after a refit)
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return repr(self.options)


def _pair(embeddings: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    if set(embeddings) != {VISUAL, TEXT}:
        raise ValueError(f"dynamic CLEAR projects exactly the {VISUAL!r} and {TEXT!r} embeddings; "
                         f"got {sorted(embeddings)}")
    return embeddings[VISUAL], embeddings[TEXT]


def _project_torch(E: Tensor, U: Tensor, strength: float, mean: Tensor | None = None) -> Tensor:
    """``E - strength ((E - mean) U) U^T`` (``mean`` None: raw projection) -> (N, d)."""
    coef = E @ U  # (N, k)
    if mean is not None:
        coef = coef - mean @ U
    return E - strength * coef @ U.T  # (N, d)
