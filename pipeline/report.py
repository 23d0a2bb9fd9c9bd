"""Reports: one self-contained HTML page and a Markdown twin.

For a work directory: dataset statistics, stage status counts, CLEAR diagnostics, training
curve, metrics, index info and example recommendations. For an experiment folder (what
``clearrec compare / ablate / sweep`` write): the comparison, ablation and sweep tables and
the sweep heatmap. Every section reads only artifacts; an absent artifact makes its section
say "not run" instead of failing. A section shows the few numbers a reader needs, in words,
and links its JSON artifacts for the rest (never a key / value dump of them). An untrained or
imported encoder gets a notice at the top. The HTML embeds every image as a base64 data URI
and has no external assets; both files link images / JSON relative to where they are written.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .experiment_tables import (ablation_table, change_table, compare_table, markdown_table, noise_rule_text,
                                random_control_table, sweep_choice_table, sweep_table)
from .errors import ArtifactError
from .store import ArtifactStore, arrow_to_vectors, resolve_inside
from .workdir import (project_modalities, DIAGNOSTICS, INDEX_INFO, INTERACTIONS, MANIFEST, ITEM_VECTORS, ITEMS, MODEL_JSON,
                      PROJECTOR_JSON, REJECTS, TRAINING_CURVE, USER_VECTORS, USERS, clear_features, features,
                      imported, read_manifest)
from .workdir import METRICS as METRICS_JSON

WORKDIR_SECTIONS = ("dataset", "status", "clear", "training", "metrics", "index", "recommendations")
COMPARISON_SECTIONS = ("comparison", "ablations", "sweep")
STAGE_ORDER = ("ingest", "encode", "project", "train", "index")
THUMB_PX = 64  # thumbnail edge in the example recommendations
MAX_THUMB_SOURCE_PIXELS = 40_000_000  # refuse to decode larger images (decompression bombs)
MAX_SCORED = 1 << 22  # most user x item scores held at once while picking example users
CAPTIONS = {  # figure file name -> the sentence under it
    "spectrum.png": "Left: singular values of the image-text cross-covariance before and after CLEAR (log scale); "
                    "the top k shared directions are removed and the rest are unchanged. Right: the cumulative share "
                    "of the original cross-modal energy that each number of directions explains.",
    "overlap.png": "How many of an item's K nearest neighbours by image are also among its K nearest by text, before "
                   "and after CLEAR, against chance: a drop means the two modalities now carry less of the same "
                   "information.",
    "similarity.png": "Cosine similarity of each item to its nearest neighbours within one modality, before and after "
                      "CLEAR: how much the projection reshapes each modality's own neighbourhoods.",
    "variance.png": "Share of each modality's variance that is left after the projection removes the shared "
                    "directions.",
    "training_curve.png": "Training loss and valid Recall@20 / NDCG@20 per epoch; the marked epoch is the best on "
                          "valid, whose weights are kept and tested.",
    "sweep_heatmap.png": "Mean valid Recall@20 for each rank k (or energy ratio) and strength lambda; the boxed cell "
                         "is the setting chosen on valid.",
}


@dataclass
class Image:
    """An image: a file (linked from Markdown, embedded in HTML) or bytes (HTML only)."""

    alt: str
    path: Path | None = None
    data: bytes | None = None
    mime: str = "image/png"
    caption: str = ""  # the sentence under a figure (the alt text when empty)

    def data_uri(self) -> str:
        raw = self.data if self.data is not None else self.path.read_bytes()
        return f"data:{self.mime};base64,{base64.b64encode(raw).decode('ascii')}"


@dataclass
class Section:
    id: str
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def p(self, text: str) -> "Section":
        self.blocks.append(("p", text))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> "Section":
        self.blocks.append(("table", (list(headers), [list(r) for r in rows])))
        return self

    def image(self, img: Image) -> "Section":
        self.blocks.append(("img", img))
        return self

    def not_run(self, why: str) -> "Section":
        return self.p(f"not run: {why}")

    def files(self, store: ArtifactStore, names: Sequence[str]) -> "Section":
        """A line linking the artifacts that hold every detail (those present)."""
        present = [store.path(n) for n in names if store.exists(n)]
        if present:
            self.blocks.append(("files", present))
        return self


class NoWrap(str):
    """A table cell that must stay on one line (timestamps)."""


class Marked(str):
    """A table cell to highlight (a held-out item the model recommended)."""


# ---- work directory --------------------------------------------------------------------
def workdir_sections(root: Path, n_users: int = 3, top_k: int = 10) -> list[Section]:
    store = ArtifactStore(root)
    return [_dataset(store), _status(store), _clear(store), _training(store), _metrics(store), _index(store),
            _recommendations(store, n_users, top_k)]


def _modalities(store: ArtifactStore) -> list[str]:
    """The work directory's modalities: the project stage's, else the encode stage's feature files (by name)."""
    names = project_modalities(store)
    if names:
        return names
    folder = store.path("features")
    return sorted(p.stem for p in folder.glob("*.parquet") if not p.stem.endswith("_clear")) if folder.is_dir() else []


