"""LightGCN: the ID-only graph reference backbone."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Backbone
from .graph import bpr_loss, emb_norm, layer_mean, user_item_graph


class LightGCN(Backbone):
    r"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
    Recommendation", SIGIR 2020).

    Users and items are the nodes of one bipartite graph with symmetric-normalised adjacency
    :math:`\hat A = D^{-1/2} A D^{-1/2}`. Embeddings are propagated without weights or
    non-linearities and averaged over layers:

    .. math::
        E^{(l+1)} = \hat A E^{(l)}, \qquad E = \frac{1}{L+1} \sum_{l=0}^{L} E^{(l)}

    and ``score(u, i) = e_u . e_i``. Loss: BPR on the final embeddings plus
    ``reg * emb_norm`` of the batch's layer-0 (ego) embeddings.

    Args:
        num_users: number of users ``U``.
        num_items: number of items ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        embedding_dim: ``d``.
        layers: ``L``, propagation steps.
        reg: weight of the ego-embedding regulariser.
    """

    uses_graph = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        embedding_dim: int = 64,
        layers: int = 3,
        reg: float = 1e-4,
    ):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.reg = embedding_dim, layers, reg
        self.embedding = nn.Parameter(torch.empty(num_users + num_items, embedding_dim))  # (U+I, d), users first
        self.register_buffer("adj", user_item_graph(edge_index[0], edge_index[1], num_users, num_items), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform, separately for the user and the item table (as two embedding tables)."""
        with torch.no_grad():
            nn.init.xavier_uniform_(self.embedding[: self.num_users])
            nn.init.xavier_uniform_(self.embedding[self.num_users :])

    def propagate(self) -> Tensor:
        """Layer-averaged embeddings of all nodes -> (U+I, d)."""
        return layer_mean(self.adj, self.embedding, self.layers)

    def forward(self) -> tuple[Tensor, Tensor]:
        out = self.propagate()
        return out[: self.num_users], out[self.num_users :]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        nodes = torch.cat([users, pos_items + self.num_users, neg_items + self.num_users])  # (3B,)
        u, p, n = self.propagate()[nodes].chunk(3)  # (B, d) each
        loss = bpr_loss((u * p).sum(1), (u * n).sum(1))
        if self.reg > 0:
            loss = loss + self.reg * emb_norm(*self.embedding[nodes].chunk(3))
        return loss

    def hparams(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "layers": self.layers, "reg": self.reg}
