"""The numbers of ``clear/diagnostics.json``, the stage's summary line, and ``clearrec diagnose``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ..models.clear import CrossCovariance
from ..models.diagnostics import Moments, cross_modal_report, energy_curve, score_density
from ..pipeline.config import Config
from ..pipeline.errors import ArtifactError, InputDataError
from ..pipeline.store import ArtifactStore, arrow_to_vectors
from ..pipeline.workdir import PROJECTOR_JSON, clear_features, declared_modalities, features
from ._project_io import Source, iter_aligned, open_features, sample_rows, train_items

OVERLAP_CURVE_KS = (1, 5, 10, 20, 50)  # K values of the overlap curve (those below the sample size)


def kept_share(before: Moments, after: Moments) -> float | None:
    """Total variance after / before (None when there were no rows or no variance)."""
    total = before.total_variance()
    return None if not before.n or total == 0 else after.total_variance() / total


def build_diagnostics(
    spectrum_before: np.ndarray,
    spectrum_after: np.ndarray,
    k: int,
    sample: dict[str, np.ndarray] | None,
    overlap_k: int,
    variance_kept: dict[str, float | None],
    modalities: tuple[str, str] = ("image", "text"),
    **extra: Any,
) -> dict[str, Any]:
    """One pair's diagnostics from its spectra, a paired sample (``<name>_before`` / ``<name>_after``
    vectors) and variance shares."""
    before = np.sort(np.asarray(spectrum_before, dtype=np.float64))[::-1]
    after = np.sort(np.asarray(spectrum_after, dtype=np.float64))[::-1]
    diag: dict[str, Any] = {
        "k": int(k),
        **extra,
        "spectrum_before": before.tolist(),
        "spectrum_after": after.tolist(),
        "energy_curve_before": energy_curve(before).tolist(),
        # share of the ORIGINAL energy: the after curve ends at 1 - energy removed
        "energy_curve_after": (energy_curve(after) * _energy_ratio(after, before)).tolist(),
        "top_singular_values": {"before": before[: max(k, 1)].tolist(), "after": after[: max(k, 1)].tolist()},
        "variance_kept": variance_kept,
    }
    a, b = modalities
    diag["modalities"] = [a, b]
    if sample is not None and len(sample[f"{a}_before"]) >= 2:
        m = len(sample[f"{a}_before"])
        ks = [x for x in OVERLAP_CURVE_KS if x < m]
        rb = cross_modal_report(sample[f"{a}_before"], sample[f"{b}_before"], overlap_k, ks)
        ra = cross_modal_report(sample[f"{a}_after"], sample[f"{b}_after"], overlap_k, ks)
        diag[f"overlap@{overlap_k}"] = {"before": rb["overlap"], "after": ra["overlap"],
                                        "chance": min(overlap_k, m - 1) / (m - 1)}
        diag["overlap_curve"] = {"k": sorted(rb["overlap_curve"]), "before": list(rb["overlap_curve"].values()),
                                 "after": list(ra["overlap_curve"].values())}
        diag["similarity_density"] = {
            mod: {"before": score_density(rb[f"scores_{side}"]), "after": score_density(ra[f"scores_{side}"])}
            for mod, side in ((a, "image"), (b, "text"))  # cross_modal_report's first / second side
        }
        diag["overlap_k"] = overlap_k
        diag["n_sample"] = m
    return diag


def build_pairwise(projector: Any, sample: dict[str, np.ndarray] | None, overlap_k: int,
                   variance_kept: dict[str, float | None], **extra: Any) -> dict[str, Any]:
    """``clear/diagnostics.json`` of a fitted :class:`MultiClearProjector`: one entry per pair under
    ``pairs`` (``"a|b"``), a ``pairwise`` table, and the first pair's numbers at the top level."""
    pairs = {}
    for a, b in projector.pairs:
        before, after = projector.pair_spectra(a, b)
        pairs[f"{a}|{b}"] = build_diagnostics(before, after, projector.k_[a], sample, overlap_k, variance_kept,
                                              modalities=(a, b), n_fit=projector.n_fit_, **extra)
    return _with_pairs(pairs, projector.k_)


def _with_pairs(pairs: dict[str, dict[str, Any]], ks: dict[str, int]) -> dict[str, Any]:
    table = {}
    for key, d in pairs.items():
        over = d.get(f"overlap@{d.get('overlap_k')}") or {}
        table[key] = {"overlap_before": over.get("before"), "overlap_after": over.get("after"),
                      "sigma1_before": d["spectrum_before"][0] if d["spectrum_before"] else None,
                      "sigma1_after": d["spectrum_after"][0] if d["spectrum_after"] else None,
                      "energy_removed": 1.0 - _energy_ratio(np.asarray(d["spectrum_after"]),
                                                            np.asarray(d["spectrum_before"]))}
    first = next(iter(pairs.values()))
    return {**first, "k_per_modality": dict(ks), "pairwise": table, "pairs": pairs}


def _energy_ratio(after: np.ndarray, before: np.ndarray) -> float:
    total = float(np.sum(before**2))
    return 0.0 if total == 0 else float(np.sum(after**2)) / total