def workdir_notices(root: Path) -> list[str]:
    """What a reader must know before trusting the numbers: untrained or imported encoders."""
    store = ArtifactStore(root)
    notices = []
    for modality in _modalities(store):
        name = features(modality)
        if not store.exists(name):
            continue
        meta = store.parquet_metadata(name)
        encoder = meta.get("encoder", "?")
        if meta.get("untrained") in (True, "true", "True"):
            notices.append(
                f"The {modality} encoder ({encoder}) is untrained: its weights are random, so the {modality} features "
                f"carry no {modality} meaning. Everything built on them below (CLEAR, the {modality} side of the "
                f"model and of the content index, {modality} search) shows the pipeline working, not what the "
                f"{modality}s are worth. Set encode.modalities.{modality}.encoder to a pretrained model for real use.")
        elif encoder == "imported":
            source = meta.get("source") or imported(modality)
            notices.append(
                f"The {modality} features were imported ({source}), not encoded here: clearrec cannot tell how they "
                f"were made, and {modality} queries (search by {modality}, new items' {modality}) are unavailable "
                "because no encoder is known for them.")
    return notices


def _rows(store: ArtifactStore, name: str) -> int:
    return pq.ParquetFile(store.path(name)).metadata.num_rows


def _dataset(store: ArtifactStore) -> Section:
    s = Section("dataset", "Dataset")
    need = [USERS, ITEMS, INTERACTIONS]
    if not all(store.exists(n) for n in need):
        return s.not_run(f"users / items / interactions.parquet absent; run `{_run_command(store, 'ingest')}`")
    users, items = _rows(store, USERS), _rows(store, ITEMS)
    inter = store.read_parquet(INTERACTIONS, columns=["split"])
    counts = {r["values"]: r["counts"] for r in pc.value_counts(inter["split"]).to_pylist()}
    n = inter.num_rows
    sparsity = 1 - n / (users * items) if users and items else float("nan")
    s.table(["statistic", "value"], [
        ["users", f"{users:,}"], ["items", f"{items:,}"], ["interactions", f"{n:,}"],
        *[[f"{k} interactions", f"{counts.get(k, 0):,}"] for k in ("train", "valid", "test")],
        ["interactions per user (mean)", f"{n / users:.1f}" if users else "n/a"],
        ["sparsity", f"{sparsity:.4%}"],
    ])
    split = _split_policy(store)
    if split:
        s.p(f"split: {split}")
    return s


def _split_policy(store: ArtifactStore) -> str:
    """The ingest split as recorded in the manifest, in words ("" when unknown)."""
    entry = read_manifest(store)["stages"].get("ingest", {})
    cfg = ((entry.get("parts") or {}).get("config") or {}).get("ingest") or {}
    policy = cfg.get("split")
    if not policy:
        return ""
    ratios = "/".join(f"{r:g}" for r in cfg.get("split_ratios") or [])
    words = {"random": f"random per user (seed {cfg.get('seed')}, train/valid/test {ratios})",
             "temporal": f"temporal per user, newest to test (train/valid/test {ratios})",
             "global-temporal": f"global temporal, one cut-off time for every user (train/valid/test {ratios})",
             "leave-one-out": "leave-one-out: each user's newest interaction to test, the one before to valid",
             "given": "as given by the data"}.get(policy, policy)
    cut = (entry.get("counts") or {}).get("split_cutoffs") or {}
    if cut:
        words += "; " + ", ".join(f"{k.replace('_', ' ')} {_utc(v)}" for k, v in cut.items())
    return words


def _utc(unix_seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status(store: ArtifactStore) -> Section:
    s = Section("status", "Stage status and counts")
    stages = read_manifest(store)["stages"]
    if not stages:
        s.not_run("no manifest.json (no stage has run in this work directory)")
    else:
        order = sorted(stages, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))
        rows = []
        for name in order:
            e = stages[name]
            status = e.get("status", "?") + (f": {e['error']}" if e.get("error") else "")
            rows.append([name, status, e.get("seconds", ""), _counts(e.get("counts") or {}), _stamp(e.get("ended"))])
        s.table(["stage", "status", "seconds", "counts", "ended"], rows)
    for modality in _modalities(store):
        name = features(modality)
        if not store.exists(name):
            s.p(f"{modality} features: absent (no {name}: encode has not run)")
            continue
        meta = store.parquet_metadata(name)
        status = store.read_parquet(name, columns=["status"])["status"]
        counts = ", ".join(f"{r['values']}: {r['counts']:,}" for r in pc.value_counts(status).to_pylist())
        s.p(f"{modality} features ({meta.get('encoder', '?')}, dim {meta.get('dim', '?')}): {counts}")
    if store.exists(REJECTS):
        rej = store.read_parquet(REJECTS, columns=["reason"])["reason"]
        top = sorted(pc.value_counts(rej).to_pylist(), key=lambda r: -r["counts"])[:10]
        s.p(f"rejected input rows: {len(rej):,}" + (" (top reasons below)" if top else ""))
        if top:
            s.table(["reason", "rows"], [[r["values"], f"{r['counts']:,}"] for r in top])
    return s


