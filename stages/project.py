"""Stage ``project``: fit CLEAR on the encoded features, write projected features and diagnostics.

The modalities are those declared in ``[encode.modalities]`` that have a features file, in
declared order; CLEAR over M >= 2 of them is :class:`~clearrec.models.clear_multi.MultiClearProjector`
(for M = 2 exactly the two-modality CLEAR). Two streaming passes over ``features/<name>.parquet``
(read together, ``project.chunk_rows`` rows at a time, so a catalog larger than memory works):

1. fit: modality means of the valid vectors (for ``encode.missing = "mean"``) and the
   cross-covariances of the fit items (items with every vector; with ``fit_on = "train"``
   only those in the train split), then the SVDs;
2. transform: fill or keep missing vectors per policy, project, and write
   ``features/<name>_clear.parquet`` row group by row group; meanwhile collect the
   seeded diagnostics sample and each modality's variance before and after.

Pass-through (vectors unchanged, missing policy still applied) when ``project.enabled`` is
false, when ``project.mode = "dynamic"`` (train projects the backbone's embeddings), or
when only one modality has features. ``project.modalities`` turns the projection of single
modalities off (they still shape the others' directions).
"""

from __future__ import annotations

import json
import time
from functools import partial
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models.clear import ClearOptions
from ..models.clear_multi import MultiClearProjector
from ..models.diagnostics import Moments
from ..pipeline.config import Config
from ..pipeline.errors import ConfigError, InputDataError
from ..pipeline.stage import StageContext, StageResult, StageSpec
from ..pipeline.store import ArtifactStore, arrow_to_vectors, vectors_to_arrow
from ..pipeline.workdir import (
    DIAGNOSTICS,
    FILL,
    INTERACTIONS,
    PROJECTOR,
    PROJECTOR_JSON,
    clear_features,
    declared_modalities,
    features,
)
from . import _project_plots as plots
from ._project_diagnostics import build_pairwise, kept_share, measure_files, summary_line
from ._project_io import Source, iter_aligned, open_features, sample_rows, train_items


