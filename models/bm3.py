"""BM3: bootstrapped self-supervision on dropout views of the graph and modality embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import Backbone, ModalityHook
from .graph import check_features, emb_norm, layer_mean, user_item_graph
from .losses import cosine_alignment, dropout


class BM3(Backbone):
    r"""BM3 (Zhou et al., "Bootstrap Latent Representations for Multi-modal Recommendation", WWW 2023).

    LightGCN on the user-item graph gives :math:`[H_u; H_i] = \mathrm{mean}_{l=0..L} \hat A^l
    [E_u; E_i]` and :math:`h_i \mathrel{+}= e_i`; each modality ``m`` is embedded as
    :math:`f^m_i = W_m x^m_i + b_m`. One shared predictor :math:`g(z) = W_p z + b_p` makes the
    online views; the target views are dropout copies without gradient,
    :math:`\tilde z = \mathrm{sg}(\mathrm{dropout}_p(z))`. With :math:`c(a, b) = 1 - \cos(a, b)`
    averaged over a batch of ``(u, i)`` pairs (no negative sampling):

    .. math::
        \mathcal{L} = c(g(h_u), \tilde h_i) + c(g(h_i), \tilde h_u)
        + \lambda_{cl} \sum_m \big[c(g(f^m_i), \tilde h_i) + c(g(f^m_i), \tilde f^m_i)\big]
        + \lambda_{reg} \frac{\lVert H_u \rVert + \lVert H_i \rVert}{I}

    and ``score(u, i) = g(h_u) . g(h_i)``. The feature tables are trainable (as the reference).

    As the reference (MMRec ``src/models/bm3.py``), the regulariser is on the whole user and
    item tables (Frobenius norms, not squared, over ``I``), the dropout views are drawn over
    the whole tables (a user or item repeated in a batch shares its mask), and the paper's
    alignment/masking terms are the two ``c(g(f), \cdot)`` terms above. Only the batch's rows
    of each view are computed (exactly the same values). The negatives the trainer passes are
    ignored.

    Any number of modalities: the two feature terms are summed over every modality (with
    image + text exactly the reference's four terms). CLEAR: static mode consumes the projected
    features; the dynamic mode's hook projects the modality embeddings ``{m: f^m}`` (I, d)
    before the predictor.

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) features, at least one.
        embedding_dim: ``d`` (also the modality embedding size).
        layers: ``L``, LightGCN layers (reference grid ``[1, 2]``).
        dropout: ``p`` of the target views (reference grid ``[0.3, 0.5]``).
        reg_weight: ``lambda_reg`` (reference grid ``[0.1, 0.01]``).
        cl_weight: ``lambda_cl``, weight of the modality terms.
        trainable_features: let Adam update the feature tables (reference: True).
        modality_hook: optional transform of ``{m: f^m}`` (CLEAR's dynamic mode).
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
        layers: int = 1,
        dropout: float = 0.3,
        reg_weight: float = 0.1,
        cl_weight: float = 2.0,
        trainable_features: bool = True,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"BM3 dropout must be in [0, 1), got {dropout}")
        feats = dict(sorted(check_features(features, num_items, "BM3", modality_hook).items()))  # by name: image, text
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.dropout = embedding_dim, layers, dropout
        self.reg_weight, self.cl_weight, self.trainable_features = reg_weight, cl_weight, trainable_features
        self.modality_hook, self.modalities = modality_hook, list(feats)
        self.user_embedding = nn.Parameter(torch.empty(num_users, embedding_dim))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.predictor = nn.Linear(embedding_dim, embedding_dim)
        self.features = nn.ParameterDict() if trainable_features else None
        for name, x in feats.items():
            if trainable_features:  # Adam updates it in place: never the caller's tensor
                self.features[name] = nn.Parameter(x.clone())
            else:
                self.register_buffer(f"features_{name}", x, persistent=False)
        self.encoders = nn.ModuleDict({name: nn.Linear(x.shape[1], embedding_dim) for name, x in feats.items()})
        self.register_buffer("adj", user_item_graph(edge_index[0], edge_index[1], num_users, num_items), persistent=False)
        self._generator: torch.Generator | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_embedding)
        nn.init.xavier_uniform_(self.item_embedding)
        for lin in (self.predictor, *self.encoders.values()):
            lin.reset_parameters()
            nn.init.xavier_normal_(lin.weight)

    def feature(self, name: str) -> Tensor:
        """The (I, d_m) feature table of modality ``name``."""
        return self.features[name] if self.features is not None else getattr(self, f"features_{name}")

    def modality_embeddings(self, items: Tensor | None = None) -> dict[str, Tensor]:
        """``{m: W_m x_m + b_m}`` for ``items`` (all items if None), (B or I, d) each, hook applied."""
        if self.modality_hook is not None:
            out = self.modality_hook({m: enc(self.feature(m)) for m, enc in self.encoders.items()})
            return out if items is None else {m: e[items] for m, e in out.items()}
        return {m: enc(self.feature(m) if items is None else self.feature(m).index_select(0, items))
                for m, enc in self.encoders.items()}

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """Keep the trainer's generator for the dropout views; refit CLEAR's dynamic hook."""
        self._generator = generator
        if self.modality_hook is not None:
            with torch.no_grad():
                self.modality_hook.refit({m: enc(self.feature(m)) for m, enc in self.encoders.items()})

    def propagate(self) -> tuple[Tensor, Tensor]:
        """``(H_u (U, d), H_i + E_i (I, d))`` before the predictor."""
        out = layer_mean(self.adj, torch.cat([self.user_embedding, self.item_embedding]), self.layers)
        return out[: self.num_users], out[self.num_users :] + self.item_embedding

    def forward(self) -> tuple[Tensor, Tensor]:
        h_u, h_i = self.propagate()
        return self.predictor(h_u), self.predictor(h_i)

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        h_u, h_i = self.propagate()
        uu, u_inv = torch.unique(users, return_inverse=True)
        ui, i_inv = torch.unique(pos_items, return_inverse=True)
        g = self._generator
        with torch.no_grad():  # target views: one mask per distinct row, as a mask over the whole table
            u_target = dropout(h_u[uu], self.dropout, g)[u_inv]  # (B, d)
            i_target = dropout(h_i[ui], self.dropout, g)[i_inv]
        # the predictor on the distinct rows, then gathered; index_select, whose backward (index_add_)
        # is cheaper on CPU than indexing's (index_put_)
        u_online = self.predictor(h_u.index_select(0, uu)).index_select(0, u_inv)
        i_online = self.predictor(h_i.index_select(0, ui)).index_select(0, i_inv)
        loss = cosine_alignment(u_online, i_target) + cosine_alignment(i_online, u_target)
        if self.cl_weight:
            for f in self.modality_embeddings(ui).values():  # (B_distinct, d)
                with torch.no_grad():
                    f_target = dropout(f.detach(), self.dropout, g)[i_inv]
                f_online = self.predictor(f).index_select(0, i_inv)
                loss = loss + self.cl_weight * (cosine_alignment(f_online, i_target) + cosine_alignment(f_online, f_target))
        if self.reg_weight:
            loss = loss + self.reg_weight * emb_norm(h_u, h_i)
        return loss

    def hparams(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "layers": self.layers, "dropout": self.dropout,
                "reg_weight": self.reg_weight, "cl_weight": self.cl_weight,
                "trainable_features": self.trainable_features, "modalities": self.modalities}
