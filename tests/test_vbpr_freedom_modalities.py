"""VBPR and FREEDOM over any number of named modalities (tiny random graphs, seconds on CPU)."""

from __future__ import annotations

import pytest
import torch
from clearrec.models.clear import ClearOptions
from clearrec.models.clear_dynamic import DynamicClear
from clearrec.models.freedom import FREEDOM, mixing_weights
from clearrec.models.graph import bpr_loss, emb_norm, item_item_graph
from clearrec.models.trainer import TrainOptions, fit
from clearrec.models.vbpr import VBPR, ContentPathway
from safetensors.torch import load_file, save_file
from test_models import NI, NU, _splits

DIMS = {"image": 20, "text": 12, "audio": 9}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(names=tuple(DIMS), seed=0):
    """Cluster-structured features per modality, at very different scales (audio rows ~1000x the text's)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in names:
        centers = torch.randn(4, DIMS[m], generator=g)
        x = centers[torch.arange(NI) % 4] + 0.3 * torch.randn(NI, DIMS[m], generator=g)
        out[m] = x * (1000.0 if m == "audio" else 1.0)
    return out


def _make(name, edges, feats, **kw):
    if name == "vbpr":
        return VBPR(NU, NI, feats, embedding_dim=16, **kw)
    return FREEDOM(NU, NI, edges, feats, embedding_dim=16, knn_k=5, **kw)


def _dense(graph):
    return torch.zeros(NI, NI).index_put_(graph[:2], graph[2], accumulate=True)


@pytest.mark.parametrize("name", ["vbpr", "freedom"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_three_modalities_train_and_lower_the_loss(name, dynamic):
    (train, valid, test), edges = _splits()
    feats = _features()
    torch.manual_seed(0)
    hook = DynamicClear(ClearOptions(k=2)) if dynamic else None
    m = _make(name, edges, feats, modality_hook=hook)
    result = fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=4, seed=0))
    assert result.history[-1].loss < result.history[0].loss
    assert m.hparams()["modalities"] == ["image", "text", "audio"]
    if dynamic:
        assert hook.fitted and {f"modality_hook.dirs_{n}" for n in feats} <= set(m.state_dict())


def test_vbpr_concatenates_in_the_mapping_order():
    feats = _features()
    m = VBPR(NU, NI, {k: feats[k] for k in ("audio", "image", "text")}, embedding_dim=16)
    assert m.hparams()["modalities"] == ["audio", "image", "text"]
    assert torch.equal(m.features, torch.cat([feats["audio"], feats["image"], feats["text"]], dim=1))
    parts = m.content_pathway().modality_parts(m.features)
    w = m.content.weight  # (d, 9 + 20 + 12)
    torch.testing.assert_close(parts["image"], feats["image"] @ w[:, 9:29].T)
    torch.testing.assert_close(sum(parts.values()) + m.content.bias, m.content(m.features))


def test_vbpr_batch_features_reuse_one_block_and_give_the_plain_gathers_loss_and_gradients():
    feats = _features()
    torch.manual_seed(0)
    m = VBPR(NU, NI, feats, embedding_dim=16, reg=0.1)
    g = torch.Generator().manual_seed(1)
    blocks = set()
    for _ in range(3):  # 2B = 32 rows of NI: the batch-items path
        users, pos, neg = (torch.randint(0, n, (16,), generator=g) for n in (NU, NI, NI))
        m.zero_grad()
        loss = m.loss(users, pos, neg)
        loss.backward()
        blocks.add(m._feature_block.data_ptr())
        got = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        items = torch.cat([pos, neg])
        vecs = torch.cat([m.item_embedding[items], m.content(m.features[items])], dim=1)
        p_vec, n_vec = vecs.chunk(2)
        u = m.user_embedding[users]
        want = bpr_loss((u * p_vec).sum(1), (u * n_vec).sum(1)) + 0.1 * emb_norm(u, p_vec, n_vec)
        want.backward()
        torch.testing.assert_close(loss, want)
        for a, p in zip(got, m.parameters()):
            torch.testing.assert_close(a, p.grad)
    assert len(blocks) == 1  # one block for every batch
    m.vectors()  # evaluation frees it
    assert m._feature_block is None and m.training
    users, pos, neg = (torch.randint(0, n, (16,), generator=g) for n in (NU, NI, NI))
    first = m.loss(users, pos, neg)
    m.loss(users, neg, pos)  # overwrites the rows the first loss's backward needs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
    m.double()  # a block of the old dtype is not reused
    m.loss(users, pos, neg).backward()
    assert m._feature_block.dtype == torch.float64


def test_vbpr_content_pathway_with_three_modalities_saves_loads_and_embeds_new_items(tmp_path):
    (train, valid, test), _ = _splits()
    feats = _features()
    m = VBPR(NU, NI, feats, embedding_dim=16, modality_hook=DynamicClear(ClearOptions(k=2)))
    fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
    pathway = m.content_pathway()
    assert pathway.settings() == {"dims": DIMS, "embedding_dim": 16} and pathway.modalities == tuple(DIMS)
    save_file({k: v.detach().contiguous() for k, v in pathway.state_dict().items()}, tmp_path / "content.safetensors")
    loaded = ContentPathway(**pathway.settings(), modality_hook=DynamicClear.from_json(m.modality_hook.to_json()))
    loaded.load_state_dict(load_file(tmp_path / "content.safetensors"))  # as serving loads it
    new = {k: feats[k][:5] for k in ("text", "audio", "image")}  # any key order
    _, items = m.vectors()
    torch.testing.assert_close(loaded.item_vectors(new)[:, 16:], items[:5, 16:], rtol=1e-5, atol=1e-4)
    assert (loaded.item_vectors(new)[:, :16] == 0).all()
    with pytest.raises(ValueError, match=r"missing \['audio'\], unknown \['video'\]"):
        loaded.item_vectors({"image": feats["image"][:2], "text": feats["text"][:2], "video": feats["text"][:2]})


@pytest.mark.parametrize("name", ["vbpr", "freedom"])
def test_dynamic_model_with_three_modalities_saves_and_loads_to_identical_scores(name, tmp_path):
    (train, valid, test), edges = _splits()
    feats = _features()
    torch.manual_seed(0)
    m = _make(name, edges, feats, modality_hook=DynamicClear(ClearOptions(k=2)))
    fit(m, train, valid, test, TrainOptions(lr=0.01, batch_size=64, epochs=2, seed=0))
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    fresh = _make(name, edges, feats, modality_hook=DynamicClear(ClearOptions(k=2)))
    users = torch.arange(NU)
    assert not torch.equal(fresh.full_scores(users), m.full_scores(users))
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(fresh.full_scores(users), m.full_scores(users))
    assert torch.equal(fresh.modality_hook.dirs_audio, m.modality_hook.dirs_audio)


def test_freedom_default_graph_is_exactly_todays_for_image_and_text():
    _, edges = _splits()
    feats = _features(("text", "image"), seed=3)  # declared text first: the weights follow the names
    todays = item_item_graph([(feats["image"], 0.1), (feats["text"], 1.0 - 0.1)], 5)  # image_weight = 0.1
    for graph in (FREEDOM.build_item_graph(feats, 5), FREEDOM(NU, NI, edges, feats, knn_k=5).item_graph,
                  FREEDOM.build_item_graph(feats, 5, {"image": 1.0, "text": 9.0})):
        assert all(torch.equal(a, b) for a, b in zip(graph, todays))


def test_freedom_mixes_one_graph_per_modality_by_its_weight():
    feats = _features()
    single = {m: _dense(FREEDOM.build_item_graph({m: feats[m]}, 5)) for m in feats}
    equal = _dense(FREEDOM.build_item_graph(feats, 5))  # three modalities: equal weights by default
    torch.testing.assert_close(equal, sum(single.values()) / 3)
    mixed = _dense(FREEDOM.build_item_graph(feats, 5, {"image": 2, "text": 0, "audio": 6}))
    torch.testing.assert_close(mixed, 0.25 * single["image"] + 0.75 * single["audio"])
    assert mixing_weights(["a", "b"], {"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    assert mixing_weights(["image", "text"]) == {"image": 0.1, "text": 0.9}
    assert mixing_weights(["text", "audio"]) == {"text": 0.5, "audio": 0.5}
    assert mixing_weights(["text"]) == {"text": 1.0}


def test_freedom_weights_errors():
    _, edges = _splits()
    feats = _features()
    for weights, match in (({"image": 0.1, "text": 0.9}, r"name \['image', 'text'\], but the modalities are "
                                                         r"\['image', 'text', 'audio'\]"),
                           ({"image": 1, "text": 1, "audio": 1, "video": 1}, "one weight per modality"),
                           ({"image": -1, "text": 1, "audio": 1}, ">= 0"),
                           ({"image": float("nan"), "text": 1, "audio": 1}, "finite"),
                           ({"image": 0, "text": 0, "audio": 0}, "sum to 0")):
        with pytest.raises(ValueError, match=match):
            FREEDOM(NU, NI, edges, feats, modality_weights=weights)
