"""Graph code shared by every recommender, written once.

- :func:`sparse_csr` / :func:`csr_mm` / :func:`spmm` / :func:`layer_mean`: a fixed sparse
  matrix applied to dense embeddings with exact gradients. The backward pass multiplies by a precomputed
  ``A^T`` (the same tensor when ``A`` is symmetric), so no sparse transpose or COO coalescing
  happens per step; :func:`layer_mean` fuses LightGCN's layer average into one autograd node.
- :func:`user_item_graph`: the symmetric-normalised bipartite adjacency
  ``D^-1/2 A D^-1/2`` over ``num_users + num_items`` nodes (users first).
- :func:`edge_norm`: ``1 / sqrt(deg_row * deg_col)`` per edge (degrees + 1e-7, as the
  reference implementations).
- :func:`prune_edges`: FREEDOM's degree-sensitive edge pruning.
- :func:`knn_edges` / :func:`item_item_graph`: the cosine kNN item-item graph of FREEDOM,
  built in row blocks so memory stays ``O(block * num_items)``.
- :func:`knn_cosine` / :func:`sym_normalize` / :func:`max_union` / :func:`propagate_edges`:
  the weighted (cosine-valued) kNN graphs of LATTICE, MGCN and SMORE, their
  ``D^-1/2 S D^-1/2`` normalisation, SMORE's max-pooled union and an edge-list product that
  is differentiable in the edge values.
- :func:`self_loop_rw_graph` / :func:`user_item_block`: LATTICE's ``D^-1 (A + I)`` and the
  normalised user -> item block ``R`` of MGCN / SMORE.
- :func:`check_features`: the validated ``{modality: (I, d_m)}`` input of a feature backbone.
- :func:`bpr_loss`, :func:`emb_norm`, :func:`half_sq_norm`, :func:`info_nce`: the BPR loss,
  the batch embedding regularisers and the InfoNCE contrast of MGCN / SMORE.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import row_logsumexp

EPS_DEGREE = 1e-7  # added to node degrees before the inverse square root (reference behaviour)


def sparse_csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A coalesced CSR matrix; int32 indices when they fit (several times faster on CPU)."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = coo.to_sparse_csr()
        if csr.values().numel() < 2**31 - 1 and max(shape) < 2**31 - 1:
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(), shape,
                check_invariants=False,
            )
    return csr


def transpose_csr(a: Tensor) -> Tensor:
    """``a^T`` as a new CSR matrix (computed once, outside the training step)."""
    coo = a.to_sparse_coo()
    rows, cols = coo.indices()
    return sparse_csr(cols, rows, coo.values(), (a.shape[1], a.shape[0]))


def csr_mm(a: Tensor, x: Tensor, alpha: float = 1.0) -> Tensor:
    """``alpha * (a @ x)`` for a CSR ``a`` (R, C) and dense ``x`` (C, d) -> new (R, d).

    Written straight into a fresh tensor (``beta = 0``: its old contents are never read);
    ``a @ x`` would zero-fill and copy an (R, d) temporary first, about 4x slower here.
    """
    out = x.new_empty(a.shape[0], x.shape[1])
    return torch.addmm(out, a, x, beta=0.0, alpha=alpha, out=out)


class _SpMM(torch.autograd.Function):
    """``y = A x`` with ``dL/dx = A^T dL/dy``; ``A`` is constant (no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, a_t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.a_t = a_t
        return csr_mm(a, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return csr_mm(ctx.a_t, grad.contiguous()), None, None


def spmm(a: Tensor, x: Tensor, a_t: Tensor | None = None) -> Tensor:
    """``a @ x`` for a CSR ``a`` (R, C) and dense ``x`` (C, d) -> (R, d); ``a_t`` defaults to ``a`` (symmetric)."""
    return _SpMM.apply(x, a, a if a_t is None else a_t)


class _DenseMM(torch.autograd.Function):
    """``y = x w`` with ``dL/dw = (g^T x)^T`` and ``dL/dx = g w^T``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        dx = grad @ w.T if ctx.needs_input_grad[0] else None
        dw = (grad.T @ x).T.contiguous() if ctx.needs_input_grad[1] else None
        return dx, dw


def dense_mm(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` for a tall ``x`` (N, k) and a narrow ``w`` (k, n): the same product and gradients, ``w``'s
    gradient taken as ``(g^T x)^T``. Autograd's ``x^T g`` hands MKL a transposed tall ``x``, which ran up
    to 19x slower on the benchmark machine (AMD EPYC, one thread: a (7050, 4096) feature table times a
    (4096, 4) weight, 464 ms against 24 ms; (4096, 64): 301 against 124 ms; BENCHMARKS.md)."""
    return _DenseMM.apply(x, w)


class _LayerMean(torch.autograd.Function):
    """``y = (x + A x + ... + A^L x) / (L + 1)``, forward and backward by Horner's rule.

    ``r <- x + A r`` repeated ``L`` times gives ``sum_l A^l x``: one sparse product and one
    in-place add per layer, with the ``1 / (L + 1)`` folded into the last step. Nothing but
    ``A^T`` is kept for backward, which is the same recursion with ``A^T``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, a_t: Tensor, layers: int) -> Tensor:  # type: ignore[override]
        ctx.a_t, ctx.layers = a_t, layers
        return _horner(a, x, layers)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return _horner(ctx.a_t, grad.contiguous(), ctx.layers), None, None, None


def _horner(a: Tensor, x: Tensor, layers: int) -> Tensor:
    """``(x + A x + ... + A^layers x) / (layers + 1)`` -> (N, d)."""
    scale = 1.0 / (layers + 1)
    if layers == 0:
        return x * scale
    r = x
    for step in range(layers):
        alpha = scale if step == layers - 1 else 1.0
        r = csr_mm(a, r, alpha).add_(x, alpha=alpha)
    return r


def layer_mean(a: Tensor, x: Tensor, layers: int, a_t: Tensor | None = None) -> Tensor:
    """LightGCN propagation: mean of ``A^l x`` over ``l = 0..layers`` -> (R, d); ``a_t`` defaults to ``a``."""
    return _LayerMean.apply(x, a, a if a_t is None else a_t, layers)


def edge_norm(rows: Tensor, cols: Tensor, num_rows: int, num_cols: int) -> Tensor:
    """Per-edge ``1 / sqrt(deg_row[r] * deg_col[c])`` of an unweighted (E,) edge list -> (E,)."""
    deg_r = torch.bincount(rows, minlength=num_rows).to(torch.float32) + EPS_DEGREE
    deg_c = torch.bincount(cols, minlength=num_cols).to(torch.float32) + EPS_DEGREE
    return deg_r.rsqrt()[rows] * deg_c.rsqrt()[cols]


def user_item_graph(users: Tensor, items: Tensor, num_users: int, num_items: int) -> Tensor:
    """Symmetric-normalised bipartite adjacency (CSR, (U+I, U+I)) from (E,) user and item indices.

    Node ``u`` is user ``u``; node ``num_users + i`` is item ``i``. Duplicate pairs count once.
    """
    key = torch.unique(users * num_items + items)
    users, items = key // num_items, key % num_items
    vals = edge_norm(users, items, num_users, num_items)
    n = num_users + num_items
    rows = torch.cat([users, items + num_users])
    cols = torch.cat([items + num_users, users])
    return sparse_csr(rows, cols, torch.cat([vals, vals]), (n, n))


def prune_edges(weights: Tensor, keep: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of ``keep`` edges drawn without replacement with probability proportional to ``weights``."""
    keep = max(1, min(int(keep), weights.numel()))
    return torch.multinomial(weights, keep, replacement=False, generator=generator)


def knn_edges(features: Tensor, k: int, block: int = 2048) -> tuple[Tensor, Tensor]:
    """Directed cosine kNN edges ``row -> its k most similar rows`` (itself included) -> ((N*k,), (N*k,)).

    ``features`` is (N, d). Rows with zero norm (items without a vector) get a single self loop
    and are never anyone's neighbour. Computed in blocks of ``block`` rows.
    """
    rows, cols, _ = _knn_topk(features, k, block)
    return rows, cols


@torch.no_grad()
def _knn_topk(features: Tensor, k: int, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`knn_edges` plus each edge's cosine similarity (1.0 on self loops) -> 3 x (E,)."""
    n = features.shape[0]
    norms = features.norm(dim=1)  # (N,)
    valid = norms > 0
    inv = 1.0 / norms.clamp_min(1e-12)  # (N,); no normalised copy of the features is made
    k_eff = max(1, min(k, int(valid.sum())))
    rows_out, cols_out, vals_out = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = features[start:stop] @ features.T  # (b, N) dot products -> cosine below
        sim.mul_(inv[start:stop, None]).mul_(inv[None, :])
        sim[:, ~valid] = float("-inf")
        idx = torch.arange(start, stop, device=features.device)
        sim[idx - start, idx] = torch.where(valid[start:stop], 2.0, 0.0)  # self first (ties broken to self)
        top = sim.topk(k_eff, dim=1)  # (b, k)
        ok = valid[start:stop]
        rows_out.append(idx[ok].repeat_interleave(k_eff))
        cols_out.append(top.indices[ok].reshape(-1))
        vals_out.append(top.values[ok].reshape(-1).clamp_max(1.0))  # the self loop's 2.0 -> its cosine 1.0
        rows_out.append(idx[~ok])
        cols_out.append(idx[~ok])
        vals_out.append(torch.ones(int((~ok).sum()), device=features.device))
    return torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out)


def knn_graph(features: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """FREEDOM's normalised kNN graph of one modality -> (rows, cols, values), each (E,).

    Unweighted kNN edges normalised as the reference code does: ``r^-1/2[row] * r^-1/2[col]``
    with ``r`` the row (out-)degree.
    """
    rows, cols = knn_edges(features, k)
    n = features.shape[0]
    deg = torch.bincount(rows, minlength=n).to(torch.float32) + EPS_DEGREE
    return rows, cols, deg.rsqrt()[rows] * deg.rsqrt()[cols]


def item_item_graph(
    modalities: Sequence[tuple[Tensor, float]], k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted sum of per-modality kNN graphs: ``sum_m w_m * knn_graph(X_m)`` -> coalesced (rows, cols, values)."""
    if not modalities:
        raise ValueError("item_item_graph needs at least one feature matrix")
    n = modalities[0][0].shape[0]
    parts = [knn_graph(x, k) for x, _ in modalities]
    rows = torch.cat([p[0] for p in parts])
    cols = torch.cat([p[1] for p in parts])
    vals = torch.cat([p[2] * w for p, (_, w) in zip(parts, modalities)])
    g = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()
    return g.indices()[0], g.indices()[1], g.values()


def check_features(
    features: Mapping[str, Tensor] | None, num_items: int, model: str, hook: object | None = None
) -> dict[str, Tensor]:
    """Validated float32 copies of a backbone's ``{modality: (I, d_m)}`` features, in the given order.

    Raises ValueError for no modality, a wrong shape or a modality hook with fewer than two modalities.
    """
    if not features:
        raise ValueError(f"{model} needs the features of at least one modality; got none")
    out = {}
    for name, x in features.items():
        if not name or "." in name:
            raise ValueError(f"modality name {name!r} must be non-empty and contain no '.'")
        if x.ndim != 2 or x.shape[0] != num_items:
            raise ValueError(f"{model}: features[{name!r}] has shape {tuple(x.shape)}, expected ({num_items}, d)")
        out[name] = x.detach().to(torch.float32)
    if hook is not None and len(out) < 2:
        raise ValueError(f"{model}: a modality hook (CLEAR dynamic mode) needs two modalities; got {list(out)}")
    return out


def knn_cosine(features: Tensor, k: int, block: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine kNN graph of (N, d) ``features`` with the similarities as weights -> (rows, cols, values), (E,) each.

    The edges of :func:`knn_edges` (``k`` per row, itself included; a zero row gets one self loop
    of weight 1). The reference's ``topk(cos_sim)`` kept as a weighted graph. When ``features``
    requires grad the values are recomputed from it (``cos(x_r, x_c)`` per edge), so they are
    differentiable as in the reference's dense ``scatter(topk)``; the neighbour choice is not.
    """
    rows, cols, vals = _knn_topk(features.detach(), k, block)
    if features.requires_grad:
        norms = features.norm(dim=1, keepdim=True)  # (N, 1)
        unit = features / norms.clamp_min(1e-12)  # (N, d)
        cos = (unit[rows] * unit[cols]).sum(1)  # (E,)
        vals = torch.where(norms[rows, 0] > 0, cos, torch.ones_like(cos))  # a zero row's self loop stays 1
    return rows, cols, vals


def sym_normalize(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> Tensor:
    """Edge values of ``D^-1/2 S D^-1/2`` with ``D`` the row sums of ``S`` (N, N) -> (E,); zero-sum rows get 0.

    Differentiable in ``values``; duplicate ``(row, col)`` edges are summed as in a sparse matrix.
    """
    deg = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)  # (N,)
    inv = torch.where(deg > 0, deg.clamp_min(1e-30).rsqrt(), torch.zeros_like(deg))
    return inv[rows] * values * inv[cols]


def propagate_edges(rows: Tensor, cols: Tensor, values: Tensor, x: Tensor, n: int) -> Tensor:
    """``S x`` for an edge-list ``S`` (n, C) and dense (C, d) ``x`` -> (n, d), differentiable in ``values`` and ``x``."""
    return x.new_zeros(n, x.shape[1]).index_add(0, rows, values.unsqueeze(1) * x[cols])


def max_union(graphs: Sequence[tuple[Tensor, Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Element-wise maximum of weighted (n, n) edge-list graphs over the union of their edges -> coalesced (rows, cols, values).

    An edge missing from a graph counts as ``-inf`` there (SMORE's max-pooled fusion graph).
    """
    rows = torch.cat([g[0] for g in graphs])
    cols = torch.cat([g[1] for g in graphs])
    vals = torch.cat([g[2] for g in graphs])
    key, inverse = torch.unique(rows * n + cols, return_inverse=True)
    out = torch.full((key.numel(),), float("-inf"), dtype=vals.dtype, device=vals.device)
    out = out.scatter_reduce(0, inverse, vals, reduce="amax")
    return key // n, key % n, out


def self_loop_rw_graph(users: Tensor, items: Tensor, num_users: int, num_items: int) -> Tensor:
    """LATTICE's user-item adjacency ``D^-1 (A + I)`` (CSR, (U+I, U+I), users first; not symmetric).

    ``A`` is the bipartite graph of the (E,) pairs (duplicates once), ``D`` the row sums of ``A + I``.
    """
    key = torch.unique(users * num_items + items)
    users, items = key // num_items, key % num_items
    n = num_users + num_items
    nodes = torch.arange(n, device=users.device)
    rows = torch.cat([users, items + num_users, nodes])
    cols = torch.cat([items + num_users, users, nodes])
    deg = torch.bincount(rows, minlength=n).to(torch.float32)  # >= 1 (the self loop)
    return sparse_csr(rows, cols, (1.0 / deg)[rows], (n, n))


def user_item_block(users: Tensor, items: Tensor, num_users: int, num_items: int) -> tuple[Tensor, Tensor]:
    """The user -> item block ``R`` (U, I) of :func:`user_item_graph` and ``R^T`` (I, U), both CSR.

    ``R[u, i] = 1 / sqrt(d_u d_i)``: MGCN / SMORE's ``e_u = R e_i``, their user side of an item view.
    """
    key = torch.unique(users * num_items + items)
    users, items = key // num_items, key % num_items
    vals = edge_norm(users, items, num_users, num_items)
    r = sparse_csr(users, items, vals, (num_users, num_items))
    return r, sparse_csr(items, users, vals, (num_items, num_users))


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """BPR: ``mean(-log sigmoid(pos - neg))`` over (B,) scores."""
    return F.softplus(neg - pos).mean()


def emb_norm(*embeddings: Tensor) -> Tensor:
    """Sum of the Frobenius norms of (B, d) batch embeddings divided by B (the reference's EmbLoss)."""
    return torch.stack([e.norm() for e in embeddings]).sum() / embeddings[-1].shape[0]


def half_sq_norm(*embeddings: Tensor) -> Tensor:
    """``sum_e ||e||^2 / 2`` over (B, d) batch embeddings, divided by B (LATTICE / MGCN / SMORE's regulariser)."""
    return torch.stack([e.square().sum() for e in embeddings]).sum() / (2 * embeddings[-1].shape[0])


def info_nce(view1: Tensor, view2: Tensor, index: Tensor, temperature: float) -> Tensor:
    """InfoNCE of the rows ``index`` (B,) of two (N, d) views, the batch's rows as negatives.

    ``mean_b -log softmax_j(cos(v1[index_b], v2[index_j]) / t)[b]``, computed over the batch's
    ``n`` distinct rows: a row drawn ``c`` times is one column with ``log c`` added to its logit
    and one row weighted ``c``, the same value as the (B, B) form in an (n, n) product.
    """
    rows, counts = torch.unique(index, return_counts=True)  # (n,), (n,)
    a = F.normalize(view1[rows], dim=1) / temperature  # (n, d), 1 / t folded in before the (n, n) product
    b = F.normalize(view2[rows], dim=1)
    weight = counts.to(a.dtype)
    per_row = row_logsumexp(a, b, weight.log(), bound=1 / temperature) - (a * b).sum(1)  # (n,)
    return (weight * per_row).sum() / index.numel()


def content_side_loss(content: Tensor, side: Tensor, num_users: int, users: Tensor, pos_items: Tensor,
                      neg_items: Tensor, reg_weight: float, cl_weight: float, temperature: float) -> Tensor:
    """MGCN / SMORE's loss over ``content`` (ID, graph-propagated) and ``side`` (modality) views, (U+I, d) each.

    BPR on ``content + side`` plus ``reg_weight`` x :func:`half_sq_norm` of the batch, plus
    ``cl_weight`` x (item InfoNCE + user InfoNCE) between the two views.
    """
    out = content + side  # (U+I, d), users first
    items = pos_items + num_users
    u, p, n = out[users], out[items], out[neg_items + num_users]  # (B, d) each
    loss = bpr_loss((u * p).sum(1), (u * n).sum(1)) + reg_weight * half_sq_norm(u, p, n)
    if cl_weight > 0:
        cl = info_nce(side, content, items, temperature) + info_nce(side, content, users, temperature)
        loss = loss + cl_weight * cl
    return loss