def _stamp(iso: str | None) -> str:
    """An ISO-8601 time as ``YYYY-MM-DD HH:MM:SS UTC`` that never wraps."""
    if not iso:
        return ""
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc)
    except ValueError:
        return NoWrap(iso)
    return NoWrap(when.strftime("%Y-%m-%d %H:%M:%S UTC"))


CLEAR_FILES = (PROJECTOR_JSON, DIAGNOSTICS)


def _clear(store: ArtifactStore) -> Section:
    s = Section("clear", "CLEAR projection")
    pngs = sorted(store.path("clear").glob("*.png"), key=lambda f: (list(CAPTIONS).index(f.name) if f.name in CAPTIONS
                                                                      else len(CAPTIONS), f.name)) \
        if store.path("clear").is_dir() else []
    state = []
    for modality in _modalities(store):
        name = clear_features(modality)
        if store.exists(name):
            meta = store.parquet_metadata(name)
            state.append(f"{modality} {'on' if meta.get('clear_enabled') else 'off (passed through)'}")
    if state:
        s.p("CLEAR per modality: " + ", ".join(state))
    if not store.exists(PROJECTOR_JSON) and not pngs:
        return s.not_run(f"no clear/ artifacts; run `{_run_command(store, 'project')}`") if not s.blocks else s
    proj = store.read_json(PROJECTOR_JSON) if store.exists(PROJECTOR_JSON) else {}
    diag = store.read_json(DIAGNOSTICS) if store.exists(DIAGNOSTICS) else {}
    rows = _clear_rows(proj, diag)
    if rows:
        s.table(["", "value"], rows)
    pairwise = diag.get("pairwise") or {}
    if pairwise:
        k_ov = diag.get("overlap_k")
        s.p("Per pair of modalities: the top-K neighbour overlap between the two modalities' item similarities, "
            "the largest cross-covariance singular value, and the share of the pair's cross-covariance energy "
            "removed.")
        s.table(["pair", f"overlap@{k_ov} before", f"overlap@{k_ov} after", "sigma_1 before", "sigma_1 after",
                 "energy removed"],
                [[pair.replace("|", " - "), _pct(r["overlap_before"]) if r.get("overlap_before") is not None else "",
                  _pct(r["overlap_after"]) if r.get("overlap_after") is not None else "",
                  _num(r["sigma1_before"]) if r.get("sigma1_before") is not None else "",
                  _num(r["sigma1_after"]) if r.get("sigma1_after") is not None else "",
                  _pct(r["energy_removed"]) if r.get("energy_removed") is not None else ""]
                 for pair, r in pairwise.items()])
    s.files(store, CLEAR_FILES)
    for p in pngs:
        s.image(Image(alt=p.stem.replace("_", " "), path=p, caption=CAPTIONS.get(p.name, "")))
    return s


def _opt(proj: dict[str, Any], key: str) -> Any:
    """A CLEAR setting from projector.json: top level, else its ``options``."""
    return proj[key] if key in proj else (proj.get("options") or {}).get(key)


