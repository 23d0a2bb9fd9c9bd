"""The backbones and the training loop on tiny random graphs (milliseconds to seconds on CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from clearrec.models.base import Backbone
from clearrec.models.freedom import FREEDOM
from clearrec.models.lightgcn import LightGCN
from clearrec.models.metrics import ItemSets
from clearrec.models.registry import BACKBONES, backbone_class
from clearrec.models.trainer import NegativeSampler, TrainOptions, fit
from clearrec.models.vbpr import VBPR
from clearrec.pipeline.errors import TrainingError

NU, NI = 60, 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: one torch thread is faster (and the setting is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _splits(seed=0, per_user=8):
    """Users with a taste for one of 4 item clusters, so that there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    users, items, split = [], [], []
    for u in range(NU):
        cluster = torch.arange(u % 4, NI, 4)
        chosen = cluster[torch.randperm(cluster.numel(), generator=g)[:per_user]]
        for j, i in enumerate(chosen.tolist()):
            users.append(u)
            items.append(i)
            split.append(0 if j < per_user - 2 else (1 if j == per_user - 2 else 2))
    users, items, split = torch.tensor(users), torch.tensor(items), torch.tensor(split)
    sets = [ItemSets.from_pairs(users[split == s], items[split == s], NU, NI) for s in range(3)]
    return sets, torch.stack([users[split == 0], items[split == 0]])


def _features(seed=0, dim=12):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, dim, generator=g)
    return centers[torch.arange(NI) % 4] + 0.3 * torch.randn(NI, dim, generator=g)


def _make(name, edge_index, **kw):
    if name == "lightgcn":
        return LightGCN(NU, NI, edge_index, embedding_dim=16, **kw)
    if name == "vbpr":
        return VBPR(NU, NI, {"image": _features(1, 20), "text": _features(2, 12)}, embedding_dim=16, **kw)
    return FREEDOM(NU, NI, edge_index, {"image": _features(1, 20), "text": _features(2, 12)},
                   embedding_dim=16, knn_k=5, **kw)


def test_registry_maps_names_to_classes():
    assert {"lightgcn", "vbpr", "freedom"} <= set(BACKBONES)
    assert backbone_class("freedom") is FREEDOM
    with pytest.raises(KeyError, match="known: lightgcn"):
        backbone_class("lightgnc")


@pytest.mark.parametrize("name", ["lightgcn", "vbpr", "freedom"])
def test_backbone_trains_loss_decreases_shapes_and_ids(name):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make(name, edges)
    result = fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=8, patience=20, seed=0))
    losses = [r.loss for r in result.history]
    assert losses[-1] < losses[0]
    assert 1 <= result.best_epoch <= 8
    assert set(result.test) == {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit", "mrr", "coverage",
                                                     "popularity", "gini") for k in (5, 10, 20, 50)}
    assert all(0.0 <= v <= 1.0 for v in result.test.values())
    u, i = model.vectors()
    dim = 32 if name == "vbpr" else 16
    assert u.shape == (NU, dim) and i.shape == (NI, dim)
    users = torch.arange(NU)
    scores, items = model.recommend(users, 5, exclude=train)
    assert items.shape == (NU, 5) and items.min() >= 0 and items.max() < NI
    rows, train_items = train.pairs(users)
    assert not (items[rows] == train_items[:, None]).any()  # training items never recommended
    torch.testing.assert_close(model.score(users, items[:, 0]), scores[:, 0])
    torch.testing.assert_close(model.full_scores(users[:3]), u[:3] @ i.T)


def test_learns_better_than_random():
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make("lightgcn", edges)
    result = fit(model, train, valid, test, TrainOptions(lr=0.02, batch_size=64, epochs=15, seed=0))
    assert result.valid["recall@10"] > 2 * 10 / (NI - 6)  # random ranking of 34 candidates: ~10/34


