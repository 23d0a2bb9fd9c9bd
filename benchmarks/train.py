"""Training speed and memory: every backbone on Amazon Baby or Last.fm-2K; LightGCN and FREEDOM on
Amazon Baby also against a reference-style loop.

For each (model, implementation) one subprocess builds the model, runs one untimed warm-up
epoch, then ``--epochs`` timed epochs, each = one training pass (every interaction once,
batch 2048, one uniform negative per positive, one Adam step per batch) + one full-ranking
validation pass (all 7,050 items, training items masked, Recall/NDCG/Precision/MAP at
5/10/20/50). It prints the median seconds of the training pass and of the validation pass,
and its peak RSS (VmHWM). FREEDOM gets seeded random features of the benchmark's sizes
(4096-d image, 384-d text) for timing only (Amazon Baby ships no features here). ``--models``
takes any registered backbone (``all``: every one) for ``ours``, built with its config defaults;
``--data lastfm`` times them on Last.fm-2K with its real features.

- ``ours``: clearrec.models (CSR products with a precomputed transpose, the layer average
  fused into one autograd node, vectorised sampling and metrics, fused Adam).
- ``reference``: the code paths of the widely used research implementation, reproduced here
  for a same-run ratio: COO ``torch.sparse.mm`` per layer under autograd, ``torch.stack`` +
  ``mean``, negatives drawn in a Python loop, FREEDOM's feature projections over the whole
  item table in every batch, the propagation recomputed for every 4096-user evaluation batch,
  and hit lists / metrics built in Python per user. Same maths, same protocol.

By default the ``ours`` workers start with ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for PyTorch's CPU
allocations, which the ``clearrec`` command sets) and the reference workers without it, as the research
implementation runs; ``--thp on`` / ``--thp off`` gives both the same setting.

``--full`` instead trains LightGCN (3 layers, reg 1e-4, lr 1e-3, batch 2048, d 64, patience
20, up to 1000 epochs; ``--seeds``, default 999) through the real ingest + train stages in a
temporary work directory and prints the test metrics at the best-valid epoch, the epochs
and the time (and mean +- std over several seeds).

    .venv/bin/python benchmarks/train.py                 # speed + memory, ours and reference
    .venv/bin/python benchmarks/train.py --impls ours    # ours only
    .venv/bin/python benchmarks/train.py --threads 1,0,adaptive --busy 1   # a shared machine: one core kept busy
    .venv/bin/python benchmarks/train.py --models all --impls ours --threads 1 --data lastfm
    .venv/bin/python benchmarks/train.py --full --seeds 999,1,2   # full LightGCN runs (RESULTS.md)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "amazon-baby"
NUM_USERS, NUM_ITEMS, KS = 19_445, 7_050, (5, 10, 20, 50)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = json.loads((DATA / name).read_text())
    users = [int(u) for u, items in d.items() for _ in items]
    items = [i for its in d.values() for i in its]
    return torch.tensor(users), torch.tensor(items)


def features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_ITEMS, 4096, generator=g).abs_(), torch.randn(NUM_ITEMS, 384, generator=g)


# ---- ours ------------------------------------------------------------------------------------
def _dataset(name: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], int, int]:
    """``(train / valid / test (users, items), features, num_users, num_items)`` of ``--data``.

    amazon-baby: its interactions and seeded random features of the benchmark's sizes (4096-d
    image, 384-d text; timing only); lastfm: Last.fm-2K's published split and its real features
    (VGGish audio, MiniLM text), as ``benchmarks/fidelity_lastfm.py`` loads them.
    """
    if name == "lastfm":
        sys.path.insert(0, str(REPO / "benchmarks"))
        import fidelity_lastfm

        pairs, feats, nu, ni = fidelity_lastfm.load()
        return [(p[0], p[1]) for p in pairs], {"audio": feats["image"], "text": feats["text"]}, nu, ni
    image, text = features()
    return ([load_split(f) for f in ("train.json", "val.json", "test.json")], {"image": image, "text": text},
            NUM_USERS, NUM_ITEMS)


def run_ours(model_name: str, epochs: int, after_epoch=None, data: str = "amazon-baby") -> dict:
    """Any registered backbone, built as the train stage builds it (``build_backbone``) with its
    config defaults (``[train.<name>]``) and ``train.embedding_size``."""
    import inspect

    from clearrec.models.metrics import ItemSets
    from clearrec.models.registry import backbone_class
    from clearrec.models.trainer import TrainOptions, fit
    from clearrec.pipeline.config.train import TrainConfig
    from clearrec.stages.train import TrainData, build_backbone

    splits, feats, nu, ni = _dataset(data)
    train, valid, test = (ItemSets.from_pairs(u, i, nu, ni) for u, i in splits)
    cfg = TrainConfig()
    settings = getattr(cfg, model_name).model_dump()
    if "embedding_dim" in inspect.signature(backbone_class(model_name)).parameters:
        settings = {"embedding_dim": cfg.embedding_size, **settings}
    tensors = TrainData([""] * nu, [""] * ni, {"train": train, "valid": valid, "test": test}, feats, {})
    torch.manual_seed(999)
    model = build_backbone(model_name, settings, tensors)
    del feats, tensors
    cpu = [time.process_time()]
    result = fit(model, train, valid, test, TrainOptions(epochs=epochs + 1, patience=10_000),
                 on_epoch=lambda r: (cpu.append(time.process_time()), after_epoch and after_epoch()))
    timed = result.history[1:] or result.history  # a model without training has one epoch
    return {"train_s": [r.train_seconds for r in timed], "eval_s": [r.eval_seconds for r in timed],
            "cpu_s": [b - a for a, b in itertools.pairwise(cpu[1:])] or [cpu[-1] - cpu[0]],
            "valid_recall@20": timed[-1].valid["recall@20"]}


# ---- reference-style ---------------------------------------------------------------------------
def _coo_norm_adj(users: np.ndarray, items: np.ndarray, nu: int, ni: int) -> torch.Tensor:
    rows = np.concatenate([users, items + nu])
    cols = np.concatenate([items + nu, users])
    deg = np.bincount(rows, minlength=nu + ni).astype(np.float32) + 1e-7
    vals = (deg[rows] ** -0.5) * (deg[cols] ** -0.5)
    return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), (nu + ni, nu + ni))


class RefLightGCN(torch.nn.Module):
    def __init__(self, users: np.ndarray, items: np.ndarray, layers: int = 3, reg: float = 1e-4):
        super().__init__()
        self.user_embedding = torch.nn.Embedding(NUM_USERS, 64)
        self.item_embedding = torch.nn.Embedding(NUM_ITEMS, 64)
        torch.nn.init.xavier_uniform_(self.user_embedding.weight)
        torch.nn.init.xavier_uniform_(self.item_embedding.weight)
        self.adj, self.layers, self.reg = _coo_norm_adj(users, items, NUM_USERS, NUM_ITEMS), layers, reg

    def pre_epoch(self) -> None:
        pass

    def forward(self, adj=None):
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        outs = [x]
        for _ in range(self.layers):
            x = torch.sparse.mm(self.adj, x)
            outs.append(x)
        out = torch.stack(outs, dim=1).mean(dim=1)
        return torch.split(out, [NUM_USERS, NUM_ITEMS])

    def loss(self, users, pos, neg):
        u_all, i_all = self.forward()
        u, p, n = u_all[users], i_all[pos], i_all[neg]
        mf = -torch.log(1e-10 + torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
        ego = [self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg)]
        return mf + self.reg * sum(torch.norm(e, p=2) for e in ego) / ego[-1].shape[0]

    def scores(self, users):
        u, i = self.forward()
        return u[users] @ i.T


class RefFREEDOM(torch.nn.Module):
    def __init__(self, users: np.ndarray, items: np.ndarray, knn_k=10, image_weight=0.1, dropout=0.8, reg_weight=1e-4):
        super().__init__()
        self.user_embedding = torch.nn.Embedding(NUM_USERS, 64)
        self.item_id_embedding = torch.nn.Embedding(NUM_ITEMS, 64)
        torch.nn.init.xavier_uniform_(self.user_embedding.weight)
        torch.nn.init.xavier_uniform_(self.item_id_embedding.weight)
        image, text = features()
        self.image_embedding = torch.nn.Embedding.from_pretrained(image, freeze=False)
        self.text_embedding = torch.nn.Embedding.from_pretrained(text, freeze=False)
        self.image_trs, self.text_trs = torch.nn.Linear(4096, 64), torch.nn.Linear(384, 64)
        adjs = [self._knn(f, knn_k) for f in (image, text)]
        self.mm_adj = image_weight * adjs[0] + (1.0 - image_weight) * adjs[1]
        self.norm_adj = _coo_norm_adj(users, items, NUM_USERS, NUM_ITEMS)
        self.edges = torch.from_numpy(np.stack([users, items]))
        self.edge_values = self._norm_values(self.edges)
        self.dropout, self.reg_weight, self.masked_adj = dropout, reg_weight, None

    @staticmethod
    def _knn(x, k):
        xn = x / x.norm(dim=-1, keepdim=True)
        sim = xn @ xn.T
        _, idx = sim.topk(k, dim=-1)
        rows = torch.arange(idx.shape[0]).unsqueeze(1).expand(-1, k).flatten()
        ind = torch.stack([rows, idx.flatten()])
        adj = torch.sparse_coo_tensor(ind, torch.ones(ind.shape[1]), sim.shape)
        d = (1e-7 + torch.sparse.sum(adj, -1).to_dense()) ** -0.5
        return torch.sparse_coo_tensor(ind, d[ind[0]] * d[ind[1]], sim.shape)

    @staticmethod
    def _norm_values(ind):
        adj = torch.sparse_coo_tensor(ind, torch.ones(ind.shape[1]), (NUM_USERS, NUM_ITEMS))
        r = (1e-7 + torch.sparse.sum(adj, -1).to_dense()) ** -0.5
        c = (1e-7 + torch.sparse.sum(adj.t(), -1).to_dense()) ** -0.5
        return r[ind[0]] * c[ind[1]]

    def pre_epoch(self) -> None:
        keep = torch.multinomial(self.edge_values, int(self.edge_values.numel() * (1.0 - self.dropout)))
        ind = self.edges[:, keep].clone()
        vals = self._norm_values(ind)
        ind[1] += NUM_USERS
        self.masked_adj = torch.sparse_coo_tensor(torch.cat([ind, ind.flip(0)], 1), torch.cat([vals, vals]),
                                                  self.norm_adj.shape)

    def forward(self, adj=None):
        h = torch.sparse.mm(self.mm_adj, self.item_id_embedding.weight)
        x = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight])
        outs = [x]
        for _ in range(2):
            x = torch.sparse.mm(adj if adj is not None else self.masked_adj, x)
            outs.append(x)
        u, i = torch.split(torch.stack(outs, dim=1).mean(dim=1), [NUM_USERS, NUM_ITEMS])
        return u, i + h

    def loss(self, users, pos, neg):
        u_all, i_all = self.forward()
        u = u_all[users]

        def bpr(a, b):
            return -torch.nn.functional.logsigmoid((u * a).sum(1) - (u * b).sum(1)).mean()

        t = self.text_trs(self.text_embedding.weight)
        v = self.image_trs(self.image_embedding.weight)
        return bpr(i_all[pos], i_all[neg]) + self.reg_weight * (bpr(t[pos], t[neg]) + bpr(v[pos], v[neg]))

    def scores(self, users):
        u, i = self.forward(self.norm_adj)
        return u[users] @ i.T


def _ref_metrics(topk: np.ndarray, truth: list[list[int]]) -> dict[str, float]:
    """Hit lists and metrics per user in Python / numpy, as the reference evaluator."""
    hits = np.asarray([[i in t for i in row] for row, t in zip(topk, truth)])
    n_rel = np.asarray([len(t) for t in truth])
    k_max = hits.shape[1]
    recall = np.cumsum(hits, 1) / n_rel[:, None]
    ranks = np.arange(1, k_max + 1)
    dcg = np.cumsum(np.where(hits, 1.0 / np.log2(ranks + 1), 0), 1)
    idcg = np.cumsum(1.0 / np.log2(ranks + 1))[None, :].repeat(len(hits), 0)
    for row, n in enumerate(np.minimum(n_rel, k_max)):
        idcg[row, n:] = idcg[row, n - 1]
    pre = np.cumsum(hits, 1) / ranks
    sum_pre = np.cumsum(pre * hits, 1)
    ap = np.zeros_like(sum_pre)
    for row, n in enumerate(np.minimum(n_rel, k_max)):
        r = ranks.copy()
        r[n:] = r[n - 1]
        ap[row] = sum_pre[row] / r
    table = {"recall": recall.mean(0), "ndcg": (dcg / idcg).mean(0), "precision": pre.mean(0), "map": ap.mean(0)}
    return {f"{m}@{k}": float(v[k - 1]) for m, v in table.items() for k in KS}


def run_reference(model_name: str, epochs: int) -> dict:
    (tu, ti), (vu, vi) = load_split("train.json"), load_split("val.json")
    users_np, items_np = tu.numpy(), ti.numpy()
    history: dict[int, set[int]] = {}
    for u, i in zip(users_np.tolist(), items_np.tolist()):
        history.setdefault(u, set()).add(i)
    truth: dict[int, list[int]] = {}
    for u, i in zip(vu.tolist(), vi.tolist()):
        truth.setdefault(u, []).append(i)
    eval_users = sorted(truth)
    torch.manual_seed(999)
    random.seed(999)
    model = RefLightGCN(users_np, items_np) if model_name == "lightgcn" else RefFREEDOM(users_np, items_np)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_s, eval_s, cpu_s, recall = [], [], [], 0.0
    for epoch in range(epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        model.pre_epoch()
        order = torch.randperm(len(users_np))
        for start in range(0, len(order), 2048):
            idx = order[start : start + 2048]
            bu, bp = tu[idx], ti[idx]
            neg = []
            for u in bu.tolist():
                j = random.randrange(NUM_ITEMS)
                while j in history[u]:
                    j = random.randrange(NUM_ITEMS)
                neg.append(j)
            loss = model.loss(bu, bp, torch.tensor(neg))
            if torch.isnan(loss):
                raise RuntimeError("nan loss")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
        t1 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            tops = []
            for start in range(0, len(eval_users), 4096):
                batch = eval_users[start : start + 4096]
                scores = model.scores(torch.tensor(batch))
                rows = [r for r, u in enumerate(batch) for _ in history[u]]
                cols = [i for u in batch for i in history[u]]
                scores[rows, cols] = -1e10
                tops.append(torch.topk(scores, max(KS), dim=-1).indices)
            metrics = _ref_metrics(torch.cat(tops).numpy(), [truth[u] for u in eval_users])
        if epoch > 0:
            train_s.append(t1 - t0)
            eval_s.append(time.perf_counter() - t1)
            cpu_s.append(time.process_time() - c0)
            recall = metrics["recall@20"]
    return {"train_s": train_s, "eval_s": eval_s, "cpu_s": cpu_s, "valid_recall@20": recall}


# ---- driver ------------------------------------------------------------------------------------
def worker(model_name: str, impl: str, epochs: int, threads: str, data: str) -> None:
    """One measurement; ``threads``: a count, "0" (torch's default: every core) or "adaptive"
    (ours only: the train stage's default, :class:`ThreadGovernor` updated after every epoch)."""
    if threads == "adaptive":
        from clearrec.pipeline.threads import adaptive_torch_threads

        counts: list[int] = []
        with adaptive_torch_threads() as governor:
            out = run_ours(model_name, epochs, lambda: (counts.append(torch.get_num_threads()), governor.update()), data)
        out["threads"] = "adaptive " + "/".join(map(str, counts))
    else:
        if int(threads):
            torch.set_num_threads(int(threads))
        out = run_ours(model_name, epochs, data=data) if impl == "ours" else run_reference(model_name, epochs)
        out["threads"] = torch.get_num_threads()
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


def full_run(threads: int, seeds: list[int]) -> None:
    from clearrec.pipeline.config import Config
    from clearrec.pipeline.stage import StageContext
    from clearrec.pipeline.store import ArtifactStore
    from clearrec.stages import ingest, train
    from rich.console import Console

    console = Console()
    base = {"ingest.format": "split-json", "ingest.interactions": str(DATA), "ingest.split": "given",
            "train.backbone": "lightgcn", "train.lightgcn.layers": 3, "train.lightgcn.reg": 1e-4,
            "train.lr": 1e-3, "train.batch_size": 2048, "train.embedding_size": 64,
            "train.epochs": 1000, "train.patience": 20, "train.threads": threads}
    console.print(f"load average at start {os.getloadavg()}; torch threads {threads or torch.get_num_threads()}")
    tests = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            cfg = Config().with_overrides({**base, "train.seed": seed})
            store = ArtifactStore(Path(tmp) / f"seed{seed}")
            ingest.run(StageContext(store, cfg, console))
            t0 = time.perf_counter()
            result = train.run(StageContext(store, cfg, console))
            seconds = time.perf_counter() - t0
            metrics = store.read_json("model/metrics.json")
            hist = metrics["history"]
            console.print(result.summary)
            console.print(f"seed {seed}: epochs run {metrics['epochs_run']}, best epoch {metrics['best_epoch']}, "
                          f"train stage {seconds:.0f} s (mean {statistics.mean(h['train_seconds'] for h in hist):.2f} s "
                          f"training + {statistics.mean(h['eval_seconds'] for h in hist):.2f} s validation per epoch); "
                          f"load average now {os.getloadavg()}")
            console.print(f"seed {seed} test @best: " + ", ".join(
                f"{k} {metrics['test'][k]:.4f}" for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")))
            tests.append(metrics["test"])
    if len(tests) > 1:
        console.print("mean +- sample std over seeds " + ", ".join(map(str, seeds)) + ": " + ", ".join(
            f"{k} {statistics.mean(t[k] for t in tests):.4f} +- {statistics.stdev(t[k] for t in tests):.4f}"
            for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--models", default="lightgcn,freedom",
                    help="comma-separated backbones (any registered one for ours; the reference-style loops exist for "
                         "lightgcn and freedom only), or 'all'")
    ap.add_argument("--data", choices=("amazon-baby", "lastfm"), default="amazon-baby",
                    help="amazon-baby (seeded random 4096-d / 384-d features) or lastfm (Last.fm-2K, real features)")
    ap.add_argument("--impls", default="ours,reference")
    ap.add_argument("--threads", default="0",
                    help="comma-separated torch thread settings, each measured: a count, 0 (torch's default, all "
                         "cores) or 'adaptive' (ours only: the train stage's default, threads = the CPUs other "
                         "processes leave free, updated after every epoch); --full: one count")
    ap.add_argument("--busy", type=int, default=0,
                    help="start this many busy processes (one core each) for the whole measurement: a shared machine")
    ap.add_argument("--thp", choices=("cli", "on", "off"), default="cli",
                    help="THP_MEM_ALLOC_ENABLE in the workers: 'cli' = on for ours (as the clearrec command sets it) "
                         "and off for the reference, or 'on' / 'off' for both")
    ap.add_argument("--full", action="store_true", help="full LightGCN run through the stages instead")
    ap.add_argument("--seeds", default="999", help="--full: comma-separated train.seed values")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (DATA / "train.json").is_file():
        sys.exit(f"{DATA} is absent (it ships in ../shared beside the repo)")
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.epochs, args.threads, args.data)
    if args.full:
        return full_run(int(args.threads), [int(x) for x in args.seeds.split(",")])
    spin = f"import os\nwhile os.getppid() == {os.getpid()}: pass"  # ends with this process, however it ends
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
    try:
        measure(args)
    finally:
        for p in busy:
            p.kill()


def measure(args: argparse.Namespace) -> None:
    from clearrec.pipeline.experiments import backbone_names

    data = "Amazon Baby" if args.data == "amazon-baby" else "Last.fm-2K"
    print(f"{data}; {os.cpu_count()} CPUs; {args.busy} busy process(es); load average at start {os.getloadavg()}",
          flush=True)
    rows = {}
    settings = args.threads.split(",")
    models = backbone_names() if args.models == "all" else args.models.split(",")
    for model_name in models:
        for impl, threads in itertools.product(args.impls.split(","), settings):
            if (threads == "adaptive" or model_name not in ("lightgcn", "freedom") or args.data != "amazon-baby") \
                    and impl != "ours":
                continue
            thp = args.thp == "on" or (args.thp == "cli" and impl == "ours")
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if thp else "0"}
            proc = subprocess.run([sys.executable, __file__, "--worker", model_name, impl, "--epochs", str(args.epochs),
                                   "--threads", threads, "--data", args.data], capture_output=True, text=True,
                                  check=False, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{model_name}/{impl} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            rows[model_name, impl, threads] = r
            tr, ev = statistics.median(r["train_s"]), statistics.median(r["eval_s"])
            print(f"{model_name:9s} {impl:9s} THP {'on ' if thp else 'off'} train {tr:6.2f} s/epoch  validation {ev:5.2f} s  total {tr + ev:6.2f} s  "
                  f"CPU {statistics.median(r['cpu_s']):6.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  threads {r['threads']}  "
                  f"valid recall@20 after {args.epochs + 1} epochs {r['valid_recall@20']:.4f}  "
                  f"(train epochs {[round(x, 2) for x in r['train_s']]}, validation {[round(x, 2) for x in r['eval_s']]})",
                  flush=True)
    tot = lambda r: statistics.median(r["train_s"]) + statistics.median(r["eval_s"])
    for model_name, threads in itertools.product(models, settings):
        if threads != "1" and (model_name, "ours", threads) in rows and (model_name, "ours", "1") in rows:
            print(f"{model_name}: ours, threads {threads} / threads 1, time per epoch = "
                  f"{tot(rows[model_name, 'ours', threads]) / tot(rows[model_name, 'ours', '1']):.3f}")
        for ref in settings:
            if (model_name, "ours", threads) not in rows or (model_name, "reference", ref) not in rows:
                continue
            o, f = rows[model_name, "ours", threads], rows[model_name, "reference", ref]
            print(f"{model_name}: ours (threads {threads}) / reference (threads {ref}) time per epoch (train + validation) = {tot(o) / tot(f):.3f}; "
                  f"train {statistics.median(o['train_s']) / statistics.median(f['train_s']):.3f}, "
                  f"validation {statistics.median(o['eval_s']) / statistics.median(f['eval_s']):.3f}; "
                  f"CPU time {statistics.median(o['cpu_s']) / statistics.median(f['cpu_s']):.3f}; "
                  f"peak RSS {o['peak_rss_mb'] / f['peak_rss_mb']:.3f}")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
