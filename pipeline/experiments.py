"""Experiment harness: does CLEAR help on this data?

One base work directory runs the stages up to ``encode`` once. Every variant (a backbone, a
seed, CLEAR on or off, a CLEAR setting, a grid point) is a run directory
``<out>/runs/<name>-<hash of its overrides>/`` that adopts the base run's stages through the
runner (:meth:`Runner.adopt`: outputs hard-linked, manifest entries recorded), so the runner
sees ingest / encode as up to date there and runs only ``project`` and ``train`` under the
variant's config overrides. A stage whose fingerprint equals one already computed in another
run directory (e.g. the same CLEAR setting for two seeds) is adopted the same way instead of
recomputed. Rerunning an experiment resumes: finished runs are
skipped by the runner.

Three experiments, each written as ``<name>.json`` + ``<name>.md`` in the output folder:

- :meth:`Harness.compare`: backbones x CLEAR off / on x seeds (+ an optional hyperparameter
  grid selected on valid: each backbone's reference grid, :func:`backbone_grid`, and / or
  given keys); test metrics at the best-valid epoch, mean +- std, relative change
  with CLEAR and whether it exceeds seed noise (:data:`NOISE_RULE`).
- :meth:`Harness.ablate`: hard vs soft projection, static vs dynamic, one modality only, and
  the control that removes k random orthonormal directions instead of the shared ones.
- :meth:`Harness.sweep`: k x lambda (and energy ratio) for one backbone, heatmap of valid
  Recall@20, the setting chosen on valid and its test metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape

from .config import Config
from .errors import ClearrecError, ConfigError
from .experiment_tables import (
    SELECT_METRIC,
    TABLE_METRICS,
    ablations_markdown,
    compare_markdown,
    heatmap,
    sweep_markdown,
)
from .runner import UP_TO_DATE, Runner, select_stages
from .stage import StageSpec
from .store import ArtifactStore
from .workdir import MANIFEST, METRICS, PROJECTOR_JSON, declared_modalities, read_manifest

NOISE_RULE = (
    "a change counts as beyond seed noise when |mean(on) - mean(off)| > 2 * SE, "
    "SE = sqrt(sd_off^2 / n_off + sd_on^2 / n_on) with sd the sample std over seeds; "
    "needs >= 2 seeds per side. The paired t-test p-value over shared seeds is shown for reference."
)
CLEAR_ON = {"project.enabled": True, "project.strength": 1.0, "project.mode": "static", "project.modalities": {}}
ABLATIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (  # (name, what it is, overrides on top of CLEAR_ON)
    ("off", "CLEAR off (features passed through)", {"project.enabled": False}),
    ("hard", "hard null-space projection, lambda = 1, static", {}),
    ("soft", "soft projection, lambda = 0.5", {"project.strength": 0.5}),
    ("dynamic", "dynamic: refit every epoch on the backbone's modality embeddings", {"project.mode": "dynamic"}),
    ("random", "control: remove k random orthonormal directions", {"project.directions": "random"}),
)


def ablations(modalities: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """:data:`ABLATIONS` with one ``<name>-only`` row per declared modality (only that one projected)
    before the random control; none with a single modality."""
    only = [(f"{m}-only", f"project the {m} modality only",
             {"project.modalities": {o: False for o in modalities if o != m}}) for m in modalities]
    rows = list(ABLATIONS)
    return rows[:-1] + (only if len(modalities) > 1 else []) + rows[-1:]


@dataclass(frozen=True)
class Variant:
    """One run: a directory name, config overrides, and labels used to group results."""

    name: str
    overrides: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ()  # run stages not needed (e.g. project for a backbone without features)

    @property
    def dirname(self) -> str:
        """``<name>-<hash of the overrides>``: equal overrides share a run directory, different ones never do."""
        key = json.dumps(self.overrides, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# ---- statistics ------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1; None with fewer than 2 values)."""
    if not values:
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def noise_check(off: dict[int, float], on: dict[int, float]) -> dict[str, Any]:
    """Change from ``off`` to ``on`` (seed -> value) and whether it exceeds seed noise (:data:`NOISE_RULE`)."""
    m_off, s_off = mean_std(list(off.values()))
    m_on, s_on = mean_std(list(on.values()))
    res: dict[str, Any] = {"off": m_off, "on": m_on, "diff": None, "rel": None, "se": None,
                           "exceeds_noise": None, "p_paired": None}
    if m_off is None or m_on is None:
        return res
    diff = m_on - m_off
    res["diff"] = diff
    res["rel"] = diff / m_off if m_off else None
    if s_off is not None and s_on is not None:
        se = math.sqrt(s_off**2 / len(off) + s_on**2 / len(on))
        res["se"] = se
        res["exceeds_noise"] = bool(abs(diff) > 2 * se) if se > 0 else bool(diff != 0)
    shared = sorted(set(off) & set(on))
    if len(shared) >= 2:
        d = np.array([on[s] - off[s] for s in shared])
        sd = d.std(ddof=1)
        if sd > 0:
            from scipy.stats import t as t_dist

            t = d.mean() / (sd / math.sqrt(len(d)))
            res["p_paired"] = float(2 * t_dist.sf(abs(t), len(d) - 1))
        else:
            res["p_paired"] = 0.0 if d.mean() != 0 else 1.0
    return res


