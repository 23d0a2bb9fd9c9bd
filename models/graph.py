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
- :func:`bpr_loss`, :func:`emb_norm`: the BPR loss and the batch embedding regulariser.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
    n = features.shape[0]
    norms = features.norm(dim=1)  # (N,)
    valid = norms > 0
    inv = 1.0 / norms.clamp_min(1e-12)  # (N,); no normalised copy of the features is made
    k_eff = max(1, min(k, int(valid.sum())))
    rows_out, cols_out = [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = features[start:stop] @ features.T  # (b, N) dot products -> cosine below
        sim.mul_(inv[start:stop, None]).mul_(inv[None, :])
        sim[:, ~valid] = float("-inf")
        idx = torch.arange(start, stop, device=features.device)
        sim[idx - start, idx] = torch.where(valid[start:stop], 2.0, 0.0)  # self first (ties broken to self)
        nbr = sim.topk(k_eff, dim=1).indices  # (b, k)
        ok = valid[start:stop]
        rows_out.append(idx[ok].repeat_interleave(k_eff))
        cols_out.append(nbr[ok].reshape(-1))
        rows_out.append(idx[~ok])
        cols_out.append(idx[~ok])
    return torch.cat(rows_out), torch.cat(cols_out)


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


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """BPR: ``mean(-log sigmoid(pos - neg))`` over (B,) scores."""
    return F.softplus(neg - pos).mean()


def emb_norm(*embeddings: Tensor) -> Tensor:
    """Sum of the Frobenius norms of (B, d) batch embeddings divided by B (the reference's EmbLoss)."""
    return torch.stack([e.norm() for e in embeddings]).sum() / embeddings[-1].shape[0]
