"""Reports: one self-contained HTML page and a Markdown twin.

For a work directory: dataset statistics, stage status counts, CLEAR diagnostics, training
curve, metrics, index info and example recommendations. For an experiment folder (what
``clearrec compare / ablate / sweep`` write): the comparison, ablation and sweep tables and
the sweep heatmap. Every section reads only artifacts; an absent artifact makes its section
say "not run" instead of failing. The HTML embeds every image as a base64 data URI and has no
external assets; the Markdown links the image files relative to where it is written.
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

from .experiment_tables import TABLE_METRICS, ablation_table, compare_table, fmt_delta, fmt_ms, sweep_table
from .errors import ArtifactError
from .store import ArtifactStore, arrow_to_vectors

WORKDIR_SECTIONS = ("dataset", "status", "clear", "training", "metrics", "index", "recommendations")
COMPARISON_SECTIONS = ("comparison", "ablations", "sweep")
STAGE_ORDER = ("ingest", "encode", "project", "train", "index")
THUMB_PX = 64  # thumbnail edge in the example recommendations
MAX_THUMB_SOURCE_PIXELS = 40_000_000  # refuse to decode larger images (decompression bombs)


@dataclass
class Image:
    """An image: a file (linked from Markdown, embedded in HTML) or bytes (HTML only)."""

    alt: str
    path: Path | None = None
    data: bytes | None = None
    mime: str = "image/png"

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


# ---- work directory --------------------------------------------------------------------
def workdir_sections(root: Path, n_users: int = 3, top_k: int = 10) -> list[Section]:
    store = ArtifactStore(root)
    return [_dataset(store), _status(store), _clear(store), _training(store), _metrics(store), _index(store),
            _recommendations(store, n_users, top_k)]


def _rows(store: ArtifactStore, name: str) -> int:
    return pq.ParquetFile(store.path(name)).metadata.num_rows


def _dataset(store: ArtifactStore) -> Section:
    s = Section("dataset", "Dataset")
    need = ["users.parquet", "items.parquet", "interactions.parquet"]
    if not all(store.exists(n) for n in need):
        return s.not_run(f"users / items / interactions.parquet absent; run `{_run_command(store, 'ingest')}`")
    users, items = _rows(store, "users.parquet"), _rows(store, "items.parquet")
    inter = store.read_parquet("interactions.parquet", columns=["split"])
    counts = {r["values"]: r["counts"] for r in pc.value_counts(inter["split"]).to_pylist()}
    n = inter.num_rows
    sparsity = 1 - n / (users * items) if users and items else float("nan")
    s.table(["statistic", "value"], [
        ["users", f"{users:,}"], ["items", f"{items:,}"], ["interactions", f"{n:,}"],
        *[[f"{k} interactions", f"{counts.get(k, 0):,}"] for k in ("train", "valid", "test")],
        ["interactions per user (mean)", f"{n / users:.1f}" if users else "n/a"],
        ["sparsity", f"{sparsity:.4%}"],
    ])
    return s


def _status(store: ArtifactStore) -> Section:
    s = Section("status", "Stage status and counts")
    manifest = store.read_json("manifest.json") if store.exists("manifest.json") else {"stages": {}}
    stages = manifest.get("stages", {})
    if not stages:
        s.not_run("no manifest.json (no stage has run in this work directory)")
    else:
        order = sorted(stages, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))
        rows = []
        for name in order:
            e = stages[name]
            status = e.get("status", "?") + (f": {e['error']}" if e.get("error") else "")
            rows.append([name, status, e.get("seconds", ""), _counts(e.get("counts") or {}), e.get("ended", "")])
        s.table(["stage", "status", "seconds", "counts", "ended"], rows)
    for modality in ("image", "text"):
        name = f"features/{modality}.parquet"
        if not store.exists(name):
            s.p(f"{modality} features: absent (no {name}: encoder 'none', or encode has not run)")
            continue
        meta = store.parquet_metadata(name)
        status = store.read_parquet(name, columns=["status"])["status"]
        counts = ", ".join(f"{r['values']}: {r['counts']:,}" for r in pc.value_counts(status).to_pylist())
        s.p(f"{modality} features ({meta.get('encoder', '?')}, dim {meta.get('dim', '?')}): {counts}")
    if store.exists("rejects.parquet"):
        rej = store.read_parquet("rejects.parquet", columns=["reason"])["reason"]
        top = sorted(pc.value_counts(rej).to_pylist(), key=lambda r: -r["counts"])[:10]
        s.p(f"rejected input rows: {len(rej):,}" + (" (top reasons below)" if top else ""))
        if top:
            s.table(["reason", "rows"], [[r["values"], f"{r['counts']:,}"] for r in top])
    return s


def _clear(store: ArtifactStore) -> Section:
    s = Section("clear", "CLEAR projection")
    pngs = sorted(store.path("clear").glob("*.png")) if store.path("clear").is_dir() else []
    files = [n for n in ("clear/projector.json", "clear/diagnostics.json") if store.exists(n)]
    for modality in ("image", "text"):
        name = f"features/{modality}_clear.parquet"
        if store.exists(name):
            meta = store.parquet_metadata(name)
            s.p(f"{modality}: CLEAR {'on' if meta.get('clear_enabled') else 'off (pass-through)'}")
    if not files and not pngs:
        return s.not_run(f"no clear/ artifacts; run `{_run_command(store, 'project')}`") if not s.blocks else s
    for name in files:
        s.p(name)
        s.table(["key", "value"], _flatten(store.read_json(name)))
    for p in pngs:
        s.image(Image(alt=p.stem.replace("_", " "), path=p))
    return s


def _training(store: ArtifactStore) -> Section:
    s = Section("training", "Training")
    if store.exists("model/model.json"):
        s.table(["key", "value"], _flatten(store.read_json("model/model.json")))
    if store.exists("model/training_curve.png"):
        s.image(Image(alt="training curve", path=store.path("model/training_curve.png")))
    return s if s.blocks else s.not_run(f"no model/ artifacts; run `{_run_command(store, 'train')}`")


def _metrics(store: ArtifactStore) -> Section:
    s = Section("metrics", "Metrics")
    if not store.exists("model/metrics.json"):
        return s.not_run(f"no model/metrics.json; run `{_run_command(store, 'train')}`")
    m = store.read_json("model/metrics.json")
    s.p(f"best epoch (valid {m.get('select_metric', 'recall@20')}): {m.get('best_epoch', 'n/a')}; "
        "test is reported at that epoch.")
    for split in ("valid", "test"):
        values = m.get(split) or {}
        names = sorted({k.split("@")[0] for k in values if "@" in k})
        ks = sorted({int(k.split("@")[1]) for k in values if "@" in k and k.split("@")[1].isdigit()})
        if names:
            s.p(split)
            s.table(["metric", *(f"@{k}" for k in ks)],
                    [[n, *(_num(values.get(f"{n}@{k}")) for k in ks)] for n in names])
    return s


def _index(store: ArtifactStore) -> Section:
    s = Section("index", "Index")
    if not store.exists("index/index_info.json"):
        return s.not_run(f"no index/index_info.json; run `{_run_command(store, 'index')}`")
    return s.table(["key", "value"], _flatten(store.read_json("index/index_info.json")))


def _recommendations(store: ArtifactStore, n_users: int, top_k: int) -> Section:
    s = Section("recommendations", "Example recommendations")
    need = ["model/user_vectors.parquet", "model/item_vectors.parquet", "items.parquet", "interactions.parquet"]
    missing = [n for n in need if not store.exists(n)]
    if missing:
        return s.not_run(f"{', '.join(missing)} absent; run the pipeline through `train`")
    uv = store.read_parquet("model/user_vectors.parquet", columns=["user_idx", "vector"])
    iv = store.read_parquet("model/item_vectors.parquet", columns=["item_idx", "vector"])
    U, _ = arrow_to_vectors(uv["vector"])  # (n_users, d)
    V, _ = arrow_to_vectors(iv["vector"])  # (n_items, d)
    u_idx, i_idx = uv["user_idx"].to_numpy(), iv["item_idx"].to_numpy()
    items = store.read_parquet("items.parquet")
    cols = set(items.column_names)
    idx = items["item_idx"].to_pylist()
    titles = dict(zip(idx, items["title"].to_pylist() if "title" in cols else [""] * len(idx)))
    images = dict(zip(idx, items["image"].to_pylist())) if "image" in cols else {}
    catalog = store.parquet_metadata("items.parquet").get("catalog_root")
    inter = store.read_parquet("interactions.parquet", columns=["user_idx", "item_idx", "split"]).to_pandas()
    test_users = sorted(set(inter.loc[inter["split"] == "test", "user_idx"]) & set(u_idx.tolist()))[:n_users]
    if not test_users:
        return s.not_run("no user with test interactions has a vector")
    pos = {u: i for i, u in enumerate(u_idx.tolist())}
    s.p(f"Top {top_k} for {len(test_users)} users with held-out test items (training items masked; "
        "score = dot(user vector, item vector); a hit is a test item).")
    for u in test_users:
        seen = set(inter.loc[(inter["user_idx"] == u) & (inter["split"] == "train"), "item_idx"])
        test = set(inter.loc[(inter["user_idx"] == u) & (inter["split"] == "test"), "item_idx"])
        scores = V @ U[pos[u]]  # (n_items,)
        scores[np.isin(i_idx, list(seen))] = -np.inf
        order = np.argsort(-scores)
        top = order[np.isfinite(scores[order])][:top_k]
        rows = []
        for rank, j in enumerate(top, 1):
            item = int(i_idx[j])
            thumb = _thumbnail(catalog, images.get(item))
            rows.append([rank, thumb if thumb else "", titles.get(item, ""), f"{scores[j]:.3f}",
                         "hit" if item in test else ""])
        s.p(f"user {u}: {len(seen)} training items, {len(test)} test items")
        s.table(["rank", "image", "title", "score", "test"], rows)
    return s


def _thumbnail(catalog_root: str | None, image: str | None) -> Image | None:
    """A small JPEG of a local catalog image (inside the catalog root), or None."""
    if not catalog_root or not image or "://" in image:
        return None
    root = Path(catalog_root).resolve()
    path = (root / image).resolve()
    if path.parts[: len(root.parts)] != root.parts or not path.is_file():
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
        s.p(f"Noise rule: {r['noise_rule']}")
        s.table(*compare_table(r))
    else:
        s.not_run(f"no compare.json in {root}; run `{_experiment_command(store, 'compare')}`")
    out.append(s)
    s = Section("ablations", "CLEAR ablations")
    if store.exists("ablations.json"):
        r = store.read_json("ablations.json")
        _provenance(s, r)
        s.p(f"backbone {r['backbone']}; " + (f"ratio {r['ratio']}" if r.get("ratio") else f"k {r['k']}"))
        s.table(*ablation_table(r))
        for d in (d for d in r["deltas"] if d["vs"] == "random"):
            s.p("shared top-k directions (hard) vs random directions: "
                + "; ".join(f"{m} {fmt_delta(d[m])}" for m in TABLE_METRICS))
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
            c = next(c for c in r["cells"] if c["row"] == ch["row"] and c["strength"] == ch["strength"])
            s.p(f"chosen on valid: {c['row']}, lambda={c['strength']}")
            s.table(["", *TABLE_METRICS], [
                ["chosen, test", *(fmt_ms(c["mean"][m], c["std"][m]) for m in TABLE_METRICS)],
                ["CLEAR off, test", *(fmt_ms(r["off"]["mean"][m], r["off"]["std"][m]) for m in TABLE_METRICS)],
                ["change", *(fmt_delta(r["chosen_vs_off"][m]) for m in TABLE_METRICS)]])
        if r.get("heatmap") and store.exists(r["heatmap"]):
            s.image(Image(alt="sweep heatmap", path=store.path(r["heatmap"])))
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
nav a{margin-right:1em}p.notrun{color:#a33}"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n<nav>"
             + "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>')
        for kind, data in s.blocks:
            if kind == "p":
                cls = ' class="notrun"' if data.startswith("not run") else ""
                parts.append(f"<p{cls}>{esc(data)}</p>")
            elif kind == "img":
                parts.append(f'<figure><img src="{data.data_uri()}" alt="{esc(data.alt)}">'
                             f"<figcaption>{esc(data.alt)}</figcaption></figure>")
            else:
                headers, rows = data
                parts.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in headers) + "</tr>"
                             + "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>"
                                       for r in rows) + "</table>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_cell(c: Any) -> str:
    if isinstance(c, Image):
        return f'<img src="{c.data_uri()}" alt="{html.escape(c.alt)}" width="{THUMB_PX}">'
    return html.escape(str(c))


def render_markdown(title: str, sections: Sequence[Section], md_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f'<a id="{s.id}"></a>', f"## {s.title}", ""]
        for kind, data in s.blocks:
            if kind == "p":
                lines += [data, ""]
            elif kind == "img":
                lines += [f"![{data.alt}]({os.path.relpath(data.path, md_dir)})" if data.path else "", ""]
            else:
                headers, rows = data
                lines.append("| " + " | ".join(str(h) for h in headers) + " |")
                lines.append("|" + "---|" * len(headers))
                lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
                lines.append("")
    return "\n".join(lines)


def _md_cell(c: Any) -> str:
    if isinstance(c, Image):
        return "(thumbnail in the HTML report)"
    return str(c).replace("|", "\\|").replace("\n", " ")


def write_report(root: str | Path, comparison: bool = False, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Render the report of a work directory (or experiment folder); returns (html path, md path)."""
    root = Path(root).resolve()
    if not root.is_dir():
        from .errors import ArtifactError

        what = "experiment folder" if comparison else "work directory"
        raise ArtifactError(f"{what} {root} does not exist; pass an existing folder")
    out = ArtifactStore(out_dir if out_dir is not None else root)
    sections = comparison_sections(root) if comparison else workdir_sections(root)
    title = f"clearrec {'experiments' if comparison else 'report'}: {root.name}"
    html_path = out.write_text("report.html", render_html(title, sections))
    md_path = out.write_text("report.md", render_markdown(title, sections, out.root))
    return html_path, md_path


# ---- helpers ---------------------------------------------------------------------------
def _run_command(store: ArtifactStore, stage: str) -> str:
    """``clearrec run`` up to ``stage`` for this work directory, with the config its manifest records."""
    config = (_json_or_empty(store, "manifest.json")).get("config_file")
    parts = ["clearrec", "run", *(["--config", config] if config else []), "--workdir", str(store.root),
             "--to", stage]
    return " ".join(shlex.quote(p) for p in parts)


def _experiment_command(store: ArtifactStore, kind: str) -> str:
    """``clearrec compare / ablate / sweep`` writing into this experiment folder, with its config and base."""
    header = next((h for h in (_json_or_empty(store, f"{n}.json") for n in ("compare", "ablations", "sweep"))
                   if h.get("config")), {})
    config, base = header.get("config"), header.get("base_workdir")
    if not config:  # the default folder, <workdir>/experiments, of a built work directory
        config = _json_or_empty(ArtifactStore(store.root.parent), "manifest.json").get("config_file")
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


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return "n/a" if v is None else str(v)


__all__ = ["write_report", "workdir_sections", "comparison_sections", "render_html", "render_markdown"]
