"""CLEAR's dynamic mode as a module a backbone holds: refit once per epoch, project every step.

:class:`DynamicClear` is the ``modality_hook`` of VBPR and FREEDOM when
``project.mode = "dynamic"``. The backbone's ``pre_epoch`` calls :meth:`DynamicClear.refit`
on its encoded modality embeddings ``(W_v x_v, W_t x_t)`` for every item: the shared
directions ``U_k``, ``W_k`` of their cross-covariance are recomputed (SVD without gradient).
Every training step and every evaluation then projects the embeddings with the directions
of the last refit, ``E - lambda (E U_k) U_k^T`` (differentiable in ``E``, not in ``U_k``).

The directions and the means are buffers, so they are saved with the model, restored with
the best epoch's weights and used unchanged at serving time: a new item's content vector
gets exactly the projection the catalog's items got.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .clear import Directions, check_options, shared_directions

_BUFFERS = ("visual_dirs", "text_dirs", "visual_mean", "text_mean")


class DynamicClear(nn.Module):
    """Per-epoch CLEAR refit on a backbone's modality embeddings; see the module doc.

    Args are those of :class:`clearrec.models.clear.ClearProjector`: ``k`` or ``ratio``
    (exactly one), ``strength`` (lambda), ``center`` (centre before the covariance),
    ``project_centered`` (project ``E - mean`` and add the mean back), ``visual`` / ``text``
    (which sides are projected), ``directions`` (``"random"``: the control) and ``seed``.
    """

    def __init__(
        self,
        k: int | None = None,
        ratio: float | None = None,
        strength: float = 1.0,
        center: bool = True,
        project_centered: bool = False,
        visual: bool = True,
        text: bool = True,
        directions: Directions = "shared",
        seed: int = 0,
    ):
        super().__init__()
        check_options(k, ratio, strength, directions)
        self.k, self.ratio, self.strength = k, ratio, strength
        self.center, self.project_centered = center, project_centered
        self.visual, self.text = visual, text
        self.directions, self.seed = directions, seed
        for name in _BUFFERS:  # empty until the first refit; sized by refit or by a loaded state
            self.register_buffer(name, torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.visual_dirs.numel() > 0

    @torch.no_grad()
    def refit(self, ev: Tensor, et: Tensor) -> None:
        """Recompute the shared directions from ``ev (N, dv)``, ``et (N, dt)`` (no gradient)."""
        uk, wk, _ = shared_directions(ev, et, self.k, self.ratio, self.center, self.directions, self.seed)
        self.visual_dirs, self.text_dirs = uk.detach().clone(), wk.detach().clone()  # (dv, k), (dt, k)
        self.visual_mean, self.text_mean = ev.detach().mean(0), et.detach().mean(0)  # (dv,), (dt,)

    def forward(self, ev: Tensor, et: Tensor) -> tuple[Tensor, Tensor]:
        """Project ``(ev, et)`` with the last refit's directions (fit on these first if never fit)."""
        if not self.fitted:
            self.refit(ev, et)
        mv = self.visual_mean if self.project_centered else None
        mt = self.text_mean if self.project_centered else None
        return (_project_torch(ev, self.visual_dirs, self.strength, mv) if self.visual else ev,
                _project_torch(et, self.text_dirs, self.strength, mt) if self.text else et)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in _BUFFERS:  # take the saved shapes (k is known only after a refit)
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (f"k={self.k}, ratio={self.ratio}, strength={self.strength}, center={self.center}, "
                f"project_centered={self.project_centered}, visual={self.visual}, text={self.text}, "
                f"directions={self.directions!r}")


def _project_torch(E: Tensor, U: Tensor, strength: float, mean: Tensor | None = None) -> Tensor:
    """``E - strength ((E - mean) U) U^T`` (``mean`` None: raw projection) -> (N, d)."""
    coef = E @ U  # (N, k)
    if mean is not None:
        coef = coef - mean @ U
    return E - strength * coef @ U.T  # (N, d)
