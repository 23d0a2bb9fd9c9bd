"""MGCN: behaviour-guided purification of modality features, item-item views and attention fusion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import Backbone, ModalityHook
from .graph import (
    check_features,
    content_side_loss,
    knn_cosine,
    layer_mean,
    sparse_csr,
    spmm,
    sym_normalize,
    transpose_csr,
    user_item_block,
    user_item_graph,
)


def _gate(dim: int) -> nn.Sequential:
    """``sigmoid(W x + b)``, (N, dim) -> (N, dim)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())


class ContentSideBackbone(Backbone):
    """What MGCN and SMORE share (SMORE's reference is built on MGCN's code).

    Both hold ``user_embedding`` / ``item_embedding``, per-modality linear maps ``trs`` of the
    item ``features``, gates ``gate`` / ``prefer`` and attention ``query`` modules, and define
    :meth:`views` (``e^{id}`` and the modality views of all nodes, (U+I, d) each, users first) and
    :meth:`fuse`, which makes ``e^{s}`` from them row by row. Scores use ``e^{id} + e^{s}``; the loss
    is :func:`~clearrec.models.graph.content_side_loss` over the two, on the batch's rows only.
    """

    uses_graph = True
    uses_features = True

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        for module in (self.trs, self.gate, self.prefer, self.query):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()

    def encoded_features(self) -> dict[str, Tensor]:
        """``{m: W_m x_m + b_m}`` for all items, (I, d) each: the input of CLEAR's dynamic mode."""
        return {m: self.trs[m](self.features[m]) for m in self.modalities}

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """CLEAR's dynamic refit (nothing else changes between epochs)."""
        if self.modality_hook is not None:
            with torch.no_grad():
                self.modality_hook.refit(self.encoded_features())

    def views(self) -> tuple[Tensor, list[Tensor]]:
        """``e^{id}`` and the modality views of all nodes, (U+I, d) each (users first): what :meth:`fuse`
        turns into ``e^s`` row by row."""
        raise NotImplementedError

    def fuse(self, content: Tensor, views: list[Tensor]) -> Tensor:
        """``e^s`` of some nodes from their rows of ``e^{id}`` and of the views (the same rows in each)."""
        raise NotImplementedError

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """``(e^{id}, e^{s})`` of all nodes, (U+I, d) each (users first)."""
        content, views = self.views()
        return content, self.fuse(content, views)

    def forward(self) -> tuple[Tensor, Tensor]:
        content, side = self.embeddings()
        out = content + side
        return out[: self.num_users], out[self.num_users :]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        """:func:`~clearrec.models.graph.content_side_loss`, with ``e^s`` fused only for the batch's distinct
        users and items (the fusion is row-wise, and the loss reads no other rows)."""
        content, views = self.views()
        b = len(users)
        rows, at = torch.unique(torch.cat([users, pos_items + self.num_users, neg_items + self.num_users]),
                                return_inverse=True)  # at: each batch entry's place among ``rows``
        content = content[rows]
        side = self.fuse(content, [v[rows] for v in views])
        return content_side_loss(content, side, 0, at[:b], at[b : 2 * b], at[2 * b :], self.reg_weight,
                                 self.cl_weight, self.temperature)