@dataclass
class _Scan:
    """What the fit pass learned about the rows."""

    n_rows: int
    valid: dict[str, np.ndarray]  # modality -> (N,) bool, row has a vector
    fill: dict[str, np.ndarray]  # modality -> (d,) float32 mean of the valid vectors
    fit_rows: np.ndarray | None = None  # (N,) bool, rows the projector was fit on
    projector: MultiClearProjector | None = None
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def run(ctx: StageContext) -> StageResult:
    cfg, missing, store = ctx.config.project, ctx.config.encode.missing, ctx.store
    present = [m for m in declared_modalities(ctx.config) if store.exists(features(m))]
    unknown = sorted(set(cfg.modalities) - set(present))
    if unknown:
        raise ConfigError(f"project.modalities names {unknown}, which have no features; the modalities are "
                          f"{present} (encode.modalities)")
    if not present:
        reason = "no feature files (no modality is encoded): nothing to project"
        ctx.log(f"CLEAR not applied: {reason}")
        store.write_json(PROJECTOR_JSON, {"enabled": cfg.enabled, "applied": False, "reason": reason,
                                          "mode": "off", "k": 0, "strength": 0.0})
        _remove_stale(store, [PROJECTOR_JSON])
        return StageResult(outputs=[PROJECTOR_JSON], counts={"items": 0}, summary=f"CLEAR not applied ({reason})")
    sources = [open_features(store, features(m), m) for m in present]
    switches = {m: bool(cfg.modalities.get(m, True)) for m in present}
    mode = cfg.mode if cfg.enabled else "off"
    reason = None
    if not cfg.enabled:
        reason = "project.enabled = false"
    elif cfg.mode == "dynamic":
        reason = "project.mode = 'dynamic': train projects the backbone's modality embeddings every epoch"
    elif len(present) < 2:
        reason = f"only {present[0]} features exist: CLEAR needs at least two modalities"
        mode = "off"
    elif not any(switches.values()):
        reason = "project.modalities turns every modality off"
        mode = "off"
    if reason:
        ctx.log(f"CLEAR not applied: {reason}; passing {', '.join(present)} features through")

    options = _options(cfg)
    scan = _fit_pass(ctx, sources, missing, options if reason is None else None, switches)
    projector, sha, sample = scan.projector, None, None
    if projector is not None:
        tensors, meta = projector.state_dict()
        store.write_tensors(PROJECTOR, tensors, metadata={"format": meta["format"]})
        sha = store.checksum(PROJECTOR)
        sample = sample_rows(scan.fit_rows, cfg.diagnostics_items, cfg.seed)
    t0 = time.perf_counter()
    moments, picked, fill = _transform_pass(ctx, sources, scan, missing, sample, sha)
    transform_seconds = time.perf_counter() - t0
    raw_fill = {f"{m}.raw": np.ascontiguousarray(v, dtype=np.float32) for m, v in scan.fill.items()}
    store.write_tensors(FILL, {**fill, **raw_fill}, metadata={"missing": missing})  # as projected, and before

    written = [clear_features(s.modality) for s in sources] + [FILL]
    # what train and serving learn from this file: deterministic, and only settings that take effect
    info: dict[str, Any] = {
        "enabled": cfg.enabled, "applied": projector is not None, "reason": reason, "mode": mode,
        "missing": missing,
        "inputs": {s.modality: {"dim": s.dim, "encoder": s.meta.get("encoder"), "rows": scan.n_rows} for s in sources},
        "project": switches,
        "counts": scan.counts,
    }
    counts: dict[str, Any] = {"items": scan.n_rows, **scan.counts, "fit_seconds": round(scan.seconds, 3),
                              "transform_seconds": round(transform_seconds, 3)}
    if projector is None:
        clear = {**options.to_json(), "k": None} if mode == "dynamic" else {"k": 0, "strength": 0.0}
        store.write_json(PROJECTOR_JSON, {**info, **clear})
        _remove_stale(store, written + [PROJECTOR_JSON])
        return StageResult(outputs=written + [PROJECTOR_JSON], counts=counts,
                           summary=f"CLEAR not applied ({reason}); {len(present)} feature file(s) passed through")

    ks = dict(projector.k_)
    pairs = projector.pairs
    store.write_json(PROJECTOR_JSON, {
        **meta, "k": ks[present[0]] if len(set(ks.values())) == 1 else ks, "k_per_modality": ks,
        "sha256": sha, **info, "fit_on": cfg.fit_on,
        "energy_topk": {m: projector.energy_topk(m) for m in present},
        "energy_removed": {f"{a}|{b}": projector.energy_removed(a, b) for a, b in pairs}})
    variance = {m: kept_share(*moments[m]) for m in present}
    diag = build_pairwise(projector, picked, cfg.overlap_k, variance, strength=options.strength,
                          ratio=options.ratio, directions=options.directions)
    store.write_json(DIAGNOSTICS, diag)
    pngs = plots.write_plots(store, "clear", diag)
    outputs = written + [PROJECTOR, PROJECTOR_JSON, DIAGNOSTICS, *pngs]
    _remove_stale(store, outputs)
    counts.update(k=ks[present[0]], sigma1_before=diag["spectrum_before"][0], sigma1_after=diag["spectrum_after"][0])
    if f"overlap@{cfg.overlap_k}" in diag:
        counts.update(overlap_before=diag[f"overlap@{cfg.overlap_k}"]["before"],
                      overlap_after=diag[f"overlap@{cfg.overlap_k}"]["after"])
    return StageResult(outputs=outputs, counts=counts, summary=summary_line(diag))


