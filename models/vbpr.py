"""VBPR: matrix factorisation whose item vectors include a projection of the item's content."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import ModalityHook, Backbone
from .graph import check_features
from .losses import bpr_emb_loss


class ContentPathway(nn.Module):
    r"""VBPR's content layer alone: a new item's vector :math:`[\, 0 \,;\, W [x_1 ; \dots ; x_M] + b \,]`.

    What serving needs to embed new items without the rest of the model. It holds the
    backbone's own ``content`` layer and ``modality_hook`` (the same modules, so the same
    state-dict keys: ``content.weight``, ``content.bias``, ``modality_hook.*``), and is saved
    and loaded on its own.

    Args:
        dims: modality name -> ``d_m``, in the order the features are concatenated.
        embedding_dim: ``d``.
        modality_hook: the backbone's hook (CLEAR's dynamic mode), or None.
        content: the backbone's content layer (a new one when None).
    """

    def __init__(self, dims: Mapping[str, int], embedding_dim: int, modality_hook: nn.Module | None = None,
                 content: nn.Linear | None = None):
        super().__init__()
        self.dims, self.embedding_dim = {str(m): int(d) for m, d in dims.items()}, embedding_dim
        if not self.dims or min(self.dims.values()) < 1:
            raise ValueError(f"the content pathway needs at least one modality of dim >= 1; got {self.dims}")
        self.content = content if content is not None else nn.Linear(sum(self.dims.values()), embedding_dim)
        self.modality_hook = modality_hook

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in concatenation order."""
        return tuple(self.dims)

    def modality_parts(self, features: Tensor) -> dict[str, Tensor]:
        """(N, sum d_m) features -> ``{name: W_m x_m}``, (N, d) each, bias not included."""
        w, parts, lo = self.content.weight, {}, 0  # (d, sum d_m)
        for m, dim in self.dims.items():
            parts[m] = features[:, lo : lo + dim] @ w[:, lo : lo + dim].T
            lo += dim
        return parts

    def forward(self, features: Tensor) -> Tensor:
        """(N, sum d_m) features -> (N, d) content part of the item vectors."""
        if self.modality_hook is None:
            return self.content(features)
        parts = self.modality_hook(self.modality_parts(features))
        return sum(parts[m] for m in self.dims) + self.content.bias

    @torch.no_grad()
    def item_vectors(self, features: Mapping[str, Tensor]) -> Tensor:
        """Vectors (N, 2d) of new items from their features ``{name: (N, d_m)}`` alone (ID part zero).

        Pass every modality the model was trained with (:attr:`modalities`), prepared like the
        training features (same encoder, same CLEAR projection).
        """
        missing = [m for m in self.dims if features.get(m) is None]
        extra = sorted(set(features) - set(self.dims))
        if missing or extra:
            raise ValueError(f"the content pathway takes the features of exactly {list(self.dims)}; "
                             f"missing {missing}, unknown {extra}")
        parts = []
        for m, dim in self.dims.items():
            x = features[m]
            if x.ndim != 2 or x.shape[1] != dim or x.shape[0] != features[self.modalities[0]].shape[0]:
                shapes = {n: tuple(features[n].shape) for n in self.dims}
                raise ValueError(f"features[{m!r}] must be (N, {dim}) as in training, with the same N for every "
                                 f"modality; got {shapes}")
            parts.append(x.to(self.content.weight.device, torch.float32))
        content = self(torch.cat(parts, dim=1))  # the hook projects with its saved directions
        return torch.cat([torch.zeros_like(content), content], dim=1)

    def settings(self) -> dict[str, Any]:
        """The constructor's sizes (the hook's settings are saved by whoever built it)."""
        return {"dims": dict(self.dims), "embedding_dim": self.embedding_dim}


