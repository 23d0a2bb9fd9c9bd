"""Epoch time of our backbones against the reference implementation's own code, in one window.

The reference is MMRec (``enoche/MMRec``), whose ``src/models/<name>.py`` our backbones follow.
This script does not ship it: pass a checkout with ``--mmrec`` (the folder holding ``src/main.py``).
Both sides run the same data: ``--data lastfm`` (default) is Last.fm-2K
(``../shared/datasets/lastfm-2k/mmrec``: the ``x_label`` split, MiniLM text in MMRec's ``t_feat``
slot, VGGish audio as float32 in its ``v_feat`` slot); ``--data amazon-baby`` is Amazon Baby's
interactions and split (``../shared/datasets/amazon-baby``) with the seeded random 4096-d image /
384-d text features of ``benchmarks/train.py`` (timing only), staged as an MMRec dataset folder. Both
run with MMRec's global defaults (d 64, Adam, batch 2048, one negative per positive, full-ranking validation with
eval batch 4096) and the first value of every grid in the model's yaml, on one thread, seed 999;
ours through ``benchmarks/fidelity_lastfm.py``'s ``run`` (the same settings, ``SETTINGS`` there).

Per model and round the two run one after the other, each in a fresh subprocess: one warm-up
epoch, then ``--epochs`` timed epochs (training pass + validation pass). The script prints the
median seconds of each pass, their sum's ratio ours / reference, and each subprocess's peak RSS
(``VmHWM``). The reference's times are the ones its trainer logs ("epoch N training [time: ...]",
"evaluating [time: ...]"). Its code uses ``np.float`` / ``np.int``, which NumPy 1.24 removed, and
fills its adjacency matrices with ``dok_matrix._update``, which SciPy 1.12 removed; the worker puts
back the alias (``float`` / ``int``) and the plain dict update they were, before importing it. MGCN and
SMORE build their kNN graphs' degrees with ``torch_scatter.scatter_add``, a compiled extension with no
wheel for this torch; without it the worker provides that one function (a sum by index, torch's
``scatter_add_``), used only while the model is built, outside the timed epochs; and as they move
those graphs to the GPU with ``.cuda()`` in the constructor, on a machine without one the worker makes
``Tensor.cuda()`` return the tensor itself. MMRec
writes its logs under ``<mmrec>/src/log``; the data is staged in a temporary folder.

    .venv/bin/python benchmarks/vs_mmrec.py --mmrec ../MMRec --reference-python ../mmrec-env/bin/python
    .venv/bin/python benchmarks/vs_mmrec.py --mmrec ../MMRec --reference-python ../mmrec-env/bin/python \\
        --models vbpr,bm3 --epochs 5 --rounds 2
    .venv/bin/python benchmarks/vs_mmrec.py --mmrec ../MMRec --reference-python ../mmrec-env/bin/python \\
        --data amazon-baby --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "datasets" / "lastfm-2k" / "mmrec"
BABY = HERE.parent.parent / "shared" / "datasets" / "amazon-baby"
NAMES = {"vbpr": "VBPR", "bm3": "BM3", "mgcn": "MGCN", "lgmrec": "LGMRec", "smore": "SMORE", "lightgcn": "LightGCN",
         "freedom": "FREEDOM", "lattice": "LATTICE", "mmgcn": "MMGCN"}
DATASET = {"USER_ID_FIELD": "userID", "ITEM_ID_FIELD": "itemID", "TIME_FIELD": "timestamp",
           "filter_out_cod_start_users": True,
           "vision_feature_file": "image_feat.npy", "text_feature_file": "text_feat.npy",
           "user_graph_dict_file": "user_graph_dict.npy", "field_separator": "\t"}
_EPOCH = re.compile(r"epoch (\d+) (training|evaluating) \[time: ([0-9.]+)s")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stage_data(folder: Path, data: str) -> Path:
    """``folder/lfm2k`` or ``folder/baby``: the interactions (``<name>.inter``) and the two feature files,
    as MMRec reads them; returns that dataset folder."""
    if data == "lastfm":
        out = folder / "lfm2k"
        out.mkdir(parents=True)
        (out / "lfm2k.inter").symlink_to(DATA / "lfm2k.inter")
        for src, dst in (("vggish.npy", "image_feat.npy"), ("all-MiniLM-L6-v2.npy", "text_feat.npy")):
            np.save(out / dst, np.load(DATA / src, allow_pickle=False).astype(np.float32))
        return out
    out = folder / "baby"
    out.mkdir(parents=True)
    pairs, feats, _, _ = load_baby()
    with open(out / "baby.inter", "w") as f:
        f.write("userID\titemID\tx_label\n")
        for label, pair in enumerate(pairs):
            f.writelines(f"{u}\t{i}\t{label}\n" for u, i in pair.T.tolist())
    np.save(out / "image_feat.npy", feats["image"].numpy())
    np.save(out / "text_feat.npy", feats["text"].numpy())
    return out


def load_baby() -> tuple[list, dict, int, int]:
    """Amazon Baby in ``fidelity_lastfm.load``'s form: split pairs (2, E) each, the seeded random features
    (``benchmarks/train.py``'s ``features``: 4096-d "image", 384-d "text"), number of users and items."""
    import torch

    sys.path.insert(0, str(HERE))
    import train

    pairs = [torch.stack(train.load_split(name)) for name in ("train.json", "val.json", "test.json")]
    image, text = train.features()
    return pairs, {"image": image, "text": text}, train.NUM_USERS, train.NUM_ITEMS


def first_grid_values(model_yaml: Path) -> dict:
    """The model yaml's settings with every grid (a key listed in ``hyper_parameters``) at its first value."""
    import yaml

    loader = yaml.SafeLoader
    loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))  # 1e-4 is a float, as MMRec's own loader reads it
    cfg = yaml.load(model_yaml.read_text(), Loader=loader) or {}
    return {k: (cfg[k][0] if isinstance(cfg[k], list) else cfg[k]) for k in cfg.get("hyper_parameters", [])
            if k != "seed"}


