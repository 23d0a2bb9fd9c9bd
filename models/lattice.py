"""LATTICE: item-item structure learned from the modality features, mixed with the original kNN graph."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, ModalityHook
from .graph import (
    bpr_loss,
    check_features,
    half_sq_norm,
    knn_cosine,
    layer_mean,
    propagate_edges,
    self_loop_rw_graph,
    sparse_csr,
    spmm,
    sym_normalize,
    transpose_csr,
)


class LATTICE(Backbone):
    r"""LATTICE (Zhang et al., "Mining Latent Structures for Multimedia Recommendation", ACM MM 2021).

    For each modality ``m`` with features :math:`x_m` (trainable) and projection
    :math:`\tilde x_m = W_m x_m + b_m`:

    .. math::
        S_m = \mathrm{kNN}_k(\cos(\tilde x_m)), \quad
        S^0_m = \mathcal{L}(\mathrm{kNN}_k(\cos(x_m))), \quad
        \mathcal{L}(S) = D^{-1/2} S D^{-1/2}

    (the kNN graphs keep their cosine values; :math:`S^0_m` is frozen, built once from the
    input features). With :math:`w = \mathrm{softmax}(\alpha)` over the modalities:

    .. math::
        A = (1 - \lambda)\, \mathcal{L}\big(\textstyle\sum_m w_m S_m\big)
            + \lambda \textstyle\sum_m w_m S^0_m, \qquad h = A^{L_m} e^{id}_i

    User and item vectors: the mean over ``l = 0..L`` of :math:`\hat A^l [E_u; E^{id}_i]` with
    LATTICE's user-item adjacency :math:`\hat A = D^{-1}(A_{ui} + I)`, the items plus
    :math:`h / \lVert h \rVert`. Loss: BPR + ``reg_weight`` * (half the squared norms of the
    batch's final vectors) / B.

    Where the reference (MMRec ``src/models/lattice.py``, ``cf_model: lightgcn``) differs from
    the paper we follow it: the learned graph is rebuilt with gradient only in the first batch
    of each epoch (later batches use it detached; :meth:`pre_epoch` arms the rebuild), and at
    every evaluation; the input features are trainable; the mixing weights :math:`\alpha`
    start equal (0.5 each). The reference's regulariser divides by the configured batch size,
    ours by the actual one (they differ on an epoch's last batch only). Its yaml decays the
    learning rate (``learning_rate_scheduler: [0.96, 50]``): ``train.lr_decay`` defaults to
    0.96 for it.

    Any number of modalities: one projection, one learned and one frozen graph and one
    mixing weight per modality (with exactly ``image`` + ``text`` this is the reference's
    ``v_feat`` / ``t_feat`` form; with one, ``w = 1``). CLEAR: in static mode the given
    features (and so :math:`S^0_m`) are the projected ones; in dynamic mode the hook projects
    the learned-graph inputs :math:`\{m: \tilde x_m\}` (refit in :meth:`pre_epoch`).

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) float features; zero rows mean "no vector".
        embedding_dim: ``d`` of the user / item ID embeddings.
        feat_embed_dim: size of the projections :math:`\tilde x_m` the learned graphs come from.
        layers: ``L``, propagation steps on the user-item graph (the reference's ``weight_size`` length).
        mm_layers: ``L_m``, propagation steps on the item-item graph (``n_layers``).
        knn_k: neighbours per item in every kNN graph.
        lambda_coeff: :math:`\lambda`, share of the frozen graph in ``A``.
        reg_weight: weight of the batch regulariser.
        trainable_features: let Adam update the input features (reference: True).
        modality_hook: CLEAR's dynamic mode (see above); needs two modalities.
    """

    uses_graph = True
    uses_features = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        features: Mapping[str, Tensor] | None = None,
        embedding_dim: int = 64,
        feat_embed_dim: int = 64,
        layers: int = 2,
        mm_layers: int = 1,
        knn_k: int = 10,
        lambda_coeff: float = 0.9,
        reg_weight: float = 0.0,
        trainable_features: bool = True,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        feats = check_features(features, num_items, "LATTICE", modality_hook)
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.feat_embed_dim = embedding_dim, feat_embed_dim
        self.layers, self.mm_layers, self.knn_k = layers, mm_layers, knn_k
        self.lambda_coeff, self.reg_weight, self.trainable_features = lambda_coeff, reg_weight, trainable_features
        self.modality_hook = modality_hook
        self.modalities = list(feats)

        frozen = [knn_cosine(x, knn_k) for x in feats.values()]  # S^0_m before normalisation
        self.register_buffer("frozen_rows", torch.cat([g[0] for g in frozen]), persistent=False)  # (E0,)
        self.register_buffer("frozen_cols", torch.cat([g[1] for g in frozen]), persistent=False)
        self.register_buffer("frozen_values", torch.cat([sym_normalize(*g, num_items) for g in frozen]), persistent=False)
        self.register_buffer("frozen_modality", torch.cat([torch.full_like(g[0], j) for j, g in enumerate(frozen)]),
                             persistent=False)

        self.user_embedding = nn.Parameter(torch.empty(num_users, embedding_dim))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.features = nn.ParameterDict(
            {m: nn.Parameter(x.clone(), requires_grad=trainable_features) for m, x in feats.items()})
        self.trs = nn.ModuleDict({m: nn.Linear(x.shape[1], feat_embed_dim) for m, x in feats.items()})
        self.modal_weight = nn.Parameter(torch.empty(len(feats)))  # alpha, (M,)

        adj = self_loop_rw_graph(edge_index[0].long(), edge_index[1].long(), num_users, num_items)
        self.register_buffer("adj", adj, persistent=False)
        self.register_buffer("adj_t", transpose_csr(adj), persistent=False)
        self._epoch_graph: tuple[Tensor, Tensor] | None = None  # detached (A, A^T) for the epoch's later batches
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        for trs in self.trs.values():
            trs.reset_parameters()
        with torch.no_grad():
            self.modal_weight.fill_(0.5)
        self._epoch_graph = None

    def encoded_features(self) -> dict[str, Tensor]:
        """``{m: W_m x_m + b_m}`` for all items, (I, feat_embed_dim) each: the learned graphs' inputs."""
        return {m: self.trs[m](self.features[m]) for m in self.modalities}

    def item_graph(self) -> tuple[Tensor, Tensor, Tensor]:
        """The item-item matrix ``A`` as an edge list ``(rows, cols, values)`` (duplicates sum), values with gradient."""
        encoded = self.encoded_features()
        if self.modality_hook is not None:
            encoded = self.modality_hook(encoded)
        w = torch.softmax(self.modal_weight, dim=0)  # (M,)
        parts = [knn_cosine(encoded[m], self.knn_k) for m in self.modalities]
        rows = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        learned = torch.cat([p[2] * w[j] for j, p in enumerate(parts)])
        learned = (1.0 - self.lambda_coeff) * sym_normalize(rows, cols, learned, self.num_items)
        frozen = self.lambda_coeff * w[self.frozen_modality] * self.frozen_values
        return (torch.cat([rows, self.frozen_rows]), torch.cat([cols, self.frozen_cols]),
                torch.cat([learned, frozen]))

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """Arm the rebuild of the learned graph for the epoch's first batch (and CLEAR's dynamic refit)."""
        if self.modality_hook is not None:
            with torch.no_grad():
                self.modality_hook.refit(self.encoded_features())
        self._epoch_graph = None

    def _item_side(self) -> Tensor:
        """``h = A^{L_m} e^{id}`` -> (I, d), rebuilding ``A`` unless a training batch already built it this epoch."""
        h = self.item_embedding
        if self.training and self._epoch_graph is not None:
            a, a_t = self._epoch_graph
            for _ in range(self.mm_layers):
                h = spmm(a, h, a_t)
            return h
        rows, cols, vals = self.item_graph()
        if self.training:
            a = sparse_csr(rows, cols, vals.detach(), (self.num_items, self.num_items))
            self._epoch_graph = (a, transpose_csr(a))
        for _ in range(self.mm_layers):
            h = propagate_edges(rows, cols, vals, h, self.num_items)
        return h

    def forward(self) -> tuple[Tensor, Tensor]:
        h = self._item_side()
        ego = torch.cat([self.user_embedding, self.item_embedding])  # (U+I, d)
        out = layer_mean(self.adj, ego, self.layers, self.adj_t)
        return out[: self.num_users], out[self.num_users :] + F.normalize(h, dim=1)

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        user_vecs, item_vecs = self.forward()
        u, p, n = user_vecs[users], item_vecs[pos_items], item_vecs[neg_items]  # (B, d) each
        loss = bpr_loss((u * p).sum(1), (u * n).sum(1))
        if self.reg_weight > 0:
            loss = loss + self.reg_weight * half_sq_norm(u, p, n)
        return loss

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "feat_embed_dim": self.feat_embed_dim,
            "layers": self.layers,
            "mm_layers": self.mm_layers,
            "knn_k": self.knn_k,
            "lambda_coeff": self.lambda_coeff,
            "reg_weight": self.reg_weight,
            "trainable_features": self.trainable_features,
            "modalities": list(self.modalities),
        }
