"""SMORE: spectral denoising and fusion of the modality features with learned frequency filters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import ModalityHook
from .graph import (
    check_features,
    knn_cosine,
    layer_mean,
    max_union,
    sparse_csr,
    spmm,
    sym_normalize,
    transpose_csr,
    user_item_block,
    user_item_graph,
)
from .mgcn import ContentSideBackbone, _gate

FUSION = "fusion"  # the key of the fused view among the per-modality modules


class SMORE(ContentSideBackbone):
    r"""SMORE (Ong & Khong, "Spectrum-based Modality Representation Fusion Graph Convolutional
    Network for Multimodal Recommendation", WSDM 2025).

    With :math:`\tilde x_m = W_m x_m + b_m`, :math:`\mathcal F` the real FFT along the
    embedding axis and learned complex filters :math:`w_m, w_f \in \mathbb C^{d/2+1}`:

    .. math::
        c_m = \mathcal F^{-1}(\mathcal F \tilde x_m \cdot w_m), \qquad
        c_f = \mathcal F^{-1}\big(w_f \cdot \textstyle\prod_m \mathcal F \tilde x_m\big)

        \dot e_k = E_i \odot \sigma(G_k c_k + g_k), \quad
        \bar e_{k,i} = S_k^{L_m} \dot e_k, \quad \bar e_k = [R\, \bar e_{k,i}; \bar e_{k,i}]
        \qquad (k \in \{m\} \cup \{f\})

    with :math:`S_m` the sym-normalised weighted cosine kNN graph of :math:`x_m` and
    :math:`S_f` their element-wise maximum over the union of edges. Then, with
    :math:`e^{id} = \mathrm{mean}_{l=0..L} \hat A^l [E_u; E_i]`:

    .. math::
        a_m = \mathrm{softmax}_{dim}(Q_m \tanh(P_m \bar e_f + c_m)) \odot \bar e_m, \qquad
        e^{s} = \mathrm{mean}\big(\{\delta(\sigma(H_m e^{id})) \odot a_m\}_m \cup
                \{\delta(\sigma(H_f e^{id})) \odot \bar e_f\}\big)

    (:math:`\delta` = dropout). Vectors :math:`e^{id} + e^{s}`; loss: BPR + ``reg_weight`` *
    (half the squared norms of the batch's vectors) / B + ``cl_weight`` * (InfoNCE(e^s,
    e^{id}) over the batch's positive items + over its users).

    We follow the reference (MMRec ``src/models/smore.py``): the attention softmax runs over
    the embedding axis (not over the modalities), dropout acts on the preference gates, the
    filters start from a standard normal, the input features are trainable. Its regulariser
    divides by the configured batch size, ours by the actual one. Its yaml decays the learning
    rate (``learning_rate_scheduler: [0.96, 50]``): ``train.lr_decay`` defaults to 0.96 for it.

    Any number of modalities: one filter, graph, gate, query and preference gate per modality;
    the fused spectrum is the product of all modalities' spectra (the reference's
    ``image_fft * text_fft`` for exactly ``image`` + ``text``, its ``v_feat`` / ``t_feat``),
    the fusion graph the maximum over all kNN graphs, the side view the mean of ``M + 1``
    terms. CLEAR: in static mode the given features (and so the graphs) are the projected
    ones; in dynamic mode the hook projects :math:`\{m: \tilde x_m\}` before the spectral
    filters (refit in :meth:`pre_epoch`).

    Args:
        num_users, num_items: ``U``, ``I``.
        edge_index: (2, E) training ``(user, item)`` pairs.
        features: modality name -> (I, d_m) float features; zero rows mean "no vector".
        embedding_dim: ``d``.
        layers: ``L``, propagation steps on the user-item graph (``n_ui_layers``).
        mm_layers: ``L_m``, propagation steps on the item-item graphs (``n_layers``).
        knn_k: neighbours per item in the kNN graphs: one number, or one per modality name
            (the reference's ``image_knn_k`` / ``text_knn_k``).
        reg_weight: weight of the batch regulariser.
        cl_weight: weight of the contrastive term (the reference's ``cl_loss``).
        temperature: InfoNCE temperature.
        dropout: dropout rate on the preference gates.
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
        layers: int = 3,
        mm_layers: int = 1,
        knn_k: int | Mapping[str, int] = 10,
        reg_weight: float = 1e-5,
        cl_weight: float = 0.01,
        temperature: float = 0.2,
        dropout: float = 0.0,
        trainable_features: bool = True,
        modality_hook: ModalityHook | None = None,
    ):
        super().__init__()
        feats = check_features(features, num_items, "SMORE", modality_hook)
        if FUSION in feats:
            raise ValueError(f"SMORE: {FUSION!r} is reserved for the fused view; rename that modality")
        ks = {m: knn_k for m in feats} if isinstance(knn_k, int) else dict(knn_k)
        if set(ks) != set(feats):
            raise ValueError(f"SMORE: knn_k names {sorted(ks)}, the features {sorted(feats)}")
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim, self.layers, self.mm_layers = embedding_dim, layers, mm_layers
        self.knn_k = knn_k if isinstance(knn_k, int) else dict(ks)
        self.reg_weight, self.cl_weight, self.temperature = reg_weight, cl_weight, temperature
        self.dropout_rate, self.trainable_features = dropout, trainable_features
        self.modality_hook = modality_hook
        self.modalities = list(feats)
        d = embedding_dim

        graphs = []
        for m, x in feats.items():
            rows, cols, vals = knn_cosine(x, ks[m])
            graphs.append((rows, cols, sym_normalize(rows, cols, vals, num_items)))
        graphs.append(max_union(graphs, num_items))
        for j, g in enumerate(graphs):  # one per modality, then the fusion graph
            s = sparse_csr(*g, (num_items, num_items))
            self.register_buffer(f"mm_adj_{j}", s, persistent=False)
            self.register_buffer(f"mm_adj_t_{j}", transpose_csr(s), persistent=False)

        views = [*self.modalities, FUSION]
        self.user_embedding = nn.Parameter(torch.empty(num_users, d))  # (U, d)
        self.item_embedding = nn.Parameter(torch.empty(num_items, d))  # (I, d)
        self.features = nn.ParameterDict(
            {m: nn.Parameter(x.clone(), requires_grad=trainable_features) for m, x in feats.items()})
        self.trs = nn.ModuleDict({m: nn.Linear(x.shape[1], d) for m, x in feats.items()})
        self.filters = nn.ParameterDict({k: nn.Parameter(torch.empty(d // 2 + 1, 2)) for k in views})  # (re, im)
        self.gate = nn.ModuleDict({k: _gate(d) for k in views})
        self.prefer = nn.ModuleDict({k: _gate(d) for k in views})
        self.query = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d, bias=False)) for m in self.modalities})
        self.dropout = nn.Dropout(dropout)

        users, items = edge_index[0].long(), edge_index[1].long()
        self.register_buffer("adj", user_item_graph(users, items, num_users, num_items), persistent=False)
        r, r_t = user_item_block(users, items, num_users, num_items)
        self.register_buffer("r", r, persistent=False)
        self.register_buffer("r_t", r_t, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for w in self.filters.values():
            nn.init.normal_(w)

    def spectral(self, encoded: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The filtered modalities ``c_m`` and the fused ``c_f`` (key ``"fusion"``), (I, d) each."""
        d = self.embedding_dim
        spectra = {m: torch.fft.rfft(encoded[m], dim=1, norm="ortho") for m in self.modalities}  # (I, d//2+1)
        out = {}
        for m, s in spectra.items():
            out[m] = torch.fft.irfft(s * torch.view_as_complex(self.filters[m]), n=d, dim=1, norm="ortho")
        fused = torch.view_as_complex(self.filters[FUSION])
        for s in spectra.values():
            fused = fused * s
        out[FUSION] = torch.fft.irfft(fused, n=d, dim=1, norm="ortho")
        return out

    def views(self) -> tuple[Tensor, list[Tensor]]:
        """``e^{id}`` and the views of every modality and then of the fusion, (U+I, d) each (users first)."""
        encoded = self.encoded_features()
        if self.modality_hook is not None:
            encoded = self.modality_hook(encoded)
        conv = self.spectral(encoded)
        views = []
        for j, k in enumerate([*self.modalities, FUSION]):
            h = self.item_embedding * self.gate[k](conv[k])  # (I, d)
            for _ in range(self.mm_layers):
                h = spmm(getattr(self, f"mm_adj_{j}"), h, getattr(self, f"mm_adj_t_{j}"))
            views.append(torch.cat([spmm(self.r, h, self.r_t), h]))  # (U+I, d)
        content = layer_mean(self.adj, torch.cat([self.user_embedding, self.item_embedding]), self.layers)
        return content, views

    def fuse(self, content: Tensor, views: list[Tensor]) -> Tensor:
        """``e^s`` of some nodes (n, d) from their ``e^{id}`` and their rows of :meth:`views`."""
        fused = views[-1]
        parts = []
        for m, view in zip(self.modalities, views):
            att = torch.softmax(self.query[m](fused), dim=-1)  # over the embedding axis, as the reference
            parts.append(self.dropout(self.prefer[m](content)) * att * view)
        parts.append(self.dropout(self.prefer[FUSION](content)) * fused)
        return torch.stack(parts).mean(0)

    def hparams(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "layers": self.layers,
            "mm_layers": self.mm_layers,
            "knn_k": self.knn_k,
            "reg_weight": self.reg_weight,
            "cl_weight": self.cl_weight,
            "temperature": self.temperature,
            "dropout": self.dropout_rate,
            "trainable_features": self.trainable_features,
            "modalities": list(self.modalities),
        }