class _Scripted(Backbone):
    """Item vectors set from a script each epoch: epoch 2 ranks every user's truth first."""

    def __init__(self, good: torch.Tensor, bad: torch.Tensor):
        super().__init__()
        self.num_users, self.num_items = good.shape[0], good.shape[1]
        self.user_vecs = torch.eye(self.num_users)
        self.table = torch.nn.Parameter(bad.T.clone())  # (I, U)
        self.good, self.bad, self.epoch = good, bad, 0

    def pre_epoch(self, generator=None):
        self.epoch += 1
        with torch.no_grad():
            self.table.copy_((self.good if self.epoch == 2 else self.bad).T)

    def forward(self):
        return self.user_vecs, self.table

    def loss(self, users, pos_items, neg_items):
        return (self.table * 0).sum() + 1.0

    def hparams(self):
        return {}


def test_early_stopping_and_best_epoch_restore():
    truth = ItemSets.from_pairs(torch.arange(4), torch.arange(4), 4, 6)
    train = ItemSets.from_pairs(torch.arange(4), torch.tensor([5, 5, 5, 5]), 4, 6)
    good = torch.zeros(4, 6)
    good[torch.arange(4), torch.arange(4)] = 1.0  # user u's top item is u
    bad = -good
    model = _Scripted(good, bad)
    result = fit(model, train, truth, truth, TrainOptions(batch_size=2, epochs=50, patience=3, ks=(1,), stop_metric="recall@1"))
    assert result.best_epoch == 2
    assert result.stopped_early and len(result.history) == 5  # 3 epochs without improvement after epoch 2
    assert result.valid["recall@1"] == 1.0 and result.test["recall@1"] == 1.0  # best weights restored
    torch.testing.assert_close(model.table.detach(), good.T)


