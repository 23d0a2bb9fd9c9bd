"""Dynamic CLEAR over M >= 2 named modalities: today's two-modality result, MultiClearProjector's for M = 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clearrec.models.clear import ClearOptions, shared_directions
from clearrec.models.clear_dynamic import DynamicClear, directions
from clearrec.models.clear_multi import MultiClearProjector


def _embeddings(names=("image", "text", "audio"), dims=(10, 6, 8), n=150, dtype=torch.float64, seed=0):
    """Paired rows sharing a 3-d latent factor, each modality at its own scale (as VGGish vs MiniLM)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    out = {}
    for i, (m, d) in enumerate(zip(names, dims)):
        mix = torch.randn(3, d, generator=g, dtype=torch.float64)
        out[m] = ((z @ mix + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)) * 10.0 ** i).to(dtype)
    return out


def _todays_projection(ev, et, options):
    """The two-modality dynamic mode before modalities were named: shared_directions, then E - lambda (E U) U^T."""
    uk, wk, _ = shared_directions(ev, et, options)
    uk, wk = uk.contiguous(), wk.contiguous()  # the module kept them contiguous (as a loaded state is)
    mv, mt = (ev.mean(0), et.mean(0)) if options.project_centered else (None, None)

    def proj(e, u, mean):
        coef = e @ u if mean is None else e @ u - mean @ u
        return e - options.strength * coef @ u.T

    return uk, wk, proj(ev, uk, mv) if options.visual else ev, proj(et, wk, mt) if options.text else et


@pytest.mark.parametrize("order", [("image", "text"), ("text", "image")])
@pytest.mark.parametrize("options", [ClearOptions(k=3), ClearOptions(k=2, strength=0.5, project_centered=True),
                                     ClearOptions(ratio=0.8, center=False), ClearOptions(k=2, text=False),
                                     ClearOptions(k=3, directions="random", seed=4)])
def test_two_modalities_give_exactly_todays_directions_and_projection(options, order):
    e = _embeddings(("image", "text"), (10, 6), dtype=torch.float32)
    uk, wk, pv, pt = _todays_projection(e["image"], e["text"], options)
    hook = DynamicClear(options)
    hook.refit({m: e[m] for m in order})
    out = hook({m: e[m] for m in order})
    assert list(out) == list(order)
    assert torch.equal(hook.dirs_image, uk) and torch.equal(hook.dirs_text, wk)
    assert torch.equal(out["image"], pv) and torch.equal(out["text"], pt)
    assert torch.equal(hook.mean_image, e["image"].mean(0))


@pytest.mark.parametrize("options", [ClearOptions(k=2), ClearOptions(ratio=0.7), ClearOptions(k=3, center=False),
                                     ClearOptions(k=2, strength=0.4, project_centered=True)])
def test_three_modalities_match_the_static_multi_projector(options):
    e = _embeddings()
    ref = MultiClearProjector(options, list(e)).fit({m: x.numpy() for m, x in e.items()})
    hook = DynamicClear(options)
    hook.refit(e)
    out = hook(e)
    for m, x in e.items():
        got, want = getattr(hook, f"dirs_{m}").numpy(), ref.directions_[m]
        assert got.shape == want.shape == (x.shape[1], ref.k_[m])
        np.testing.assert_allclose(np.abs(got.T @ want), np.eye(ref.k_[m]), atol=1e-8)  # same columns up to sign
        np.testing.assert_allclose(out[m].numpy(), ref.transform(m, x.numpy()), rtol=1e-10, atol=1e-8 * 10.0 ** 2)


def test_three_modality_random_directions_match_the_multi_projector():
    e = _embeddings()
    options = ClearOptions(k=2, directions="random", seed=7)
    ref = MultiClearProjector(options, list(e)).fit({m: x.numpy() for m, x in e.items()})
    got = directions(e, options)
    for m in e:
        np.testing.assert_allclose(got[m].numpy(), ref.directions_[m], atol=1e-12)


def test_projection_is_differentiable_in_e_and_not_in_the_directions():
    e = {m: x.float().requires_grad_(True) for m, x in _embeddings().items()}
    hook = DynamicClear(ClearOptions(k=2, strength=0.5))
    hook.refit(e)
    out = hook(e)
    sum(o.sum() for o in out.values()).backward()
    for m, x in e.items():
        u = getattr(hook, f"dirs_{m}")
        assert not u.requires_grad
        expected = torch.ones_like(x) @ (torch.eye(x.shape[1]) - 0.5 * u @ u.T)  # d sum(E P) / dE = 1 P^T
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_per_modality_switches():
    e = _embeddings()
    out = DynamicClear(ClearOptions(k=2), project={"audio": False})(e)
    assert out["audio"] is e["audio"] and not torch.equal(out["image"], e["image"])
    out = DynamicClear(ClearOptions(k=2, visual=False))(e)  # the old switch still means image
    assert out["image"] is e["image"] and not torch.equal(out["audio"], e["audio"])
    out = DynamicClear(ClearOptions(k=2, visual=False), project={"image": True, "text": False})(e)
    assert out["text"] is e["text"] and not torch.equal(out["image"], e["image"])
    hook = DynamicClear(ClearOptions(k=2), project={"video": False})
    with pytest.raises(ValueError, match=r"project names \['video'\]"):
        hook.refit(e)
    again = DynamicClear.from_json(DynamicClear(ClearOptions(k=2), project={"audio": False}).to_json())
    assert again.project == {"audio": False} and again.options == ClearOptions(k=2)


def test_buffers_per_modality_round_trip_and_follow_the_saved_state():
    e = {m: x.float() for m, x in _embeddings().items()}
    hook = DynamicClear(ClearOptions(k=2))
    hook.refit(e)
    state = hook.state_dict()
    assert sorted(state) == sorted(f"{kind}_{m}" for m in e for kind in ("dirs", "mean"))
    fresh = DynamicClear(ClearOptions(k=2))
    assert not fresh.fitted and fresh.state_dict() == {}
    fresh.load_state_dict(state)
    assert fresh.fitted and set(fresh.modalities) == set(e)
    shifted = {m: x[:20] * 2 + 1 for m, x in e.items()}  # no refit: the loaded directions are used
    for m in e:
        assert torch.equal(fresh(shifted)[m], hook(shifted)[m])
    two = DynamicClear(ClearOptions(k=2))
    two.refit({"image": e["image"], "text": e["text"]})
    two.load_state_dict(state)  # a state of other modalities replaces the buffers (strict load)
    assert set(two.modalities) == set(e) and torch.equal(two.dirs_audio, state["dirs_audio"])
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"mean_audio\""):
        DynamicClear().load_state_dict({k: v for k, v in state.items() if k != "mean_audio"})
    fresh.refit({"image": e["image"], "text": e["text"]})  # a refit on fewer modalities drops the others
    assert "dirs_audio" not in fresh.state_dict()
    with pytest.raises(ValueError, match=r"fit on the modalities \['image', 'text'\]"):
        fresh(e)


def test_bad_inputs_are_refused():
    e = _embeddings()
    with pytest.raises(ValueError, match="at least 2 modalities"):
        DynamicClear().refit({"text": e["text"]})
    with pytest.raises(ValueError, match="not lowercase identifiers"):
        DynamicClear().refit({"Image": e["image"], "text": e["text"]})
    with pytest.raises(ValueError, match="one row per item"):
        DynamicClear().refit({"image": e["image"][:10], "text": e["text"]})
    with pytest.raises(ValueError, match="'audio' has zero variance"):
        DynamicClear().refit({**e, "audio": torch.ones_like(e["audio"])})
