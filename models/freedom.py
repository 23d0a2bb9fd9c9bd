"""FREEDOM: a frozen feature kNN item-item graph plus a degree-pruned user-item graph."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModalityHook, Backbone
from .graph import (
    bpr_loss,
    check_features,
    csr_mm,
    edge_norm,
    item_item_graph,
    layer_mean,
    prune_edges,
    sparse_csr,
    spmm,
    transpose_csr,
    user_item_graph,
)


class _FeatureMargin(torch.autograd.Function):
    """``m[b] = z[b] . (X[pos[b]] - X[neg[b]])`` for X (I, D), z (B, D) and (B,) item indices -> (B,).

    The same values and gradients as ``(z * (X[pos] - X[neg])).sum(1)`` under autograd, with less
    memory traffic for a wide trainable X (4096-d image features): the row difference is
    gathered in one pass (``embedding_bag`` with weights +1 / -1) and no (B, 2, D) copy of the
    rows is kept; ``dL/dX`` is written once by a sparse (I x B) @ z (B, D) product instead of
    zero-filling an (I, D) tensor and scattering rows into it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, pos: Tensor, neg: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        items = torch.stack([pos, neg], dim=1)  # (B, 2)
        signs = torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).expand(items.shape).contiguous()
        diff = F.embedding_bag(items, x, per_sample_weights=signs, mode="sum")  # (B, D)
        ctx.save_for_backward(diff, pos, neg, z)
        ctx.num_rows = x.shape[0]
        return torch.bmm(diff.unsqueeze(1), z.unsqueeze(2)).view(-1)  # (B,)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, Tensor | None]:  # type: ignore[override]
        diff, pos, neg, z = ctx.saved_tensors
        grad_x = grad_z = None
        if ctx.needs_input_grad[3]:
            grad_z = diff * grad.unsqueeze(1)  # (B, D)
        if ctx.needs_input_grad[0]:
            b = pos.shape[0]
            cols = torch.arange(b, device=pos.device).repeat(2)
            values = torch.cat([grad, -grad]).contiguous()
            scatter = sparse_csr(torch.cat([pos, neg]), cols, values, (ctx.num_rows, b))  # (I, B)
            grad_x = csr_mm(scatter, z)  # (I, D), every row written once
        return grad_x, None, None, grad_z


