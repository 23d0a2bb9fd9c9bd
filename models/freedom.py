"""FREEDOM: a frozen feature kNN item-item graph plus a degree-pruned user-item graph."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModalityHook, Backbone
from .graph import (
    bpr_loss,
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

    1. A frozen item-item graph :math:`S = w_v S_v + (1 - w_v) S_t`, where :math:`S_m` is the
       normalised cosine kNN graph (``knn_k`` neighbours) of modality ``m``'s input features,
       built once (or passed in as ``item_graph``).
    2. Each epoch, degree-sensitive pruning keeps a ``1 - dropout`` share of the user-item edges,
       drawn without replacement with probability :math:`\propto 1/\sqrt{d_u d_i}`, and
       re-normalises them: :math:`\tilde A`. Evaluation uses the full graph :math:`\hat A`.
    3. :math:`[E_u; E_i] = \mathrm{mean}_{l=0..L} \tilde A^l [U; I]`, item vectors
       :math:`E_i + S^{L_m} I`, user vectors :math:`E_u`; ``score = dot``.
    4. Loss :math:`= \mathrm{BPR}(E_u, E_i) + \lambda \sum_m \mathrm{BPR}(E_u, W_m x_m)` over the
       available modalities, with the raw features :math:`x_m` trainable if
       ``trainable_features``.

    A missing modality is simply left out (its graph and its alignment term); at least one of
    ``image_features`` / ``text_features`` is required.

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        image_features: (I, d_v) or None. Rows of zeros mean "no vector" (no kNN edges).
        text_features: (I, d_t) or None.
        embedding_dim: ``d`` of the ID embeddings and of the feature projections.
        layers: ``L``, LightGCN layers on the user-item graph.
        mm_layers: ``L_m``, propagation steps on the item-item graph.
        knn_k: neighbours per item in the item-item graph.
        image_weight: ``w_v`` (used only when both modalities are present).
        dropout: share of user-item edges pruned each epoch.
        reg_weight: ``lambda``, weight of the feature-alignment BPR terms.
        trainable_features: let Adam update the input feature matrices (reference: True).
        item_graph: optional precomputed ``(rows, cols, values)`` of ``S`` (a cache).
        modality_hook: optional transform of the projected features ``{"image": W_v x_v, "text": W_t x_t}``
            before the alignment terms (CLEAR's dynamic mode, refit in :meth:`pre_epoch`);
            needs both modalities.
    """

    uses_graph = True
    uses_features = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
        embedding_dim: int = 64,
        layers: int = 2,
        mm_layers: int = 1,
        knn_k: int = 10,
        image_weight: float = 0.1,
        dropout: float = 0.8,
        reg_weight: float = 1e-4,
        trainable_features: bool = True,
        item_graph: tuple[Tensor, Tensor, Tensor] | None = None,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        if image_features is None and text_features is None:
            raise ValueError("FREEDOM needs image or text features (or both); got neither")
        if modality_hook is not None and (image_features is None or text_features is None):
            raise ValueError("a modality hook (CLEAR dynamic mode) needs both image and text features")
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.mm_layers = embedding_dim, layers, mm_layers
        self.knn_k, self.image_weight, self.dropout = knn_k, image_weight, dropout
        self.reg_weight, self.trainable_features = reg_weight, trainable_features
        self.modality_hook = modality_hook
        for name, feats in (("image", image_features), ("text", text_features)):
            if feats is not None and (feats.ndim != 2 or feats.shape[0] != num_items):
                raise ValueError(f"{name}_features has shape {tuple(feats.shape)}, expected ({num_items}, d)")
        if item_graph is None:  # before the features are copied, to keep peak memory down
            item_graph = self.build_item_graph(image_features, text_features, knn_k, image_weight)

        self.user_embedding = nn.Parameter(torch.empty(num_users, embedding_dim))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.image_proj = self.text_proj = None
        for name, feats in (("image", image_features), ("text", text_features)):
            if feats is None:
                continue
            feats = feats.detach().to(torch.float32)  # (I, d_m)
            if trainable_features:  # Adam updates it in place: never the caller's tensor
                setattr(self, f"{name}_features", nn.Parameter(feats.clone()))
            else:
                self.register_buffer(f"{name}_features", feats, persistent=False)
            setattr(self, f"{name}_proj", nn.Linear(feats.shape[1], embedding_dim))

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
        for proj in (self.image_proj, self.text_proj):
            if proj is not None:
                proj.reset_parameters()

    @staticmethod
    def build_item_graph(
        image_features: Tensor | None, text_features: Tensor | None, knn_k: int = 10, image_weight: float = 0.1
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The frozen item-item graph ``S`` from the input features -> ``(rows, cols, values)``.

        Both modalities: ``image_weight * S_v + (1 - image_weight) * S_t``; one: that one's graph.
        """
        both = image_features is not None and text_features is not None
        mods = []
        if image_features is not None:
            mods.append((image_features.detach().float(), image_weight if both else 1.0))
        if text_features is not None:
            mods.append((text_features.detach().float(), 1.0 - image_weight if both else 1.0))
        return item_item_graph(mods, knn_k)

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
        """``{"image": W_v x_v, "text": W_t x_t}`` for all items, (I, d) each (present modalities only)."""
        out = {}
        if self.image_proj is not None:
            out["image"] = self.image_proj(self.image_features)
        if self.text_proj is not None:
            out["text"] = self.text_proj(self.text_features)
        return out

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
        for proj, feats in ((self.image_proj, "image_features"), (self.text_proj, "text_features")):
            if proj is None:
                continue
            # u . (W x_p + b) - u . (W x_n + b) = (u W) . (x_p - x_n): only the batch's feature
            # rows are touched, never the (I, d) projection of the whole table
            z = u @ proj.weight  # (B, d_m)
            margin = _FeatureMargin.apply(getattr(self, feats), pos_items, neg_items, z)  # (B,)
            loss = loss + self.reg_weight * F.softplus(-margin).mean()  # BPR on the margin
        return loss

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "layers": self.layers,
            "mm_layers": self.mm_layers,
            "knn_k": self.knn_k,
            "image_weight": self.image_weight,
            "dropout": self.dropout,
            "reg_weight": self.reg_weight,
            "trainable_features": self.trainable_features,
            "modalities": [m for m, p in (("image", self.image_proj), ("text", self.text_proj)) if p is not None],
        }