def machine() -> str:
    """'N cores, M GiB, GPU name | no GPU' of this machine."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, {gpu} ({platform.machine()})"


# ---- the harness -----------------------------------------------------------------------
class Harness:
    """Runs variants of one config in run directories that share the base run's encoded features."""

    def __init__(self, config: Config, base_workdir: str | Path, out_dir: str | Path,
                 stages: Sequence[StageSpec] | None = None, console: Console | None = None,
                 base_to: str = "encode", run_from: str = "project", run_to: str = "train",
                 command: str | None = None):
        if stages is None:
            from .registry import STAGES

            stages = STAGES
        self.config = config
        self.stages = list(stages)
        self.base = ArtifactStore(base_workdir)
        self.out = ArtifactStore(out_dir)
        self.console = console or Console(stderr=True)
        self.base_stages = select_stages(self.stages, to=base_to)
        self.run_stages = select_stages(self.stages, from_=run_from, to=run_to)
        self.command = command
        self._donors: dict[tuple[str, str], Path] = {}  # (stage, fingerprint) -> run dir that has it
        for manifest in sorted((self.out.root / "runs").glob(f"*/{MANIFEST}")):
            for name, entry in _entries(manifest.parent).items():
                if entry.get("status") == "ok" and "fingerprint" in entry:
                    self._donors.setdefault((name, entry["fingerprint"]), manifest.parent)

    # ---- runs ------------------------------------------------------------------------
    def prepare_base(self) -> None:
        """Run (or skip, if up to date) the base stages once in the base work directory."""
        Runner(self.stages, self.config, self.base.root, console=self.console).run(self.base_stages)
        entries = _entries(self.base.root)
        for s in self.base_stages:
            if entries.get(s.name, {}).get("status") != "ok":
                raise ClearrecError(f"base stage {s.name} has no successful run in {self.base.root}")

    def run_variant(self, variant: Variant) -> dict[str, Any]:
        """Run one variant; returns its record (status, metrics, timings). Stage failures are recorded."""
        rec: dict[str, Any] = {"name": variant.name, "labels": variant.labels, "overrides": variant.overrides,
                               "run_dir": f"runs/{variant.dirname}"}
        cfg = self.config.with_overrides(variant.overrides)
        run_dir = self.out.root / "runs" / variant.dirname
        runner = Runner(self.stages, cfg, run_dir, console=self.console)
        for stage in self.base_stages:  # the base run's encoded catalog, shared by every variant
            runner.adopt(stage, self.base.root, same_fingerprint=False)
        try:
            for stage in (s for s in self.run_stages if s.name not in variant.skip):
                parts = runner.fingerprint_parts(stage)
                fp = runner.fingerprint(parts)
                donor = self._donors.get((stage.name, fp))
                if donor is not None and runner.stage_state(stage, parts, check_upstream=False).state != UP_TO_DATE:
                    runner.adopt(stage, donor)  # another variant already ran it with this fingerprint
                runner.run([stage], resume_hint=f"clearrec run --workdir {run_dir}")
                self._donors[(stage.name, runner.fingerprint(runner.fingerprint_parts(stage)))] = run_dir
        except ClearrecError as e:
            return {**rec, "status": "failed", "error": str(e)}
        return {**rec, "status": "ok", **self._read_results(run_dir)}

    def run_all(self, variants: Sequence[Variant]) -> list[dict[str, Any]]:
        records = []
        for i, v in enumerate(variants, 1):
            self.console.print(f"[bold]run {i}/{len(variants)}[/] {escape(v.name)}")
            records.append(self.run_variant(v))
        return records

    def _read_results(self, run_dir: Path) -> dict[str, Any]:
        store = ArtifactStore(run_dir)
        metrics = store.read_json(METRICS)
        entries = _entries(run_dir)
        res: dict[str, Any] = {"valid": metrics.get("valid", {}), "test": metrics.get("test", {}),
                               "best_epoch": metrics.get("best_epoch"),
                               "seconds": {s.name: entries.get(s.name, {}).get("seconds") for s in self.run_stages}}
        if store.exists(PROJECTOR_JSON):
            proj = store.read_json(PROJECTOR_JSON)
            k = proj.get("k")  # one rank, or one per modality when the energy ratio picks different ones
            res["clear_k"] = ", ".join(f"{m} {v}" for m, v in k.items()) if isinstance(k, dict) else k
            res["clear_strength"] = proj.get("strength")
        return res

    def _header(self, kind: str, seeds: Sequence[int], epochs: int | None) -> dict[str, Any]:
        source = str(self.config.source) if self.config.source else None
        return {"kind": kind, "command": self.command, "config": source,
                "base_workdir": str(self.base.root), "date": datetime.now(timezone.utc).date().isoformat(),
                "machine": machine(), "seeds": list(seeds), "epochs": epochs or self.config.train.epochs,
                "select_metric": f"valid {SELECT_METRIC}", "metrics": list(TABLE_METRICS), "noise_rule": NOISE_RULE}

    def _write(self, name: str, result: dict[str, Any], markdown: str) -> None:
        self.out.write_json(f"{name}.json", result)
        self.out.write_text(f"{name}.md", markdown)

    # ---- experiments -----------------------------------------------------------------
    def compare(self, backbones: Sequence[str], seeds: Sequence[int], epochs: int | None = None,
                grid: dict[str, list[Any]] | None = None, default_grid: bool = False) -> dict[str, Any]:
        """Backbones x CLEAR off/on x seeds (x a valid-selected grid); writes compare.json / compare.md.

        ``default_grid``: each backbone's reference grid (:func:`backbone_grid`); ``grid``: more
        keys (or other values), see :func:`grid_points`. The grid point with the best mean valid
        Recall@20 is chosen per backbone and CLEAR setting; its test metrics are reported.
        """
        unknown = [b for b in backbones if b not in backbone_names()]
        if unknown:
            raise ConfigError(f"unknown backbone(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(backbone_names())} (or all)")
        common = {"train.epochs": epochs} if epochs else {}
        groups = []
        for b in backbones:
            points = grid_points(b, grid, default_grid)
            for clear in (("n/a",) if featureless(b) else ("off", "on")):
                base = {**common, "train.backbone": b,
                        **({"project.enabled": False} if clear != "on" else CLEAR_ON)}
                groups.append(((b, clear), base, points))
        variants, keys = [], []
        for (b, clear), base, points in groups:
            for gi, point in enumerate(points):
                for s in seeds:
                    tag = f"-g{gi}" if len(points) > 1 else ""
                    variants.append(Variant(f"{b}-{clear.replace('/', '')}{tag}-s{s}",
                                            {**base, **point, "train.seed": s},
                                            {"backbone": b, "clear": clear, "seed": s, "grid": point},
                                            skip=("project",) if featureless(b) else ()))
                    keys.append(((b, clear), gi))
        self.prepare_base()
        runs = self.run_all(variants)
        rows = []
        for key, _, points in groups:
            point_runs = [[r for r, k in zip(runs, keys) if k == (key, gi)] for gi in range(len(points))]
            chosen, table = select_point(point_runs)
            rows.append({"backbone": key[0], "clear": key[1], "grid": points[chosen], "grid_valid": table,
                         **aggregate(point_runs[chosen])})
        deltas = []
        for b in backbones:
            off = next((r for r in rows if r["backbone"] == b and r["clear"] == "off"), None)
            on = next((r for r in rows if r["backbone"] == b and r["clear"] == "on"), None)
            if off and on:
                deltas.append({"backbone": b, **{m: noise_check(off["per_seed"][m], on["per_seed"][m])
                                                 for m in TABLE_METRICS}})
        result = {**self._header("compare", seeds, epochs), "backbones": list(backbones),
                  "rows": rows, "deltas": deltas, "runs": runs}
        self._write("compare", result, compare_markdown(result))
        return result

    def ablate(self, backbone: str, seeds: Sequence[int], epochs: int | None = None) -> dict[str, Any]:
        """CLEAR ablations for one backbone; writes ablations.json / ablations.md."""
        common = {"train.epochs": epochs} if epochs else {}
        variants, unavailable = [], {}
        table = ablations(declared_modalities(self.config))
        for name, what, over in table:
            overrides = {**common, "train.backbone": backbone, **CLEAR_ON, **over}
            if "project.directions" in self._known_keys() and "project.directions" not in over:
                overrides["project.directions"] = "shared"
            try:
                self.config.with_overrides(overrides)
            except ConfigError as e:
                unavailable[name] = f"config does not support it: {e}"
                continue
            variants += [Variant(f"{backbone}-{name}-s{s}", {**overrides, "train.seed": s},
                                 {"ablation": name, "seed": s}) for s in seeds]
        self.prepare_base()
        runs = self.run_all(variants)
        rows = []
        for name, what, _ in table:
            if name in unavailable:
                rows.append({"ablation": name, "what": what, "status": "unavailable", "error": unavailable[name]})
                continue
            rows.append({"ablation": name, "what": what, "status": "ok",
                         **aggregate([r for r in runs if r["labels"]["ablation"] == name])})
        by = {r["ablation"]: r for r in rows if r["status"] == "ok"}
        deltas = []
        for ref, name in [("off", n) for n, _, _ in table if n != "off"] + [("random", "hard")]:
            if ref in by and name in by and by[ref]["n"] and by[name]["n"]:
                deltas.append({"ablation": name, "vs": ref, **{m: noise_check(by[ref]["per_seed"][m],
                                                                         by[name]["per_seed"][m])
                                                              for m in TABLE_METRICS}})
        result = {**self._header("ablations", seeds, epochs), "backbone": backbone,
                  "k": self.config.project.k, "ratio": self.config.project.ratio,
                  "rows": rows, "deltas": deltas, "runs": runs}
        self._write("ablations", result, ablations_markdown(result))
        return result

    def sweep(self, backbone: str, ks: Sequence[int], strengths: Sequence[float], ratios: Sequence[float],
              seeds: Sequence[int], epochs: int | None = None) -> dict[str, Any]:
        """k x lambda (+ ratio rows) for one backbone; writes sweep.json / sweep.md / sweep_heatmap.png."""
        common = {**({"train.epochs": epochs} if epochs else {}), "train.backbone": backbone}
        settings = [(f"k={k}", {"project.k": k, "project.ratio": None}) for k in ks]
        settings += [(f"ratio={r}", {"project.ratio": r}) for r in ratios]
        variants = [Variant(f"{backbone}-off-s{s}", {**common, "project.enabled": False, "train.seed": s},
                            {"row": "off", "strength": None, "seed": s}) for s in seeds]
        for (row, over), lam, s in itertools.product(settings, strengths, seeds):
            tag = row.replace("=", "")
            variants.append(Variant(f"{backbone}-{tag}-l{lam}-s{s}",
                                    {**common, **CLEAR_ON, **over, "project.strength": lam, "train.seed": s},
                                    {"row": row, "strength": lam, "seed": s}))
        self.prepare_base()
        runs = self.run_all(variants)
        cells = []
        for (row, _), lam in itertools.product(settings, strengths):
            rs = [r for r in runs if r["labels"]["row"] == row and r["labels"]["strength"] == lam]
            ks_used = sorted({r.get("clear_k") for r in rs if r.get("clear_k") is not None})
            cells.append({"row": row, "strength": lam, "k_used": ks_used, **aggregate(rs)})
        off = aggregate([r for r in runs if r["labels"]["row"] == "off"])
        scored = [c for c in cells if c["valid_select"] is not None]
        chosen = max(scored, key=lambda c: c["valid_select"]) if scored else None
        result = {**self._header("sweep", seeds, epochs), "backbone": backbone, "rows": [r for r, _ in settings],
                  "strengths": list(strengths), "cells": cells, "off": off,
                  "chosen": ({"row": chosen["row"], "strength": chosen["strength"]} if chosen else None),
                  "heatmap": "sweep_heatmap.png" if scored else None, "runs": runs}
        if chosen is not None:
            result["chosen_vs_off"] = {m: noise_check(off["per_seed"][m], chosen["per_seed"][m]) for m in TABLE_METRICS}
            with self.out.atomic("sweep_heatmap.png") as tmp:
                heatmap(result, tmp)
        self._write("sweep", result, sweep_markdown(result))
        return result

    def _known_keys(self) -> set[str]:
        return {f"project.{k}" for k in type(self.config.project).model_fields}