def test_nan_loss_raises_training_error():
    (train, valid, test), edges = _splits()
    model = _make("lightgcn", edges)
    with torch.no_grad():
        model.embedding[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan at epoch 1"):
        fit(model, train, valid, test, TrainOptions(batch_size=NU * 8, epochs=3))


def test_training_is_deterministic_for_a_seed():
    (train, valid, test), edges = _splits()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = _make("freedom", edges)
        result = fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=3, seed=5))
        runs.append(([r.loss for r in result.history], model.vectors()[1]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_negative_sampler_never_returns_a_training_item():
    (train, _, _), _ = _splits()
    sampler = NegativeSampler(train, NI)
    users = torch.arange(NU).repeat(50)
    neg = sampler.sample(users, torch.Generator().manual_seed(0))
    rows, items = train.pairs(torch.arange(NU))
    positives = set(zip(rows.tolist(), items.tolist()))
    assert not any((u, i) in positives for u, i in zip(users.tolist(), neg.tolist()))
    assert neg.unique().numel() == NI  # every item can be a negative for someone


def test_negative_sampler_rejects_user_with_every_item():
    full = ItemSets.from_pairs(torch.zeros(5, dtype=torch.long), torch.arange(5), 2, 5)
    with pytest.raises(TrainingError, match="every item"):
        NegativeSampler(full, 5)


def test_freedom_item_graph_changes_with_features():
    (_, _, _), edges = _splits()
    a = FREEDOM(NU, NI, edges, {"image": _features(1, 20), "text": _features(2, 12)}, knn_k=5)
    b = FREEDOM(NU, NI, edges, {"image": _features(1, 20), "text": _features(3, 12)}, knn_k=5)
    c = FREEDOM(NU, NI, edges, {"image": _features(1, 20), "text": _features(2, 12)}, knn_k=5)
    dense = [torch.zeros(NI, NI).index_put_(m.item_graph[:2], m.item_graph[2]) for m in (a, b, c)]
    assert not torch.equal(dense[0], dense[1])
    assert torch.equal(dense[0], dense[2])


def test_freedom_mixes_image_and_text_graphs():
    (_, _, _), edges = _splits()
    xv, xt = _features(1, 20), _features(2, 12)
    m = FREEDOM(NU, NI, edges, {"image": xv, "text": xt}, knn_k=5, modality_weights={"image": 0.1, "text": 0.9})
    expected = FREEDOM.build_item_graph({"image": xv, "text": xt}, 5)
    got = torch.zeros(NI, NI).index_put_(m.item_graph[:2], m.item_graph[2])
    torch.testing.assert_close(got, torch.zeros(NI, NI).index_put_(expected[:2], expected[2]))
    assert got.sum(1).allclose(torch.ones(NI), atol=1e-4)  # 0.1 * (k * 1/k) + 0.9 * (k * 1/k)


def test_freedom_with_text_only_and_with_nothing():
    (train, valid, test), edges = _splits()
    m = FREEDOM(NU, NI, edges, {"text": _features(2, 12)}, embedding_dim=16, knn_k=5)
    assert list(m.proj) == ["text"] and m.hparams()["modalities"] == ["text"]
    fit(m, train, valid, test, TrainOptions(batch_size=128, epochs=2))
    with pytest.raises(ValueError, match="at least one modality"):
        FREEDOM(NU, NI, edges, {})


def test_freedom_pruning_keeps_share_of_edges_and_eval_uses_full_graph():
    (_, _, _), edges = _splits()
    m = _make("freedom", edges, dropout=0.8)
    m.pre_epoch(torch.Generator().manual_seed(0))
    full_edges = m.adj.values().numel()
    assert m.train_adj.values().numel() == 2 * int(full_edges // 2 * (1.0 - 0.8))  # as the reference rounds
    m.eval()
    assert m.forward()[0].allclose(m._propagate(m.adj)[0])


@pytest.mark.parametrize("trainable", [True, False])
def test_freedom_trainable_features_option(trainable):
    (train, valid, test), edges = _splits()
    m = _make("freedom", edges, trainable_features=trainable)
    before = m.text_features.detach().clone()
    assert isinstance(m.text_features, torch.nn.Parameter) == trainable
    fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2))
    assert (not torch.equal(before, m.text_features.detach())) == trainable


def test_freedom_alignment_loss_equals_reference_form():
    """The (u W) . (x_p - x_n) shortcut equals BPR(u, W x_p + b, W x_n + b) of the reference code."""
    (_, _, _), edges = _splits()
    m = _make("freedom", edges, dropout=0.0)
    users, pos, neg = torch.arange(10), torch.arange(10), torch.arange(10, 20)
    u, i = m.forward()
    ev, et = m.encoded_features().values()
    from clearrec.models.graph import bpr_loss

    ref = bpr_loss((u[users] * i[pos]).sum(1), (u[users] * i[neg]).sum(1))
    for e in (ev, et):
        ref = ref + m.reg_weight * bpr_loss((u[users] * e[pos]).sum(1), (u[users] * e[neg]).sum(1))
    torch.testing.assert_close(m.loss(users, pos, neg), ref)


class _ZeroHook:
    def __init__(self):
        self.calls, self.refits = [], []

    def refit(self, embeddings):
        ev, et = embeddings["image"], embeddings["text"]
        self.refits.append((ev.shape, et.shape, ev.requires_grad))

    def __call__(self, embeddings):
        ev, et = embeddings["image"], embeddings["text"]
        self.calls.append((ev.shape, et.shape))
        return {"image": ev * 0, "text": et * 0}


def test_modality_hook_is_refit_each_epoch_and_applied_in_loss():
    (_, _, _), edges = _splits()
    for cls_name in ("freedom", "vbpr"):
        hook = _ZeroHook()
        m = _make(cls_name, edges, modality_hook=hook)
        m.pre_epoch()
        assert hook.refits == [((NI, 16), (NI, 16), False)]
        loss = m.loss(torch.arange(4), torch.arange(4), torch.arange(4, 8))
        loss.backward()
        assert hook.calls and hook.calls[0] == ((NI, 16), (NI, 16))
    with pytest.raises(ValueError, match="needs two modalities"):
        FREEDOM(NU, NI, edges, {"text": _features(2, 12)}, modality_hook=_ZeroHook())


def test_vbpr_content_vectors_for_new_items():
    (train, valid, test), _ = _splits()
    xv, xt = _features(1, 20), _features(2, 12)
    m = VBPR(NU, NI, {"image": xv, "text": xt}, embedding_dim=16)
    fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2))
    _, items = m.vectors()
    new = m.content_item_vectors({"text": xt[:5], "image": xv[:5]})  # as if items 0..4 were new
    assert new.shape == (5, 32)
    assert (new[:, :16] == 0).all()
    torch.testing.assert_close(new[:, 16:], items[:5, 16:])
    with pytest.raises(ValueError, match=r"missing \['image'\]"):
        m.content_item_vectors({"text": xt[:5]})
    with pytest.raises(ValueError, match=r"features\['image'\] must be \(N, 20\)"):
        m.content_item_vectors({"text": xt[:5], "image": xt[:5]})
    text_only = VBPR(NU, NI, {"text": xt}, embedding_dim=16)
    assert text_only.content_item_vectors({"text": xt[:2]}).shape == (2, 32)


