"""Pop: every user gets the items most interacted with in training."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Backbone
from .graph import bpr_loss


class Pop(Backbone):
    r"""Most-popular baseline: ``score(u, i) = n_i``, the number of distinct training users of item ``i``.

    As vectors: user vectors are ``1`` (U, 1), item vectors ``n_i`` (I, 1), so ``score = dot``
    and every user gets the same ranking (their own training items masked by the evaluator).
    Nothing is trained: the trainer ranks it once. :meth:`loss` is the BPR loss of these fixed
    scores (no gradient). CLEAR does not apply (no features).

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs; duplicate pairs count once.
    """

    uses_graph = True

    def __init__(self, num_users: int, num_items: int, edge_index: Tensor):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        key = torch.unique(edge_index[0].long() * num_items + edge_index[1].long())
        counts = torch.bincount(key % num_items, minlength=num_items).to(torch.float32)
        self.register_buffer("popularity", counts[:, None])  # (I, 1)
        self.register_buffer("ones", torch.ones(num_users, 1), persistent=False)  # (U, 1)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the popularity counts are data."""

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.ones, self.popularity

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        pop = self.popularity[:, 0]
        return bpr_loss(pop[pos_items], pop[neg_items])

    def hparams(self) -> dict[str, Any]:
        return {}
