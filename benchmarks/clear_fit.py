"""CLEAR fit + transform streamed from Parquet, against the bare matrix products it needs.

For each N, synthetic image (dv) and text (dt) features are written to Parquet in chunks
(zstd, one row group per chunk, like the encode stage's files) in a temporary folder, then
timed in one subprocess that, after one untimed warm-up pass, alternates ``--repeat`` times
(the minimum is kept):

- bare fit: one pass of ``acc += Xv^T Xt`` over the chunks (the product CLEAR's fit needs);
- CLEAR fit: ``ClearProjector.partial_fit`` over the chunks + ``finalize`` (SVD, also shown alone);
- bare transform: one pass of ``X - lam * (X U) U^T`` per modality;
- CLEAR transform: one pass of ``transform_visual`` / ``transform_text``.

All passes read the same files with the same reader (``ParquetFile.iter_batches`` +
``arrow_to_vectors``); transformed chunks are discarded (the stage writes them). Peak memory
is the VmHWM of a separate subprocess per kind (bare / CLEAR fit + transform). The data files
are deleted after each N.

    .venv/bin/python benchmarks/clear_fit.py                      # N = 10k, 100k, 1M
    .venv/bin/python benchmarks/clear_fit.py --sizes 10000 50000  # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def generate(folder: Path, n: int, dv: int, dt: int, chunk: int, seed: int = 0) -> float:
    """Write image.parquet and text.parquet with n rows (shared 16-dim latent + noise); returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    Av, At = rng.standard_normal((16, dv)).astype(np.float32), rng.standard_normal((16, dt)).astype(np.float32)
    writers = {}
    for name, d in (("image", dv), ("text", dt)):
        schema = pa.schema([("item_idx", pa.int64()), ("vector", pa.list_(pa.float32(), d))])
        writers[name] = pq.ParquetWriter(folder / f"{name}.parquet", schema, compression="zstd")
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = rng.standard_normal((m, 16), dtype=np.float32)
        for name, A in (("image", Av), ("text", At)):
            x = z @ A + rng.standard_normal((m, A.shape[1]), dtype=np.float32)  # (m, d)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), A.shape[1])
            idx = pa.array(np.arange(lo, lo + m), pa.int64())
            writers[name].write_table(pa.table({"item_idx": idx, "vector": vec}), row_group_size=chunk)
    for w in writers.values():
        w.close()
    return time.perf_counter() - t0


def chunks(folder: Path, chunk: int):
    from clearrec.pipeline.store import arrow_to_vectors

    opts = {"pre_buffer": False, "buffer_size": 8 << 20}  # as the project stage reads
    fv, ft = pq.ParquetFile(folder / "image.parquet", **opts), pq.ParquetFile(folder / "text.parquet", **opts)
    for bv, bt in zip(fv.iter_batches(batch_size=chunk, columns=["vector"]),
                      ft.iter_batches(batch_size=chunk, columns=["vector"])):
        yield arrow_to_vectors(bv.column(0))[0], arrow_to_vectors(bt.column(0))[0]  # (m, dv), (m, dt) float32


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def bare_fit(folder: Path, chunk: int) -> np.ndarray:
    acc = None
    for xv, xt in chunks(folder, chunk):
        prod = xv.T @ xt  # (dv, dt)
        acc = prod if acc is None else acc + prod
    return acc


def bare_transform(folder: Path, chunk: int, U: np.ndarray, W: np.ndarray) -> None:
    for xv, xt in chunks(folder, chunk):
        _ = xv - ((xv @ U) * 1.0) @ U.T  # (m, dv)
        _ = xt - ((xt @ W) * 1.0) @ W.T  # (m, dt)


def clear_fit(folder: Path, chunk: int, k: int):
    from clearrec.models.clear import ClearOptions, ClearProjector

    proj = ClearProjector(ClearOptions(k=k))
    for xv, xt in chunks(folder, chunk):
        proj.partial_fit(xv, xt)
    t0 = time.perf_counter()
    proj.finalize()  # the SVD of the (dv, dt) cross-covariance: a fixed cost, independent of N
    return proj, time.perf_counter() - t0


