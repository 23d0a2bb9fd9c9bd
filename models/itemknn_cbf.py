"""ItemKNN-CBF: a user's score for an item is its content similarity to the user's training items."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import Backbone
from .graph import bpr_loss, check_features, sparse_csr


class ItemKNNCBF(Backbone):
    r"""Content-based item kNN (the baseline of Dacrema et al., "Are We Really Making Much Progress?
    A Worrying Analysis of Recent Neural Recommendation Approaches", RecSys 2019).

    Items are described by the concatenation :math:`x_i = [x^{m_1}_i; x^{m_2}_i; \dots]` of
    their features over the declared modalities (sorted by name: ``[image; text]`` as the
    reference's ``[v_feat; t_feat]``). With the shrunk cosine

    .. math::
        s_{ij} = \frac{x_i \cdot x_j}{\lVert x_i \rVert \lVert x_j \rVert + \mathrm{shrink}}, \qquad
        W_{ij} = s_{ij} \ \text{if } j \in \mathrm{top}_k(s_{i\cdot}) \text{ else } 0

    (each row keeps its ``knn_k`` largest entries, the item itself included as in the
    reference MMRec ``src/models/itemknncbf.py``), the score is
    :math:`\mathrm{score}(u, j) = \sum_{i \in R_u} W_{ij} = (R W)_{uj}`.

    As vectors: user vectors are the rows of the 0/1 training matrix ``R`` (U, I) and item
    vectors the columns of ``W`` (I, I), so ``score = dot`` holds exactly; both are dense in
    :meth:`forward`, O((U + I) I) memory, meant for catalogs of up to some ten thousand items.
    Items without a vector (zero rows) have zero similarity to everything. Nothing is trained
    (the trainer ranks it once); :meth:`loss` is the BPR loss of the fixed scores. CLEAR's static
    mode applies (pass the projected features); there is no learned modality embedding for
    the dynamic mode.

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs; duplicates count once.
        features: modality name -> (I, d_m) features, at least one.
        knn_k: neighbours kept per item (reference grid ``[10]``).
        shrink: the similarity's shrink term (reference grid ``[10]``).
        block: rows of the similarity matrix computed at once.
    """

    uses_graph = True
    uses_features = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        features: Mapping[str, Tensor] | None = None,
        knn_k: int = 10,
        shrink: float = 10.0,
        block: int = 2048,
    ):
        super().__init__()
        if knn_k < 1 or shrink < 0:
            raise ValueError(f"ItemKNN-CBF needs knn_k >= 1 and shrink >= 0, got knn_k={knn_k}, shrink={shrink}")
        feats = dict(sorted(check_features(features, num_items, "ItemKNN-CBF").items()))  # by name: image, text
        self.num_users, self.num_items = num_users, num_items
        self.knn_k, self.shrink, self.modalities = knn_k, float(shrink), list(feats)
        x = torch.cat(list(feats.values()), dim=1)  # (I, sum d_m)
        key = torch.unique(edge_index[0].long() * num_items + edge_index[1].long())
        ones = torch.ones(key.numel())
        self.register_buffer("interactions", sparse_csr(key // num_items, key % num_items, ones, (num_users, num_items)),
                             persistent=False)  # R (U, I)
        self.register_buffer("similarity", self.knn_similarity(x, knn_k, self.shrink, block), persistent=False)  # W (I, I)

    @staticmethod
    def knn_similarity(x: Tensor, k: int, shrink: float, block: int = 2048) -> Tensor:
        """The row-wise top-``k`` shrunk cosine matrix ``W`` of (I, d) features -> CSR (I, I)."""
        n = x.shape[0]
        k = min(k, n)
        norms = x.norm(dim=1)  # (I,)
        rows, cols, vals = [], [], []
        for start in range(0, n, block):
            stop = min(start + block, n)
            sim = (x[start:stop] @ x.T).div_((norms[start:stop, None] * norms[None, :]).add_(shrink).clamp_min_(1e-12))
            top = sim.topk(k, dim=1)  # (b, k)
            rows.append(torch.arange(start, stop).repeat_interleave(k))
            cols.append(top.indices.reshape(-1))
            vals.append(top.values.reshape(-1))
        return sparse_csr(torch.cat(rows), torch.cat(cols), torch.cat(vals), (n, n))

    def reset_parameters(self) -> None:
        """Nothing to initialise: ``R`` and ``W`` are data."""

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.interactions.to_dense(), self.similarity.to_dense().T.contiguous()  # (U, I), (I, I)

    @torch.no_grad()
    def full_scores(self, users: Tensor) -> Tensor:
        """``(R W)[users]`` -> (B, I), without the dense vectors."""
        rows = torch.index_select(self.interactions.to_sparse_coo(), 0, users)  # (B, I) sparse
        return torch.sparse.mm(rows, self.similarity.to_dense())

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        scores = self.full_scores(users)  # (B, I)
        b = torch.arange(users.numel(), device=users.device)
        return bpr_loss(scores[b, pos_items], scores[b, neg_items])

    def hparams(self) -> dict[str, Any]:
        return {"knn_k": self.knn_k, "shrink": self.shrink, "modalities": self.modalities}
