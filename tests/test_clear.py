"""ClearProjector, CrossCovariance, the dynamic hook and the diagnostics maths on small random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clearrec.models.clear import (
    ClearOptions,
    ClearProjector,
    CrossCovariance,
    random_orthonormal,
    shared_directions,
)
from clearrec.models.clear_dynamic import DynamicClear
from clearrec.models.clear_multi import MultiClearProjector
from clearrec.models.diagnostics import Moments, energy_curve, neighbour_overlap, top_neighbours
from clearrec.pipeline.store import ArtifactStore
from conftest import SHARED_DATASETS

SHAPES = [(300, 12, 7), (200, 5, 9), (64, 16, 16)]  # (N, dv, dt), dv != dt in two


def data(n: int, dv: int, dt: int, seed: int = 0, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Correlated features with non-zero means (so raw and centred projection differ)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    xv = z @ rng.standard_normal((4, dv)) + rng.standard_normal((n, dv)) + rng.uniform(-2, 2, dv)
    xt = z @ rng.standard_normal((4, dt)) + rng.standard_normal((n, dt)) + rng.uniform(-2, 2, dt)
    return xv.astype(dtype), xt.astype(dtype)


def cross_cov_spectrum(xv: np.ndarray, xt: np.ndarray) -> np.ndarray:
    xv, xt = xv.astype(np.float64), xt.astype(np.float64)
    return np.linalg.svd((xv - xv.mean(0)).T @ (xt - xt.mean(0)) / len(xv), compute_uv=False)


@pytest.mark.parametrize("n,dv,dt", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("centered", [False, True])
def test_projected_spectrum_identity(n, dv, dt, lam, centered):
    xv, xt = data(n, dv, dt)
    k = 3
    p = ClearProjector(ClearOptions(k=k, strength=lam, project_centered=centered)).fit(xv, xt)
    s = p.spectrum()
    got = cross_cov_spectrum(p.transform_visual(xv), p.transform_text(xt))
    expected = np.sort(np.concatenate([(1 - lam) ** 2 * s[:k], s[k:]]))[::-1]
    np.testing.assert_allclose(got, expected, atol=1e-10 * s[0])
    np.testing.assert_allclose(p.projected_spectrum(), expected, atol=1e-10 * s[0])
    np.testing.assert_allclose(s, cross_cov_spectrum(xv, xt), rtol=1e-10)


def test_identity_holds_in_float32_to_float32_precision():
    xv, xt = data(500, 20, 11, dtype=np.float32)
    p = ClearProjector(ClearOptions(k=4)).fit(xv, xt)
    got = cross_cov_spectrum(p.transform_visual(xv), p.transform_text(xt))
    s = p.spectrum()
    assert got.dtype == np.float64 and p.transform_visual(xv).dtype == np.float32
    expected = np.sort(np.concatenate([np.zeros(4), s[4:]]))[::-1]
    np.testing.assert_allclose(got, expected, atol=1e-5 * s[0])


def test_lambda_zero_is_identity_and_lambda_one_idempotent():
    xv, xt = data(100, 8, 6)
    for centered in (False, True):
        p0 = ClearProjector(ClearOptions(k=2, strength=0.0, project_centered=centered)).fit(xv, xt)
        assert np.array_equal(p0.transform_visual(xv), xv) and np.array_equal(p0.transform_text(xt), xt)
        p1 = ClearProjector(ClearOptions(k=2, strength=1.0, project_centered=centered)).fit(xv, xt)
        once = p1.transform_visual(xv)
        np.testing.assert_allclose(p1.transform_visual(once), once, atol=1e-12)
        once = p1.transform_text(xt)
        np.testing.assert_allclose(p1.transform_text(once), once, atol=1e-12)


def test_raw_vs_centered_projection_of_the_mean():
    xv, xt = data(100, 8, 6)
    raw = ClearProjector(ClearOptions(k=2, project_centered=False)).fit(xv, xt)
    cen = ClearProjector(ClearOptions(k=2, project_centered=True)).fit(xv, xt)
    mu = xv.mean(0)
    np.testing.assert_allclose(cen.transform_visual(mu), mu, atol=1e-12)  # the mean is kept
    U = raw.directions_visual_
    np.testing.assert_allclose(raw.transform_visual(mu) @ U, 0, atol=1e-12)  # raw: the mean loses its U_k part


def test_streaming_equals_in_memory():
    xv, xt = data(1000, 10, 7)
    full = ClearProjector(ClearOptions(k=3)).fit(xv, xt, chunk_rows=len(xv))
    stream = ClearProjector(ClearOptions(k=3))
    for lo in range(0, 1000, 37):
        stream.partial_fit(xv[lo : lo + 37], xt[lo : lo + 37])
    stream.finalize()
    np.testing.assert_allclose(stream.cross_covariance_, full.cross_covariance_, atol=1e-12)
    np.testing.assert_allclose(stream.spectrum(), full.spectrum(), rtol=1e-10)
    np.testing.assert_allclose(stream.transform_visual(xv), full.transform_visual(xv), atol=1e-10)
    # float32 features: chunk products in float32, float64 accumulators
    xv32, xt32 = xv.astype(np.float32) + 100.0, xt.astype(np.float32) - 50.0  # large common mean
    a = ClearProjector(ClearOptions(k=3)).fit(xv32, xt32, chunk_rows=1000)
    b = ClearProjector(ClearOptions(k=3)).fit(xv32, xt32, chunk_rows=37)
    ref = ClearProjector(ClearOptions(k=3)).fit(xv32.astype(np.float64), xt32.astype(np.float64))
    for p in (a, b):
        np.testing.assert_allclose(p.spectrum(), ref.spectrum(), atol=1e-5 * ref.spectrum()[0])
        np.testing.assert_allclose(p.transform_text(xt32), ref.transform_text(xt32), atol=1e-5 * np.abs(xt32).max())


def test_cross_covariance_uncentred_moment():
    xv, xt = data(50, 4, 3)
    acc = CrossCovariance()
    acc.update(xv[:20], xt[:20])
    acc.update(xv[20:], xt[20:])
    np.testing.assert_allclose(acc.covariance(center=False), xv.T @ xt / 50, atol=1e-12)
    np.testing.assert_allclose(acc.mean_v, xv.mean(0), atol=1e-12)


def test_state_round_trip_through_store(tmp_path):
    xv, xt = data(200, 9, 5)
    for kwargs in ({"k": 3, "strength": 0.7, "project_centered": True}, {"ratio": 0.8, "text": False},
                   {"k": 2, "directions": "random", "seed": 5}):
        p = ClearProjector(ClearOptions(**kwargs)).fit(xv, xt)
        tensors, meta = p.state_dict()
        store = ArtifactStore(tmp_path)
        store.write_tensors("clear/p.safetensors", tensors)
        store.write_json("clear/p.json", meta)
        loaded_t, _ = store.read_tensors("clear/p.safetensors")
        q = ClearProjector.from_state(loaded_t, {**store.read_json("clear/p.json"), "fit_seconds": 1.0})
        assert q.k_ == p.k_ and q.options == p.options
        assert np.array_equal(q.transform_visual(xv), p.transform_visual(xv))
        assert np.array_equal(q.transform_text(xt), p.transform_text(xt))
        assert np.array_equal(q.spectrum(), p.spectrum())
        assert np.array_equal(q.transform_visual(xv[0].astype(np.float32)), p.transform_visual(xv[0].astype(np.float32)))


def test_from_state_checks_shapes_and_format():
    p = ClearProjector(ClearOptions(k=2)).fit(*data(50, 6, 4))
    tensors, meta = p.state_dict()
    with pytest.raises(ValueError, match=r"'directions_visual' has shape \(6, 2\), expected \(6, 3\)"):
        ClearProjector.from_state(tensors, {**meta, "k": 3, "k_requested": 3})
    with pytest.raises(ValueError, match="format"):
        ClearProjector.from_state(tensors, {**meta, "format": "other"})
    with pytest.raises(ValueError, match="lacks tensors"):
        ClearProjector.from_state({k: v for k, v in tensors.items() if k != "mean_text"}, meta)


def test_ratio_rule_on_constructed_spectrum():
    s = np.array([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22: cumulative .727 .909 .955 1
    ranks = [ClearOptions(ratio=r).rank(s) for r in (0.5, 16 / 22, 0.75, 0.909, 0.91, 0.95, 0.96, 1.0)]
    assert ranks == [1, 1, 2, 2, 3, 3, 4, 4]
    assert ClearOptions(k=2).rank(s) == 2 and ClearOptions(k=2, ratio=0.5).rank(s) == 1  # the ratio wins
    assert ClearOptions(ratio=0.5).rank(np.zeros(3)) == 0
    for k in (4, 10):  # k at or above the smaller dimension would erase that modality: refused
        with pytest.raises(ValueError, match=f"k = {k} is not below the smaller feature dimension 4"):
            ClearOptions(k=k).rank(s)
    # the same rule through a fit: C with singular values 4, 2, 1, 1 (exact, planted in orthonormal bases)
    rng = np.random.default_rng(1)
    n = 400
    q = np.linalg.qr(rng.standard_normal((n, 4)))[0] * np.sqrt(n)  # orthonormal columns scaled: q^T q / n = I
    q -= q.mean(0)
    q = np.linalg.qr(q)[0] * np.sqrt(n)  # re-orthonormalise after centring (columns stay zero-mean)
    U, W = random_orthonormal(6, 4, rng), random_orthonormal(5, 4, rng)
    xv, xt = q @ (U * s).T, q @ W.T
    p = ClearProjector(ClearOptions(ratio=0.91)).fit(xv, xt)
    np.testing.assert_allclose(p.spectrum()[:4], s, atol=1e-9)
    assert p.k_ == 3 and p.energy_topk() == pytest.approx(21 / 22)


def test_random_directions_control():
    xv, xt = data(300, 12, 8)
    shared = ClearProjector(ClearOptions(k=3)).fit(xv, xt)
    rand = ClearProjector(ClearOptions(k=3, directions="random", seed=7)).fit(xv, xt)
    U, W = rand.directions_visual_, rand.directions_text_
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(W.T @ W, np.eye(3), atol=1e-12)
    assert np.abs(shared.directions_visual_.T @ U).max() < 0.99  # not the shared directions
    np.testing.assert_allclose(rand.transform_visual(xv) @ U, 0, atol=1e-10)  # these directions are removed
    np.testing.assert_allclose(rand.transform_text(xt) @ W, 0, atol=1e-10)
    again = ClearProjector(ClearOptions(k=3, directions="random", seed=7)).fit(xv, xt)
    assert np.array_equal(again.directions_visual_, U)
    assert rand.projected_spectrum()[0] > shared.projected_spectrum()[0]


def test_signs_are_deterministic():
    xv, xt = data(200, 7, 5)
    a = ClearProjector(ClearOptions(k=4)).fit(xv, xt)
    perm = np.random.default_rng(3).permutation(200)
    b = ClearProjector(ClearOptions(k=4)).fit(-(-xv[perm]), xt[perm])
    np.testing.assert_allclose(a.directions_visual_, b.directions_visual_, atol=1e-10)
    np.testing.assert_allclose(a.directions_text_, b.directions_text_, atol=1e-10)
    U = a.directions_visual_
    assert (U[np.abs(U).argmax(0), np.arange(4)] > 0).all()


def test_per_modality_switch():
    xv, xt = data(100, 6, 5)
    p = ClearProjector(ClearOptions(k=2, visual=False)).fit(xv, xt)
    assert np.array_equal(p.transform_visual(xv), xv)
    assert not np.allclose(p.transform_text(xt), xt)
    s = p.spectrum()
    # one side projected: the top-k singular values scale by (1 - lambda) = 0, the rest stay
    expected = np.sort(np.concatenate([np.zeros(2), s[2:]]))[::-1]
    np.testing.assert_allclose(cross_cov_spectrum(xv, p.transform_text(xt)), expected, atol=1e-10)
    np.testing.assert_allclose(p.projected_spectrum(), expected, atol=1e-10)


def test_shape_and_dtype_errors_name_both_shapes():
    xv, xt = data(10, 4, 3)
    with pytest.raises(ValueError, match=r"Xv has shape \(10, 4\), Xt has shape \(9, 3\)"):
        ClearProjector(ClearOptions(k=1)).fit(xv, xt[:9])
    with pytest.raises(ValueError, match=r"Xv has shape \(10,\), Xt has shape \(10, 3\)"):
        ClearProjector(ClearOptions(k=1)).fit(xv[:, 0], xt)
    with pytest.raises(TypeError, match=r"Xv has shape \(10, 4\), Xt has shape \(10, 3\).*int64"):
        ClearProjector(ClearOptions(k=1)).fit(xv.astype(np.int64), xt)
    p = ClearProjector(ClearOptions(k=1))
    p.partial_fit(xv, xt)
    with pytest.raises(ValueError, match=r"Xv has shape \(10, 5\), Xt has shape \(10, 3\): earlier chunks had feature dims 4 / 3"):
        p.partial_fit(np.ones((10, 5)), xt)
    p.finalize()
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(N, 4\).*visual dim 4 and text dim 3"):
        p.transform_visual(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"float32 or float64, got int64 with shape \(2, 4\)"):
        p.transform_visual(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        bad = xv.copy()
        bad[3, 1] = np.nan
        ClearProjector(ClearOptions(k=1)).fit(bad, xt)
    with pytest.raises(ValueError, match="not fitted"):
        ClearProjector(ClearOptions(k=1)).transform_text(xt)
    with pytest.raises(ValueError, match="give k"):
        ClearOptions(k=None)
    with pytest.raises(ValueError, match="strength"):
        ClearProjector(ClearOptions(k=2, strength=1.5))


def dynamic_step(ev: torch.Tensor, et: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit and project in one call, as one epoch of the dynamic mode does."""
    hook = DynamicClear(ClearOptions(**options))
    hook.refit({"image": ev, "text": et})
    out = hook({"image": ev, "text": et})
    return out["image"], out["text"]


