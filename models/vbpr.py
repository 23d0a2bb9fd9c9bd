"""VBPR: matrix factorisation whose item vectors include a projection of the item's content."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import ModalityHook, Backbone
from .graph import bpr_loss, emb_norm


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

    def _modality_parts(self, features: Tensor) -> dict[str, Tensor]:
        """(N, d_t + d_v) features -> ``{"image": W_v x_v, "text": W_t x_t}``, (N, d) each, bias not included."""
        w = self.content.weight  # (d, d_t + d_v)
        return {"image": features[:, self.text_dim :] @ w[:, self.text_dim :].T,
                "text": features[:, : self.text_dim] @ w[:, : self.text_dim].T}

    def _content(self, features: Tensor) -> Tensor:
        """(N, d_t + d_v) features -> (N, d) content part of the item vectors."""
        if self.modality_hook is None:
            return self.content(features)
        parts = self.modality_hook(self._modality_parts(features))
        return parts["image"] + parts["text"] + self.content.bias

    @torch.no_grad()
    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """CLEAR's dynamic mode: refit the hook's directions on the current modality parts."""
        if self.modality_hook is not None:
            self.modality_hook.refit(self._modality_parts(self.features))

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

    @torch.no_grad()
    def content_item_vectors(self, image_features: Tensor | None = None, text_features: Tensor | None = None) -> Tensor:
        """Vectors (N, 2d) of new items from their features alone (ID part zero): the cold-start pathway.

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
            parts.append(feats.to(self.features.device, torch.float32))
        content = self._content(torch.cat(parts, dim=1))  # the hook projects with its saved directions
        return torch.cat([torch.zeros_like(content), content], dim=1)

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "reg": self.reg,
            "modalities": [m for m, d in (("text", self.text_dim), ("image", self.image_dim)) if d > 0],
        }