def _clear_rows(proj: dict[str, Any], diag: dict[str, Any]) -> list[list[str]]:
    """The headline numbers of a CLEAR fit, in words."""
    rows: list[list[str]] = []
    if proj:
        strength, mode, directions = _opt(proj, "strength"), _opt(proj, "mode"), _opt(proj, "directions")
        if proj.get("applied") is False or _opt(proj, "enabled") is False:
            rows.append(["projection", f"not applied: {proj.get('reason') or 'project.enabled = false'}"])
        else:
            kind = "hard null-space" if strength == 1 else f"soft (lambda = {strength})"
            what = "k random orthonormal directions (control)" if directions == "random" else "top-k shared directions"
            rows.append(["projection", f"{kind} projection removing the {what}, {mode or 'static'} mode"])
        k, asked, ratio = _opt(proj, "k"), _opt(proj, "k_requested"), _opt(proj, "ratio")
        if k is not None:
            how = (f"chosen as the smallest k reaching energy ratio {ratio}" if ratio
                   else f"requested {asked}" if asked is not None and asked != k else "as requested")
            dims = proj.get("dims")
            cap = (f" (at most {min(dims.values())}, the smaller feature dimension)"
                   if isinstance(dims, dict) and dims else "")
            rows.append(["rank k", f"{k}, {how}{cap}"])
        counts = proj.get("counts") if isinstance(proj.get("counts"), dict) else {}
        fitted = counts.get("fit_items", proj.get("n_fit"))
        if fitted is not None:
            on = {"all": "all items", "train": "items seen in training"}.get(_opt(proj, "fit_on"), "items")
            rows.append(["fitted on", f"{fitted:,} items ({on})"])
        removed = proj.get("energy_removed")
        if isinstance(removed, dict):
            for pair, share in removed.items():
                rows.append(["cross-modal energy removed", f"{_pct(share)} of the {pair.replace('|', '-')} "
                             "cross-covariance energy (sum of s_i^2)"])
        elif removed is not None:
            rows.append(["cross-modal energy removed",
                         f"{_pct(removed)} of the image-text cross-covariance energy (sum of s_i^2)"])
    top = diag.get("top_singular_values") or {}
    if top.get("before") and top.get("after"):
        rows.append(["largest cross-covariance singular value",
                     f"{_num(top['before'][0])} before, {_num(top['after'][0])} after"])
    k_ov = diag.get("overlap_k")
    ov = diag.get(f"overlap@{k_ov}") if k_ov else None
    if isinstance(ov, dict) and {"before", "after"} <= set(ov):
        chance = f" (chance {_pct(ov['chance'])})" if ov.get("chance") is not None else ""
        pair = "-".join(diag.get("modalities") or ("image", "text"))
        rows.append([f"{pair} top-{k_ov} neighbour overlap",
                     f"{_pct(ov['before'])} before, {_pct(ov['after'])} after{chance}"])
    kept = {m: v for m, v in (diag.get("variance_kept") or {}).items() if v is not None}
    if kept:
        rows.append(["variance kept", ", ".join(f"{m} {_pct(v)}" for m, v in kept.items())])
    inputs = {m: i for m, i in (proj.get("inputs") or {}).items() if isinstance(i, dict)}
    if inputs:
        rows.append(["inputs", "; ".join(f"{m}: {i.get('encoder', '?')} ({i.get('dim', '?')}-d, {i.get('rows', '?')} "
                                         "rows)" for m, i in inputs.items())])
    if proj.get("fit_seconds") is not None:
        rows.append(["time", f"fit {proj['fit_seconds']:.2f} s, projection {proj.get('transform_seconds', 0):.2f} s"])
    return rows


def _training(store: ArtifactStore) -> Section:
    s = Section("training", "Training")
    if store.exists(MODEL_JSON):
        s.table(["", "value"], _training_rows(store.read_json(MODEL_JSON)))
    s.files(store, (MODEL_JSON, METRICS_JSON))
    if store.exists(TRAINING_CURVE):
        s.image(Image(alt="training curve", path=store.path(TRAINING_CURVE),
                      caption=CAPTIONS["training_curve.png"]))
    return s if s.blocks else s.not_run(f"no model/ artifacts; run `{_run_command(store, 'train')}`")


def _training_rows(info: dict[str, Any]) -> list[list[str]]:
    """The headline facts of model.json, in words."""
    rows = [["backbone", f"{info.get('class', '?')} (train.backbone = {info.get('backbone', '?')})"]]
    if info.get("num_users") is not None:
        rows.append(["data", f"{info['num_users']:,} users x {info.get('num_items', 0):,} items; "
                             f"{info.get('vector_dim', '?')}-d user and item vectors, score = dot product"])
    feats = info.get("features") or {}
    rows.append(["features", "; ".join(
        f"{m}: {f.get('encoder', '?')} ({f.get('dim', '?')}-d, CLEAR {'on' if f.get('clear_enabled') else 'off'})"
        for m, f in feats.items()) or "none (IDs only)"])
    hp = info.get("hyperparameters") or {}
    if hp:
        rows.append(["hyperparameters", ", ".join(f"{k} {_setting(v)}" for k, v in hp.items())])
    t = info.get("training") or {}
    if t:
        rows.append(["optimisation", f"{t.get('optimizer', '?')}, lr {_num(t.get('lr'))}, batch "
                                     f"{t.get('batch_size')}, negatives {t.get('negatives', '?')}, seed "
                                     f"{t.get('seed')}, on {t.get('device')}"])
    if info.get("best_epoch") is not None:
        stop = t.get("stop_metric", "recall@20")
        why = (f"stopped early: no better valid {stop} in {t.get('patience')} epochs" if info.get("stopped_early")
               else f"ran to the limit of {t.get('max_epochs')} epochs")
        rows.append(["epochs", f"best {info['best_epoch']} of {info.get('epochs_run', '?')} run on valid {stop} "
                               f"({why})"])
    if info.get("clear_dynamic"):
        rows.append(["CLEAR dynamic", "CLEAR refitted on the model's modality embeddings every epoch"])
    return rows


