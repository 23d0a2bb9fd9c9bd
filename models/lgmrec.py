"""LGMRec: local (collaborative + modality) graph embeddings plus global hypergraph embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, ModalityHook
from .graph import check_features, dense_mm, layer_mean, sparse_csr, spmm, transpose_csr, user_item_graph
from .losses import TableCache, bpr_emb_loss, dropout, gumbel_softmax, info_nce_candidates


def hypergraph_step(item_hyper: Tensor, user_hyper: Tensor, items: Tensor, layers: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""LGMRec's hypergraph message passing -> ``(users (U, d), items (I, d), Z (h, d))``.

    With item and user hyperedge memberships ``H_i`` (I, h), ``H_u`` (U, h) and item embeddings
    ``E`` (I, d), each layer sends items to hyperedges and back: :math:`Z = H_i^T E`,
    :math:`E \leftarrow H_i Z`, users read the last :math:`Z`: :math:`H_u Z`. Both outputs are
    the memberships times the last :math:`Z`: rank at most ``h``.
    """
    z = item_hyper.T @ items  # (h, d)
    for _ in range(layers - 1):
        z = item_hyper.T @ (item_hyper @ z)
    return user_hyper @ z, item_hyper @ z, z


class LGMRec(Backbone):
    r"""LGMRec (Guo et al., "LGMRec: Local and Global Graph Learning for Multimodal Recommendation",
    AAAI 2024).

    With the 0/1 interactions ``R`` (U, I), user degrees ``d_u`` and :math:`\hat A` the
    normalised bipartite adjacency:

    - collaborative graph embedding :math:`C = \mathrm{mean}_{l=0..L_{ui}} \hat A^l [E_u; E_i]`;
    - modality graph embedding, per modality: :math:`F_m = X_m W_m` (I, d) (the CLEAR-dynamic
      tensor), :math:`G_m = \hat A^{L_{mm}} [\mathrm{diag}(d_u)^{-1} R F_m;\ F_m]`;
    - hyperedges: :math:`H^i_m = \mathrm{gs}_\tau(X_m V_m)` (I, h) and :math:`H^u_m = \mathrm{gs}_\tau(R X_m V_m)`
      (U, h), ``gs`` the Gumbel-softmax at :math:`\tau = 0.2`, both with dropout ``1 - keep_rate``
      in training; :func:`hypergraph_step` on the item part of ``C`` gives :math:`\Gamma_m`;
    - :math:`Z = C + \sum_m \mathrm{norm}(G_m) + \alpha\, \mathrm{norm}(\sum_m \Gamma_m)` (row L2 norms),
      ``score(u, i) = z_u . z_i``.

    Loss: BPR + ``cl_weight`` times the InfoNCE (summed over the batch) between every pair of
    modalities' hypergraph embeddings, of the batch's users (candidates: all users) and of its
    positive items (candidates: all items), + ``reg_weight * emb_norm`` of the batch's final
    embeddings. The hypergraph embeddings are :math:`H Z` with ``h`` hyperedges, so when ``h < d``
    the (batch, all) cosines of the contrast are taken through ``h`` instead of ``d``
    (``factors`` of :func:`~clearrec.models.losses.info_nce_candidates`): the same loss up to rounding.

    As the reference (MMRec ``src/models/lgmrec.py``) we use fixed features, raw (unnormalised)
    ``R`` for the user hyperedges, and the last layer's ``Z`` for the users. The reference also
    draws Gumbel noise when it evaluates; we rank with the noise-free softmax
    :math:`\mathrm{softmax}(X_m V_m / \tau)` so that scores are deterministic.

    Any number of modalities: the sums above run over all of them and the contrast over every
    pair ``(a, b)``, ``a`` before ``b`` in name order (image + text: the reference's single
    image -> text term). With one modality there is no pair, so no contrastive term (the
    reference then drops the modality branches altogether).

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) features, at least one.
        embedding_dim: ``d`` (ID and modality embeddings).
        ui_layers, mm_layers, hyper_layers: ``L_ui``, ``L_mm``, hypergraph layers.
        hyper_num: ``h``, hyperedges per modality.
        keep_rate: share of hyperedge memberships kept by dropout in training.
        alpha: weight of the global (hypergraph) embeddings.
        cl_weight, reg_weight: weights of the contrastive and the batch regulariser terms.
        tau: temperature of the Gumbel-softmax and of the InfoNCE.
        modality_hook: optional transform of ``{m: F_m}`` (CLEAR's dynamic mode).
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
        ui_layers: int = 2,
        mm_layers: int = 2,
        hyper_layers: int = 1,
        hyper_num: int = 4,
        keep_rate: float = 0.5,
        alpha: float = 0.3,
        cl_weight: float = 1e-4,
        reg_weight: float = 1e-6,
        tau: float = 0.2,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        if hyper_layers < 1 or hyper_num < 1 or not 0 < keep_rate <= 1:
            raise ValueError(f"LGMRec needs hyper_layers >= 1, hyper_num >= 1 and keep_rate in (0, 1]; got "
                             f"{hyper_layers}, {hyper_num}, {keep_rate}")
        feats = dict(sorted(check_features(features, num_items, "LGMRec", modality_hook).items()))  # by name: image, text
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.ui_layers, self.mm_layers = embedding_dim, ui_layers, mm_layers
        self.hyper_layers, self.hyper_num, self.keep_rate, self.alpha = hyper_layers, hyper_num, keep_rate, alpha
        self.cl_weight, self.reg_weight, self.tau = cl_weight, reg_weight, tau
        self.modality_hook, self.modalities = modality_hook, list(feats)
        for name, x in feats.items():
            self.register_buffer(f"features_{name}", x, persistent=False)
        self.user_embedding = nn.Parameter(torch.empty(num_users, embedding_dim))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, embedding_dim))  # (I, d)
        self.transforms = nn.ParameterDict({m: nn.Parameter(torch.empty(x.shape[1], embedding_dim)) for m, x in feats.items()})
        self.hyperedges = nn.ParameterDict({m: nn.Parameter(torch.empty(x.shape[1], hyper_num)) for m, x in feats.items()})
        key = torch.unique(edge_index[0].long() * num_items + edge_index[1].long())
        users, items = key // num_items, key % num_items
        r = sparse_csr(users, items, torch.ones(key.numel()), (num_users, num_items))
        self.register_buffer("inter", r, persistent=False)  # R (U, I)
        self.register_buffer("inter_t", transpose_csr(r), persistent=False)  # R^T (I, U)
        deg = torch.bincount(users, minlength=num_users).to(torch.float32)
        self.register_buffer("inv_degree", 1.0 / (deg[:, None] + 1e-7), persistent=False)  # (U, 1)
        self.register_buffer("adj", user_item_graph(users, items, num_users, num_items), persistent=False)
        self._generator: torch.Generator | None = None
        self._tables = TableCache()  # the contrast's (batch, all) tables, kept through training
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.user_embedding, self.item_embedding, *self.transforms.values(), *self.hyperedges.values()):
            nn.init.xavier_uniform_(p)

    def _feature_products(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({m: X_m W_m}, {m: X_m V_m})``, the hook applied to the first: one product of each
        feature table with ``[W_m | V_m]`` (d + h columns), one pass over ``X_m`` instead of two."""
        feats, logits = {}, {}
        for m, w in self.transforms.items():
            both = dense_mm(getattr(self, f"features_{m}"), torch.cat([w, self.hyperedges[m]], 1))  # (I, d + h)
            feats[m], logits[m] = both[:, : w.shape[1]], both[:, w.shape[1] :]
        return (self.modality_hook(feats) if self.modality_hook is not None else feats), logits

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """Keep the trainer's generator for the Gumbel noise and dropout; refit CLEAR's dynamic hook."""
        self._generator = generator
        if self.modality_hook is not None:
            with torch.no_grad():
                self.modality_hook.refit({m: getattr(self, f"features_{m}") @ w for m, w in self.transforms.items()})

    def memberships(self, logits_i: Tensor) -> tuple[Tensor, Tensor]:
        """Item (I, h) and user (U, h) hyperedge memberships from a modality's ``X_m V_m`` (I, h)."""
        logits_u = spmm(self.inter, logits_i, self.inter_t)  # (U, h)
        if not self.training:
            return torch.softmax(logits_i / self.tau, 1), torch.softmax(logits_u / self.tau, 1)
        g, p = self._generator, 1.0 - self.keep_rate
        hi, hu = gumbel_softmax(logits_i, self.tau, g), gumbel_softmax(logits_u, self.tau, g)
        return dropout(hi, p, g), dropout(hu, p, g)

    def embeddings(self) -> tuple[Tensor, dict[str, tuple[Tensor, ...]]]:
        """Final node embeddings (U+I, d) and, per modality, its hypergraph embeddings with their factors:
        ``(users (U, d), items (I, d), H_u, H_i, Z)``, users ``= H_u Z`` and items ``= H_i Z``."""
        cge = layer_mean(self.adj, torch.cat([self.user_embedding, self.item_embedding]), self.ui_layers)
        out = cge
        feats, logits = self._feature_products()
        for f in feats.values():
            x = torch.cat([spmm(self.inter, f, self.inter_t) * self.inv_degree, f])  # (U+I, d)
            for _ in range(self.mm_layers):
                x = spmm(self.adj, x)
            out = out + F.normalize(x)
        hyper = {}
        for m in self.modalities:
            hi, hu = self.memberships(logits[m])
            users, items, z = hypergraph_step(hi, hu, cge[self.num_users :], self.hyper_layers)
            hyper[m] = (users, items, hu, hi, z)
        ghe = torch.stack([torch.cat(h[:2]) for h in hyper.values()]).sum(0)  # (U+I, d)
        return out + self.alpha * F.normalize(ghe), hyper

    def forward(self) -> tuple[Tensor, Tensor]:
        z, _ = self.embeddings()
        return z[: self.num_users], z[self.num_users :]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        z, hyper = self.embeddings()
        u, p, n = z[users], z[pos_items + self.num_users], z[neg_items + self.num_users]
        loss = bpr_emb_loss(u, p, n, self.reg_weight)
        if self.cl_weight:  # over the batch's distinct users / items, weighted by their counts: the same sum
            uu, nu = torch.unique(users, return_counts=True)
            ui, ni = torch.unique(pos_items, return_counts=True)
            low = self.hyper_num < self.embedding_dim  # the (batch, all) cosines through the h hyperedges
            for a, b in combinations(self.modalities, 2):
                (ua, ia, hua, hia, za), (ub, ib, hub, hib, zb) = hyper[a], hyper[b]
                fu = (hua[uu], za, hub, zb) if low else None
                fi = (hia[ui], za, hib, zb) if low else None
                tu = self._tables.table(("users", a, b), len(uu), self.num_users, ua)
                ti = self._tables.table(("items", a, b), len(ui), self.num_items, ia)
                cl = (info_nce_candidates(ua[uu], ub[uu], ub, self.tau, nu, fu, tu)
                      + info_nce_candidates(ia[ui], ib[ui], ib, self.tau, ni, fi, ti))
                loss = loss + self.cl_weight * cl
        return loss

    def train(self, mode: bool = True) -> LGMRec:
        """As :meth:`torch.nn.Module.train`; leaving training mode frees the contrast's kept tables."""
        if not mode:
            self._tables.clear()
        return super().train(mode)

    def hparams(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "ui_layers": self.ui_layers, "mm_layers": self.mm_layers,
                "hyper_layers": self.hyper_layers, "hyper_num": self.hyper_num, "keep_rate": self.keep_rate,
                "alpha": self.alpha, "cl_weight": self.cl_weight, "reg_weight": self.reg_weight, "tau": self.tau,
                "modalities": self.modalities}
