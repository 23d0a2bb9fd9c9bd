"""What every recommender offers: vectors whose dot product is the score, a loss, top-k."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Protocol

import torch
from torch import Tensor, nn

from .metrics import ItemSets, topk_items

class ModalityHook(Protocol):
    """A transform of a backbone's encoded modality embeddings (CLEAR's dynamic mode).

    The backbone calls :meth:`refit` with its encoded embeddings of every item by modality
    name (``{name: (I, d_m)}``, two modalities or more) once per epoch (in ``pre_epoch``, without
    gradient) and the hook itself wherever the embeddings are used; the call returns the
    transformed embeddings under the same names. Gradients flow through the call, not
    through the refit.
    """

    def refit(self, embeddings: Mapping[str, Tensor]) -> None: ...

    def __call__(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]: ...


class Backbone(nn.Module):
    """Base class of the backbones.

    Subclasses implement :meth:`forward` (``(user_vectors (U, d'), item_vectors (I, d'))`` with
    ``score(u, i) = user_vectors[u] @ item_vectors[i]``) and :meth:`loss` (the training loss of a
    batch of ``(user, positive item, negative item)`` triples). ``uses_graph`` /
    ``uses_features`` say which constructor inputs the class takes (``edge_index``;
    ``features``, a mapping modality name -> (I, d_m)). No training loop, sampling or file I/O here.
    """

    uses_graph: ClassVar[bool] = False
    uses_features: ClassVar[bool] = False

    num_users: int
    num_items: int

    def forward(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        raise NotImplementedError

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """Called once before each training epoch (e.g. FREEDOM's edge pruning). Default: nothing."""

    def content_pathway(self) -> nn.Module | None:
        """The module that embeds new items from their features alone, or None (no cold-start pathway).

        It must load and run on its own (serving builds it without the rest of the model).
        """
        return None

    def hparams(self) -> dict[str, Any]:
        """The plain constructor arguments (no tensors), for the checkpoint's JSON."""
        raise NotImplementedError

    @torch.no_grad()
    def vectors(self) -> tuple[Tensor, Tensor]:
        """Evaluation-mode ``(user_vectors, item_vectors)``; restores the previous train/eval mode."""
        was_training = self.training
        self.eval()
        try:
            users, items = self.forward()
        finally:
            self.train(was_training)
        return users.detach(), items.detach()

    @torch.no_grad()
    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of (B,) user and (B,) item index pairs -> (B,)."""
        u, i = self.vectors()
        return (u[users] * i[items]).sum(dim=1)

    @torch.no_grad()
    def full_scores(self, users: Tensor) -> Tensor:
        """Scores of (B,) users against every item -> (B, num_items)."""
        u, i = self.vectors()
        return u[users] @ i.T

    @torch.no_grad()
    def recommend(self, users: Tensor, k: int, exclude: ItemSets | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` items for (B,) users, items in ``exclude`` (e.g. training items) left out.

        Returns ``(scores (B, k), items (B, k))``, best first; ``-1`` / ``-inf`` where fewer than
        ``k`` items are left.
        """
        u, i = self.vectors()
        return topk_items(u, i, users, k, exclude)