def _metrics(store: ArtifactStore) -> Section:
    s = Section("metrics", "Metrics")
    if not store.exists(METRICS_JSON):
        return s.not_run(f"no model/metrics.json; run `{_run_command(store, 'train')}`")
    m = store.read_json(METRICS_JSON)
    select = m.get("select_metric", "recall@20")
    test = m.get("test") or {}
    head = [f"{label} {_metric(test[key])}" for key, label in HEADLINE if key in test]
    s.p(f"best epoch (valid {select}): {m.get('best_epoch', 'n/a')}; test is reported at that epoch"
        + (f": {', '.join(head)}." if head else "."))
    for split in ("test", "valid"):
        values = m.get(split) or {}
        present = {k.split("@")[0] for k in values if "@" in k}
        names = [n for n in METRIC_WORDS if n in present] + sorted(present - set(METRIC_WORDS))
        ks = sorted({int(k.split("@")[1]) for k in values if "@" in k and k.split("@")[1].isdigit()})
        if names:
            s.p(split)
            s.table(["metric", *(f"@{k}" for k in ks), "meaning"],
                    [[n, *(_metric(values.get(f"{n}@{k}")) for k in ks), METRIC_WORDS.get(n, "")] for n in names])
    s.files(store, (METRICS_JSON,))
    return s


HEADLINE = (("recall@20", "Recall@20"), ("ndcg@20", "NDCG@20"), ("hit@20", "Hit@20"), ("coverage@20", "coverage@20"))
METRIC_WORDS = {  # metric name -> what it measures (README "Metrics")
    "recall": "share of the user's held-out items in the top K",
    "ndcg": "rank-discounted hits over the best possible",
    "precision": "held-out items in the top K / K",
    "map": "mean precision at each hit",
    "hit": "share of users with at least one held-out item in the top K",
    "mrr": "mean 1 / rank of the first held-out item",
    "coverage": "share of the catalog recommended to someone",
    "popularity": "mean popularity percentile of recommended items (1 = most popular)",
    "gini": "concentration of recommendations on few items (0 = even)",
}


def _index(store: ArtifactStore) -> Section:
    s = Section("index", "Index")
    if not store.exists(INDEX_INFO):
        return s.not_run(f"no index/index_info.json; run `{_run_command(store, 'index')}`")
    info = store.read_json(INDEX_INFO)
    rows = []
    for name, what in (("items", "model item vectors (recommend)"), ("content", "CLEAR-projected features (similar, "
                                                                                  "search)")):
        i = info.get(name)
        if not isinstance(i, dict):
            continue
        by = i.get("recall_by_query") or {}
        parts = f" ({', '.join(f'{q} {_metric(v)}' for q, v in by.items())})" if len(by) > 1 else ""
        knob = f"{i['knob']} = {i['knob_value']}" if i.get("knob") else "none (exact)"
        rows.append([name, what, i.get("factory", "?"), f"{i.get('ntotal', 0):,}", i.get("dim", "?"),
                     _size(i.get("bytes")), f"{_metric(i.get('recall'))}{parts}", knob])
    recall_k = info.get("recall_k", "K")
    if rows:
        s.table(["index", "holds", "type", "rows", "dim", "size", f"recall@{recall_k} vs exact", "search knob"], rows)
    blocks = (info.get("content") or {}).get("blocks") or []
    if blocks:
        s.p("content vector = " + " + ".join(
            f"{b.get('modality', '?')} ({b.get('dim', '?')}-d, {b.get('encoder', '?')}, CLEAR "
            f"{'on' if b.get('clear_enabled') else 'off'})" for b in blocks) + ", each block L2-normalised")
    if info.get("recall_target") is not None:
        s.p(f"recall target {_num(info['recall_target'])} at K = {recall_k}, measured on held-out queries")
    s.files(store, (INDEX_INFO,))
    return s


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _recommendations(store: ArtifactStore, n_users: int, top_k: int) -> Section:
    s = Section("recommendations", "Example recommendations")
    need = [USER_VECTORS, ITEM_VECTORS, ITEMS, INTERACTIONS]
    missing = [n for n in need if not store.exists(n)]
    if missing:
        return s.not_run(f"{', '.join(missing)} absent; run the pipeline through `train`")
    uv = store.read_parquet(USER_VECTORS)
    iv = store.read_parquet(ITEM_VECTORS, columns=["item_idx", "vector"])
    U, _ = arrow_to_vectors(uv["vector"])  # (n_users, d)
    V, _ = arrow_to_vectors(iv["vector"])  # (n_items, d)
    u_idx, i_idx = uv["user_idx"].to_numpy(), iv["item_idx"].to_numpy()
    user_ids = dict(zip(u_idx.tolist(), uv["user_id"].to_pylist())) if "user_id" in uv.column_names else {}
    items = store.read_parquet(ITEMS)
    cols = set(items.column_names)
    idx = items["item_idx"].to_pylist()
    item_ids = dict(zip(idx, items["item_id"].to_pylist()))
    titles = dict(zip(idx, items["title"].to_pylist() if "title" in cols else [""] * len(idx)))
    images = dict(zip(idx, items["image"].to_pylist())) if "image" in cols else {}
    catalog = store.parquet_metadata(ITEMS).get("catalog_root")
    inter = store.read_parquet(INTERACTIONS, columns=["user_idx", "item_idx", "split"]).to_pandas()
    pos = {u: i for i, u in enumerate(u_idx.tolist())}
    test_users = sorted(set(inter.loc[inter["split"] == "test", "user_idx"]) & set(pos))
    if not test_users:
        return s.not_run("no user with test interactions has a vector")
    by_user = {u: g for u, g in inter[inter["user_idx"].isin(test_users)].groupby("user_idx")}
    col_of = {int(item): j for j, item in enumerate(i_idx.tolist())}
    scores, cols = _top_items(U, V, inter, pos, col_of, test_users, top_k)  # (T, K) each
    tops, found = {}, []
    for row, u in enumerate(test_users):
        rows = by_user[u]
        n_seen = sum(i in col_of for i in rows.loc[rows["split"] == "train", "item_idx"])
        top = [(int(i_idx[j]), float(v)) for v, j in zip(scores[row], cols[row]) if j >= 0]
        test = set(rows.loc[rows["split"] == "test", "item_idx"].tolist())
        tops[u] = (top, test, n_seen)
        if any(item in test for item, _ in top):
            found.append(u)
    shown = (found + [u for u in test_users if u not in set(found)])[:n_users]
    s.p(f"{len(found):,} of the {len(test_users):,} users with held-out test items have at least one in their top "
        f"{top_k} (training items masked; score = dot(user vector, item vector)). Shown: "
        f"{'the first users with a hit' if found else 'the first test users (none has a hit)'}; "
        "a test item that the model ranks in the top list is marked \"test item (hit)\".")
    for u in shown:
        top, test, n_seen = tops[u]
        rows = []
        for rank, (item, score) in enumerate(top, 1):
            thumb = _thumbnail(catalog, images.get(item))
            rows.append([rank, thumb if thumb else "", item_ids.get(item, item), titles.get(item, ""), f"{score:.3f}",
                         Marked("test item (hit)") if item in test else ""])
        ranked = {item for item, _ in top}
        missed = [item_ids.get(i, i) for i in sorted(test) if i not in ranked]
        s.p(f"user {user_ids.get(u, u)} (user_idx {u}): {_n(n_seen, 'training item')}, {_n(len(test), 'test item')}, "
            f"{len(test) - len(missed)} of them in the top {top_k}"
            + (f"; not in the top {top_k}: {', '.join(map(str, missed[:10]))}" + (", ..." if len(missed) > 10 else "")
               if missed else ""))
        s.table(["rank", "image", "item", "title", "score", "held out"], rows)
    return s


