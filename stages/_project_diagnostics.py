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
from ..pipeline.workdir import MODALITIES, PROJECTOR_JSON, clear_features, features
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
    **extra: Any,
) -> dict[str, Any]:
    """The numbers of ``clear/diagnostics.json`` from spectra, a paired sample and variance shares."""
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
    if sample is not None and len(sample["image_before"]) >= 2:
        m = len(sample["image_before"])
        ks = [x for x in OVERLAP_CURVE_KS if x < m]
        rb = cross_modal_report(sample["image_before"], sample["text_before"], overlap_k, ks)
        ra = cross_modal_report(sample["image_after"], sample["text_after"], overlap_k, ks)
        diag[f"overlap@{overlap_k}"] = {"before": rb["overlap"], "after": ra["overlap"],
                                        "chance": min(overlap_k, m - 1) / (m - 1)}
        diag["overlap_curve"] = {"k": sorted(rb["overlap_curve"]), "before": list(rb["overlap_curve"].values()),
                                 "after": list(ra["overlap_curve"].values())}
        diag["similarity_density"] = {
            mod: {"before": score_density(rb[f"scores_{mod}"]), "after": score_density(ra[f"scores_{mod}"])}
            for mod in MODALITIES
        }
        diag["overlap_k"] = overlap_k
        diag["n_sample"] = m
    return diag


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

    Unlike the stage, which derives the projected spectrum from the projector, this streams
    the written files and measures both cross-covariances on the fit items.
    """
    cfg = config.project
    overlap_k = overlap_k or cfg.overlap_k
    items = items or cfg.diagnostics_items
    for name in [*map(features, MODALITIES), *map(clear_features, MODALITIES)]:
        if not store.exists(name):
            raise ArtifactError(f"{name} not found in {store.root}: diagnose needs both modalities before and "
                                "after the project stage; run 'clearrec run --to project' first")
    sources = [open_features(store, features(m), m) for m in MODALITIES]
    sources += [open_features(store, clear_features(m), m) for m in MODALITIES]
    info = store.read_json(PROJECTOR_JSON) if store.exists(PROJECTOR_JSON) else {}
    train = train_items(store) if cfg.fit_on == "train" else None
    n = sources[0].file.metadata.num_rows
    fit_rows = np.zeros(n, dtype=bool)
    accs = {"before": CrossCovariance(), "after": CrossCovariance()}
    moments = {(m, w): Moments() for m in MODALITIES for w in ("before", "after")}
    lo = 0
    for batches in iter_aligned(sources, cfg.chunk_rows):
        hi = lo + batches[0].num_rows
        (xv, okv), (xt, okt), (yv, _), (yt, _) = (arrow_to_vectors(b.column("vector")) for b in batches)
        rows = okv & okt
        if train is not None:
            rows &= np.isin(batches[0].column("item_idx").to_numpy(), train)
        fit_rows[lo:hi] = rows
        accs["before"].update(xv[rows], xt[rows])
        accs["after"].update(yv[rows], yt[rows])
        for m, x, y, ok in (("image", xv, yv, okv), ("text", xt, yt, okt)):
            moments[(m, "before")].update(x[ok])
            moments[(m, "after")].update(y[ok])
        lo = hi
    if accs["before"].n < 2:
        raise InputDataError(f"only {accs['before'].n} fit items have both vectors; diagnostics need at least 2")
    rows = sample_rows(fit_rows, items, cfg.seed)
    picked = _gather(sources, rows, cfg.chunk_rows)
    spectra = {w: np.linalg.svd(accs[w].covariance(cfg.center), compute_uv=False) for w in accs}
    k = int(info.get("k") or 0)
    variance = {m: kept_share(moments[(m, "before")], moments[(m, "after")]) for m in MODALITIES}
    return build_diagnostics(spectra["before"], spectra["after"], k, picked, overlap_k, variance,
                             n_fit=accs["before"].n, strength=info.get("strength"), measured_from="files")


def _gather(sources: list[Source], rows: np.ndarray, chunk_rows: int) -> dict[str, np.ndarray]:
    """Vectors of the given row positions from (image, text, image_clear, text_clear)."""
    names = ["image_before", "text_before", "image_after", "text_after"]
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
