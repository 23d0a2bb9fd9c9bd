"""Tables, Markdown and the sweep heatmap of the experiment harness's results (plain dicts from its JSON)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TABLE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")  # test metrics in every table
SELECT_METRIC = "recall@20"  # valid metric that selects epochs, grid points and sweep settings


def fmt_ms(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def fmt_delta(d: dict[str, Any]) -> str:
    if d["diff"] is None:
        return "n/a"
    rel = f"{d['rel'] * 100:+.1f}%" if d["rel"] is not None else f"{d['diff']:+.4f}"
    verdict = {True: "beyond noise", False: "within noise", None: "noise unknown"}[d["exceeds_noise"]]
    p = f", p={d['p_paired']:.2f}" if d["p_paired"] is not None else ""
    return f"{rel} ({verdict}{p})"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_header() -> list[str]:
    return [m.replace("recall", "Recall").replace("ndcg", "NDCG") for m in TABLE_METRICS]


def compare_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (one row per backbone x CLEAR, then a change row)."""
    headers = ["backbone", "CLEAR", "seeds", *_metric_header(), f"valid {SELECT_METRIC}", "selected grid point"]
    rows = []
    for b in result["backbones"]:
        for r in (r for r in result["rows"] if r["backbone"] == b):
            grid = ", ".join(f"{k}={v}" for k, v in r["grid"].items()) or "-"
            failed = f" ({len(r['failed'])} failed)" if r["failed"] else ""
            vs = f"{r['valid_select']:.4f}" if r["valid_select"] is not None else "n/a"
            rows.append([b, r["clear"], f"{r['n']}{failed}",
                         *(fmt_ms(r["mean"][m], r["std"][m]) for m in TABLE_METRICS), vs, grid])
        for d in (d for d in result["deltas"] if d["backbone"] == b):
            rows.append([b, "change on vs off", "", *(fmt_delta(d[m]) for m in TABLE_METRICS), "", ""])
    return headers, rows


def ablation_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "what", "seeds", *_metric_header(), f"change vs off ({TABLE_METRICS[1]})"]
    rows = []
    deltas = {(d["ablation"], d["vs"]): d for d in result["deltas"]}
    for r in result["rows"]:
        if r["status"] != "ok":
            rows.append([r["ablation"], r["what"], "0", *(["not run"] * len(TABLE_METRICS)), r["error"]])
            continue
        d = deltas.get((r["ablation"], "off"))
        rows.append([r["ablation"], r["what"], str(r["n"]), *(fmt_ms(r["mean"][m], r["std"][m]) for m in TABLE_METRICS),
                     fmt_delta(d[TABLE_METRICS[1]]) if d else "-"])
    return headers, rows


def sweep_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["setting", *(f"lambda={s}" for s in result["strengths"])]
    rows = []
    for row in result["rows"]:
        cells = [c for c in result["cells"] if c["row"] == row]
        rows.append([row_label(result, row),
                     *(f"{c['valid_select']:.4f}" if c["valid_select"] is not None else "failed" for c in cells)])
    return headers, rows


def row_label(result: dict[str, Any], row: str) -> str:
    """A sweep row's name, with the k that an energy-ratio row actually used."""
    if not row.startswith("ratio="):
        return row
    ks = sorted({k for c in result["cells"] if c["row"] == row for k in c["k_used"]})
    return f"{row} (k={'/'.join(map(str, ks))})" if ks else row


def _provenance(result: dict[str, Any]) -> str:
    cmd = result.get("command") or "(Python API)"
    return (f"Command: `{cmd}`  \nMachine: {result['machine']}; date {result['date']}; seeds {result['seeds']}; "
            f"max epochs {result['epochs']}; epochs and grid points selected on {result['select_metric']}; "
            "test metrics at the best-valid epoch.\n")


def compare_markdown(result: dict[str, Any]) -> str:
    h, rows = compare_table(result)
    return (f"# CLEAR off vs on\n\n{_provenance(result)}\nNoise rule: {result['noise_rule']}\n\n"
            f"{_md_table(h, rows)}\n\n{_failures(result)}")


def ablations_markdown(result: dict[str, Any]) -> str:
    h, rows = ablation_table(result)
    k = f"ratio={result['ratio']}" if result.get("ratio") else f"k={result['k']}"
    extra = [d for d in result["deltas"] if d["vs"] == "random"]
    lines = [f"# CLEAR ablations ({result['backbone']}, {k})\n", _provenance(result),
             f"Noise rule: {result['noise_rule']}\n", _md_table(h, rows), ""]
    for d in extra:
        lines.append("Shared top-k directions (hard) vs the random-directions control: "
                     + ", ".join(f"{m} {fmt_delta(d[m])}" for m in TABLE_METRICS) + "\n")
    return "\n".join(lines) + _failures(result)


def sweep_markdown(result: dict[str, Any]) -> str:
    h, rows = sweep_table(result)
    lines = [f"# CLEAR sweep ({result['backbone']}): valid {SELECT_METRIC}\n", _provenance(result),
             _md_table(h, rows), ""]
    off = result["off"]
    lines.append(f"CLEAR off: valid {SELECT_METRIC} "
                 + (f"{off['valid_select']:.4f}" if off["valid_select"] is not None else "n/a") + "\n")
    if result["chosen"]:
        c = next(c for c in result["cells"] if c["row"] == result["chosen"]["row"]
                 and c["strength"] == result["chosen"]["strength"])
        ks = f" (k used: {', '.join(map(str, c['k_used']))})" if c["k_used"] else ""
        lines.append(f"Chosen on valid: {c['row']}, lambda={c['strength']}{ks}.\n")
        lines.append(_md_table(["", *_metric_header()],
                               [["chosen, test", *(fmt_ms(c["mean"][m], c["std"][m]) for m in TABLE_METRICS)],
                                ["CLEAR off, test", *(fmt_ms(off["mean"][m], off["std"][m]) for m in TABLE_METRICS)],
                                ["change", *(fmt_delta(result["chosen_vs_off"][m]) for m in TABLE_METRICS)]]))
        lines.append(f"\n![valid {SELECT_METRIC} heatmap](sweep_heatmap.png)\n")
    return "\n".join(lines) + "\n" + _failures(result)


def _failures(result: dict[str, Any]) -> str:
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if not failed:
        return ""
    return "Failed runs:\n\n" + "\n".join(f"- `{r['name']}`: {r['error']}" for r in failed) + "\n"


def heatmap(result: dict[str, Any], path: Path) -> None:
    """PNG heatmap of mean valid Recall@20: settings (rows) x lambda (columns), chosen cell boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = result["rows"], result["strengths"]
    grid = np.full((len(rows), len(cols)), np.nan)
    for c in result["cells"]:
        if c["valid_select"] is not None:
            grid[rows.index(c["row"]), cols.index(c["strength"])] = c["valid_select"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.55 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"λ={c}" for c in cols])
    ax.set_yticks(range(len(rows)), [row_label(result, r) for r in rows])
    mid = np.nanmean(grid)
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", fontsize=8,
                    color="k" if grid[i, j] > mid else "w")
    ch = result["chosen"]
    ax.add_patch(plt.Rectangle((cols.index(ch["strength"]) - 0.5, rows.index(ch["row"]) - 0.5), 1, 1,
                               fill=False, edgecolor="red", linewidth=2))
    off = result["off"]["valid_select"]
    off_text = f" (CLEAR off {off:.4f})" if off is not None else ""
    ax.set_title(f"{result['backbone']}: valid {SELECT_METRIC}{off_text}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