class FREEDOM(Backbone):
    r"""FREEDOM (Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
    Multimodal Recommendation", ACM MM 2023).

    1. A frozen item-item graph :math:`S = \sum_m w_m S_m`, where :math:`S_m` is the
       normalised cosine kNN graph (``knn_k`` neighbours) of modality ``m``'s input features,
       built once (or passed in as ``item_graph``); the weights :math:`w_m` are
       ``modality_weights`` normalised to sum 1 (see :func:`mixing_weights`: by default the
       reference's image 0.1 / text 0.9 when the modalities are exactly image and text,
       equal weights otherwise).
    2. Each epoch, degree-sensitive pruning keeps a ``1 - dropout`` share of the user-item edges,
       drawn without replacement with probability :math:`\propto 1/\sqrt{d_u d_i}`, and
       re-normalises them: :math:`\tilde A`. Evaluation uses the full graph :math:`\hat A`.
    3. :math:`[E_u; E_i] = \mathrm{mean}_{l=0..L} \tilde A^l [U; I]`, item vectors
       :math:`E_i + S^{L_m} I`, user vectors :math:`E_u`; ``score = dot``.
    4. Loss :math:`= \mathrm{BPR}(E_u, E_i) + \lambda \sum_m \mathrm{BPR}(E_u, W_m x_m)` over the
       modalities, with the raw features :math:`x_m` trainable if ``trainable_features``.

    Any number of modalities (one graph, one projection and one alignment term each); with
    exactly ``image`` + ``text`` and the default weights this is the reference's model.

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) features (one or more). Rows of zeros mean "no
            vector" (no kNN edges).
        embedding_dim: ``d`` of the ID embeddings and of the feature projections.
        layers: ``L``, LightGCN layers on the user-item graph.
        mm_layers: ``L_m``, propagation steps on the item-item graph.
        knn_k: neighbours per item in the item-item graph.
        modality_weights: modality name -> weight of its kNN graph in ``S`` (>= 0, positive sum,
            normalised to sum 1; exactly the modalities of ``features``); None or empty: the
            default rule above.
        dropout: share of user-item edges pruned each epoch.
        reg_weight: ``lambda``, weight of the feature-alignment BPR terms.
        trainable_features: let Adam update the input feature matrices (reference: True).
        item_graph: optional precomputed ``(rows, cols, values)`` of ``S`` (a cache).
        modality_hook: optional transform of the projected features ``{name: W_m x_m}`` before
            the alignment terms (CLEAR's dynamic mode, refit in :meth:`pre_epoch`); needs two
            modalities or more.
    """

    uses_graph = True
    uses_features = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        features: Mapping[str, Tensor],
        embedding_dim: int = 64,
        layers: int = 2,
        mm_layers: int = 1,
        knn_k: int = 10,
        modality_weights: Mapping[str, float] | None = None,
        dropout: float = 0.8,
        reg_weight: float = 1e-4,
        trainable_features: bool = True,
        item_graph: tuple[Tensor, Tensor, Tensor] | None = None,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        feats = check_features(features, num_items, "FREEDOM", modality_hook)
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.mm_layers = embedding_dim, layers, mm_layers
        self.knn_k, self.dropout = knn_k, dropout
        self.modality_weights = mixing_weights(list(feats), modality_weights)
        self.given_weights = dict(modality_weights or {})
        self.reg_weight, self.trainable_features = reg_weight, trainable_features
        self.modality_hook = modality_hook
        if item_graph is None:  # before the features are copied, to keep peak memory down
            item_graph = self.build_item_graph(feats, knn_k, modality_weights)

        self.user_embedding = nn.Parameter(torch.empty(num_users, embedding_dim))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.modalities = tuple(feats)
        self.proj = nn.ModuleDict()  # name -> W_m: (d_m) -> (d)
        for name, x in feats.items():
            if trainable_features:  # Adam updates it in place: never the caller's tensor
                setattr(self, f"{name}_features", nn.Parameter(x.clone()))
            else:
                self.register_buffer(f"{name}_features", x, persistent=False)
            self.proj[name] = nn.Linear(x.shape[1], embedding_dim)

        mm = sparse_csr(*item_graph, (num_items, num_items))
        self.register_buffer("mm_adj", mm, persistent=False)
        self.register_buffer("mm_adj_t", transpose_csr(mm), persistent=False)

        key = torch.unique(edge_index[0].long() * num_items + edge_index[1].long())
        self.register_buffer("edge_users", key // num_items, persistent=False)  # (E,)
        self.register_buffer("edge_items", key % num_items, persistent=False)  # (E,)
        self.register_buffer("edge_weights", edge_norm(self.edge_users, self.edge_items, num_users, num_items), persistent=False)
        self.register_buffer("adj", user_item_graph(self.edge_users, self.edge_items, num_users, num_items), persistent=False)
        self.register_buffer("train_adj", self.adj, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        for proj in self.proj.values():
            proj.reset_parameters()

    @staticmethod
    def build_item_graph(
        features: Mapping[str, Tensor], knn_k: int = 10, modality_weights: Mapping[str, float] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The frozen item-item graph ``S = sum_m w_m S_m`` from the input features -> ``(rows, cols, values)``.

        ``w`` is :func:`mixing_weights` of the modality names and ``modality_weights``; a
        modality of weight 0 adds no graph.
        """
        weights = mixing_weights(list(features), modality_weights)
        return item_item_graph([(features[m].detach().float(), w) for m, w in weights.items() if w > 0], knn_k)

    @property
    def item_graph(self) -> tuple[Tensor, Tensor, Tensor]:
        """The frozen item-item graph ``S`` as ``(rows, cols, values)``."""
        coo = self.mm_adj.to_sparse_coo().coalesce()
        return coo.indices()[0], coo.indices()[1], coo.values()

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """Degree-sensitive pruning of the user-item graph for the coming epoch (and CLEAR's dynamic refit)."""
        if self.modality_hook is not None:
            with torch.no_grad():
                self.modality_hook.refit(self.encoded_features())
        if self.dropout <= 0:
            self.train_adj = self.adj
            return
        weights = self.edge_weights.cpu()
        keep = prune_edges(weights, int(weights.numel() * (1.0 - self.dropout)), generator).to(self.edge_users.device)
        self.train_adj = user_item_graph(self.edge_users[keep], self.edge_items[keep], self.num_users, self.num_items)

    def _propagate(self, adj: Tensor) -> tuple[Tensor, Tensor]:
        h = self.item_embedding
        for _ in range(self.mm_layers):
            h = spmm(self.mm_adj, h, self.mm_adj_t)  # (I, d)
        ego = torch.cat([self.user_embedding, self.item_embedding])  # (U+I, d)
        out = layer_mean(adj, ego, self.layers)
        return out[: self.num_users], out[self.num_users :] + h

    def forward(self) -> tuple[Tensor, Tensor]:
        return self._propagate(self.train_adj if self.training else self.adj)

    def encoded_features(self) -> dict[str, Tensor]:
        """``{name: W_m x_m}`` for all items, (I, d) each, in the order of the features."""
        return {m: self.proj[m](getattr(self, f"{m}_features")) for m in self.modalities}

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        user_vecs, item_vecs = self.forward()
        u = user_vecs[users]  # (B, d)
        loss = bpr_loss((u * item_vecs[pos_items]).sum(1), (u * item_vecs[neg_items]).sum(1))
        if self.reg_weight <= 0:
            return loss
        if self.modality_hook is not None:
            for e in self.modality_hook(self.encoded_features()).values():
                loss = loss + self.reg_weight * bpr_loss((u * e[pos_items]).sum(1), (u * e[neg_items]).sum(1))
            return loss
        for m in self.modalities:
            # u . (W x_p + b) - u . (W x_n + b) = (u W) . (x_p - x_n): only the batch's feature
            # rows are touched, never the (I, d) projection of the whole table
            z = u @ self.proj[m].weight  # (B, d_m)
            margin = _FeatureMargin.apply(getattr(self, f"{m}_features"), pos_items, neg_items, z)  # (B,)
            loss = loss + self.reg_weight * F.softplus(-margin).mean()  # BPR on the margin
        return loss

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "layers": self.layers,
            "mm_layers": self.mm_layers,
            "knn_k": self.knn_k,
            "modality_weights": self.given_weights,
            "dropout": self.dropout,
            "reg_weight": self.reg_weight,
            "trainable_features": self.trainable_features,
            "modalities": list(self.modalities),
            "graph_weights": dict(self.modality_weights),
        }


REFERENCE_WEIGHTS = {"image": 0.1, "text": 0.9}  # the reference's v_feat / t_feat mix


def mixing_weights(modalities: Sequence[str], given: Mapping[str, float] | None = None) -> dict[str, float]:
    """The item-item graph's weights ``{name: w_m}``, summing to 1, in the order of ``modalities``.

    ``given`` None or empty: :data:`REFERENCE_WEIGHTS` when the modalities are exactly image
    and text, else equal weights. Given weights must name exactly the modalities, be >= 0
    (finite) with a positive sum; they are normalised to sum 1. ``ValueError`` otherwise.
    """
    names = list(modalities)
    if not given:
        if set(names) == set(REFERENCE_WEIGHTS):
            return {m: REFERENCE_WEIGHTS[m] for m in names}
        return {m: 1.0 / len(names) for m in names}
    if set(given) != set(names):
        raise ValueError(f"FREEDOM modality_weights name {sorted(given)}, but the modalities are {names}; "
                         f"give one weight per modality, e.g. {{{', '.join(f'{m} = 1.0' for m in names)}}}")
    bad = {m: w for m, w in given.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"FREEDOM modality_weights must be finite and >= 0; got {bad}")
    total = float(sum(given.values()))
    if not total > 0:
        raise ValueError(f"FREEDOM modality_weights sum to 0 ({dict(given)}); give at least one positive weight")
    return {m: float(given[m]) / total for m in names}