def clear_transform(folder: Path, chunk: int, proj) -> None:
    for xv, xt in chunks(folder, chunk):
        _ = proj.transform_visual(xv)
        _ = proj.transform_text(xt)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def worker(mode: str, folder: Path, chunk: int, k: int, repeat: int) -> dict:
    """``time``: bare and CLEAR passes alternated ``repeat`` times (minimum kept); ``rss-*``: one kind only."""
    from clearrec.models.clear import random_orthonormal

    rng = np.random.default_rng(0)
    if mode == "rss-bare":
        acc = bare_fit(folder, chunk)
        bare_transform(folder, chunk, random_orthonormal(acc.shape[0], k, rng).astype(np.float32),
                       random_orthonormal(acc.shape[1], k, rng).astype(np.float32))
        return {"peak_rss_mb": peak_rss_mb()}
    if mode == "rss-clear":
        clear_transform(folder, chunk, clear_fit(folder, chunk, k)[0])
        return {"peak_rss_mb": peak_rss_mb()}
    times: dict[str, list[float]] = {"bare_fit": [], "clear_fit": [], "clear_svd": [], "bare_transform": [],
                                     "clear_transform": []}
    bare_fit(folder, chunk)  # warm-up (page cache, BLAS threads), not timed
    for _ in range(repeat):
        t, acc = timed(bare_fit, folder, chunk)
        times["bare_fit"].append(t)
        t, (proj, svd_s) = timed(clear_fit, folder, chunk, k)
        times["clear_fit"].append(t)
        times["clear_svd"].append(svd_s)
        U = random_orthonormal(acc.shape[0], k, rng).astype(np.float32)
        W = random_orthonormal(acc.shape[1], k, rng).astype(np.float32)
        times["bare_transform"].append(timed(bare_transform, folder, chunk, U, W)[0])
        times["clear_transform"].append(timed(clear_transform, folder, chunk, proj)[0])
    return {key: min(v) for key, v in times.items()}


def run_worker(mode: str, folder: Path, chunk: int, k: int, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--dir", str(folder), "--chunk-rows", str(chunk),
           "--k", str(k), "--repeat", str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dv", type=int, default=512)
    ap.add_argument("--dt", type=int, default=384)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=2, help="alternate bare/clear this many times; report the minimum")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the temporary Parquet files")
    ap.add_argument("--worker", choices=["time", "rss-bare", "rss-clear"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.chunk_rows, args.k, args.repeat)))
        return

    print(f"CLEAR fit + transform vs bare products: dv={args.dv} dt={args.dt} k={args.k} "
          f"chunk_rows={args.chunk_rows} repeat={args.repeat}")
    header = (f"{'N':>9} {'GB':>5} | {'bare fit':>8} {'CLEAR fit':>9} {'(SVD)':>6} {'ratio':>5} | {'bare tr':>7} {'CLEAR tr':>8} "
              f"{'ratio':>5} | {'total ratio':>11} | {'RSS bare MB':>11} {'RSS CLEAR MB':>12}")
    rows = []
    for n in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"clear_bench_{n}_", dir=args.tmp))
        try:
            gen_s = generate(folder, n, args.dv, args.dt, args.chunk_rows)
            gb = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
            t = run_worker("time", folder, args.chunk_rows, args.k, args.repeat)
            rss = {m: run_worker(f"rss-{m}", folder, args.chunk_rows, args.k, 1)["peak_rss_mb"] for m in ("bare", "clear")}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        bare, clear = t["bare_fit"] + t["bare_transform"], t["clear_fit"] + t["clear_transform"]
        row = {"n": n, "gb_on_disk": gb, "generate_s": gen_s, **t, "peak_rss_mb": rss,
               "fit_ratio": t["clear_fit"] / t["bare_fit"],
               "transform_ratio": t["clear_transform"] / t["bare_transform"], "total_ratio": clear / bare}
        rows.append(row)
        if len(rows) == 1:
            print(header)
        print(f"{n:>9} {gb:>5.2f} | {t['bare_fit']:>7.2f}s {t['clear_fit']:>8.2f}s {t['clear_svd']:>5.2f}s "
              f"{row['fit_ratio']:>5.2f} | "
              f"{t['bare_transform']:>6.2f}s {t['clear_transform']:>7.2f}s {row['transform_ratio']:>5.2f} | "
              f"{row['total_ratio']:>11.2f} | {rss['bare']:>11.0f} {rss['clear']:>12.0f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
