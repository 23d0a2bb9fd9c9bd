"""MMGCN, BM3, LGMRec and the Pop / BPR-MF / ItemKNN-CBF baselines on tiny random graphs."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from clearrec.models.bpr import BPRMF
from clearrec.models.clear import ClearOptions, ClearProjector
from clearrec.models.clear_dynamic import DynamicClear
from clearrec.models.itemknn_cbf import ItemKNNCBF
from clearrec.models.lgmrec import hypergraph_step
from clearrec.models.graph import bpr_loss, dense_mm, emb_norm
from clearrec.models.losses import bpr_emb_loss, cosine_alignment, dropout, gumbel_softmax, info_nce_candidates as info_nce, row_logsumexp
from clearrec.models.pop import Pop
from clearrec.models.registry import BACKBONES
from clearrec.models.trainer import TrainOptions, fit
from safetensors.torch import load_file, save_file

from test_models import NI, NU, _splits, one_thread  # noqa: F401  (one_thread: the autouse fixture)

LEARNED = ("mmgcn", "bm3", "lgmrec", "bpr")
HOOKED = ("mmgcn", "bm3", "lgmrec")
ALL = ("mmgcn", "bm3", "lgmrec", "pop", "bpr", "itemknncbf")


def _feat(seed, dim):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, dim, generator=g)
    return centers[torch.arange(NI) % 4] + 0.3 * torch.randn(NI, dim, generator=g)


def _features(three=False):
    out = {"text": _feat(2, 12), "image": _feat(1, 20)}  # deliberately not in name order
    if three:
        out["audio"] = _feat(3, 8)
    return out


def _make(name, edges, features=None, **kw):
    cls = BACKBONES[name]
    accepts = inspect.signature(cls).parameters
    args = {"num_users": NU, "num_items": NI}
    if "edge_index" in accepts:
        args["edge_index"] = edges
    if "features" in accepts:
        args["features"] = _features() if features is None else features
    if "embedding_dim" in accepts:
        args["embedding_dim"] = 16
    if name == "mmgcn":
        args["latent"] = {"image": 8}
    return cls(**args, **kw)


def _dense(a):
    return a.to_dense() if a.layout != torch.strided else a


OPTS = TrainOptions(lr=0.01, batch_size=64, epochs=6, patience=20, seed=0)


@pytest.mark.parametrize("name", LEARNED)
def test_training_lowers_the_loss(name):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make(name, edges)
    result = fit(model, train, valid, test, OPTS)
    losses = [r.loss for r in result.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    u, i = model.vectors()
    assert u.shape[0] == NU and i.shape[0] == NI and u.shape[1] == i.shape[1]
    assert all(0.0 <= v <= 1.0 for v in result.test.values())


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_gives_identical_scores(name, tmp_path):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make(name, edges)
    fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    fresh = _make(name, edges)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    users = torch.arange(NU)
    assert torch.equal(fresh.full_scores(users), model.full_scores(users))


@pytest.mark.parametrize("name", HOOKED)
def test_dynamic_clear_round_trip_keeps_the_fitted_directions(name):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make(name, edges, modality_hook=DynamicClear(ClearOptions(k=2)))
    fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
    assert model.modality_hook.fitted
    fresh = _make(name, edges, modality_hook=DynamicClear(ClearOptions(k=2)))
    fresh.load_state_dict(model.state_dict())
    users = torch.arange(NU)
    assert torch.equal(fresh.full_scores(users), model.full_scores(users))


@pytest.mark.parametrize("name", LEARNED)
def test_training_is_deterministic_for_a_seed(name):
    (train, valid, test), edges = _splits()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = _make(name, edges)
        result = fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=3, seed=5))
        runs.append(([r.loss for r in result.history], model.vectors()[1]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


class _RecordingHook:
    """Zeroes every modality embedding and records what it saw."""

    def __init__(self):
        self.refits, self.calls = [], []

    def refit(self, embeddings):
        self.refits.append({m: (tuple(e.shape), e.requires_grad) for m, e in embeddings.items()})

    def __call__(self, embeddings):
        self.calls.append(sorted(embeddings))
        return {m: e * 0 for m, e in embeddings.items()}


@pytest.mark.parametrize("name", HOOKED)
def test_clear_off_static_and_dynamic_all_run_and_differ(name):
    (train, valid, test), edges = _splits()
    feats = _features()
    projector = ClearProjector(ClearOptions(k=2)).fit(feats["image"].numpy(), feats["text"].numpy())
    static = {"image": torch.from_numpy(projector.transform_visual(feats["image"].numpy())),
              "text": torch.from_numpy(projector.transform_text(feats["text"].numpy()))}
    scores = {}
    for mode, kw in (("off", {}), ("static", {"features": static}),
                     ("dynamic", {"modality_hook": DynamicClear(ClearOptions(k=2))})):
        torch.manual_seed(0)
        model = _make(name, edges, **kw)
        result = fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
        assert all(math.isfinite(r.loss) for r in result.history)
        scores[mode] = model.full_scores(torch.arange(NU))
    assert not torch.equal(scores["off"], scores["static"])
    assert not torch.equal(scores["off"], scores["dynamic"])


@pytest.mark.parametrize("name", HOOKED)
def test_modality_hook_sees_the_documented_tensor_and_is_used(name):
    (_, _, _), edges = _splits()
    hook = _RecordingHook()
    torch.manual_seed(0)
    model = _make(name, edges, modality_hook=hook)
    model.pre_epoch(torch.Generator().manual_seed(0))
    assert hook.refits == [{"image": ((NI, 16), False), "text": ((NI, 16), False)}]
    batch = torch.arange(4), torch.arange(4), torch.arange(4, 8)
    loss = model.loss(*batch)
    loss.backward()
    assert hook.calls and hook.calls[0] == ["image", "text"]
    torch.manual_seed(0)
    plain = _make(name, edges)
    plain.pre_epoch(torch.Generator().manual_seed(0))
    assert not torch.equal(loss, plain.loss(*batch))  # the hooked embeddings enter the loss


@pytest.mark.parametrize("name", ("mmgcn", "bm3", "lgmrec", "itemknncbf"))
def test_three_modalities(name):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make(name, edges, features=_features(three=True))
    assert model.hparams()["modalities"] == ["audio", "image", "text"]
    result = fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
    assert all(math.isfinite(r.loss) for r in result.history)
    torch.manual_seed(0)
    two = _make(name, edges)
    assert model.vectors()[1].shape[0] == two.vectors()[1].shape[0] == NI


def test_lgmrec_contrasts_every_pair_of_modalities():
    (_, _, _), edges = _splits()
    batch = torch.arange(6), torch.arange(6), torch.arange(6, 12)
    for feats, pairs in ((_features(), 1), (_features(three=True), 3), ({"text": _feat(2, 12)}, 0)):
        torch.manual_seed(0)
        with_cl = _make("lgmrec", edges, features=feats, cl_weight=1.0).eval()
        torch.manual_seed(0)
        without = _make("lgmrec", edges, features=feats, cl_weight=0.0).eval()
        z, hyper = with_cl.embeddings()
        names = sorted(feats)
        expected = sum(info_nce(hyper[a][0][batch[0]], hyper[b][0][batch[0]], hyper[b][0], 0.2)
                       + info_nce(hyper[a][1][batch[1]], hyper[b][1][batch[1]], hyper[b][1], 0.2)
                       for i, a in enumerate(names) for b in names[i + 1 :]) if pairs else 0.0
        torch.testing.assert_close(with_cl.loss(*batch) - without.loss(*batch), torch.as_tensor(expected))


def test_feature_mapping_errors_and_name_order():
    (_, _, _), edges = _splits()
    for name in HOOKED + ("itemknncbf",):
        with pytest.raises(ValueError, match="at least one modality"):
            BACKBONES[name](NU, NI, edges, features=None)
        with pytest.raises(ValueError, match=r"features\['image'\] has shape \(3, 4\), expected \(40, d\)"):
            BACKBONES[name](NU, NI, edges, features={"image": torch.zeros(3, 4)})
        assert _make(name, edges).hparams()["modalities"] == ["image", "text"]  # given as text, image
    for name in HOOKED:
        with pytest.raises(ValueError, match="needs two modalities"):
            BACKBONES[name](NU, NI, edges, features={"text": _feat(2, 12)}, modality_hook=DynamicClear())


# ---- key steps against dense references -------------------------------------------------------------


def _dense_mean_adj(edges):
    a = torch.zeros(NU + NI, NU + NI)
    a[edges[0], edges[1] + NU] = 1
    a[edges[1] + NU, edges[0]] = 1
    return a / a.sum(1, keepdim=True).clamp_min(1)


def test_mmgcn_modality_convolution_matches_dense_reference():
    (_, _, _), edges = _splits()
    torch.manual_seed(0)
    model = _make("mmgcn", edges)
    adj = _dense_mean_adj(edges)
    feats = _features()
    outs = model.modality_outputs()
    for m, tower in model.towers.items():
        item = feats[m] @ tower.mlp.weight.T + tower.mlp.bias if tower.mlp is not None else feats[m]
        x = torch.cat([tower.preference, item])
        x = x / x.norm(dim=1, keepdim=True)
        for w, lin, comb in zip(tower.conv, tower.linear, tower.combine):
            h = F.leaky_relu(adj @ (x @ w))
            x_hat = F.leaky_relu(x @ lin.weight.T + lin.bias) + model.id_embedding
            x = F.leaky_relu(torch.cat([h, x_hat], 1) @ comb.weight.T + comb.bias)
        torch.testing.assert_close(outs[m], x)
    u, i = model.forward()
    torch.testing.assert_close(torch.cat([u, i]), (outs["image"] + outs["text"]) / 2)
    assert model.towers["text"].mlp is None and model.towers["image"].preference.shape == (NU, 8)


def test_mmgcn_reference_keeps_id_tables_fixed_and_option_trains_them():
    (train, valid, test), edges = _splits()
    for trainable in (False, True):
        torch.manual_seed(0)
        model = _make("mmgcn", edges, trainable_embeddings=trainable)
        before = model.id_embedding.detach().clone()
        fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=1, seed=0))
        assert torch.equal(before, model.id_embedding.detach()) != trainable
        assert ("id_embedding" in dict(model.named_parameters())) == trainable


def _dense_norm_adj(edges):
    a = torch.zeros(NU + NI, NU + NI)
    a[edges[0], edges[1] + NU] = 1
    a[edges[1] + NU, edges[0]] = 1
    d = a.sum(1) + 1e-7
    return a / torch.sqrt(d[:, None] * d[None, :])


def test_bm3_bootstrap_loss_matches_dense_reference():
    (_, _, _), edges = _splits()
    torch.manual_seed(0)
    model = _make("bm3", edges, dropout=0.0, layers=2)
    adj = _dense_norm_adj(edges)
    ego = torch.cat([model.user_embedding, model.item_embedding])
    out = (ego + adj @ ego + adj @ adj @ ego) / 3
    h_u, h_i = out[:NU], out[NU:] + model.item_embedding
    g = model.predictor
    users, items = torch.tensor([0, 1, 1, 5]), torch.tensor([3, 7, 7, 2])

    def c(a, b):
        return 1 - F.cosine_similarity(g(a), b, dim=-1).mean()

    ref = c(h_u[users], h_i[items]) + c(h_i[items], h_u[users])
    for m in ("image", "text"):
        f = model.encoders[m](model.features[m])[items]
        ref = ref + 2.0 * (c(f, h_i[items]) + c(f, f))
    ref = ref + 0.1 * (h_u.norm() + h_i.norm()) / NI
    torch.testing.assert_close(model.loss(users, items, torch.zeros_like(items)), ref)
    u, i = model.forward()
    torch.testing.assert_close(u @ i.T, g(h_u) @ g(h_i).T)


def test_bm3_targets_are_dropout_views_without_gradient():
    (_, _, _), edges = _splits()
    torch.manual_seed(0)
    model = _make("bm3", edges, dropout=0.5)
    users, items = torch.arange(8), torch.arange(8)
    losses = []
    for seed in (0, 0, 1):
        model.pre_epoch(torch.Generator().manual_seed(seed))
        losses.append(float(model.loss(users, items, items).detach()))
    assert losses[0] == losses[1] != losses[2]
    model.zero_grad()
    model.loss(users, items, items).backward()
    assert model.user_embedding.grad is not None and model.predictor.weight.grad is not None


def test_cosine_alignment_value_and_gradient_equal_cosine_similarity():
    torch.manual_seed(0)
    online = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        online[3] = 0  # a zero row: clamped to eps on both sides
        target[4] = 0
    loss = cosine_alignment(online, target)
    (g,) = torch.autograd.grad(loss, online)
    ref = 1 - F.cosine_similarity(online, target.detach(), dim=-1).mean()
    (g_ref,) = torch.autograd.grad(ref, online)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(lambda x: cosine_alignment(x, target[5:]), (online[5:].detach().requires_grad_(),))
    cosine_alignment(online, target).backward()
    assert target.grad is None  # the target is a constant


def test_dropout_and_gumbel_softmax_helpers():
    x = torch.ones(200, 50)
    y = dropout(x, 0.3, torch.Generator().manual_seed(0))
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.02
    assert torch.equal(dropout(x, 0.3, torch.Generator().manual_seed(0)), y)
    assert dropout(x, 0.0) is x
    logits = torch.randn(100, 4)
    s = gumbel_softmax(logits, 0.2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.sum(1), torch.ones(100))
    assert torch.equal(s, gumbel_softmax(logits, 0.2, torch.Generator().manual_seed(0)))
    hard = gumbel_softmax(torch.tensor([[10.0, 0.0]]).repeat(500, 1), 0.2, torch.Generator().manual_seed(1))
    assert float((hard[:, 0] > 0.5).float().mean()) > 0.99  # a 10-logit lead survives Gumbel(0, 1) noise


def test_info_nce_matches_the_naive_formula():
    g = torch.Generator().manual_seed(0)
    a, p, x = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(9, 7, generator=g)
    an, pn, xn = (t / t.norm(dim=1, keepdim=True) for t in (a, p, x))
    for tau in (0.2, 0.01):  # the direct sum of exponentials and the logsumexp branch
        ad, pd, xd = an.double(), pn.double(), xn.double()
        ref = -torch.log(torch.exp((ad * pd).sum(1) / tau) / torch.exp(ad @ xd.T / tau).sum(1)).sum()
        torch.testing.assert_close(info_nce(a, p, x, tau).double(), ref, rtol=1e-5, atol=1e-4)
    rows = torch.tensor([0, 2, 2, 4, 0, 0])  # a batch with repeats = its distinct rows weighted by counts
    distinct, counts = torch.unique(rows, return_counts=True)
    torch.testing.assert_close(info_nce(a[rows], p[rows], x, 0.2), info_nce(a[distinct], p[distinct], x, 0.2, counts))


def test_info_nce_through_factors_equals_the_full_product_in_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    hu, zu = torch.rand(30, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    hv, zv = torch.rand(30, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    rows, counts = torch.tensor([1, 4, 7, 29]), torch.tensor([2.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    for tau in (0.2, 0.01):
        mine = [t.clone().requires_grad_() for t in (hu, zu, hv, zv)]
        theirs = [t.clone().requires_grad_() for t in (hu, zu, hv, zv)]
        u, v = mine[0] @ mine[1], mine[2] @ mine[3]
        got = info_nce(u[rows], v[rows], v, tau, counts, (mine[0][rows], mine[1], mine[2], mine[3]))
        ru, rv = theirs[0] @ theirs[1], theirs[2] @ theirs[3]
        ref = info_nce(ru[rows], rv[rows], rv, tau, counts)
        torch.testing.assert_close(got, ref)
        for a, b in zip(torch.autograd.grad(got, mine), torch.autograd.grad(ref, theirs)):
            torch.testing.assert_close(a, b)


def test_lgmrec_hypergraph_step_and_embeddings_match_dense_reference():
    (_, _, _), edges = _splits()
    torch.manual_seed(0)
    model = _make("lgmrec", edges, hyper_layers=2).eval()
    feats = _features()
    r = torch.zeros(NU, NI)
    r[edges[0], edges[1]] = 1
    adj = _dense_norm_adj(edges)
    ego = torch.cat([model.user_embedding, model.item_embedding])
    cge = (ego + adj @ ego + adj @ adj @ ego) / 3
    local, ghe = cge.clone(), 0
    for m in ("image", "text"):
        f = feats[m] @ model.transforms[m]
        x = torch.cat([(r @ f) / (r.sum(1, keepdim=True) + 1e-7), f])
        local = local + F.normalize(adj @ adj @ x)
        hi = torch.softmax(feats[m] @ model.hyperedges[m] / 0.2, 1)
        hu = torch.softmax(r @ feats[m] @ model.hyperedges[m] / 0.2, 1)
        e = cge[NU:]
        for _ in range(2):
            lat = hi.T @ e
            e = hi @ lat
        ghe = ghe + torch.cat([hu @ lat, e])
        hyper_u, hyper_i, _ = hypergraph_step(hi, hu, cge[NU:], 2)
        torch.testing.assert_close(hyper_u, hu @ lat)
        torch.testing.assert_close(hyper_i, e)
    u, i = model.forward()
    torch.testing.assert_close(torch.cat([u, i]), local + 0.3 * F.normalize(ghe))


def test_lgmrec_kept_contrast_tables_refuse_a_stale_backward_and_are_freed_on_eval():
    (_, _, _), edges = _splits()
    torch.manual_seed(0)
    model = _make("lgmrec", edges).train()
    model.pre_epoch(torch.Generator().manual_seed(0))
    batch = torch.arange(6), torch.arange(6), torch.arange(6, 12)
    first = model.loss(*batch)
    model.loss(*batch).backward()  # writes the same kept tables again
    with pytest.raises(RuntimeError, match="inplace operation"):
        first.backward()
    assert model._tables._flat
    model.eval()
    assert not model._tables._flat


def test_lgmrec_training_views_are_random_and_eval_is_deterministic():
    (_, _, _), edges = _splits()
    torch.manual_seed(0)
    model = _make("lgmrec", edges)
    model.train()
    model.pre_epoch(torch.Generator().manual_seed(0))
    a, _ = model.embeddings()
    b, _ = model.embeddings()
    assert not torch.equal(a, b)
    assert torch.equal(model.vectors()[1], model.vectors()[1])


# ---- baselines against naive references ---------------------------------------------------------------


def test_pop_ranking_equals_counting_by_hand():
    (train, valid, test), edges = _splits()
    edges = torch.cat([edges, edges[:, :5]], dim=1)  # duplicate pairs count once
    model = Pop(NU, NI, edges)
    counts = [0] * NI
    for u, i in set(zip(edges[0].tolist(), edges[1].tolist())):
        counts[i] += 1
    scores = model.full_scores(torch.arange(3))
    assert scores[0].tolist() == [float(c) for c in counts] and torch.equal(scores[0], scores[2])
    _, top = model.recommend(torch.tensor([0]), 5)
    assert [counts[i] for i in top[0].tolist()] == sorted(counts, reverse=True)[:5]
    result = fit(model, train, valid, test, TrainOptions(epochs=50, seed=0))
    assert len(result.history) == 1 and result.best_epoch == 1  # nothing to train: ranked once
    assert result.history[0].loss == 0.0 and result.test["recall@50"] > 0


def test_bpr_mf_loss_equals_formula():
    torch.manual_seed(0)
    model = BPRMF(NU, NI, embedding_dim=8, reg=0.5)
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 3])
    p, q = model.user_embedding, model.item_embedding
    bpr = -torch.log(torch.sigmoid((p[users] * q[pos]).sum(1) - (p[users] * q[neg]).sum(1))).mean()
    reg = (p[users].norm() + q[pos].norm() + q[neg].norm()) / 3
    torch.testing.assert_close(model.loss(users, pos, neg), bpr + 0.5 * reg)
    torch.testing.assert_close(model.full_scores(users), p[users].detach() @ q.detach().T)


def test_itemknn_cbf_scores_equal_naive_loops():
    (train, valid, test), edges = _splits()
    feats = _features()
    feats["image"][3] = 0  # an item without an image vector
    model = ItemKNNCBF(NU, NI, edges, features=feats, knn_k=4, shrink=2.0)
    x = torch.cat([feats["image"], feats["text"]], 1).double()
    sim = torch.zeros(NI, NI, dtype=torch.float64)
    for i in range(NI):
        row = [float(x[i] @ x[j]) / (float(x[i].norm() * x[j].norm()) + 2.0) for j in range(NI)]
        for j in sorted(range(NI), key=lambda j: -row[j])[:4]:
            sim[i, j] = row[j]
    expected = torch.zeros(NU, NI, dtype=torch.float64)
    for u, i in set(zip(edges[0].tolist(), edges[1].tolist())):
        expected[u] += sim[i]
    users = torch.arange(NU)
    torch.testing.assert_close(model.full_scores(users).double(), expected, atol=1e-5, rtol=1e-5)
    u, i = model.vectors()  # the dot-product form the evaluator uses
    torch.testing.assert_close((u @ i.T).double(), expected, atol=1e-5, rtol=1e-5)
    result = fit(model, train, valid, test, TrainOptions(epochs=5, seed=0))
    assert len(result.history) == 1 and result.test["recall@10"] > 10 / NI  # content clusters beat random
    with pytest.raises(ValueError, match="knn_k >= 1"):
        ItemKNNCBF(NU, NI, edges, features=feats, knn_k=0)


@pytest.mark.parametrize("name", ALL)
def test_config_section_holds_constructor_arguments_with_their_defaults(name):
    from clearrec.pipeline.config.train import TrainConfig

    cfg = TrainConfig(backbone=name)
    params = getattr(cfg, name).model_dump()
    signature = inspect.signature(BACKBONES[name]).parameters
    assert set(params) <= set(signature)
    for key, value in params.items():
        default = signature[key].default
        assert value == ({"image": 256} if default is None and key == "latent" else default), key


def test_bpr_emb_loss_equals_the_composition_in_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    u, p, n = (torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for reg, zero in ((0.0, None), (0.7, None), (2.0, 1)):  # the last with p all zeros: its norm's gradient is 0
        leaves = [t.clone() for t in (u, p, n)]
        if zero is not None:
            leaves[zero].zero_()
        mine_in = [t.clone().requires_grad_() for t in leaves]
        ref_in = [t.clone().requires_grad_() for t in leaves]
        got = bpr_emb_loss(*mine_in, reg)
        ru, rp, rn = ref_in
        ref = bpr_loss((ru * rp).sum(1), (ru * rn).sum(1)) + reg * emb_norm(ru, rp, rn)
        torch.testing.assert_close(got, ref)
        for mine, theirs in zip(torch.autograd.grad(got * 1.3, mine_in), torch.autograd.grad(ref * 1.3, ref_in)):
            assert torch.isfinite(mine).all()
            torch.testing.assert_close(mine, theirs)


def test_dense_mm_equals_the_product_in_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(40, 9, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    for x_grad, w_grad in ((False, True), (True, True), (True, False)):  # fixed features, trainable ones, fixed weight
        x, w = x0.clone().requires_grad_(x_grad), w0.clone().requires_grad_(w_grad)
        rx, rw = x0.clone().requires_grad_(x_grad), w0.clone().requires_grad_(w_grad)
        got, ref = dense_mm(x, w), rx @ rw
        torch.testing.assert_close(got, ref)
        upstream = torch.randn(40, 3, generator=g, dtype=torch.float64)
        got.backward(upstream)
        ref.backward(upstream)
        for mine, theirs in ((x, rx), (w, rw)):
            assert (mine.grad is None) == (theirs.grad is None)
            if mine.grad is not None:
                assert mine.grad.is_contiguous()
                torch.testing.assert_close(mine.grad, theirs.grad)


def test_row_logsumexp_equals_autograd_logsumexp_in_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    for scale, bound in ((1.0, None), (5.0, 5.0), (100.0, 100.0)):  # row maxima; exponentials as they are; maxima again
        a = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64)) * scale
        x = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64))
        shift = torch.rand(9, generator=g, dtype=torch.float64).log()
        weight = torch.randn(6, generator=g, dtype=torch.float64)
        for s in (None, shift):
            leaves = [t.clone().requires_grad_() for t in (a, x) + ((s,) if s is not None else ())]
            got = row_logsumexp(leaves[0], leaves[1], leaves[2] if s is not None else None, bound=bound)
            ref_leaves = [t.clone().requires_grad_() for t in leaves]
            logits = ref_leaves[0] @ ref_leaves[1].T + (ref_leaves[2] if s is not None else 0)
            ref = torch.logsumexp(logits, dim=1)
            torch.testing.assert_close(got, ref)
            for mine, theirs in zip(torch.autograd.grad((got * weight).sum(), leaves),
                                    torch.autograd.grad((ref * weight).sum(), ref_leaves)):
                torch.testing.assert_close(mine, theirs)