def summary_line(diag: dict[str, Any]) -> str:
    """One line: by how much the cross-modal overlap and the top singular values dropped."""
    k = diag["k"]
    sb, sa = diag["top_singular_values"]["before"], diag["top_singular_values"]["after"]
    parts = [f"CLEAR k={k}"]
    key = next((x for x in diag if x.startswith("overlap@")), None)
    if key:
        o = diag[key]
        parts.append(f"{key} {o['before']:.3f} -> {o['after']:.3f} ({_pct(o['before'], o['after'])})")
    parts.append(f"sigma_1 {sb[0]:.3g} -> {sa[0]:.3g} ({_pct(sb[0], sa[0])})")
    parts.append(f"top-{k} singular-value sum {sum(sb):.3g} -> {sum(sa):.3g} ({_pct(sum(sb), sum(sa))})")
    kept = diag.get("variance_kept") or {}
    shown = [f"{m} {v:.0%}" for m, v in kept.items() if v is not None]
    if shown:
        parts.append("variance kept " + ", ".join(shown))
    return "; ".join(parts)


def _pct(before: float, after: float) -> str:
    return "n/a" if before == 0 else f"{(after - before) / before:+.0%}"


def measure_files(store: ArtifactStore, config: Config, overlap_k: int | None = None,
                  items: int | None = None) -> dict[str, Any]:
    """Diagnostics measured from the features before and after (``features/*.parquet`` vs ``*_clear``).

    Unlike the stage, which derives the projected spectra from the projector, this streams
    the written files and measures every pair's cross-covariance on the fit items.
    """
    cfg = config.project
    overlap_k = overlap_k or cfg.overlap_k
    items = items or cfg.diagnostics_items
    info = store.read_json(PROJECTOR_JSON) if store.exists(PROJECTOR_JSON) else {}
    mods = list(info.get("inputs") or declared_modalities(config))
    if len(mods) < 2:
        raise ArtifactError(f"diagnose needs at least two modalities before and after the project stage; "
                            f"{store.root} has {mods}")
    for name in [*map(features, mods), *map(clear_features, mods)]:
        if not store.exists(name):
            raise ArtifactError(f"{name} not found in {store.root}: diagnose needs every modality before and "
                                "after the project stage; run 'clearrec run --to project' first")
    sources = [open_features(store, features(m), m) for m in mods]
    sources += [open_features(store, clear_features(m), m) for m in mods]
    train = train_items(store) if cfg.fit_on == "train" else None
    n = sources[0].file.metadata.num_rows
    fit_rows = np.zeros(n, dtype=bool)
    pair_names = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    accs = {(p, w): CrossCovariance() for p in pair_names for w in ("before", "after")}
    moments = {(m, w): Moments() for m in mods for w in ("before", "after")}
    lo = 0
    for batches in iter_aligned(sources, cfg.chunk_rows):
        hi = lo + batches[0].num_rows
        vecs = [arrow_to_vectors(b.column("vector")) for b in batches]
        x = {m: vecs[i] for i, m in enumerate(mods)}  # before: (vectors, valid)
        y = {m: vecs[len(mods) + i][0] for i, m in enumerate(mods)}  # after
        rows = np.logical_and.reduce([x[m][1] for m in mods])
        if train is not None:
            rows &= np.isin(batches[0].column("item_idx").to_numpy(), train)
        fit_rows[lo:hi] = rows
        for a, b in pair_names:
            accs[((a, b), "before")].update(x[a][0][rows], x[b][0][rows])
            accs[((a, b), "after")].update(y[a][rows], y[b][rows])
        for m in mods:
            ok = x[m][1]
            moments[(m, "before")].update(x[m][0][ok])
            moments[(m, "after")].update(y[m][ok])
        lo = hi
    n_fit = accs[(pair_names[0], "before")].n
    if n_fit < 2:
        raise InputDataError(f"only {n_fit} fit items have every vector; diagnostics need at least 2")
    rows = sample_rows(fit_rows, items, cfg.seed)
    picked = _gather(sources, mods, rows, cfg.chunk_rows)
    variance = {m: kept_share(moments[(m, "before")], moments[(m, "after")]) for m in mods}
    ks = info.get("k_per_modality") or {m: int(info.get("k") or 0) for m in mods}
    pairs = {}
    for a, b in pair_names:
        spectra = {w: np.linalg.svd(accs[((a, b), w)].covariance(cfg.center), compute_uv=False)
                   for w in ("before", "after")}
        pairs[f"{a}|{b}"] = build_diagnostics(spectra["before"], spectra["after"], int(ks.get(a, 0)), picked,
                                              overlap_k, variance, modalities=(a, b), n_fit=n_fit,
                                              strength=info.get("strength"), measured_from="files")
    return _with_pairs(pairs, ks)


def _gather(sources: list[Source], mods: list[str], rows: np.ndarray, chunk_rows: int) -> dict[str, np.ndarray]:
    """Vectors of the given row positions from every features file, then every ``*_clear`` file."""
    names = [f"{m}_before" for m in mods] + [f"{m}_after" for m in mods]
    out = {nm: np.zeros((len(rows), s.dim), np.float32) for nm, s in zip(names, sources)}
    lo, cursor = 0, 0
    for batches in iter_aligned(sources, chunk_rows):
        hi = lo + batches[0].num_rows
        take = rows[(rows >= lo) & (rows < hi)] - lo
        if len(take):
            for nm, b in zip(names, batches):
                out[nm][cursor : cursor + len(take)] = arrow_to_vectors(b.column("vector").take(pa.array(take)))[0]
            cursor += len(take)
        lo = hi
    return out