@pytest.mark.parametrize("batch", [3, NI])  # 2B < I: the distinct items projected; 2B >= I: the whole table
def test_vbpr_reference_loss_and_gradients(batch):
    m = _make("vbpr", None, reg=0.5)
    g = torch.Generator().manual_seed(3)
    users, pos, neg = (torch.randint(0, n, (batch,), generator=g) for n in (NU, NI, NI))
    items = torch.cat([m.item_embedding, m.content(m.features)], dim=1)  # v_i = [q_i ; W x_i + b]
    u = m.user_embedding[users]
    bpr = -torch.log(torch.sigmoid((u * items[pos]).sum(1) - (u * items[neg]).sum(1))).mean()
    reference = bpr + 0.5 * (u.norm() + items[pos].norm() + items[neg].norm()) / batch
    expected = torch.autograd.grad(reference, list(m.parameters()))
    loss = m.loss(users, pos, neg)
    torch.testing.assert_close(loss, reference)
    for got, want in zip(torch.autograd.grad(loss, list(m.parameters())), expected):
        torch.testing.assert_close(got, want)


def test_lightgcn_reference_loss():
    (_, _, _), edges = _splits()
    m = _make("lightgcn", edges, reg=1e-2)
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])
    u, i = m.forward()
    ego_u, ego_i = m.embedding[:NU], m.embedding[NU:]
    bpr = -torch.log(torch.sigmoid((u[users] * i[pos]).sum(1) - (u[users] * i[neg]).sum(1))).mean()
    reg = (ego_u[users].norm() + ego_i[pos].norm() + ego_i[neg].norm()) / 2
    assert math.isclose(m.loss(users, pos, neg).item(), (bpr + 1e-2 * reg).item(), rel_tol=1e-5)


def test_freedom_forward_matches_dense_formula():
    (_, _, _), edges = _splits()
    m = _make("freedom", edges, mm_layers=2)
    m.eval()
    u, i = m.forward()
    adj = m.adj.to_dense()
    s = m.mm_adj.to_dense()
    ego = torch.cat([m.user_embedding, m.item_embedding]).detach()
    out = (ego + adj @ ego + adj @ adj @ ego) / 3  # layers = 2
    torch.testing.assert_close(u, out[:NU])
    torch.testing.assert_close(i, out[NU:] + s @ s @ m.item_embedding.detach())


def test_lightgcn_forward_matches_dense_formula():
    (_, _, _), edges = _splits()
    m = _make("lightgcn", edges, layers=2)
    u, i = m.forward()
    adj, x = m.adj.to_dense(), m.embedding.detach()
    out = (x + adj @ x + adj @ adj @ x) / 3
    torch.testing.assert_close(torch.cat([u, i]), out)


def test_freedom_feature_margin_matches_autograd_including_repeated_items():
    from clearrec.models.freedom import _FeatureMargin

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 9, generator=g, requires_grad=True)
    z = torch.randn(8, 9, generator=g, requires_grad=True)
    pos, neg = torch.randint(0, 30, (8,), generator=g), torch.randint(0, 30, (8,), generator=g)
    neg[1] = pos[1]  # the same item as positive and negative
    pos[2] = neg[5]  # the same item in two rows
    w = torch.randn(8, generator=g)
    (_FeatureMargin.apply(x, pos, neg, z) * w).sum().backward()
    x_ref, z_ref = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    ref = (z_ref * (x_ref[pos] - x_ref[neg])).sum(1)
    (ref * w).sum().backward()
    torch.testing.assert_close(_FeatureMargin.apply(x, pos, neg, z), ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(z.grad, z_ref.grad)