# ---- grouping and selection ------------------------------------------------------------
def backbone_names() -> tuple[str, ...]:
    """Every backbone ``train.backbone`` accepts (the registry's names), in the config's order."""
    from .config.train import TrainConfig

    return typing.get_args(TrainConfig.model_fields["backbone"].annotation)


def featureless(backbone: str) -> bool:
    """True for a backbone that reads no item features (LightGCN, Pop, BPR-MF): CLEAR cannot change it."""
    from ..models.registry import backbone_class

    return not backbone_class(backbone).uses_features


def backbone_grid(backbone: str) -> dict[str, list[Any]]:
    """The reference grid of ``backbone`` (dotted key -> values), kept next to its config section
    (``GRID`` of its Params class in ``config/train.py``); {} where the reference searches none."""
    from .config.train import TrainConfig

    return {k: list(v) for k, v in getattr(TrainConfig.model_fields[backbone].annotation, "GRID", {}).items()}


def grid_points(backbone: str, grid: dict[str, list[Any]] | None, default_grid: bool) -> list[dict[str, Any]]:
    """Grid points for ``backbone``: its reference grid when ``default_grid``, then ``grid``'s keys
    (replacing the values of a key both name); keys ``train.<other backbone>.*`` of ``grid`` are
    left out; no grid gives [{}]."""
    spec = backbone_grid(backbone) if default_grid else {}
    names = backbone_names()
    for key, values in (grid or {}).items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "train" and parts[1] in names and parts[1] != backbone:
            continue
        spec[key] = list(values)
    keys = sorted(spec)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec[k] for k in keys))] or [{}]


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean / std over a group's successful runs, per-seed values, and failures."""
    ok = [r for r in runs if r["status"] == "ok"]
    per_seed = {m: {r["labels"]["seed"]: r["test"][m] for r in ok if m in r["test"]} for m in TABLE_METRICS}
    valid = [r["valid"][SELECT_METRIC] for r in ok if SELECT_METRIC in r["valid"]]
    out: dict[str, Any] = {"n": len(ok), "failed": [{"name": r["name"], "error": r["error"]} for r in runs
                                                    if r["status"] != "ok"],
                           "per_seed": per_seed, "valid_select": mean_std(valid)[0]}
    out["mean"] = {m: mean_std(list(v.values()))[0] for m, v in per_seed.items()}
    out["std"] = {m: mean_std(list(v.values()))[1] for m, v in per_seed.items()}
    return out


def select_point(point_runs: Sequence[Sequence[dict[str, Any]]]) -> tuple[int, list[float | None]]:
    """Index of the grid point with the best mean valid metric, and every point's mean."""
    means = [aggregate(rs)["valid_select"] for rs in point_runs]
    scored = [(m, i) for i, m in enumerate(means) if m is not None]
    return (max(scored)[1] if scored else 0), means


def _entries(root: Path) -> dict[str, Any]:
    """The manifest's stage entries of the work directory ``root`` (none when it is unreadable)."""
    try:
        return read_manifest(ArtifactStore(root))["stages"]
    except ClearrecError:
        return {}
