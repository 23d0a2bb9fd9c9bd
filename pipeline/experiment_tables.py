"""Tables, Markdown and the sweep heatmap of the experiment harness's results (plain dicts from its JSON)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TABLE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")  # test metrics in every table
SELECT_METRIC = "recall@20"  # valid metric that selects epochs, grid points and sweep settings
VERDICT_HEADER = "verdict (2 SE rule)"
P_HEADER = "paired t-test p"
NOISE_EXPLAINED = (
    "The verdict and the p-value answer different questions and can disagree: the verdict compares the change of "
    "the means with the spread of each side across seeds, while the paired t-test looks only at the per-seed "
    "differences, so with few seeds a small change that every seed repeats can get a small p yet stay within noise, "
    "and a large change that one seed contradicts can be beyond noise yet get a large p (with n seeds the t-test has "
    "only n - 1 degrees of freedom)."
)


def fmt_ms(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def fmt_change(d: dict[str, Any]) -> str:
    """The relative change (absolute when the baseline is 0), e.g. ``+12.9%``."""
    if d["diff"] is None:
        return "n/a"
    return f"{d['rel'] * 100:+.1f}%" if d["rel"] is not None else f"{d['diff']:+.4f}"


def fmt_verdict(d: dict[str, Any]) -> str:
    if d["diff"] is None:
        return "n/a"
    return {True: "beyond noise", False: "within noise", None: "unknown (one seed)"}[d["exceeds_noise"]]


def fmt_p(d: dict[str, Any]) -> str:
    return f"{d['p_paired']:.2f}" if d.get("p_paired") is not None else "n/a"


def delta_cells(d: dict[str, Any]) -> list[str]:
    """[change, verdict, p] of one noise check."""
    return [fmt_change(d), fmt_verdict(d), fmt_p(d)]


def noise_rule_text(result: dict[str, Any]) -> str:
    """The rule, stated once above a table of changes, and why its verdict can differ from the p-value."""
    return f"Noise rule: {result.get('noise_rule', '')} {NOISE_EXPLAINED}"


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (the one writer of them): ``|`` in a cell is escaped, line breaks become spaces."""
    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_header() -> list[str]:
    return [m.replace("recall", "Recall").replace("ndcg", "NDCG") for m in TABLE_METRICS]


def compare_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table: one row per backbone x CLEAR (test mean ± std over seeds)."""
    headers = ["backbone", "CLEAR", "seeds", *_metric_header(), f"valid {SELECT_METRIC}", "selected grid point"]
    rows = []
    for b in result["backbones"]:
        for r in (r for r in result["rows"] if r["backbone"] == b):
            grid = ", ".join(f"{k}={v}" for k, v in r["grid"].items()) or "-"
            failed = f" ({len(r['failed'])} failed)" if r["failed"] else ""
            vs = f"{r['valid_select']:.4f}" if r["valid_select"] is not None else "n/a"
            rows.append([b, r["clear"], f"{r['n']}{failed}",
                         *(fmt_ms(r["mean"][m], r["std"][m]) for m in TABLE_METRICS), vs, grid])
    return headers, rows


def change_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The change on vs off per backbone and metric: change, verdict and p-value in their own columns."""
    headers = ["backbone", "metric", "CLEAR off", "CLEAR on", "change on vs off", VERDICT_HEADER, P_HEADER]
    rows = []
    for d in result["deltas"]:
        for m in TABLE_METRICS:
            x = d[m]
            rows.append([d["backbone"], m, _fmt(x["off"]), _fmt(x["on"]), *delta_cells(x)])
    return headers, rows


def _fmt(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "n/a"


def ablation_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    m = TABLE_METRICS[1]
    headers = ["variant", "what", "seeds", *_metric_header(), f"change vs off ({m})", VERDICT_HEADER, P_HEADER]
    rows = []
    deltas = {(d["ablation"], d["vs"]): d for d in result["deltas"]}
    for r in result["rows"]:
        if r["status"] != "ok":
            rows.append([r["ablation"], r["what"], "0", *(["not run"] * len(TABLE_METRICS)), r["error"], "", ""])
            continue
        d = deltas.get((r["ablation"], "off"))
        rows.append([r["ablation"], r["what"], str(r["n"]), *(fmt_ms(r["mean"][k], r["std"][k]) for k in TABLE_METRICS),
                     *(delta_cells(d[m]) if d else ["-", "", ""])])
    return headers, rows


def random_control_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Hard projection (shared top-k directions) vs the random-directions control, per metric."""
    headers = ["metric", "change hard vs random", VERDICT_HEADER, P_HEADER]
    rows = [[m, *delta_cells(d[m])] for d in result["deltas"] if d["vs"] == "random" for m in TABLE_METRICS]
    return headers, rows


def sweep_choice_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Test metrics of the setting chosen on valid next to CLEAR off; one row per metric."""
    c = next(c for c in result["cells"] if c["row"] == result["chosen"]["row"]
             and c["strength"] == result["chosen"]["strength"])
    off = result["off"]
    headers = ["metric", "chosen, test", "CLEAR off, test", "change", VERDICT_HEADER, P_HEADER]
    rows = [[m, fmt_ms(c["mean"][m], c["std"][m]), fmt_ms(off["mean"][m], off["std"][m]),
             *delta_cells(result["chosen_vs_off"][m])] for m in TABLE_METRICS]
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
    ch, crows = change_table(result)
    return (f"# CLEAR off vs on\n\n{_provenance(result)}\nTest metrics, mean ± std over seeds:\n\n"
            f"{markdown_table(h, rows)}\n\n## Change on vs off\n\n{noise_rule_text(result)}\n\n"
            f"{markdown_table(ch, crows)}\n\n{_failures(result)}")


def ablations_markdown(result: dict[str, Any]) -> str:
    h, rows = ablation_table(result)
    k = f"ratio={result['ratio']}" if result.get("ratio") else f"k={result['k']}"
    lines = [f"# CLEAR ablations ({result['backbone']}, {k})\n", _provenance(result),
             noise_rule_text(result) + "\n", markdown_table(h, rows), ""]
    rh, rrows = random_control_table(result)
    if rrows:
        lines += ["Shared top-k directions (hard) vs the random-directions control:\n", markdown_table(rh, rrows), ""]
    return "\n".join(lines) + _failures(result)


def sweep_markdown(result: dict[str, Any]) -> str:
    h, rows = sweep_table(result)
    lines = [f"# CLEAR sweep ({result['backbone']}): valid {SELECT_METRIC}\n", _provenance(result),
             markdown_table(h, rows), ""]
    off = result["off"]
    lines.append(f"CLEAR off: valid {SELECT_METRIC} "
                 + (f"{off['valid_select']:.4f}" if off["valid_select"] is not None else "n/a") + "\n")
    if result["chosen"]:
        c = next(c for c in result["cells"] if c["row"] == result["chosen"]["row"]
                 and c["strength"] == result["chosen"]["strength"])
        ks = f" (k used: {', '.join(map(str, c['k_used']))})" if c["k_used"] else ""
        lines.append(f"Chosen on valid: {c['row']}, lambda={c['strength']}{ks}.\n")
        lines.append(noise_rule_text(result) + "\n")
        lines.append(markdown_table(*sweep_choice_table(result)))
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
