"""MMGCN: one graph convolution network per modality over the user-item graph, averaged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, ModalityHook
from .graph import bpr_loss, check_features, sparse_csr, spmm, transpose_csr


def mean_adjacency(users: Tensor, items: Tensor, num_users: int, num_items: int) -> tuple[Tensor, Tensor]:
    """Mean aggregation over the bipartite graph: ``D^-1 A`` (CSR, (U+I, U+I)) and its transpose.

    Row ``v`` averages ``v``'s neighbours (users first); duplicate pairs count once, nodes
    without neighbours get zero rows (PyG's ``aggr="mean"`` on both edge directions).
    """
    key = torch.unique(users.long() * num_items + items.long())
    users, items = key // num_items, key % num_items
    n = num_users + num_items
    rows = torch.cat([users, items + num_users])
    cols = torch.cat([items + num_users, users])
    deg = torch.bincount(rows, minlength=n).to(torch.float32).clamp_min(1.0)
    a = sparse_csr(rows, cols, deg.reciprocal()[rows], (n, n))
    return a, transpose_csr(a)


class _ModalityGCN(nn.Module):
    """One modality's tower: ``L`` layers of convolution + ID-aware combination (see MMGCN's docstring)."""

    def __init__(self, num_users: int, feature_dim: int, latent_dim: int | None, embedding_dim: int, layers: int,
                 trainable: bool):
        super().__init__()
        in_dim = latent_dim or feature_dim
        self.mlp = nn.Linear(feature_dim, latent_dim) if latent_dim else None
        pref = torch.empty(num_users, in_dim)  # (U, d_in) user preference in this modality's space
        if trainable:
            self.preference = nn.Parameter(pref)
        else:
            self.register_buffer("preference", pref)
        dims = [in_dim] + [embedding_dim] * (layers - 1)
        self.conv = nn.ParameterList([nn.Parameter(torch.empty(d, d)) for d in dims])  # W_l
        self.linear = nn.ModuleList([nn.Linear(d, embedding_dim) for d in dims])  # W'_l, b'_l
        self.combine = nn.ModuleList([nn.Linear(d + embedding_dim, embedding_dim) for d in dims])  # W''_l, b''_l

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.preference)
        if self.mlp is not None:
            self.mlp.reset_parameters()
        for i, (w, lin, comb) in enumerate(zip(self.conv, self.linear, self.combine)):
            nn.init.xavier_normal_(w)
            lin.reset_parameters()
            nn.init.xavier_normal_(lin.weight)
            comb.reset_parameters()
            if i == 0:  # the reference re-initialises only the first combination layer
                nn.init.xavier_normal_(comb.weight)

    def forward(self, features: Tensor, ids: Tensor, adj: Tensor, adj_t: Tensor) -> Tensor:
        """(I, d_m) features, (U+I, d) ID embeddings -> (U+I, d) node representations."""
        item = self.mlp(features) if self.mlp is not None else features
        x = F.normalize(torch.cat([self.preference, item]))  # (U+I, d_in)
        for w, lin, comb in zip(self.conv, self.linear, self.combine):
            h = F.leaky_relu(spmm(adj, x @ w, adj_t))  # neighbour mean of x W
            x_hat = F.leaky_relu(lin(x)) + ids
            x = F.leaky_relu(comb(torch.cat([h, x_hat], dim=1)))
        return x


class MMGCN(Backbone):
    r"""MMGCN (Wei et al., "MMGCN: Multi-modal Graph Convolution Network for Personalized
    Recommendation of Micro-video", ACM MM 2019).

    Every modality ``m`` has its own tower over the user-item graph. Users start from a
    preference vector :math:`p^m_u`, items from their (optionally MLP-projected) features; with
    :math:`x^{(0)} = \mathrm{normalize}([P^m; \mathrm{MLP}_m(X^m)])` and ``e`` the node's ID
    embedding, each layer ``l`` computes (the paper's Eqs. 1, 5 and the concatenation variant
    of its combination)

    .. math::
        h_v &= \mathrm{lrelu}\big(\mathrm{mean}_{w \in N(v)} x^{(l)}_w W_l\big), \qquad
        \hat x_v = \mathrm{lrelu}(W'_l x^{(l)}_v + b'_l) + e_v \\
        x^{(l+1)}_v &= \mathrm{lrelu}(W''_l [h_v; \hat x_v] + b''_l)

    and the representation is the mean of the towers' outputs, :math:`r_v = \frac{1}{M}\sum_m
    x^{m,(L)}_v`, ``score(u, i) = r_u . r_i``. Loss: BPR + ``reg`` times the mean square of the
    batch's ID embeddings plus that of the preference tables of the MLP-projected modalities.

    Where the reference (MMRec ``src/models/mmgcn.py``) differs from the paper we follow it:
    three layers whatever its ``n_layers`` says (``layers = 3``); the concatenating combination
    (its ``concate = 'False'`` is a true string); only the image tower projects its features
    by an MLP to 256-d, the text tower convolves the raw features (``latent = {"image": 256}``);
    the ID embeddings and the user preferences are fixed random tables, not trained (they
    are not registered as parameters there; ``trainable_embeddings = True`` trains them as the
    paper does); the first combination layer alone gets Xavier-normal weights. The
    reference ranks with the representation of the last training batch; we recompute it.

    Any number of modalities: one tower each, averaged. CLEAR: static mode consumes the
    projected features; the dynamic mode's hook projects the towers' item outputs
    ``{m: x^{m,(L)}_{items}}`` (I, d) before the average.

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) features, at least one.
        embedding_dim: ``d``.
        layers: ``L``, convolution layers per tower.
        latent: modality name -> MLP width for the modalities projected before the tower
            (default ``{"image": 256}``); the others start from their raw features.
        reg: weight of the mean-square regulariser (reference grid ``[0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]``).
        trainable_embeddings: train the ID and preference tables (the paper) or keep them fixed (the reference).
        modality_hook: optional transform of the towers' item outputs (CLEAR's dynamic mode).
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
        layers: int = 3,
        latent: Mapping[str, int] | None = None,
        reg: float = 0.0,
        trainable_embeddings: bool = False,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"MMGCN needs layers >= 1, got {layers}")
        feats = dict(sorted(check_features(features, num_items, "MMGCN", modality_hook).items()))  # by name: image, text
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.reg = embedding_dim, layers, reg
        self.latent = dict({"image": 256} if latent is None else latent)
        self.trainable_embeddings, self.modality_hook = trainable_embeddings, modality_hook
        for name, x in feats.items():
            self.register_buffer(f"features_{name}", x, persistent=False)
        self.modalities = list(feats)
        self.towers = nn.ModuleDict({
            name: _ModalityGCN(num_users, x.shape[1], self.latent.get(name), embedding_dim, layers, trainable_embeddings)
            for name, x in feats.items()
        })
        ids = torch.empty(num_users + num_items, embedding_dim)  # (U+I, d), users first
        if trainable_embeddings:
            self.id_embedding = nn.Parameter(ids)
        else:
            self.register_buffer("id_embedding", ids)
        adj, adj_t = mean_adjacency(edge_index[0], edge_index[1], num_users, num_items)
        self.register_buffer("adj", adj, persistent=False)
        self.register_buffer("adj_t", adj_t, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.id_embedding)
        for tower in self.towers.values():
            tower.reset_parameters()

    def modality_outputs(self) -> dict[str, Tensor]:
        """Each tower's node representations, modality name -> (U+I, d)."""
        return {m: tower(getattr(self, f"features_{m}"), self.id_embedding, self.adj, self.adj_t)
                for m, tower in self.towers.items()}

    def pre_epoch(self, generator: torch.Generator | None = None) -> None:
        """CLEAR's dynamic mode: refit the hook on the towers' item outputs."""
        if self.modality_hook is not None:
            with torch.no_grad():
                self.modality_hook.refit({m: x[self.num_users :] for m, x in self.modality_outputs().items()})

    def propagate(self) -> Tensor:
        """The averaged representation of all nodes -> (U+I, d)."""
        outs = self.modality_outputs()
        if self.modality_hook is not None:
            items = self.modality_hook({m: x[self.num_users :] for m, x in outs.items()})
            outs = {m: torch.cat([x[: self.num_users], items[m]]) for m, x in outs.items()}
        return torch.stack(list(outs.values())).mean(0)

    def forward(self) -> tuple[Tensor, Tensor]:
        out = self.propagate()
        return out[: self.num_users], out[self.num_users :]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        out = self.propagate()
        u, p, n = out[users], out[pos_items + self.num_users], out[neg_items + self.num_users]
        loss = bpr_loss((u * p).sum(1), (u * n).sum(1))
        if self.reg > 0:
            ids_u = self.id_embedding[users.repeat_interleave(2)]
            ids_i = self.id_embedding[torch.stack([pos_items, neg_items], 1).reshape(-1) + self.num_users]
            reg = (ids_u.square() + ids_i.square()).mean()
            for m in self.latent:
                if m in self.towers:
                    reg = reg + self.towers[m].preference.square().mean()
            loss = loss + self.reg * reg
        return loss

    def hparams(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "layers": self.layers, "latent": self.latent, "reg": self.reg,
                "trainable_embeddings": self.trainable_embeddings, "modalities": self.modalities}