def diagnose(store: ArtifactStore, config: Config, target: ArtifactStore, overlap_k: int | None = None,
             items: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """``clearrec diagnose``: measure CLEAR from the written files; write diagnostics.json + PNGs to ``target``.

    Unlike the stage, which derives the projected spectrum from the projector, this streams
    ``features/*.parquet`` and ``*_clear.parquet`` and measures both cross-covariances.
    """
    diag = measure_files(store, config, overlap_k=overlap_k, items=items)
    target.write_json("diagnostics.json", diag)
    return diag, plots.write_plots(target, "", diag)


# ---- the two passes ----------------------------------------------------------------------
def _fit_pass(ctx: StageContext, sources: list[Source], missing: str, options: ClearOptions | None,
              switches: dict[str, bool]) -> _Scan:
    """Scan the features; with ``options``, also fit the projector on the fit items (every vector present)."""
    cfg = ctx.config.project
    fit = options is not None
    t0 = time.perf_counter()
    n = sources[0].file.metadata.num_rows
    valid = {s.modality: np.zeros(n, dtype=bool) for s in sources}
    sums = {s.modality: np.zeros(s.dim, dtype=np.float64) for s in sources}
    projector = MultiClearProjector(options, [s.modality for s in sources], switches) if fit else None
    fit_rows = np.zeros(n, dtype=bool) if fit else None
    train = train_items(ctx.store) if fit and cfg.fit_on == "train" else None
    lo = 0
    with ctx.progress(n, "CLEAR fit" if fit else "scan features", unit="item") as bar:
        for batches in iter_aligned(sources, cfg.chunk_rows):
            hi = lo + batches[0].num_rows
            xs = {}
            for s, b in zip(sources, batches):
                xs[s.modality], valid[s.modality][lo:hi] = arrow_to_vectors(b.column("vector"))
                sums[s.modality] += np.sum(xs[s.modality], axis=0, dtype=np.float64)  # null rows are zeros
            if projector is not None:
                rows = np.logical_and.reduce([valid[m][lo:hi] for m in xs])
                if train is not None:
                    rows &= np.isin(batches[0].column("item_idx").to_numpy(), train)
                fit_rows[lo:hi] = rows
                projector.partial_fit(xs if rows.all() else {m: x[rows] for m, x in xs.items()})
            bar.update(hi - lo)
            lo = hi
    counts = {}
    fill = {}
    for s in sources:
        n_valid = int(valid[s.modality].sum())
        counts[f"missing_{s.modality}"] = n - n_valid
        if missing == "mean" and n_valid == 0 and n > 0:
            raise InputDataError(f"{s.name} has no vectors at all, so encode.missing = 'mean' has nothing to "
                                 f"fill with; check the encode stage's status/error columns in {s.name}")
        fill[s.modality] = (sums[s.modality] / max(n_valid, 1)).astype(np.float32)
    if projector is not None:
        n_fit = int(fit_rows.sum())
        counts["fit_items"] = n_fit
        if n_fit < 2:
            where = " in the train split" if cfg.fit_on == "train" else ""
            raise InputDataError(f"CLEAR needs at least 2 items with a vector of every modality{where} to fit; "
                                 f"found {n_fit}. Check the encode stage's status columns, or set project.enabled = false")
        try:
            projector.finalize()
        except ValueError as e:  # a setting the fitted dimensions cannot take (k too large)
            dims = ", ".join(f"{s.modality} {s.dim}" for s in sources)
            raise ConfigError(f"project.k: {e} (feature dims: {dims})") from e
        shares = ", ".join(f"{m} {projector.energy_topk(m):.3f}" for m in projector.modalities)
        ks = ", ".join(f"{m} {k}" for m, k in projector.k_.items())
        ctx.log(f"CLEAR fit on {n_fit} items: k = {ks}; top-k energy share {shares}")
    return _Scan(n, valid, fill, fit_rows, projector, time.perf_counter() - t0, counts)


def _transform_pass(
    ctx: StageContext, sources: list[Source], scan: _Scan, missing: str, sample: np.ndarray | None,
    sha: str | None,
) -> tuple[dict[str, tuple[Moments, Moments]], dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
    """Write the *_clear files; return per-modality (before, after) moments, the sample's vectors and
    the fill vectors (what an item without a vector of that modality got, projected as the others)."""
    store, cfg, proj = ctx.store, ctx.config.project, scan.projector
    moments = {s.modality: (Moments(scan.fill[s.modality]), Moments()) for s in sources}
    picked = None
    if sample is not None:
        picked = {f"{s.modality}_{when}": np.zeros((len(sample), s.dim), np.float32)
                  for s in sources for when in ("before", "after")}
        in_sample = np.zeros(scan.n_rows, dtype=bool)
        in_sample[sample] = True
    transform = {m: partial(proj.transform, m) for m in proj.modalities} if proj else {}
    applied = {s.modality: bool(proj and proj.project[s.modality]) for s in sources}
    fill_out = {m: (transform[m](scan.fill[m][None])[0] if m in transform else scan.fill[m]) for m in scan.fill}
    n_filled = {m: int((~scan.valid[m]).sum()) if missing == "mean" else 0 for m in scan.valid}
    schemas = {s.modality: _output_schema(s, missing, applied[s.modality], sha, n_filled[s.modality])
               for s in sources}
    lo, cursor = 0, 0
    with _writers(store, sources, schemas) as writers, ctx.progress(scan.n_rows, "CLEAR transform", "item") as bar:
        for batches in iter_aligned(sources, cfg.chunk_rows):
            hi = lo + batches[0].num_rows
            take = np.flatnonzero(in_sample[lo:hi]) if sample is not None else None
            for s, b in zip(sources, batches):
                m = s.modality
                x, ok = arrow_to_vectors(b.column("vector"))
                y = transform[m](x) if m in transform else x  # (n, d)
                if missing == "mean":
                    y[~ok] = fill_out[m]
                moments[m][0].update(x if ok.all() else x[ok])
                moments[m][1].update(y if ok.all() else y[ok])
                if take is not None and len(take):
                    picked[f"{m}_before"][cursor : cursor + len(take)] = x[take]
                    picked[f"{m}_after"][cursor : cursor + len(take)] = y[take]
                filled = ~ok if missing == "mean" else np.zeros(len(ok), dtype=bool)
                has_vector = ok | filled
                vectors = vectors_to_arrow(y, None if has_vector.all() else has_vector)
                writers[m].write_batch(_output_batch(b, schemas[m], vectors, filled))
            cursor += 0 if take is None else len(take)
            bar.update(hi - lo)
            lo = hi
    return moments, picked, {m: np.ascontiguousarray(v, dtype=np.float32) for m, v in fill_out.items()}


def _options(cfg) -> ClearOptions:
    """The ``[project]`` section's CLEAR settings as the one settings object."""
    return ClearOptions(**{f.name: getattr(cfg, f.name) for f in dataclass_fields(ClearOptions)
                           if f.name not in ("visual", "text")})  # per-modality switches: project.modalities

# ---- writing -----------------------------------------------------------------------------
class _writers:
    """Context manager: one ParquetWriter per modality, each on the store's atomic temp path."""

    def __init__(self, store: ArtifactStore, sources: list[Source], schemas: dict[str, pa.Schema]):
        self.store, self.sources, self.schemas = store, sources, schemas
        self._atomics: list[Any] = []
        self.writers: dict[str, pq.ParquetWriter] = {}

    def __enter__(self) -> dict[str, pq.ParquetWriter]:
        try:
            for s in self.sources:
                cm = self.store.atomic(clear_features(s.modality))
                tmp = cm.__enter__()
                self._atomics.append(cm)
                self.writers[s.modality] = pq.ParquetWriter(tmp, self.schemas[s.modality], compression="zstd")
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self.writers

    def __exit__(self, et, ev, tb) -> bool:
        for w in self.writers.values():
            w.close()
        for cm in reversed(self._atomics):  # on error each temp file is removed
            cm.__exit__(et, ev, tb)
        return False


def _output_schema(src: Source, missing: str, applied: bool, sha: str | None, n_filled: int) -> pa.Schema:
    """The input's schema plus a ``filled`` column; metadata names the projector (sha256 or null)."""
    meta = dict(src.meta)
    meta.update(
        projector=sha,
        clear_enabled=applied,
        missing=missing,
        filled=n_filled,
        source=src.name,
        normalized=bool(src.meta.get("normalized", False)) and not applied and n_filled == 0,
    )
    schema = src.file.schema_arrow
    if "filled" in schema.names:
        schema = schema.remove(schema.get_field_index("filled"))
    schema = schema.append(pa.field("filled", pa.bool_(), nullable=False))
    return schema.with_metadata({b"clearrec": json.dumps(meta, sort_keys=True).encode()})


def _output_batch(batch: pa.RecordBatch, schema: pa.Schema, vectors: pa.Array, filled: np.ndarray) -> pa.RecordBatch:
    cols = [vectors if name == "vector" else batch.column(name) for name in schema.names if name != "filled"]
    return pa.RecordBatch.from_arrays([*cols, pa.array(filled, type=pa.bool_())], schema=schema)


def _remove_stale(store: ArtifactStore, keep: list[str]) -> None:
    """Delete outputs of an earlier run that this run did not write (e.g. a projector after disabling, the
    projected features of a modality no longer declared)."""
    folder = store.path("features")
    stale = [f"features/{p.name}" for p in sorted(folder.glob("*_clear.parquet"))] if folder.is_dir() else []
    for name in [*FIXED_OUTPUTS, *stale]:
        if name not in keep and store.exists(name):
            store.path(name).unlink()


FIXED_OUTPUTS = (PROJECTOR, PROJECTOR_JSON, FILL, DIAGNOSTICS, *plots.PLOT_NAMES)


SPEC = StageSpec(
    name="project",
    run=run,
    inputs=lambda config: (*(features(m) for m in declared_modalities(config)), INTERACTIONS),
    outputs=lambda config: (*FIXED_OUTPUTS, *(clear_features(m) for m in declared_modalities(config))),
    config_keys=("project", "encode.missing", "encode.modalities"),
    code=("clearrec.models.clear", "clearrec.models.clear_multi", "clearrec.models.diagnostics", "clearrec.stages._project_io",
          "clearrec.stages._project_diagnostics", "clearrec.stages._project_plots"),
    description="fit the CLEAR projector; write projected features and diagnostics",
)