def test_dynamic_step_matches_projector_and_keeps_gradient():
    xv, xt = data(120, 10, 6, dtype=np.float32)
    Ev = torch.tensor(xv, requires_grad=True)
    Et = torch.tensor(xt, requires_grad=True)
    Pv, Pt = dynamic_step(Ev, Et, k=3, strength=0.5)
    ref = ClearProjector(ClearOptions(k=3, strength=0.5)).fit(xv.astype(np.float64), xt.astype(np.float64))
    np.testing.assert_allclose(Pv.detach().numpy(), ref.transform_visual(xv), atol=1e-4)
    np.testing.assert_allclose(Pt.detach().numpy(), ref.transform_text(xt), atol=1e-4)
    (Pv.sum() + Pt.square().sum()).backward()
    # gradient flows through the projection only (U_k detached): d sum(E P)/dE = 1 P^T
    Uk, Wk, s = shared_directions(Ev, Et, ClearOptions(k=3))
    expected = torch.ones(120, 10) @ (torch.eye(10) - 0.5 * Uk @ Uk.T)
    torch.testing.assert_close(Ev.grad, expected, atol=1e-5, rtol=1e-5)
    assert not Uk.requires_grad and Et.grad is not None
    np.testing.assert_allclose(s.numpy(), ref.spectrum(), rtol=1e-4)
    Qv, Qt = dynamic_step(Ev, Et, ratio=0.99, text=False, directions="random", seed=1)
    assert Qt is Et and Qv.shape == Ev.shape


