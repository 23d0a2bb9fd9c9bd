"""LATTICE, MGCN, SMORE and their graph pieces on tiny random graphs, against dense forms of the reference code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clearrec.models.clear import ClearOptions, ClearProjector
from clearrec.models.clear_dynamic import DynamicClear
from clearrec.models.graph import (
    half_sq_norm,
    info_nce,
    knn_cosine,
    max_union,
    propagate_edges,
    self_loop_rw_graph,
    sym_normalize,
    user_item_block,
    user_item_graph,
)
from clearrec.models.lattice import LATTICE
from clearrec.models.mgcn import MGCN
from clearrec.models.registry import backbone_class
from clearrec.models.smore import SMORE
from clearrec.models.trainer import TrainOptions, fit
from safetensors.torch import load_file, save_file

from test_models import NI, NU, _features, _splits

CLASSES = {"lattice": LATTICE, "mgcn": MGCN, "smore": SMORE}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _feats(*names):
    dims = {"image": 20, "text": 12, "audio": 9}
    return {m: _features(j + 1, dims[m]) for j, m in enumerate(names)}


def _make(name, edges, features=None, **kw):
    features = _feats("image", "text") if features is None else features
    return CLASSES[name](NU, NI, edges, features=features, embedding_dim=16, knn_k=5, **kw)


def _dense(rows, cols, vals, n=NI, m=None):
    return torch.zeros(n, n if m is None else m).index_put_((rows, cols), vals, accumulate=True)


# dense forms of the reference's utilities (MMRec utils.utils: build_sim, build_knn_neighbourhood,
# compute_normalized_laplacian)
def _sim(x):
    x = x / x.norm(dim=-1, keepdim=True)
    return x @ x.T


def _knn(adj, k):
    val, ind = adj.topk(k, dim=-1)
    return torch.zeros_like(adj).scatter(-1, ind, val)


def _lap(adj):
    d = adj.sum(-1).pow(-0.5)
    d = torch.where(torch.isinf(d), torch.zeros_like(d), d)
    return d[:, None] * adj * d[None, :]


def _ui_dense(edges):
    return user_item_graph(edges[0], edges[1], NU, NI).to_dense()


def _mean_layers(adj, x, layers):
    out, h = x, x
    for _ in range(layers):
        h = adj @ h
        out = out + h
    return out / (layers + 1)


def test_registered():
    for name, cls in CLASSES.items():
        assert backbone_class(name) is cls


@pytest.mark.parametrize("name", list(CLASSES))
def test_training_lowers_the_loss(name):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    model = _make(name, edges)
    result = fit(model, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=6, seed=0))
    losses = [r.loss for r in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.valid["recall@10"] > 2 * 10 / (NI - 6)  # random ranking of ~34 candidates: ~10/34
    u, i = model.vectors()
    assert u.shape == (NU, 16) and i.shape == (NI, 16)


# ---- graph pieces ---------------------------------------------------------------------------


def test_knn_cosine_is_the_reference_topk_with_its_values_and_gradient():
    x = _features(1, 20).requires_grad_()
    rows, cols, vals = knn_cosine(x, 5)
    ref = _knn(_sim(x), 5)
    torch.testing.assert_close(_dense(rows, cols, vals), ref)
    w = torch.randn(NI, NI, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad((_dense(rows, cols, vals) * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref)
    _, _, frozen = knn_cosine(x.detach(), 5)
    torch.testing.assert_close(frozen, vals.detach())


def test_knn_cosine_zero_rows_get_a_unit_self_loop():
    x = _features(1, 20)
    x[3] = 0
    for feats in (x, x.clone().requires_grad_()):
        rows, cols, vals = knn_cosine(feats, 5)
        assert rows.tolist().count(3) == 1 and cols[rows == 3].item() == 3 and vals[rows == 3].item() == 1.0
        assert (cols[rows != 3] != 3).all()


def test_sym_normalize_and_propagate_edges_match_dense():
    rows, cols, vals = knn_cosine(_features(1, 20), 5)
    rows, cols, vals = torch.cat([rows, rows[:7]]), torch.cat([cols, cols[:7]]), torch.cat([vals, vals[:7]])
    s = _dense(rows, cols, vals)  # duplicates summed
    norm = sym_normalize(rows, cols, vals, NI)
    torch.testing.assert_close(_dense(rows, cols, norm), _lap(s))
    x = torch.randn(NI, 6)
    torch.testing.assert_close(propagate_edges(rows, cols, norm, x, NI), _lap(s) @ x)


def test_max_union_is_elementwise_max_over_either_graph():
    a = knn_cosine(_features(1, 20), 4)
    b = knn_cosine(_features(2, 12), 6)
    rows, cols, vals = max_union([a, b], NI)
    da, db = _dense(*a), _dense(*b)
    ma, mb = da != 0, db != 0
    ref = torch.where(ma & mb, torch.maximum(da, db), torch.where(ma, da, db))
    torch.testing.assert_close(_dense(rows, cols, vals), ref)
    assert rows.numel() == int((ma | mb).sum())


def test_lattice_user_item_graph_is_row_normalised_with_self_loops():
    _, edges = _splits()
    a = torch.zeros(NU + NI, NU + NI)
    a[edges[0], NU + edges[1]] = 1
    a[NU + edges[1], edges[0]] = 1
    a = a + torch.eye(NU + NI)
    ref = a / a.sum(1, keepdim=True)
    torch.testing.assert_close(self_loop_rw_graph(edges[0], edges[1], NU, NI).to_dense(), ref)


def test_user_item_block_is_the_normalised_adjacency_block():
    _, edges = _splits()
    r, r_t = user_item_block(edges[0], edges[1], NU, NI)
    full = _ui_dense(edges)
    torch.testing.assert_close(r.to_dense(), full[:NU, NU:])
    torch.testing.assert_close(r_t.to_dense(), full[:NU, NU:].T)


def test_info_nce_over_distinct_rows_equals_the_reference_batch_form():
    g = torch.Generator().manual_seed(0)
    t1 = torch.randn(12, 5, generator=g, requires_grad=True)
    t2 = torch.randn(12, 5, generator=g, requires_grad=True)
    index = torch.tensor([3, 7, 3, 0, 11, 7, 3, 5, 2])  # rows drawn more than once, as users in a batch
    got = info_nce(t1, t2, index, 0.2)
    a, b = F.normalize(t1[index], dim=1), F.normalize(t2[index], dim=1)  # the reference's (B, B) InfoNCE
    pos = torch.exp((a * b).sum(-1) / 0.2)
    ttl = torch.exp(a @ b.T / 0.2).sum(1)
    ref = (-torch.log(pos / ttl)).mean()
    torch.testing.assert_close(got, ref)
    for x, y in zip(torch.autograd.grad(got, (t1, t2)), torch.autograd.grad(ref, (t1, t2))):
        torch.testing.assert_close(x, y)


def test_half_sq_norm_equals_the_reference_form():
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    ref = (0.5 * (v1**2).sum() + 0.5 * (v2**2).sum()) / 9
    torch.testing.assert_close(half_sq_norm(v1, v2), ref)


def test_mgcn_and_smore_loss_equal_the_reference_form():
    _, edges = _splits()
    users, pos, neg = torch.tensor([0, 1, 1, 5, 0]), torch.tensor([2, 3, 3, 9, 4]), torch.tensor([7, 8, 6, 1, 0])
    for name in ("mgcn", "smore"):
        m = _make(name, edges)
        m.eval()  # no dropout: the same forward twice
        content, side = m.embeddings()
        out = content + side
        u, p, n = out[users], out[NU + pos], out[NU + neg]
        bpr = -F.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
        reg = (0.5 * (u**2).sum() + 0.5 * (p**2).sum() + 0.5 * (n**2).sum()) / 5

        def nce(v1, v2):
            v1, v2 = F.normalize(v1, dim=1), F.normalize(v2, dim=1)
            return (-torch.log(torch.exp((v1 * v2).sum(-1) / 0.2) / torch.exp(v1 @ v2.T / 0.2).sum(1))).mean()

        cl = nce(side[NU + pos], content[NU + pos]) + nce(side[users], content[users])
        ref = bpr + m.reg_weight * reg + m.cl_weight * cl
        got = m.loss(users, pos, neg)  # e^s fused for the batch's rows only
        torch.testing.assert_close(got, ref)
        params = [p for p in m.parameters() if p.requires_grad]
        for mine, theirs in zip(torch.autograd.grad(got, params, allow_unused=True),
                                torch.autograd.grad(ref, params, allow_unused=True)):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                torch.testing.assert_close(mine, theirs)


# ---- dense references of each model's key step ------------------------------------------------


def test_lattice_item_graph_equals_the_reference_dense_construction():
    _, edges = _splits()
    feats = _feats("image", "text")
    m = _make("lattice", edges, feats, lambda_coeff=0.7)
    with torch.no_grad():
        m.modal_weight.copy_(torch.tensor([0.2, 0.9]))  # unequal mixing weights
    enc = m.encoded_features()
    w = torch.softmax(m.modal_weight, 0)
    learned = _lap(w[0] * _knn(_sim(enc["image"]), 5) + w[1] * _knn(_sim(enc["text"]), 5))
    original = w[0] * _lap(_knn(_sim(feats["image"]), 5)) + w[1] * _lap(_knn(_sim(feats["text"]), 5))
    ref = 0.3 * learned + 0.7 * original
    got = _dense(*m.item_graph())
    torch.testing.assert_close(got, ref)
    probe = torch.randn(NI, NI, generator=torch.Generator().manual_seed(1))
    params = [m.trs["image"].weight, m.modal_weight, m.features["text"]]
    grads = torch.autograd.grad((got * probe).sum(), params)
    refs = torch.autograd.grad((ref * probe).sum(), params)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r)


def test_lattice_forward_equals_the_reference_and_rebuilds_with_gradient_once_per_epoch():
    _, edges = _splits()
    m = _make("lattice", edges, mm_layers=2)
    m.eval()
    u, i = m.forward()
    a = _dense(*m.item_graph()).detach()
    ui = self_loop_rw_graph(edges[0], edges[1], NU, NI).to_dense()
    out = _mean_layers(ui, torch.cat([m.user_embedding, m.item_embedding]).detach(), 2)
    torch.testing.assert_close(u, out[:NU])
    torch.testing.assert_close(i, out[NU:] + F.normalize(a @ a @ m.item_embedding.detach(), dim=1))
    m.train()
    m.pre_epoch()
    batch = (torch.arange(8), torch.arange(8), torch.arange(8, 16))
    grads = []
    for _ in range(2):  # the epoch's first batch builds the graph with gradient, the second reuses it detached
        m.zero_grad()
        m.loss(*batch).backward()
        grads.append(m.trs["text"].weight.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None or grads[1].abs().sum() == 0
    u2, i2 = m.forward()
    m.eval()
    torch.testing.assert_close((u2.detach(), i2.detach()), m.forward())  # the cached graph is the epoch's graph


def _views_dense(m, edges, conv):
    """[R h; h] with h = S (E_i * gate(conv)) per view, dense."""
    full = _ui_dense(edges)
    out = {}
    for j, k in enumerate(conv):
        s = getattr(m, f"mm_adj_{j}").to_dense()
        h = s @ (m.item_embedding * m.gate[k](conv[k]))
        out[k] = torch.cat([full[:NU, NU:] @ h, h])
    return out, _mean_layers(full, torch.cat([m.user_embedding, m.item_embedding]), m.layers)


def test_mgcn_gating_and_fusion_equal_the_reference_two_modality_form():
    _, edges = _splits()
    feats = _feats("image", "text")
    m = _make("mgcn", edges, feats)
    for j, k in enumerate(feats):
        torch.testing.assert_close(getattr(m, f"mm_adj_{j}").to_dense(), _lap(_knn(_sim(feats[k]), 5)))
    with torch.no_grad():
        u, i = m.forward()
        enc = m.encoded_features()
        views, content = _views_dense(m, edges, enc)
        img, txt = views["image"], views["text"]
        att = torch.softmax(torch.cat([m.query(img), m.query(txt)], dim=-1), dim=-1)
        common = att[:, 0:1] * img + att[:, 1:2] * txt
        side = (m.prefer["image"](content) * (img - common) + m.prefer["text"](content) * (txt - common) + common) / 3
        ref = content + side
    torch.testing.assert_close(torch.cat([u, i]), ref)


def _dft_filter(x, spectrum_weight):
    """Dense real DFT, multiply, inverse (orthonormal): the reference's rfft / irfft step."""
    d = x.shape[1]
    k = torch.arange(d // 2 + 1, dtype=torch.float64)[:, None]
    n = torch.arange(d, dtype=torch.float64)[None, :]
    basis = torch.exp(-2j * math.pi * k * n / d) / math.sqrt(d)  # (d//2+1, d)
    spec = x.double().to(torch.complex128) @ basis.T * spectrum_weight.to(torch.complex128)  # (N, d//2+1)
    c = torch.full((d // 2 + 1,), 2.0, dtype=torch.float64)
    c[0] = 1.0
    if d % 2 == 0:
        c[-1] = 1.0
    return ((spec * c) @ basis.conj()).real.float()


def test_smore_spectral_filter_equals_a_dense_dft():
    _, edges = _splits()
    m = _make("smore", edges)
    enc = {k: v.detach() for k, v in m.encoded_features().items()}
    with torch.no_grad():
        got = m.spectral(enc)
    w = {k: torch.view_as_complex(p.detach()) for k, p in m.filters.items()}
    torch.testing.assert_close(got["image"], _dft_filter(enc["image"], w["image"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["text"], _dft_filter(enc["text"], w["text"]), atol=1e-5, rtol=1e-4)
    d = m.embedding_dim
    basis = torch.exp(-2j * math.pi * torch.arange(d // 2 + 1)[:, None] * torch.arange(d)[None, :] / d) / math.sqrt(d)
    spec_img = enc["image"].to(torch.complex64) @ basis.T.to(torch.complex64)
    fused_ref = _dft_filter(enc["text"], spec_img * w["fusion"])  # text_fft * image_fft * w_f
    torch.testing.assert_close(got["fusion"], fused_ref, atol=1e-5, rtol=1e-4)


def test_smore_forward_equals_the_reference_two_modality_form():
    _, edges = _splits()
    feats = _feats("image", "text")
    m = _make("smore", edges, feats, layers=2)
    fusion_ref = max_union([(*knn_cosine(feats[k], 5)[:2], sym_normalize(*knn_cosine(feats[k], 5), NI)) for k in feats], NI)
    torch.testing.assert_close(m.mm_adj_2.to_dense(), _dense(*fusion_ref))
    m.eval()
    with torch.no_grad():
        u, i = m.forward()
        views, content = _views_dense(m, edges, m.spectral(m.encoded_features()))
        fused = views["fusion"]
        agg_img = torch.softmax(m.query["image"](fused), dim=-1) * views["image"]
        agg_txt = torch.softmax(m.query["text"](fused), dim=-1) * views["text"]
        side = torch.stack([m.prefer["image"](content) * agg_img, m.prefer["text"](content) * agg_txt,
                            m.prefer["fusion"](content) * fused]).mean(0)
    torch.testing.assert_close(torch.cat([u, i]), content + side)


# ---- persistence, determinism, CLEAR modes, modalities --------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dynamic", [False, True])
def test_state_dict_round_trip_gives_identical_scores(name, dynamic, tmp_path):
    (train, valid, test), edges = _splits()
    torch.manual_seed(0)
    hook = DynamicClear(ClearOptions(k=2)) if dynamic else None
    m = _make(name, edges, modality_hook=hook)
    fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    fresh = _make(name, edges, modality_hook=DynamicClear(ClearOptions(k=2)) if dynamic else None)
    assert not torch.equal(fresh.full_scores(torch.arange(NU)), m.full_scores(torch.arange(NU)))
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(fresh.full_scores(torch.arange(NU)), m.full_scores(torch.arange(NU)))


@pytest.mark.parametrize("name", list(CLASSES))
def test_training_is_deterministic_for_a_seed(name):
    (train, valid, test), edges = _splits()
    kw = {"dropout": 0.1} if name == "smore" else {}
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = _make(name, edges, **kw)
        result = fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=3, seed=5))
        runs.append(([r.loss for r in result.history], m.vectors()[1]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", list(CLASSES))
def test_clear_off_static_and_dynamic_all_train(name):
    (train, valid, test), edges = _splits()
    raw = _feats("image", "text")
    proj = ClearProjector(ClearOptions(k=2)).fit(raw["image"].numpy(), raw["text"].numpy())
    static = {"image": torch.from_numpy(proj.transform_visual(raw["image"].numpy())).float(),
              "text": torch.from_numpy(proj.transform_text(raw["text"].numpy())).float()}
    hook = DynamicClear(ClearOptions(k=2))
    scores = []
    for feats, h in ((raw, None), (static, None), (raw, hook)):
        torch.manual_seed(0)
        m = _make(name, edges, feats, modality_hook=h)
        result = fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
        assert all(math.isfinite(r.loss) for r in result.history)
        scores.append(m.full_scores(torch.arange(NU)))
    assert hook.fitted and hook.dirs_image.shape == (m.encoded_features()["image"].shape[1], 2)
    assert not torch.equal(scores[0], scores[1])  # the projected features change the model
    assert not torch.equal(scores[0], scores[2])  # so does the dynamic projection


@pytest.mark.parametrize("name", list(CLASSES))
def test_one_and_three_modalities(name):
    (train, valid, test), edges = _splits()
    for feats in (_feats("text"), _feats("image", "text", "audio")):
        torch.manual_seed(0)
        m = _make(name, edges, feats)
        result = fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=3, seed=0))
        assert result.history[-1].loss < result.history[0].loss
        assert m.hparams()["modalities"] == list(feats)
        assert set(m.encoded_features()) == set(feats)


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_features_are_refused(name):
    _, edges = _splits()
    with pytest.raises(ValueError, match="at least one modality"):
        _make(name, edges, {})
    with pytest.raises(ValueError, match=r"features\['text'\] has shape \(39, 12\)"):
        _make(name, edges, {"text": _features(2, 12)[:-1]})
    with pytest.raises(ValueError, match="needs two modalities"):
        _make(name, edges, _feats("text"), modality_hook=DynamicClear())


def test_smore_per_modality_knn_k():
    _, edges = _splits()
    m = _make_smore_k(edges, {"image": 3, "text": 7})
    assert m.mm_adj_0.values().numel() == 3 * NI and m.mm_adj_1.values().numel() == 7 * NI
    assert m.hparams()["knn_k"] == {"image": 3, "text": 7}
    with pytest.raises(ValueError, match="knn_k names"):
        _make_smore_k(edges, {"image": 3})


def _make_smore_k(edges, ks):
    return SMORE(NU, NI, edges, features=_feats("image", "text"), embedding_dim=16, knn_k=ks)
