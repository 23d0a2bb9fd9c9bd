"""Exact vs auto-chosen FAISS index on synthetic clustered item vectors (inner product).

For each catalog size: build time, index size, recall@K against exact search on held-out
queries (the knob is tuned on a separate half, as the index stage does), single-query
latency p50 / p99 with one OpenMP thread, and batch QPS with every thread, for the exact
index (``Flat``) and the index :func:`clearrec.models.ann.choose_factory` picks. All sizes
in one run, so the ratios compare like with like.

    .venv/bin/python benchmarks/index.py                       # 10k, 100k, 1M items, dim 64
    .venv/bin/python benchmarks/index.py --sizes 10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np

from clearrec.models import ann


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """(n, d) float32: a random centre plus Gaussian noise, with per-vector norms varying x0.5..1.5."""
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return (x * rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)).astype(np.float32)


def single_latency(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, queries/s) of one-query searches, one OpenMP thread."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for q in queries[:10]:
            index.search(q[None], k)  # warm-up
        times = []
        for q in queries:
            t0 = time.perf_counter()
            index.search(q[None], k)
            times.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(before)
    t = np.array(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99)), float(len(t) / (t.sum() / 1e3))


def batch_qps(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    t0 = time.perf_counter()
    index.search(queries, k)
    return len(queries) / (time.perf_counter() - t0)


def measure(n: int, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    d, k = args.dim, args.k
    centres = rng.standard_normal((max(16, n // 1000), d)).astype(np.float32)
    items = clustered(n, d, centres, rng, args.spread)  # (n, d)
    queries = clustered(args.queries, d, centres, rng, args.spread)  # held-out "user" vectors
    tune_q, eval_q = queries[: len(queries) // 2], queries[len(queries) // 2 :]
    t0 = time.perf_counter()
    exact_tune = ann.exact_search(items, tune_q, k)[1]
    exact_eval = ann.exact_search(items, eval_q, k)[1]
    truth_s = time.perf_counter() - t0
    single_q = clustered(args.single, d, centres, rng, args.spread)
    rows = []
    auto = ann.choose_factory(n, d, args.memory_budget_mb * 2**20, args.exact_max_items, args.hnsw_m)
    for label, factory in (("exact", "Flat"), ("auto", auto)):
        t0 = time.perf_counter()
        index = ann.build_index(items, factory, ef_construction=args.ef_construction, seed=0)
        build_s = time.perf_counter() - t0
        tuning = ann.tune(index, [(tune_q, exact_tune)], k, args.recall_target)
        ann.set_default(index, tuning.knob, tuning.value)
        recall = ann.recall_at_k(ann.search(index, eval_q, k)[1], exact_eval, k)
        n_single = len(single_q) if factory != "Flat" or n <= 100_000 else min(len(single_q), 300)
        p50, p99, qps1 = single_latency(index, single_q[:n_single], k)
        qps = batch_qps(index, single_q, k)
        size = len(faiss.serialize_index(index))
        rows.append({"items": n, "index": label, "factory": factory, "knob": tuning.knob, "value": tuning.value,
                     "build_s": build_s, "size_mb": size / 2**20, "recall": recall, "p50_ms": p50, "p99_ms": p99,
                     "single_qps": qps1, "batch_qps": qps, "truth_s": truth_s})
        print(_line(rows[-1]), flush=True)
        del index
    rows[1]["single_speedup"] = rows[1]["single_qps"] / rows[0]["single_qps"]
    print(f"  -> {auto} vs exact at {n} items: {rows[1]['single_speedup']:.1f}x single-query throughput, "
          f"recall@{k} {rows[1]['recall']:.3f}", flush=True)
    return rows


def _line(r: dict) -> str:
    knob = f"{r['knob']}={r['value']}" if r["knob"] else "-"
    return (f"{r['items']:>9,} {r['index']:<5} {r['factory']:<14} {knob:<14} build {r['build_s']:7.1f}s "
            f"size {r['size_mb']:7.1f} MiB  recall@20 {r['recall']:.3f}  p50 {r['p50_ms']:7.3f} ms  "
            f"p99 {r['p99_ms']:7.3f} ms  1-query {r['single_qps']:8.0f}/s  batch {r['batch_qps']:8.0f}/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--queries", type=int, default=500, help="held-out queries: half tune, half measure recall")
    p.add_argument("--single", type=int, default=2000, help="queries for latency and batch QPS")
    p.add_argument("--spread", type=float, default=0.6, help="noise around the cluster centres")
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--memory-budget-mb", type=int, default=2048)
    p.add_argument("--exact-max-items", type=int, default=50_000)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads for batch; load average {os.getloadavg()}")
    rng = np.random.default_rng(0)
    rows = [r for n in (int(s) for s in args.sizes.split(",")) for r in measure(n, args, rng)]
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