@pytest.mark.parametrize("centered", [False, True])
def test_dynamic_clear_module_projects_with_the_last_refit_and_round_trips(centered):
    xv, xt = data(120, 10, 6, dtype=np.float32)
    Ev, Et = torch.tensor(xv), torch.tensor(xt)
    options = ClearOptions(k=3, strength=0.5, project_centered=centered)
    dyn = DynamicClear(options)
    P = dyn({"image": Ev, "text": Et})  # never fit: fits on these first
    Qv, Qt = dynamic_step(Ev, Et, k=3, strength=0.5, project_centered=centered)
    torch.testing.assert_close(P["image"], Qv)
    torch.testing.assert_close(P["text"], Qt)
    other_v, other_t = Ev[:40] * 2 + 1, Et[:40] - 1
    Rv = dyn({"image": other_v, "text": other_t})["image"]  # no refit: the directions and mean of the fit above
    Uk = dyn.dirs_image
    mean = Ev.mean(0) if centered else torch.zeros(10)
    torch.testing.assert_close(Rv, other_v - 0.5 * ((other_v - mean) @ Uk) @ Uk.T)
    dyn.refit({"image": other_v, "text": other_t})
    assert not torch.allclose(dyn.dirs_image, Uk)
    fresh = DynamicClear(options)
    fresh.load_state_dict(dyn.state_dict())
    both = {"image": Ev, "text": Et}
    torch.testing.assert_close(fresh(both)["image"], dyn(both)["image"])
    with pytest.raises(ValueError, match=r"fit on the modalities \['image', 'text'\]"):
        dyn({"image": Ev, "audio": Et})


