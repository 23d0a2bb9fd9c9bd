"""PNG figures of the CLEAR diagnostics (matplotlib, Agg; written atomically through the store)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..pipeline.lazy import lazy_module
from ..pipeline.store import ArtifactStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

figure = lazy_module("matplotlib.figure")  # imported on first use (pipeline/lazy.py)

PLOTS = ("spectrum.png", "overlap.png", "similarity.png", "variance.png")
PLOT_NAMES = tuple(f"clear/{p}" for p in PLOTS)
COLORS = {"before": "tab:gray", "after": "tab:blue"}


def write_plots(store: ArtifactStore, folder: str, diag: dict[str, Any]) -> list[str]:
    """Write the figures for ``diag`` (see ``stages.project.build_diagnostics``) under ``folder``."""
    figures = {"spectrum.png": _spectrum(diag), "variance.png": _variance(diag)}
    if "overlap_curve" in diag:
        figures["overlap.png"] = _overlap(diag)
        figures["similarity.png"] = _similarity(diag)
    written = []
    for name in PLOTS:
        if name in figures:
            target = f"{folder}/{name}" if folder else name
            with store.atomic(target) as tmp:
                figures[name].savefig(tmp, format="png", dpi=110)
            written.append(target)
    return written


def _spectrum(diag: dict[str, Any]) -> Figure:
    k = diag["k"]
    fig = figure.Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for when in ("before", "after"):
        s = np.asarray(diag[f"spectrum_{when}"])
        idx = np.arange(1, len(s) + 1)
        ax1.semilogy(idx, np.maximum(s, 1e-300), marker=".", ms=3, color=COLORS[when], label=f"{when} CLEAR")
        ax2.plot(idx, diag[f"energy_curve_{when}"], color=COLORS[when], label=f"{when} CLEAR")
    for ax in (ax1, ax2):
        if k:
            ax.axvline(k + 0.5, color="tab:red", ls="--", lw=1, label=f"k = {k} (removed)")
        ax.set_xlabel("singular value index i (descending)")
        ax.legend()
        ax.grid(alpha=0.3)
    top = max(diag["spectrum_before"][0], diag["spectrum_after"][0])
    if top > 0:
        ax1.set_ylim(bottom=top * 1e-6)  # below that is rounding noise
    ax1.set_ylabel("singular value s_i of image-text cross-covariance")
    ax1.set_title("Cross-covariance spectrum")
    ax2.set_ylabel("cumulative share of the original energy sum s_j^2")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("Explained cross-modal energy")
    if diag.get("ratio"):
        ax2.axhline(diag["ratio"], color="tab:orange", ls=":", label=f"ratio = {diag['ratio']}")
        ax2.legend()
    return fig


def _overlap(diag: dict[str, Any]) -> Figure:
    curve = diag["overlap_curve"]
    K = diag["overlap_k"]
    fig = figure.Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for when in ("before", "after"):
        ax.plot(curve["k"], curve[when], marker="o", color=COLORS[when], label=f"{when} CLEAR")
    chance = [min(k, diag["n_sample"] - 1) / (diag["n_sample"] - 1) for k in curve["k"]]
    ax.plot(curve["k"], chance, ls=":", color="black", label="chance (random neighbours)")
    o = diag[f"overlap@{K}"]
    ax.set_title(f"Image-text top-K neighbour overlap (K={K}: {o['before']:.3f} -> {o['after']:.3f})")
    ax.set_xlabel("K (neighbours per item)")
    ax.set_ylabel("mean share of image top-K also in text top-K")
    ax.set_xscale("log")
    ax.set_ylim(0, max(1e-3, max(curve["before"] + curve["after"])) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _similarity(diag: dict[str, Any]) -> Figure:
    fig = figure.Figure(figsize=(11, 4.2), layout="constrained")
    mods = list(diag["similarity_density"])  # the pair's two modalities
    axes = fig.subplots(1, len(mods), sharey=False, squeeze=False)[0]
    for ax, mod in zip(axes, mods):
        for when in ("before", "after"):
            d = diag["similarity_density"][mod][when]
            if d["edges"]:
                ax.stairs(d["density"], d["edges"], color=COLORS[when], lw=1.5,
                          label=f"{when} CLEAR (mean {d['mean']:.3f})")
        ax.set_title(f"{mod}: cosine scores of each item's top-{diag['overlap_k']} {mod} neighbours")
        ax.set_xlabel("cosine similarity")
        ax.set_xlim(left=_lowest_edge(diag["similarity_density"]) - 0.05, right=1.02)
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def _lowest_edge(densities: dict[str, Any]) -> float:
    """Left edge of the lowest non-empty histogram bin over every modality and side."""
    lows = [d["edges"][int(np.argmax(np.asarray(d["density"]) > 0))]
            for per in densities.values() for d in per.values() if d["edges"]]
    return min(lows) if lows else -1.0


PALETTE = ("tab:purple", "tab:green", "tab:orange", "tab:blue", "tab:red", "tab:brown")


def _variance(diag: dict[str, Any]) -> Figure:
    kept = {m: v for m, v in (diag.get("variance_kept") or {}).items() if v is not None}
    fig = figure.Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(list(kept), [100 * v for v in kept.values()], color=[PALETTE[i % len(PALETTE)] for i in range(len(kept))])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylim(0, 105)
    ax.set_ylabel("variance kept after CLEAR (% of total)")
    ax.set_xlabel("modality")
    ax.set_title(f"Share of each modality's variance kept (k={diag['k']})")
    ax.grid(axis="y", alpha=0.3)
    return fig
