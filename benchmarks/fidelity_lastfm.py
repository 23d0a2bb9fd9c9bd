"""Fidelity check on Last.fm-2K: backbones with the reference implementation's settings, through models + trainer.

Reads ``../shared/datasets/lastfm-2k/mmrec`` (``lfm2k.inter`` with its ``x_label`` split;
``all-MiniLM-L6-v2.npy`` as the ``text`` modality; ``vggish.npy`` as float32 in the ``image``
slot, MMRec's ``v_feat``), builds each backbone with MMRec's global defaults (d 64, Adam,
batch 2048, patience 20 on valid Recall@20) and the first value of each grid of the model's
yaml, trains it on one thread with one seed and prints, per backbone: the best-valid epoch /
epochs run, the median seconds per epoch of training and of the validation pass, the process
CPU seconds of the whole run, valid R@20 and test R@10 / R@20 / N@10 / N@20 at the best-valid
epoch. Backbones are built through the registry, so another one is one more ``SETTINGS`` line.
With several seeds it also prints, per backbone, test R@20 mean +- sd over the seeds next to the
reference implementation's figure (MMRec's own run, seed 999) and a verdict (:func:`verdict`).

    nice .venv/bin/python benchmarks/fidelity_lastfm.py                       # every backbone
    nice .venv/bin/python benchmarks/fidelity_lastfm.py --models bm3,lgmrec --seed 999
    nice .venv/bin/python benchmarks/fidelity_lastfm.py --models lightgcn --seeds 999,1,2          # + mean, verdict
    nice .venv/bin/python benchmarks/fidelity_lastfm.py --models vbpr --grid                     # selected on valid
    nice .venv/bin/python benchmarks/fidelity_lastfm.py --models bpr --set bpr.reg=1e-4   # another setting
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "lastfm-2k" / "mmrec"

# name -> (constructor settings, Adam lr): the reference settings (first grid values)
SETTINGS: dict[str, tuple[dict, float]] = {
    "lightgcn": ({"layers": 1, "reg": 1e-2}, 1e-3),
    "vbpr": ({"reg": 2.0}, 1e-3),
    "freedom": ({"dropout": 0.8, "reg_weight": 0.0}, 1e-3),
    "pop": ({}, 1e-3),
    "itemknncbf": ({"knn_k": 10, "shrink": 10.0}, 1e-3),
    "bpr": ({"reg": 2.0}, 1e-3),
    "bm3": ({"layers": 1, "reg_weight": 0.1, "dropout": 0.3, "cl_weight": 2.0}, 1e-3),
    "lgmrec": ({"ui_layers": 2, "mm_layers": 2, "hyper_layers": 1, "hyper_num": 4, "keep_rate": 0.5, "alpha": 0.3,
                "cl_weight": 1e-4, "reg_weight": 1e-6}, 1e-3),
    "mmgcn": ({"reg": 0.0}, 1e-4),
    "lattice": ({"reg_weight": 0.0}, 1e-4),
    "mgcn": ({"cl_weight": 1e-3}, 1e-3),
    "smore": ({"layers": 3, "knn_k": 10, "reg_weight": 1e-5, "dropout": 0.0}, 1e-3),
}

# name -> the reference implementation's test R@20 on this data (MMRec, seed 999; none for the baselines)
REFERENCE_R20: dict[str, float] = {
    "lightgcn": 0.4168, "vbpr": 0.3979, "freedom": 0.3877, "lattice": 0.2495, "bm3": 0.3056, "mgcn": 0.4064,
    "lgmrec": 0.4119, "smore": 0.2018, "mmgcn": 0.2710,
}


def verdict(ours: list[float], reference: float) -> tuple[float, float, str]:
    """``(mean, sd, verdict)`` of our per-seed figures against the reference's single run.

    "at or above" when our mean is at least the reference's; "within noise" when it is below by
    at most 2 SE, SE = sd * sqrt(1/n + 1) (the project's 2-SE rule, the one reference run given
    our seed sd, since one run has none); else "below, beyond noise". ``sd`` is the sample std
    (ddof 1) over the ``n >= 2`` seeds.
    """
    if len(ours) < 2:
        raise ValueError("a verdict needs at least 2 seeds")
    mean, sd = statistics.mean(ours), statistics.stdev(ours)
    if mean >= reference:
        return mean, sd, "at or above"
    se = sd * (1 / len(ours) + 1) ** 0.5
    return mean, sd, "within noise" if reference - mean <= 2 * se else "below, beyond noise"


def load() -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int, int]:
    """``(split pairs [(2, E_train), (2, E_valid), (2, E_test)], features, num_users, num_items)``."""
    if not (DATA / "lfm2k.inter").is_file():
        sys.exit(f"{DATA} is absent: this benchmark needs ../shared/datasets/lastfm-2k beside the repository")
    table = np.loadtxt(DATA / "lfm2k.inter", dtype=np.int64, skiprows=1)  # userID itemID rating x_label
    users, items, label = (torch.from_numpy(table[:, c].copy()) for c in (0, 1, 3))
    feats = {"image": torch.from_numpy(np.load(DATA / "vggish.npy", allow_pickle=False).astype(np.float32)),
             "text": torch.from_numpy(np.load(DATA / "all-MiniLM-L6-v2.npy", allow_pickle=False).astype(np.float32))}
    pairs = [torch.stack([users[label == s], items[label == s]]) for s in range(3)]
    return pairs, feats, int(users.max()) + 1, int(items.max()) + 1


def run(name: str, seed: int, epochs: int, overrides: dict | None = None, lr: float | None = None,
        data: Callable[[], tuple] = load) -> dict:
    """Train backbone ``name`` (its ``SETTINGS``, then ``overrides``; Adam at ``lr``, default its
    setting's) on one seed; the run's epochs, timings and metrics at the best-valid epoch. ``data``:
    :func:`load`, or a function giving another dataset in its form."""
    import inspect

    from clearrec.models.metrics import ItemSets
    from clearrec.models.registry import backbone_class
    from clearrec.models.trainer import TrainOptions, fit
    from clearrec.pipeline.config.train import reference_lr_decay
    from clearrec.stages.train import TrainData, build_backbone

    pairs, feats, nu, ni = data()
    train, valid, test = (ItemSets.from_pairs(p[0], p[1], nu, ni) for p in pairs)
    kwargs, default_lr = SETTINGS[name]
    lr = default_lr if lr is None else lr
    settings = {**kwargs, **(overrides or {})}
    if "embedding_dim" in inspect.signature(backbone_class(name)).parameters:
        settings = {"embedding_dim": 64, **settings}
    torch.manual_seed(seed)
    model = build_backbone(name, settings, TrainData([""] * nu, [""] * ni, {"train": train, "valid": valid, "test": test},
                                                     feats, {}))
    del feats  # as the train stage does: the model holds what it uses
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(model, train, valid, test, TrainOptions(lr=lr, lr_decay=reference_lr_decay(name), epochs=epochs,
                                                               seed=seed),
                 on_epoch=lambda r: print(f"  {name} epoch {r.epoch}: loss {r.loss:.4f} valid R@20 "
                                          f"{r.valid['recall@20']:.4f}", file=sys.stderr, flush=True)
                 if r.epoch % 25 == 0 else None)
    hist = result.history
    return {"best": result.best_epoch, "run": len(hist), "total_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "train_s": statistics.median(r.train_seconds for r in hist),
            "eval_s": statistics.median(r.eval_seconds for r in hist),
            "train_all": [r.train_seconds for r in hist], "eval_all": [r.eval_seconds for r in hist],
            "valid": result.valid["recall@20"], **{k: result.test[k] for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")}}


def grid(name: str) -> list[tuple[str, dict, float | None]]:
    """``(label, constructor overrides, lr or None)`` per point of ``name``'s reference grid, as
    ``clearrec compare --grid`` expands it (``train.<name>.<key>`` and ``train.lr`` keys)."""
    from clearrec.pipeline.experiments import grid_points

    out = []
    for point in grid_points(name, None, True):
        kwargs = {k.split(".")[-1]: v for k, v in point.items() if k.startswith(f"train.{name}.")}
        unknown = sorted(set(point) - {f"train.{name}.{k}" for k in kwargs} - {"train.lr"})
        if unknown:
            raise SystemExit(f"{name}: the grid key(s) {unknown} are not constructor settings or train.lr")
        label = " ".join(f"{k.removeprefix('train.').removeprefix(name + '.')}={v}" for k, v in point.items()) or "-"
        out.append((label, kwargs, point.get("train.lr")))
    return out


def _value(text: str) -> bool | int | float:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--seed", "--seeds", dest="seeds", default="999", help="one seed, or comma-separated seeds")
    ap.add_argument("--epochs", type=int, default=1000, help="most epochs per backbone")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", action="store_true",
                    help="run every point of each backbone's reference grid (as clearrec compare --grid) and "
                         "report test at the point with the best mean valid R@20")
    ap.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="override one constructor setting (a float, an int or true/false), e.g. bpr.reg=1e-4")
    args = ap.parse_args()
    overrides: dict[str, dict] = {}
    for item in args.set:
        target, _, value = item.partition("=")
        model, _, key = target.partition(".")
        if not key or model not in SETTINGS:
            ap.error(f"--set {item!r}: expected MODEL.KEY=VALUE with MODEL in {', '.join(SETTINGS)}")
        overrides.setdefault(model, {})[key] = _value(value)
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    torch.set_num_threads(args.threads)
    print(f"Last.fm-2K, seeds {seeds}, {args.threads} thread(s), torch {torch.__version__}, "
          f"overrides {overrides or 'none'}")
    print("| model | seed | best epoch / run | s/epoch train + eval | CPU s total | valid R@20 | test R@10 | "
          "test R@20 | test N@10 | test N@20 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary, chosen = [], []
    for name in (n.strip() for n in args.models.split(",")):
        points = grid(name) if args.grid else [("", {}, None)]
        per_point = []
        for label, kwargs, lr in points:
            rs = []
            for seed in seeds:
                r = run(name, seed, args.epochs, {**kwargs, **overrides.get(name, {})}, lr)
                rs.append(r)
                print(f"| {name} {label} | {seed} | {r['best']} / {r['run']} | "
                      f"{r['train_s']:.2f} + {r['eval_s']:.2f} | {r['cpu_s']:.0f} | {r['valid']:.4f} | "
                      f"{r['recall@10']:.4f} | {r['recall@20']:.4f} | {r['ndcg@10']:.4f} | {r['ndcg@20']:.4f} |",
                      flush=True)
            per_point.append((statistics.mean(r["valid"] for r in rs), label, [r["recall@20"] for r in rs]))
        ref = REFERENCE_R20.get(name)
        if args.grid:
            valid, label, r20 = max(per_point, key=lambda p: p[0])
            sd = f" ± {statistics.stdev(r20):.4f}" if len(r20) > 1 else ""
            chosen.append(f"| {name} | {len(points)} | {label} | {valid:.4f} | {statistics.mean(r20):.4f}{sd} |")
        elif len(seeds) > 1 and ref is not None and name not in overrides:
            mean, sd, word = verdict(per_point[0][2], ref)
            summary.append(f"| {name} | {mean:.4f} ± {sd:.4f} | {ref:.4f} | {mean - ref:+.4f} | {word} |")
    if summary:
        print(f"\ntest R@20 over seeds {seeds} against the reference's (seed 999):\n")
        print("| model | ours, mean ± sd | reference | ours - reference | verdict |\n|---|---|---|---|---|")
        print("\n".join(summary))
    if chosen:
        print(f"\nreference grid, selected on mean valid R@20 over seeds {seeds}:\n")
        print("| model | points | selected | valid R@20 | test R@20 |\n|---|---|---|---|---|")
        print("\n".join(chosen))


if __name__ == "__main__":
    main()