def test_top_neighbours_and_overlap():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    scores, ids = top_neighbours(x, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    ref = np.argsort(-sim, axis=1)[:, :5]
    assert (ids == ref).mean() > 0.99 and not (ids == np.arange(50)[:, None]).any()
    np.testing.assert_allclose(scores, np.take_along_axis(sim, ids, 1), atol=1e-5)
    assert neighbour_overlap(ids, ids, [1, 5]) == [1.0, 1.0]
    other = np.array([[1, 2, 3], [7, 8, 9]])
    assert neighbour_overlap(np.array([[3, 1, 5], [1, 2, 9]]), other, [1, 3]) == [0.0, pytest.approx(0.5)]
    s, i = top_neighbours(x[:3], 5)
    assert (i[:, 2:] == -1).all() and np.isnan(s[:, 2:]).all()
    assert energy_curve(np.array([2.0, 1.0]))[0] == pytest.approx(0.8)


def test_moments_total_variance():
    x = np.random.default_rng(0).standard_normal((100, 4)) * [1, 2, 3, 4] + 1000
    m = Moments()
    m.update(x[:30])
    m.update(x[30:])
    assert m.total_variance() == pytest.approx(x.var(axis=0).sum(), rel=1e-9)


# ---- CLEAR over M >= 2 named modalities ------------------------------------------------------
def multi_data(n: int, dims: dict[str, int], scales: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Correlated features through 4 shared factors, per-modality scale and non-zero means."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    return {m: scales[m] * (z @ rng.standard_normal((4, d)) + rng.standard_normal((n, d)) + rng.uniform(-2, 2, d))
            for m, d in dims.items()}


def test_multi_projector_equals_two_modality_clear():
    """M = 2: every setting gives ClearProjector's projected features to 1e-10."""
    for n, dv, dt in SHAPES:
        x = multi_data(n, {"image": dv, "text": dt}, {"image": 40.0, "text": 0.03}, seed=n)
        for lam in (0.5, 1.0):
            for centered in (False, True):
                for rank in ({"k": 3}, {"ratio": 0.7}):
                    opts = ClearOptions(strength=lam, project_centered=centered, **rank)
                    ref = ClearProjector(opts).fit(x["image"], x["text"])
                    p = MultiClearProjector(opts, ("image", "text")).fit(x)
                    assert p.k_ == {"image": ref.k_, "text": ref.k_}
                    scale_v, scale_t = np.abs(x["image"]).max(), np.abs(x["text"]).max()
                    np.testing.assert_allclose(p.transform("image", x["image"]), ref.transform_visual(x["image"]),
                                               rtol=0, atol=1e-10 * scale_v)
                    np.testing.assert_allclose(p.transform("text", x["text"]), ref.transform_text(x["text"]),
                                               rtol=0, atol=1e-10 * scale_t)
    x = multi_data(120, {"image": 8, "text": 6}, {"image": 1.0, "text": 1.0})
    for opts in (ClearOptions(k=2, visual=False), ClearOptions(k=2, directions="random", seed=3)):
        ref = ClearProjector(opts).fit(x["image"], x["text"])
        p = MultiClearProjector(opts, ("image", "text")).fit(x)
        np.testing.assert_allclose(p.transform("image", x["image"]), ref.transform_visual(x["image"]), atol=1e-10)
        np.testing.assert_allclose(p.transform("text", x["text"]), ref.transform_text(x["text"]), atol=1e-10)


def stacked_from_features(x: dict[str, np.ndarray], m: str, weights: dict[str, float]) -> np.ndarray:
    """``B_m`` measured directly: centred cross-covariances with every other modality, weighted."""
    c = {j: v - v.mean(0) for j, v in x.items()}
    return np.concatenate([weights[j] * c[m].T @ c[j] / len(c[m]) for j in x if j != m], axis=1)


@pytest.mark.parametrize("lam", [0.5, 1.0])
@pytest.mark.parametrize("centered", [False, True])
def test_multi_projector_identity_three_modalities(lam, centered):
    """M = 3: P_m B_m has singular values (1 - lambda) s_i (i <= k), s_i beyond; projecting every
    modality lowers the top-k energy of each B_m measured on the projected features (at the fit
    weights) to at most that of P_m B_m, which is below B_m's."""
    dims, scales = {"image": 12, "text": 9, "audio": 16}, {"image": 1.0, "text": 0.02, "audio": 1500.0}
    x = multi_data(400, dims, scales)
    k = 3
    p = MultiClearProjector(ClearOptions(k=k, strength=lam, project_centered=centered), dims).fit(x)
    after = p.transform_all(x)
    for m in dims:
        B, s = p.stacked(m), p.spectrum(m)
        np.testing.assert_allclose(B, stacked_from_features(x, m, p.weights_), rtol=0, atol=1e-12 * s[0])
        np.testing.assert_allclose(s, np.linalg.svd(B, compute_uv=False), rtol=1e-10)
        U = p.directions_[m]
        PB = B - lam * U @ (U.T @ B)
        expected = np.sort(np.concatenate([(1 - lam) * s[:k], s[k:]]))[::-1]
        np.testing.assert_allclose(np.linalg.svd(PB, compute_uv=False), expected, rtol=0, atol=1e-10 * s[0])
        s_after = np.linalg.svd(stacked_from_features(after, m, p.weights_), compute_uv=False)
        s_pb = np.linalg.svd(PB, compute_uv=False)
        assert np.sum(s_after[:k] ** 2) <= np.sum(s_pb[:k] ** 2) * (1 + 1e-10)
        assert np.sum(s_after[:k] ** 2) < 0.5 * np.sum(s[:k] ** 2)
    # the weights: w_j = 1 / total std, so the audio block does not swamp the text one
    for m in dims:
        tr = np.sum(np.var(x[m], axis=0))
        assert p.weights_[m] == pytest.approx(1 / np.sqrt(tr), rel=1e-10)


def test_multi_projector_streaming_and_state_round_trip(tmp_path):
    dims = {"image": 7, "text": 5, "audio": 10}
    x = multi_data(230, dims, {"image": 1.0, "text": 3.0, "audio": 900.0}, seed=4)
    for kwargs, project in (({"k": 2, "project_centered": True}, None), ({"ratio": 0.8}, {"audio": False}),
                            ({"k": 2, "directions": "random", "seed": 5}, None)):
        opts = ClearOptions(**kwargs)
        one = MultiClearProjector(opts, dims, project).fit(x, chunk_rows=10_000)
        chunked = MultiClearProjector(opts, dims, project).fit(x, chunk_rows=37)
        for m in dims:
            np.testing.assert_allclose(chunked.transform(m, x[m]), one.transform(m, x[m]), rtol=0,
                                       atol=1e-10 * np.abs(x[m]).max())
        tensors, meta = chunked.state_dict()
        store = ArtifactStore(tmp_path)
        store.write_tensors("clear/multi.safetensors", tensors)
        store.write_json("clear/multi.json", meta)
        loaded, _ = store.read_tensors("clear/multi.safetensors")
        q = MultiClearProjector.from_state(loaded, store.read_json("clear/multi.json"))
        assert q.k_ == chunked.k_ and q.options == opts and q.project == chunked.project
        for m in dims:
            assert np.array_equal(q.transform(m, x[m]), chunked.transform(m, x[m]))
            assert np.array_equal(q.spectrum(m), chunked.spectrum(m))
        if project:
            assert np.array_equal(q.transform("audio", x["audio"]), x["audio"])
    with pytest.raises(ValueError, match=r"'directions.text' has shape \(5, 2\), expected \(5, 3\)"):
        MultiClearProjector.from_state(tensors, {**meta, "k": {**meta["k"], "text": 3}})
    with pytest.raises(ValueError, match="format"):
        MultiClearProjector.from_state(tensors, {**meta, "format": "clearrec.clear/1"})


def test_multi_projector_refuses_bad_input():
    x = multi_data(50, {"image": 4, "text": 3, "audio": 5}, {"image": 1.0, "text": 1.0, "audio": 1.0})
    with pytest.raises(ValueError, match="at least 2 modalities"):
        MultiClearProjector(ClearOptions(k=1), ("text",))
    with pytest.raises(ValueError, match="not lowercase identifiers"):
        MultiClearProjector(ClearOptions(k=1), ("text", "Audio"))
    with pytest.raises(ValueError, match="repeat"):
        MultiClearProjector(ClearOptions(k=1), ("text", "text"))
    with pytest.raises(ValueError, match="not among the modalities"):
        MultiClearProjector(ClearOptions(k=1), ("text", "audio"), project={"image": False})
    p = MultiClearProjector(ClearOptions(k=1), ("image", "text", "audio"))
    with pytest.raises(ValueError, match="expected exactly the modalities"):
        p.fit({"image": x["image"], "text": x["text"]})
    with pytest.raises(ValueError, match="same number of rows"):
        p.fit({**x, "audio": x["audio"][:40]})
    bad = x["text"].copy()
    bad[17, 1] = np.nan
    with pytest.raises(ValueError, match="modality 'text'.*NaN"):
        p.fit({**x, "text": bad})
    with pytest.raises(ValueError, match="zero variance"):
        p.fit({**x, "audio": np.ones_like(x["audio"])})
    with pytest.raises(ValueError, match="not fitted"):
        p.transform("text", x["text"])
    p.fit(x)
    with pytest.raises(ValueError, match="expected \\(N, 3\\)"):
        p.transform("text", x["image"])
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        p.transform("video", x["text"])


def test_multi_projector_equals_two_modality_clear_on_lastfm_text_and_audio():
    """Real data: Last.fm-2K's published MiniLM text (row norm 1) and VGGish audio (row norm ~1477)."""
    mmrec = SHARED_DATASETS / "lastfm-2k" / "mmrec"
    if not (mmrec / "vggish.npy").is_file() or not (mmrec / "all-MiniLM-L6-v2.npy").is_file():
        pytest.skip(f"real-data check: {mmrec} is absent (it ships in ../shared beside the repo)")
    x = {"text": np.load(mmrec / "all-MiniLM-L6-v2.npy", allow_pickle=False).astype(np.float64),
         "audio": np.load(mmrec / "vggish.npy", allow_pickle=False).astype(np.float64)}
    for opts in (ClearOptions(k=8), ClearOptions(ratio=0.5, strength=0.5, project_centered=True)):
        ref = ClearProjector(opts).fit(x["text"], x["audio"])  # text in the first slot, audio in the second
        p = MultiClearProjector(opts, ("text", "audio")).fit(x)
        assert p.k_ == {"text": ref.k_, "audio": ref.k_}
        np.testing.assert_allclose(p.transform("text", x["text"]), ref.transform_visual(x["text"]), rtol=0,
                                   atol=1e-10 * np.abs(x["text"]).max())
        np.testing.assert_allclose(p.transform("audio", x["audio"]), ref.transform_text(x["audio"]), rtol=0,
                                   atol=1e-10 * np.abs(x["audio"]).max())
        assert p.weights_["audio"] < 1e-2 < p.weights_["text"]  # 1 / total std: audio's scale is divided out