class VBPR(Backbone):
    r"""VBPR (He & McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback",
    AAAI 2016), in the multimodal form of the benchmark implementations.

    .. math::
        v_i = [\, q_i \,;\, W [x_{1,i} ; \dots ; x_{M,i}] + b \,] \in \mathbb{R}^{2d}, \qquad
        \mathrm{score}(u, i) = p_u \cdot v_i, \quad p_u \in \mathbb{R}^{2d}

    with ``q_i`` the item's ID embedding and ``x_m`` its (fixed) features of modality ``m``,
    concatenated in the order of the ``features`` mapping (``hparams()["modalities"]``, and so
    model.json, list them in that order). Loss: BPR plus ``reg * emb_norm`` of the batch's
    user, positive and negative vectors. A batch with at least as many item rows (2B) as the
    catalog projects the whole feature table, as the reference does in every batch; a smaller one
    only its distinct items (the same values, less work on a large catalog).
    :meth:`content_item_vectors` gives vectors for new items from their features alone
    (``q = 0``), comparable with the trained item vectors.

    Args:
        num_users, num_items: ``U``, ``I``.
        features: modality name -> (I, d_m) features (one or more).
        embedding_dim: ``d`` (user and item vectors have size ``2d``).
        reg: weight of the batch regulariser.
        modality_hook: optional transform of the per-modality parts ``{name: W_m x_m}`` before
            they are summed (CLEAR's dynamic mode, refit in :meth:`pre_epoch`); needs two
            modalities or more.
    """

    uses_features = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        features: Mapping[str, Tensor],
        embedding_dim: int = 64,
        reg: float = 1e-4,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        feats = check_features(features, num_items, "VBPR", modality_hook)
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.reg = embedding_dim, reg
        self.modality_hook = modality_hook
        self.dims = {m: x.shape[1] for m, x in feats.items()}
        self.register_buffer("features", torch.cat(list(feats.values()), dim=1), persistent=False)  # (I, sum d_m)
        self.user_embedding = nn.Parameter(torch.empty(num_users, 2 * embedding_dim))  # (U, 2d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.content = nn.Linear(self.features.shape[1], embedding_dim)
        self._feature_block: Tensor | None = None  # reused by _batch_features
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        nn.init.xavier_normal_(self.content.weight)
        nn.init.zeros_(self.content.bias)

    def content_pathway(self) -> ContentPathway:
        """The content layer (and modality hook) as a module of its own, sharing these weights."""
        return ContentPathway(self.dims, self.embedding_dim, self.modality_hook, self.content)

    def _content(self, features: Tensor) -> Tensor:
        """(N, sum d_m) features -> (N, d) content part of the item vectors."""
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
        items = torch.cat([pos_items, neg_items])
        if self.modality_hook is not None or len(items) >= self.num_items:  # about the whole table: no gather
            content = self._content(self.features)[items]
        else:
            uniq, inv = torch.unique(items, return_inverse=True)
            content = self.content(self._batch_features(uniq))[inv]  # (2B, d): only the batch's items
        vecs = torch.cat([self.item_embedding[items], content], dim=1)  # (2B, 2d)
        p, n = vecs.chunk(2)
        return bpr_emb_loss(u, p, n, self.reg)

    def _batch_features(self, rows: Tensor) -> Tensor:
        """``features[rows]``, copied into a block kept from batch to batch (a new block of 2B x sum d_m
        floats in every batch costs more in page faults than the copy itself). The block is saved for
        the content layer's backward, so a second loss before that backward makes autograd raise
        (the block's version changed) instead of using the wrong rows."""
        block, feats = self._feature_block, self.features
        if block is None or block.shape[0] < len(rows) or (block.device, block.dtype) != (feats.device, feats.dtype):
            # a quarter more rows than this batch's, so that batches a little larger reuse it too
            block = self._feature_block = feats.new_empty(len(rows) * 5 // 4 + 1, feats.shape[1])
        out = block[: len(rows)]
        torch.index_select(feats, 0, rows, out=out)
        return out

    def train(self, mode: bool = True) -> VBPR:
        """As :meth:`torch.nn.Module.train`; leaving training mode frees the block of :meth:`_batch_features`
        (evaluation does not need it, and would otherwise hold it beside its score tables)."""
        if not mode:
            self._feature_block = None
        return super().train(mode)

    def content_item_vectors(self, features: Mapping[str, Tensor]) -> Tensor:
        """Vectors (N, 2d) of new items from their features alone: :meth:`ContentPathway.item_vectors`."""
        return self.content_pathway().item_vectors(features)

    def hparams(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "reg": self.reg, "modalities": list(self.dims)}
