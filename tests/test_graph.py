"""models/graph.py: adjacency normalisation, sparse products and their gradients, kNN graphs, pruning, losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from clearrec.models.graph import (
    bpr_loss,
    csr_mm,
    emb_norm,
    item_item_graph,
    knn_edges,
    knn_graph,
    layer_mean,
    prune_edges,
    sparse_csr,
    spmm,
    transpose_csr,
    user_item_graph,
)


def _pairs(num_users=30, num_items=20, per_user=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(num_users).repeat_interleave(per_user)
    items = torch.stack([torch.randperm(num_items, generator=g)[:per_user] for _ in range(num_users)]).reshape(-1)
    return users, items


def _dense_norm_adj(users, items, nu, ni):
    a = torch.zeros(nu + ni, nu + ni)
    a[users, items + nu] = 1
    a[items + nu, users] = 1
    d = a.sum(1) + 1e-7
    return a / torch.sqrt(d[:, None] * d[None, :])


def test_user_item_graph_is_symmetric_normalised_adjacency():
    users, items = _pairs()
    adj = user_item_graph(users, items, 30, 20)
    assert adj.layout == torch.sparse_csr and adj.shape == (50, 50)
    dense = adj.to_dense()
    torch.testing.assert_close(dense, _dense_norm_adj(users, items, 30, 20))
    torch.testing.assert_close(dense, dense.T)


def test_duplicate_pairs_count_once():
    users, items = _pairs()
    once = user_item_graph(users, items, 30, 20).to_dense()
    twice = user_item_graph(torch.cat([users, users]), torch.cat([items, items]), 30, 20).to_dense()
    torch.testing.assert_close(once, twice)


def test_spmm_forward_and_gradient_match_dense():
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.randint(0, 15, (60,), generator=g), torch.randint(0, 9, (60,), generator=g)
    vals = torch.rand(60, generator=g)
    a = sparse_csr(rows, cols, vals, (15, 9))
    dense = torch.zeros(15, 9).index_put_((rows, cols), vals, accumulate=True)
    x = torch.randn(9, 4, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = spmm(a, x, transpose_csr(a))
    w = torch.randn(15, 4, generator=g)
    (y * w).sum().backward()
    (dense @ x_ref * w).sum().backward()
    torch.testing.assert_close(y, dense @ x_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_layer_mean_matches_dense_propagation_and_gradient():
    users, items = _pairs()
    adj = user_item_graph(users, items, 30, 20)
    dense = _dense_norm_adj(users, items, 30, 20)
    x = torch.randn(50, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = layer_mean(adj, x, 3)
    h, acc = x_ref, x_ref
    for _ in range(3):
        h = dense @ h
        acc = acc + h
    ref = acc / 4
    w = torch.randn(50, 8)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_transpose_csr():
    rows, cols = torch.tensor([0, 0, 2, 3]), torch.tensor([1, 4, 0, 4])
    a = sparse_csr(rows, cols, torch.tensor([1.0, 2.0, 3.0, 4.0]), (4, 5))
    torch.testing.assert_close(transpose_csr(a).to_dense(), a.to_dense().T)


def test_knn_edges_match_brute_force_cosine_topk():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g)
    rows, cols = knn_edges(x, 5, block=7)  # several blocks
    assert rows.numel() == 40 * 5
    sim = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    expected = sim.topk(5, dim=1).indices
    for i in range(40):
        assert set(cols[rows == i].tolist()) == set(expected[i].tolist())
        assert i in cols[rows == i].tolist()  # itself is its nearest neighbour


def test_knn_rows_without_vector_get_only_a_self_loop():
    x = torch.randn(10, 4)
    x[3] = 0
    rows, cols = knn_edges(x, 3)
    assert cols[rows == 3].tolist() == [3]
    assert (cols[rows != 3] != 3).all()  # never anyone's neighbour


def test_knn_graph_values_are_reference_normalisation():
    x = torch.randn(25, 5)
    _, _, vals = knn_graph(x, 4)
    torch.testing.assert_close(vals, torch.full_like(vals, 1 / 4), rtol=1e-5, atol=1e-6)  # every row has 4 edges


def test_item_item_graph_mixes_modalities_by_weight():
    g = torch.Generator().manual_seed(3)
    xv, xt = torch.randn(20, 8, generator=g), torch.randn(20, 5, generator=g)
    rows, cols, vals = item_item_graph([(xv, 0.1), (xt, 0.9)], 3)
    mixed = torch.zeros(20, 20).index_put_((rows, cols), vals)
    v = torch.zeros(20, 20).index_put_(knn_graph(xv, 3)[:2], knn_graph(xv, 3)[2])
    t = torch.zeros(20, 20).index_put_(knn_graph(xt, 3)[:2], knn_graph(xt, 3)[2])
    torch.testing.assert_close(mixed, 0.1 * v + 0.9 * t)


def test_prune_edges_keeps_share_prefers_heavy_edges_and_is_seeded():
    w = torch.cat([torch.full((50,), 1.0), torch.full((50,), 0.01)])
    kept = prune_edges(w, 20, torch.Generator().manual_seed(0))
    assert kept.numel() == 20 and kept.unique().numel() == 20
    assert (kept < 50).sum() >= 18
    again = prune_edges(w, 20, torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)


def test_bpr_loss_and_emb_norm():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0)).item()) + math.log(torch.sigmoid(torch.tensor(-1.0)).item())) / 2
    assert abs(bpr_loss(pos, neg).item() - expected) < 1e-6
    assert bpr_loss(torch.tensor([5.0]), torch.tensor([0.0])) < bpr_loss(torch.tensor([0.0]), torch.tensor([5.0]))
    a, b = torch.ones(4, 3), torch.zeros(4, 3)
    assert abs(emb_norm(a, b).item() - math.sqrt(12) / 4) < 1e-6


def test_csr_mm_writes_every_row_including_empty_ones():
    rows, cols = torch.tensor([0, 0, 5]), torch.tensor([1, 2, 0])
    a = sparse_csr(rows, cols, torch.tensor([1.0, 2.0, 3.0]), (300, 4))  # rows 1-4 and 6-299 are empty
    x = torch.randn(4, 64)
    for _ in range(3):
        junk = torch.full((300, 64), float("nan"))  # freed memory that the next allocation may reuse
        del junk
        out = csr_mm(a, x, alpha=0.5)
        torch.testing.assert_close(out, 0.5 * (a.to_dense() @ x))