def _top_items(U: np.ndarray, V: np.ndarray, inter: Any, pos: dict[int, int], col_of: dict[int, int],
               users: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's top-``k`` columns of ``V`` by dot product, training items masked (as evaluation ranks)."""
    import torch

    from ..models.metrics import ItemSets, topk_items

    train = inter[(inter["split"] == "train") & inter["user_idx"].isin(list(pos)) & inter["item_idx"].isin(list(col_of))]
    rows = torch.tensor([pos[u] for u in train["user_idx"]], dtype=torch.long)
    cols = torch.tensor([col_of[i] for i in train["item_idx"]], dtype=torch.long)
    seen = ItemSets.from_pairs(rows, cols, len(U), len(V))
    scores, top = topk_items(torch.from_numpy(U), torch.from_numpy(V), torch.tensor([pos[u] for u in users]), k,
                             exclude=seen, max_block=MAX_SCORED)
    return scores.numpy(), top.numpy()


def _thumbnail(catalog_root: str | None, image: str | None) -> Image | None:
    """A small JPEG of a local catalog image (inside the catalog root), or None."""
    if not catalog_root or not image or "://" in image:
        return None
    try:
        path = resolve_inside(Path(catalog_root), image)
    except (ValueError, OSError):
        return None
    if path is None or not path.is_file():
        return None
    from PIL import Image as PILImage

    PILImage.MAX_IMAGE_PIXELS = MAX_THUMB_SOURCE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        return None
    return Image(alt=Path(image).name, data=buf.getvalue(), mime="image/jpeg")


# ---- experiment folder -----------------------------------------------------------------
def comparison_sections(root: Path) -> list[Section]:
    store = ArtifactStore(root)
    out = []
    s = Section("comparison", "CLEAR off vs on")
    if store.exists("compare.json"):
        r = store.read_json("compare.json")
        _provenance(s, r)
        s.p("Test metrics, mean ± std over seeds:")
        s.table(*compare_table(r))
        s.p(noise_rule_text(r))
        s.table(*change_table(r))
        s.files(store, ("compare.json",))
    else:
        s.not_run(f"no compare.json in {root}; run `{_experiment_command(store, 'compare')}`")
    out.append(s)
    s = Section("ablations", "CLEAR ablations")
    if store.exists("ablations.json"):
        r = store.read_json("ablations.json")
        _provenance(s, r)
        s.p(f"backbone {r['backbone']}; " + (f"ratio {r['ratio']}" if r.get("ratio") else f"k {r['k']}"))
        s.p(noise_rule_text(r))
        s.table(*ablation_table(r))
        headers, rows = random_control_table(r)
        if rows:
            s.p("shared top-k directions (hard) vs random directions:")
            s.table(headers, rows)
        s.files(store, ("ablations.json",))
    else:
        s.not_run(f"no ablations.json in {root}; run `{_experiment_command(store, 'ablate')}`")
    out.append(s)
    s = Section("sweep", "CLEAR k x lambda sweep")
    if store.exists("sweep.json"):
        r = store.read_json("sweep.json")
        _provenance(s, r)
        s.p(f"backbone {r['backbone']}: mean valid recall@20 per setting")
        s.table(*sweep_table(r))
        if r.get("chosen"):
            ch = r["chosen"]
            s.p(f"chosen on valid: {ch['row']}, lambda={ch['strength']}; its test metrics next to CLEAR off:")
            s.p(noise_rule_text(r))
            s.table(*sweep_choice_table(r))
        if r.get("heatmap") and store.exists(r["heatmap"]):
            s.image(Image(alt="sweep heatmap", path=store.path(r["heatmap"]), caption=CAPTIONS["sweep_heatmap.png"]))
        s.files(store, ("sweep.json",))
    else:
        s.not_run(f"no sweep.json in {root}; run `{_experiment_command(store, 'sweep')}`")
    out.append(s)
    return out


def _provenance(s: Section, r: dict[str, Any]) -> None:
    s.p(f"command: {r.get('command') or '(Python API)'}; machine: {r['machine']}; date {r['date']}; "
        f"seeds {r['seeds']}; max epochs {r['epochs']}; selected on {r['select_metric']}")


# ---- rendering -------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
text-align:left;vertical-align:middle}th{background:#f3f3f3}img{max-width:100%}section{margin-bottom:2em}
nav a{margin-right:1em}p.notrun{color:#a33}.nowrap{white-space:nowrap}p.files{font-size:13px;color:#555}
td.hit{background:#e3f5e1;font-weight:600;white-space:nowrap}
figure{margin:1em 0}figcaption{font-size:13px;color:#444;max-width:900px}
div.notice{border:2px solid #c60;background:#fff4e5;padding:.6em 1em;margin:1em 0;font-weight:500}"""


def render_html(title: str, sections: Sequence[Section], out_dir: Path | None = None,
                notices: Sequence[str] = ()) -> str:
    """The page; links to artifacts are relative to ``out_dir`` (where the page is written)."""
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n<nav>"
             + "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections) + "</nav>"]
    parts += [f'<div class="notice" role="alert"><strong>Notice:</strong> {esc(n)}</div>' for n in notices]
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>')
        for kind, data in s.blocks:
            if kind == "p":
                cls = ' class="notrun"' if data.startswith("not run") else ""
                parts.append(f"<p{cls}>{esc(data)}</p>")
            elif kind == "img":
                parts.append(f'<figure><img src="{data.data_uri()}" alt="{esc(data.alt)}">'
                             f"<figcaption>{esc(data.caption or data.alt)}</figcaption></figure>")
            elif kind == "files":
                links = ", ".join(f'<a href="{esc(_rel(path, out_dir))}">{esc(_rel(path, out_dir))}</a>'
                                  for path in data)
                parts.append(f'<p class="files">Every setting and number: {links}</p>')
            else:
                headers, rows = data
                parts.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in headers) + "</tr>"
                             + "".join("<tr>" + "".join(_html_td(c) for c in r) + "</tr>" for r in rows) + "</table>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _rel(path: Path, out_dir: Path | None) -> str:
    """``path`` relative to ``out_dir`` in POSIX form (the path's name without ``out_dir``)."""
    return Path(os.path.relpath(path, out_dir)).as_posix() if out_dir is not None else path.name


def _html_td(c: Any) -> str:
    if isinstance(c, Image):
        return f'<td><img src="{c.data_uri()}" alt="{html.escape(c.alt)}" width="{THUMB_PX}"></td>'
    cls = ' class="nowrap"' if isinstance(c, NoWrap) else ' class="hit"' if isinstance(c, Marked) else ""
    return f"<td{cls}>{html.escape(str(c))}</td>"


def render_markdown(title: str, sections: Sequence[Section], md_dir: Path, notices: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [line for n in notices for line in (f"> **Notice:** {n}", "")]
    for s in sections:
        lines += [f'<a id="{s.id}"></a>', f"## {s.title}", ""]
        for kind, data in s.blocks:
            if kind == "p":
                lines += [data, ""]
            elif kind == "img":
                lines += [f"![{data.alt}]({os.path.relpath(data.path, md_dir)})" if data.path else "", ""]
                if data.caption:
                    lines += [f"*{data.caption}*", ""]
            elif kind == "files":
                lines += ["Every setting and number: " + ", ".join(f"[{_rel(p, md_dir)}]({_rel(p, md_dir)})"
                                                                     for p in data), ""]
            else:
                headers, rows = data
                lines += [markdown_table(headers, [[_md_cell(c) for c in r] for r in rows]), ""]
    return "\n".join(lines)


def _md_cell(c: Any) -> Any:
    return "(thumbnail in the HTML report)" if isinstance(c, Image) else c


def write_report(root: str | Path, comparison: bool = False, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Render the report of a work directory (or experiment folder); returns (html path, md path)."""
    root = Path(root).resolve()
    if not root.is_dir():
        from .errors import ArtifactError

        what = "experiment folder" if comparison else "work directory"
        raise ArtifactError(f"{what} {root} does not exist; pass an existing folder")
    out = ArtifactStore(out_dir if out_dir is not None else root)
    sections = comparison_sections(root) if comparison else workdir_sections(root)
    notices = [] if comparison else workdir_notices(root)
    title = f"clearrec {'experiments' if comparison else 'report'}: {root.name}"
    html_path = out.write_text("report.html", render_html(title, sections, out.root.resolve(), notices))
    md_path = out.write_text("report.md", render_markdown(title, sections, out.root, notices))
    return html_path, md_path


# ---- helpers ---------------------------------------------------------------------------
def _run_command(store: ArtifactStore, stage: str) -> str:
    """``clearrec run`` up to ``stage`` for this work directory, with the config its manifest records."""
    config = _json_or_empty(store, MANIFEST).get("config_file")
    parts = ["clearrec", "run", *(["--config", config] if config else []), "--workdir", str(store.root),
             "--to", stage]
    return " ".join(shlex.quote(p) for p in parts)


def _experiment_command(store: ArtifactStore, kind: str) -> str:
    """``clearrec compare / ablate / sweep`` writing into this experiment folder, with its config and base."""
    header = next((h for h in (_json_or_empty(store, f"{n}.json") for n in ("compare", "ablations", "sweep"))
                   if h.get("config")), {})
    config, base = header.get("config"), header.get("base_workdir")
    if not config:  # the default folder, <workdir>/experiments, of a built work directory
        config = _json_or_empty(ArtifactStore(store.root.parent), MANIFEST).get("config_file")
        base = str(store.root.parent) if config else None
    parts = ["clearrec", kind, *(["--config", config] if config else []), *(["--workdir", base] if base else []),
             "--out", str(store.root)]
    return " ".join(shlex.quote(p) for p in parts)


def _json_or_empty(store: ArtifactStore, name: str) -> dict[str, Any]:
    try:
        data = store.read_json(name) if store.exists(name) else {}
    except ArtifactError:
        return {}
    return data if isinstance(data, dict) else {}


def _flatten(obj: Any, prefix: str = "", max_list: int = 8) -> list[list[str]]:
    """Nested JSON -> [[dotted key, value]] rows; long lists are summarised."""
    rows: list[list[str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            rows += _flatten(v, f"{prefix}{k}.", max_list)
        return rows
    key = prefix.rstrip(".")
    if isinstance(obj, list):
        if len(obj) > max_list or any(isinstance(v, (dict, list)) for v in obj):
            nums = [v for v in obj if isinstance(v, (int, float)) and not isinstance(v, bool)]
            summary = f"{len(obj)} values" + (f", first {', '.join(_num(v) for v in nums[:4])}, ..." if nums else "")
            return [[key, summary]]
        return [[key, ", ".join(_num(v) for v in obj)]]
    return [[key, _num(obj)]]


def _counts(counts: dict[str, Any], max_nested: int = 3) -> str:
    """A manifest's counts on one line: scalars, and small nested dicts (larger ones summarised)."""
    parts = []
    for k, v in counts.items():
        if isinstance(v, dict) and (len(v) > max_nested or any(isinstance(x, (dict, list)) for x in v.values())):
            parts.append(f"{k}: {len(v)} entries")
        else:
            parts += [f"{key}={val}" for key, val in _flatten(v, f"{k}.")]
    return ", ".join(parts)


def _setting(v: Any) -> str:
    """A hyperparameter value: ``1e-04`` as ``0.0001``, lists joined with ``+``."""
    if isinstance(v, list):
        return "+".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _metric(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return "n/a" if v is None else str(v)


__all__ = ["write_report", "workdir_sections", "workdir_notices", "comparison_sections", "render_html",
           "render_markdown"]
