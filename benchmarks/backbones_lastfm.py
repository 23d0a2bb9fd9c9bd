"""Fidelity of LATTICE, MGCN and SMORE on Last.fm-2K under the reference implementation's settings.

Reads MMRec's layout of the dataset (``../shared/datasets/lastfm-2k/mmrec``: ``lfm2k.inter`` with
its ``x_label`` split, MiniLM text features as ``text``, VGGish audio as float32 as ``image``:
MMRec's ``t_feat`` / ``v_feat`` slots), trains each backbone through ``models`` and
``models.trainer`` directly (embedding 64, batch 2048, patience 20 on valid Recall@20, Adam with
the learning rate the reference uses, the first value of each grid in the model's yaml) and
prints, per backbone, the best-valid epoch, the epochs run, valid Recall@20, test
Recall/NDCG@10/20 at that epoch and the median seconds per epoch (training, validation).
The reference's learning-rate decay (``0.96 ** (epoch / 50)``) is not applied: our trainer has
a constant learning rate.

    nice .venv/bin/python benchmarks/backbones_lastfm.py --threads 1 --seed 999
    nice .venv/bin/python benchmarks/backbones_lastfm.py --models mgcn --seed 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clearrec.models.lattice import LATTICE
from clearrec.models.metrics import ItemSets
from clearrec.models.mgcn import MGCN
from clearrec.models.smore import SMORE
from clearrec.models.trainer import TrainOptions, fit

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "lastfm-2k" / "mmrec"

# the reference's settings on this dataset (MMRec yaml, first grid values) and its learning rate
SETTINGS = {
    "lattice": (LATTICE, {"reg_weight": 0.0}, 1e-4),
    "mgcn": (MGCN, {"cl_weight": 1e-3}, 1e-3),
    "smore": (SMORE, {"layers": 3, "knn_k": 10, "reg_weight": 1e-5, "dropout": 0.0}, 1e-3),
}


def load() -> tuple[int, int, list[ItemSets], dict[str, torch.Tensor], torch.Tensor]:
    """Users, items, the train / valid / test ItemSets, the features and the (2, E) training pairs."""
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark needs the shared Last.fm-2K dataset")
    rows = np.loadtxt(DATA / "lfm2k.inter", dtype=np.int64, skiprows=1, usecols=(0, 1, 3))
    users, items, split = (torch.from_numpy(rows[:, j].copy()) for j in range(3))
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    sets = [ItemSets.from_pairs(users[split == s], items[split == s], num_users, num_items) for s in range(3)]
    text = np.load(DATA / "all-MiniLM-L6-v2.npy", allow_pickle=False).astype(np.float32)
    audio = np.load(DATA / "vggish.npy", allow_pickle=False).astype(np.float32)
    if text.shape[0] != num_items or audio.shape[0] != num_items:
        sys.exit(f"feature rows {text.shape[0]} / {audio.shape[0]} != {num_items} items")
    features = {"image": torch.from_numpy(audio), "text": torch.from_numpy(text)}
    return num_users, num_items, sets, features, torch.stack([users[split == 0], items[split == 0]])


def _progress(name: str, every: int):
    def report(record) -> None:
        if record.epoch % every == 0:
            print(f"  {name} epoch {record.epoch}: loss {record.loss:.4f}, valid R@20 {record.valid['recall@20']:.4f}",
                  file=sys.stderr, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lattice,mgcn,smore", help="comma-separated backbones")
    parser.add_argument("--seed", type=int, default=999, help="seeds initialisation, sampling and shuffling")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--epochs", type=int, default=1000, help="most epochs")
    parser.add_argument("--every", type=int, default=10, help="print valid Recall@20 every this many epochs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_users, num_items, (train, valid, test), features, edges = load()
    print(f"Last.fm-2K: {num_users} users, {num_items} items, {edges.shape[1]} training pairs; "
          f"seed {args.seed}, {args.threads} thread(s)")
    for name in args.models.split(","):
        cls, params, lr = SETTINGS[name]
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        model = cls(num_users, num_items, edges, features=features, **params)
        build = time.perf_counter() - t0
        opts = TrainOptions(lr=lr, batch_size=2048, epochs=args.epochs, patience=20, seed=args.seed)
        res = fit(model, train, valid, test, opts, on_epoch=_progress(name, args.every))
        tr = statistics.median(r.train_seconds for r in res.history)
        ev = statistics.median(r.eval_seconds for r in res.history)
        t = res.test
        print(f"{name:8s} {params} lr {lr:g}: best epoch {res.best_epoch} / {len(res.history)}, "
              f"valid R@20 {res.valid['recall@20']:.4f}, test R@10 {t['recall@10']:.4f} R@20 {t['recall@20']:.4f} "
              f"N@10 {t['ndcg@10']:.4f} N@20 {t['ndcg@20']:.4f}; {tr:.2f} + {ev:.2f} s/epoch (build {build:.1f} s)",
              flush=True)


if __name__ == "__main__":
    main()