def reference_worker(mmrec: Path, model: str, epochs: int, data: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    np.float, np.int = float, int  # removed in NumPy 1.24; the reference code still names them
    import scipy.sparse as sp

    if not hasattr(sp.dok_matrix, "_update"):  # its graphs are filled with the private dict update SciPy 1.12 removed
        sp.dok_matrix._update = lambda self, entries: self._dict.update(entries)
    try:
        import torch_scatter  # noqa: F401  (its kNN graphs' degrees, when they are built)
    except ImportError:  # a compiled extension with no wheel for this torch: the one function used, in torch
        module = types.ModuleType("torch_scatter")
        module.scatter_add = lambda src, index, dim=0, dim_size=None: torch.zeros(
            dim_size if dim_size is not None else int(index.max()) + 1, dtype=src.dtype).scatter_add_(dim, index, src)
        sys.modules["torch_scatter"] = module
    if not torch.cuda.is_available():  # MGCN and SMORE call .cuda() on their kNN graphs in the constructor
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    src = mmrec / "src"
    os.chdir(src)  # MMRec reads configs/ from the working directory
    sys.path.insert(0, str(src))
    from utils.quick_start import quick_start

    config = {"gpu_id": 0, "use_gpu": False, "epochs": epochs, "hyper_parameters": ["seed"], "seed": [999],
              "data_path": str(data.parent) + os.sep, "save_recommended_topk": False, **DATASET,
              "inter_file_name": f"{data.name}.inter", **first_grid_values(src / "configs" / "model" / f"{model}.yaml")}
    quick_start(model=model, dataset=data.name, config_dict=config, save_model=False)
    return {"rss_mib": peak_rss_mib()}  # the epoch times are in its log lines (see measure)


def ours_worker(model: str, epochs: int, data: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from fidelity_lastfm import load, run

    r = run(model, 999, epochs, data=load_baby if data.name == "baby" else load)
    return {"train_all": r["train_all"], "eval_all": r["eval_all"], "rss_mib": peak_rss_mib()}


def measure(python: str, args: list[str]) -> dict:
    done = subprocess.run([python, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"worker {' '.join(args[-3:])} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "train_all" not in result:  # the reference: its trainer's log lines
        times: dict[str, dict[int, float]] = {"training": {}, "evaluating": {}}
        for epoch, part, seconds in _EPOCH.findall(done.stdout + done.stderr):
            times[part][int(epoch)] = float(seconds)
        order = sorted(times["training"])
        result["train_all"] = [times["training"][e] for e in order]
        result["eval_all"] = [times["evaluating"].get(e, 0.0) for e in order]
    if len(result["train_all"]) < 2:
        sys.exit(f"worker {' '.join(args[-3:])}: fewer than 2 epochs timed; its output ends:\n{done.stderr[-2000:]}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mmrec", type=Path, required=True, help="an MMRec checkout (the folder with src/main.py)")
    ap.add_argument("--models", default=",".join(NAMES), help=f"comma-separated, from {', '.join(NAMES)}")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--rounds", type=int, default=1, help="ours / reference pairs per model")
    ap.add_argument("--data", choices=("lastfm", "amazon-baby"), default="lastfm",
                    help="Last.fm-2K (real features) or Amazon Baby (seeded random features, timing only)")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="interpreter for the reference worker: MMRec imports lmdb, and its MMGCN torch_geometric, "
                         "so one with those installed (and torch, numpy, scipy, pandas, pyyaml); default this one")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    mmrec = args.mmrec.resolve()
    if args.worker:
        impl, model, data = args.worker
        result = (reference_worker(mmrec, NAMES[model], args.epochs + 1, Path(data)) if impl == "reference"
                  else ours_worker(model, args.epochs + 1, Path(data)))
        print(json.dumps(result))
        return
    if not (mmrec / "src" / "utils" / "quick_start.py").is_file():
        ap.error(f"--mmrec {args.mmrec}: no src/utils/quick_start.py there; pass the root of an MMRec checkout")
    source = DATA / "lfm2k.inter" if args.data == "lastfm" else BABY / "train.json"
    if not source.is_file():
        sys.exit(f"{source.parent} is absent: this benchmark needs ../shared/datasets beside the repository")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(NAMES))
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {', '.join(NAMES)}")
    dataset = "Last.fm-2K" if args.data == "lastfm" else "Amazon Baby"
    print(f"{dataset}, 1 thread, {args.epochs} timed epochs after 1 warm-up, {args.rounds} round(s); "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| model | round | ours s/epoch train + eval | reference s/epoch train + eval | ratio | ours / reference "
          "peak RSS MiB |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_data(Path(tmp), args.data)
        for model in models:
            for rnd in range(1, args.rounds + 1):
                common = ["--mmrec", str(mmrec), "--epochs", str(args.epochs), "--worker"]
                ours = measure(sys.executable, [*common, "ours", model, str(staged)])
                ref = measure(args.reference_python, [*common, "reference", model, str(staged)])
                o_t, o_e = (statistics.median(ours[k][1:]) for k in ("train_all", "eval_all"))
                r_t, r_e = (statistics.median(ref[k][1:]) for k in ("train_all", "eval_all"))
                print(f"| {model} | {rnd} | {o_t:.2f} + {o_e:.2f} | {r_t:.2f} + {r_e:.2f} | "
                      f"{(o_t + o_e) / (r_t + r_e):.2f} | {ours['rss_mib']:.0f} / {ref['rss_mib']:.0f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