class MGCN(ContentSideBackbone):
    r"""MGCN (Yu et al., "Multi-View Graph Convolutional Network for Multimedia Recommendation",
    ACM MM 2023).

    With ID embeddings :math:`E_u, E_i`, the symmetric-normalised user-item adjacency
    :math:`\hat A` and its user -> item block :math:`R`, and for each modality ``m`` the
    frozen weighted kNN graph :math:`S_m = D^{-1/2} \mathrm{kNN}_k(\cos(x_m)) D^{-1/2}`:

    .. math::
        \tilde x_m = W_m x_m + b_m, \qquad
        \dot e_m = E_i \odot \sigma(G_m \tilde x_m + g_m)
        \quad \text{(behaviour-guided purifier)}

        \bar e_{m,i} = S_m^{L_m} \dot e_m, \quad \bar e_{m,u} = R\, \bar e_{m,i}, \quad
        \bar e_m = [\bar e_{m,u}; \bar e_{m,i}]

        e^{id} = \mathrm{mean}_{l=0..L} \hat A^l [E_u; E_i]

        \alpha = \mathrm{softmax}_m(q^T \tanh(Q \bar e_m + c)), \quad
        e^{c} = \textstyle\sum_m \alpha_m \bar e_m, \quad
        e^{s} = \frac{1}{M+1}\big(e^{c} + \textstyle\sum_m \sigma(P_m e^{id} + p_m) \odot (\bar e_m - e^{c})\big)

    User and item vectors :math:`e^{id} + e^{s}`. Loss: BPR + ``reg_weight`` * (half the
    squared norms of the batch's vectors) / B + ``cl_weight`` * (InfoNCE(e^s, e^{id}) over the
    batch's positive items + over its users, temperature ``temperature``).

    We follow the reference (MMRec ``src/models/mgcn.py``), which the paper leaves open on: the
    kNN graphs keep their cosine values (sym-normalised by their row sums), the input
    features are trainable, and the InfoNCE uses the batch as negatives. The reference's
    regulariser divides by the configured batch size, ours by the actual one (they differ on
    an epoch's last batch only). Its yaml decays the learning rate
    (``learning_rate_scheduler: [0.96, 50]``): ``train.lr_decay`` defaults to 0.96 for it.

    Any number of modalities: one purifier gate, one kNN graph and one preference gate per
    modality, the attention ``softmax`` over all of them and the side view averaged over
    ``M + 1`` terms (``/ 3`` for the reference's image + text, its ``v_feat`` / ``t_feat``).
    CLEAR: in static mode the given features (and so the kNN graphs) are the projected ones;
    in dynamic mode the hook projects :math:`\{m: \tilde x_m\}` before the purifier gates
    (refit in :meth:`pre_epoch`).

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) float features; zero rows mean "no vector".
        embedding_dim: ``d``.
        layers: ``L``, propagation steps on the user-item graph (``n_ui_layers``).
        mm_layers: ``L_m``, propagation steps on each item-item graph (``n_layers``).
        knn_k: neighbours per item in the kNN graphs.
        reg_weight: weight of the batch regulariser.
        cl_weight: weight of the contrastive term (the reference's ``cl_loss``).
        temperature: InfoNCE temperature.
        trainable_features: let Adam update the input features (reference: True).
        modality_hook: CLEAR's dynamic mode (see above); needs two modalities.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        features: Mapping[str, Tensor] | None = None,
        embedding_dim: int = 64,
        layers: int = 2,
        mm_layers: int = 1,
        knn_k: int = 10,
        reg_weight: float = 1e-4,
        cl_weight: float = 1e-3,
        temperature: float = 0.2,
        trainable_features: bool = True,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        feats = check_features(features, num_items, "MGCN", modality_hook)
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.mm_layers, self.knn_k = embedding_dim, layers, mm_layers, knn_k
        self.reg_weight, self.cl_weight, self.temperature = reg_weight, cl_weight, temperature
        self.trainable_features = trainable_features
        self.modality_hook = modality_hook
        self.modalities = list(feats)
        d = embedding_dim

        for j, x in enumerate(feats.values()):
            rows, cols, vals = knn_cosine(x, knn_k)
            s = sparse_csr(rows, cols, sym_normalize(rows, cols, vals, num_items), (num_items, num_items))
            self.register_buffer(f"mm_adj_{j}", s, persistent=False)
            self.register_buffer(f"mm_adj_t_{j}", transpose_csr(s), persistent=False)

        self.user_embedding = nn.Parameter(torch.empty(num_users, d))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, d))  # (I, d)
        self.features = nn.ParameterDict(
            {m: nn.Parameter(x.clone(), requires_grad=trainable_features) for m, x in feats.items()})
        self.trs = nn.ModuleDict({m: nn.Linear(x.shape[1], d) for m, x in feats.items()})
        self.gate = nn.ModuleDict({m: _gate(d) for m in feats})
        self.prefer = nn.ModuleDict({m: _gate(d) for m in feats})
        self.query = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))

        users, items = edge_index[0].long(), edge_index[1].long()
        self.register_buffer("adj", user_item_graph(users, items, num_users, num_items), persistent=False)
        r, r_t = user_item_block(users, items, num_users, num_items)
        self.register_buffer("r", r, persistent=False)
        self.register_buffer("r_t", r_t, persistent=False)
        self.reset_parameters()

    def views(self) -> tuple[Tensor, list[Tensor]]:
        """``e^{id}`` and each modality's view ``[R h_m; h_m]`` with ``h_m = S_m^{L_m} (E_i * gate_m)``,
        (U+I, d) each."""
        encoded = self.encoded_features()
        if self.modality_hook is not None:
            encoded = self.modality_hook(encoded)
        views = []
        for j, m in enumerate(self.modalities):
            h = self.item_embedding * self.gate[m](encoded[m])  # (I, d), purified
            for _ in range(self.mm_layers):
                h = spmm(getattr(self, f"mm_adj_{j}"), h, getattr(self, f"mm_adj_t_{j}"))
            views.append(torch.cat([spmm(self.r, h, self.r_t), h]))
        content = layer_mean(self.adj, torch.cat([self.user_embedding, self.item_embedding]), self.layers)
        return content, views

    def fuse(self, content: Tensor, views: list[Tensor]) -> Tensor:
        """The behaviour-aware fuser: ``e^s`` of some nodes (n, d) from their ``e^{id}`` and modality views."""
        att = torch.softmax(torch.cat([self.query(v) for v in views], dim=1), dim=1)  # (n, M)
        common = sum(att[:, j : j + 1] * v for j, v in enumerate(views))
        side = common
        for m, v in zip(self.modalities, views):
            side = side + self.prefer[m](content) * (v - common)
        return side / (len(views) + 1)

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "layers": self.layers,
            "mm_layers": self.mm_layers,
            "knn_k": self.knn_k,
            "reg_weight": self.reg_weight,
            "cl_weight": self.cl_weight,
            "temperature": self.temperature,
            "trainable_features": self.trainable_features,
            "modalities": list(self.modalities),
        }
