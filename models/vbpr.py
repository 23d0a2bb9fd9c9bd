"""VBPR: matrix factorisation whose item vectors include a projection of the item's content."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import ModalityHook, Backbone
from .graph import bpr_loss, emb_norm


class ContentPathway(nn.Module):
    r"""VBPR's content layer alone: a new item's vector :math:`[\, 0 \,;\, W [x^t ; x^v] + b \,]` from its features.

    What serving needs to embed new items without the rest of the model. It holds the
    backbone's own ``content`` layer and ``modality_hook`` (the same modules, so the same
    state-dict keys: ``content.weight``, ``content.bias``, ``modality_hook.*``), and is saved
    and loaded on its own.
    """

    def __init__(self, text_dim: int, image_dim: int, embedding_dim: int, modality_hook: nn.Module | None = None,
                 content: nn.Linear | None = None):
        super().__init__()
        self.text_dim, self.image_dim, self.embedding_dim = text_dim, image_dim, embedding_dim
        self.content = content if content is not None else nn.Linear(text_dim + image_dim, embedding_dim)
        self.modality_hook = modality_hook

    def modality_parts(self, features: Tensor) -> dict[str, Tensor]:
        """(N, d_t + d_v) features -> ``{"image": W_v x_v, "text": W_t x_t}``, (N, d) each, bias not included."""
        w, t = self.content.weight, self.text_dim  # (d, d_t + d_v)
        return {"image": features[:, t:] @ w[:, t:].T, "text": features[:, :t] @ w[:, :t].T}

    def forward(self, features: Tensor) -> Tensor:
        """(N, d_t + d_v) features -> (N, d) content part of the item vectors."""
        if self.modality_hook is None:
            return self.content(features)
        parts = self.modality_hook(self.modality_parts(features))
        return parts["image"] + parts["text"] + self.content.bias

    @torch.no_grad()
    def item_vectors(self, image_features: Tensor | None = None, text_features: Tensor | None = None) -> Tensor:
        """Vectors (N, 2d) of new items from their features alone (ID part zero).

        Pass the modalities the model was trained with, (N, d_v) / (N, d_t), prepared like the
        training features (same encoder, same CLEAR projection).
        """
        parts = []
        for name, feats, dim in (("text", text_features, self.text_dim), ("image", image_features, self.image_dim)):
            if dim == 0:
                continue
            if feats is None or feats.ndim != 2 or feats.shape[1] != dim:
                got = None if feats is None else tuple(feats.shape)
                raise ValueError(f"{name}_features must be (N, {dim}) as in training, got {got}")
            parts.append(feats.to(self.content.weight.device, torch.float32))
        content = self(torch.cat(parts, dim=1))  # the hook projects with its saved directions
        return torch.cat([torch.zeros_like(content), content], dim=1)

    def settings(self) -> dict[str, int]:
        """The constructor's sizes (the hook's settings are saved by whoever built it)."""
        return {"text_dim": self.text_dim, "image_dim": self.image_dim, "embedding_dim": self.embedding_dim}


class VBPR(Backbone):
    r"""VBPR (He & McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback",
    AAAI 2016), in the multimodal form of the benchmark implementations.

    .. math::
        v_i = [\, q_i \,;\, W [x^t_i ; x^v_i] + b \,] \in \mathbb{R}^{2d}, \qquad
        \mathrm{score}(u, i) = p_u \cdot v_i, \quad p_u \in \mathbb{R}^{2d}

    with ``q_i`` the item's ID embedding and ``x^t``, ``x^v`` its (fixed) text and image
    features; a missing modality is left out of the concatenation. Loss: BPR plus
    ``reg * emb_norm`` of the batch's user, positive and negative vectors.
    :meth:`content_item_vectors` gives vectors for new items from their features alone
    (``q = 0``), comparable with the trained item vectors.

    Args:
        num_users, num_items: ``U``, ``I``.
        image_features: (I, d_v) or None.
        text_features: (I, d_t) or None (at least one of the two).
        embedding_dim: ``d`` (user and item vectors have size ``2d``).
        reg: weight of the batch regulariser.
        modality_hook: optional transform of the per-modality parts ``(W_v x_v, W_t x_t)``
            (``{"image": ..., "text": ...}``) before they are summed (CLEAR's dynamic mode, refit in :meth:`pre_epoch`); needs
            both modalities.
    """

    uses_features = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
        embedding_dim: int = 64,
        reg: float = 1e-4,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        if image_features is None and text_features is None:
            raise ValueError("VBPR needs image or text features (or both); got neither")
        if modality_hook is not None and (image_features is None or text_features is None):
            raise ValueError("a modality hook (CLEAR dynamic mode) needs both image and text features")
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.reg = embedding_dim, reg
        self.modality_hook = modality_hook
        parts = [f for f in (text_features, image_features) if f is not None]
        for f in parts:
            if f.shape[0] != num_items:
                raise ValueError(f"a feature matrix has {f.shape[0]} rows, expected num_items = {num_items}")
        self.text_dim = 0 if text_features is None else text_features.shape[1]
        self.image_dim = 0 if image_features is None else image_features.shape[1]
        self.register_buffer("features", torch.cat(parts, dim=1).detach().to(torch.float32), persistent=False)  # (I, d_t + d_v)
        self.user_embedding = nn.Parameter(torch.empty(num_users, 2 * embedding_dim))  # (U, 2d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.content = nn.Linear(self.features.shape[1], embedding_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        nn.init.xavier_normal_(self.content.weight)
        nn.init.zeros_(self.content.bias)

    def content_pathway(self) -> ContentPathway:
        """The content layer (and modality hook) as a module of its own, sharing these weights."""
        return ContentPathway(self.text_dim, self.image_dim, self.embedding_dim, self.modality_hook, self.content)

    def _content(self, features: Tensor) -> Tensor:
        """(N, d_t + d_v) features -> (N, d) content part of the item vectors."""
        return self.content_pathway()(features)

    @torch.no_grad()
    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """CLEAR's dynamic mode: refit the hook's directions on the current modality parts."""
        if self.modality_hook is not None:
            self.modality_hook.refit(self.content_pathway().modality_parts(self.features))

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.user_embedding, torch.cat([self.item_embedding, self._content(self.features)], dim=1)

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        u = self.user_embedding[users]  # (B, 2d)
        if self.modality_hook is None:
            items = torch.cat([pos_items, neg_items])
            uniq, inv = torch.unique(items, return_inverse=True)
            content = self.content(self.features[uniq])[inv]  # (2B, d): only the batch's items
        else:
            items = torch.cat([pos_items, neg_items])
            content = self._content(self.features)[items]
        vecs = torch.cat([self.item_embedding[items], content], dim=1)  # (2B, 2d)
        p, n = vecs.chunk(2)
        loss = bpr_loss((u * p).sum(1), (u * n).sum(1))
        if self.reg > 0:
            loss = loss + self.reg * emb_norm(u, p, n)
        return loss

    def content_item_vectors(self, image_features: Tensor | None = None, text_features: Tensor | None = None) -> Tensor:
        """Vectors (N, 2d) of new items from their features alone: :meth:`ContentPathway.item_vectors`."""
        return self.content_pathway().item_vectors(image_features, text_features)

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "reg": self.reg,
            "modalities": [m for m, d in (("text", self.text_dim), ("image", self.image_dim)) if d > 0],
        }
