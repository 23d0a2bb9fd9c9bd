"""Encode stage throughput against the bare model, and the stage's peak memory as the catalog grows.

Throughput (one fresh process per modality; bare and stage alternate ``repeat`` times and each keeps
its fastest pass, the one least disturbed by other load on a shared machine), as items per wall
second and per CPU-second of the whole process (every thread: decoding included):

- text: all-MiniLM-L6-v2 on synthetic product titles + descriptions. Bare = the model's forward
  pass alone on texts tokenised beforehand, in the same batches the stage forms (batch_size,
  longest first within each shard). Stage = the encode stage's work for the modality with the
  encoder already loaded: read items.parquet, plan shards, hash, tokenise, encode, write the
  shard file + marker, assemble features/text.parquet.
- image: open_clip ViT-S-32 at 224 px with random weights (``open_clip-untrained:ViT-S-32?seed=0``)
  on synthetic 256x256 JPEG files. Bare = ``encode_image`` on one pre-made (B, 3, 224, 224) tensor
  repeated; stage = the same work as above plus reading, hashing, decoding and preprocessing
  every file on ``num_workers`` threads.

Memory: the whole stage (``Runner``, encoder load included) in a fresh subprocess per catalog
size, text only, with a 1-layer BERT sentence-transformers model built offline by the tests' fixture (the model is not
what is measured: the stage's own buffers are); the child imports the libraries and loads the
encoder once, prints VmRSS, runs the stage, then prints VmHWM (its peak RSS).

    .venv/bin/python benchmarks/encode.py                  # text 2048, images 1024, best of 3; memory 10k vs 100k
    .venv/bin/python benchmarks/encode.py --quick          # text 128, images 32, best of 2; memory 2k vs 20k
    .venv/bin/python benchmarks/encode.py --parts image    # one measurement only
    .venv/bin/python benchmarks/encode.py --parts profile --images 256   # CPU per image step, stage trace
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import tomli_w
from PIL import Image

WORDS = ("soft organic cotton bamboo wooden stainless glass silicone travel compact folding baby toddler kitchen "
         "garden classic modern handmade washable lightweight durable gift set pack blue red green natural").split()
NOUNS = "blanket bottle clock kite lamp mug stroller teether towel backpack puzzle rattle bowl spoon mat".split()


def texts_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        title = " ".join(rng.choice(WORDS, 3)) + " " + str(rng.choice(NOUNS))
        desc = ". ".join(" ".join(rng.choice(WORDS, int(rng.integers(5, 14)))) for _ in range(int(rng.integers(1, 4))))
        rows.append({"item_id": f"T{i:07d}", "title": title.title(), "description": desc.capitalize() + ".",
                     "image": None})
    return rows


def write_images(root: Path, n: int, seed: int = 0) -> list[dict]:
    """256x256 JPEGs: smooth gradients + a few rectangles (realistic size and decode cost)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    rows = []
    for i in range(n):
        c = rng.random((3, 3)).astype(np.float32)
        img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] for k in range(3)], axis=-1) * 160
        for _ in range(3):
            x0, y0 = rng.integers(0, 200, 2)
            img[y0:y0 + 56, x0:x0 + 56] = rng.random(3) * 255
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (root / "images" / f"i{i:06d}.jpg").write_bytes(buf.getvalue())
        rows.append({"item_id": f"I{i:06d}", "title": f"item {i}", "description": "", "image": f"images/i{i:06d}.jpg"})
    return rows


def write_items(workdir: Path, rows: list[dict], catalog_root: Path) -> None:
    from clearrec.pipeline.store import ArtifactStore

    cols = {k: [r[k] for r in rows] for k in ("item_id", "title", "description", "image")}
    table = pa.table({"item_idx": pa.array(np.arange(len(rows)), pa.int64()), **{k: pa.array(v, pa.string())
                      for k, v in cols.items()},
                      "text": pa.array([f"{t}. {d}" for t, d in zip(cols["title"], cols["description"])])})
    ArtifactStore(workdir).write_parquet("items.parquet", table, metadata={"catalog_root": str(catalog_root),
                                                                           "source": "benchmark"})


def make_config(folder: Path, image_encoder: str = "none", text_encoder: str = "none", **encode):
    """An ``[encode]`` section with an image and / or a text modality ("none": left out)."""
    from clearrec.pipeline.config import load_config

    tables = {m: {"encoder": e} for m, e in (("image", image_encoder), ("text", text_encoder)) if e != "none"}
    path = folder / "clearrec.toml"
    path.write_text(tomli_w.dumps({"encode": {**encode, "modalities": tables}}))
    return load_config(path)


def stage_run(modality: str, encoder, cfg, workdir: Path) -> None:
    """The stage's work for one modality with ``encoder`` already loaded."""
    from rich.console import Console

    from clearrec.pipeline.stage import StageContext
    from clearrec.pipeline.store import ArtifactStore
    from clearrec.stages import encode

    ctx = StageContext(ArtifactStore(workdir), cfg, Console(stderr=True, quiet=True))
    fields = ["title", "description"] if modality == "text" else []
    table = cfg.encode.modalities[modality]
    encode._encode(ctx, modality, table, encode.resolve_spec(table.encoder, cfg), encoder, fields)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of this process) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def paired(bare, stage, n: int, repeat: int) -> dict:
    """Alternate bare and stage ``repeat`` times; keep each one's fastest pass (least disturbed by other load).

    Wall time is what the target is about; CPU time (all threads, decoding included) is steadier on a
    loaded machine, where a process with more runnable threads also gets a larger share of the cores.
    """
    bare_t, stage_t = [], []
    for r in range(repeat):
        bare_t.append(timed(bare))
        stage_t.append(timed(lambda: stage(r)))
    bw, bc = min(t[0] for t in bare_t), min(t[1] for t in bare_t)
    sw, sc = min(t[0] for t in stage_t), min(t[1] for t in stage_t)
    return {"n": n, "repeat": repeat, "bare_items_s": n / bw, "stage_items_s": n / sw, "ratio": bw / sw,
            "bare_items_cpu_s": n / bc, "stage_items_cpu_s": n / sc, "cpu_ratio": bc / sc}


def bench_text(tmp: Path, n: int, batch: int, shard: int, threads: int, repeat: int) -> dict:
    import torch

    from clearrec.models.encoders import load_text_encoder
    from clearrec.models.text import apply_text_template

    rows = texts_rows(n)
    t0 = time.perf_counter()
    enc = load_text_encoder("all-MiniLM-L6-v2")
    load_s = time.perf_counter() - t0
    texts = [apply_text_template("{title}. {description}", r) for r in rows]
    batches = []  # the stage's batches: per shard, longest first, batch_size at a time
    for lo in range(0, n, shard):
        order = sorted(range(lo, min(lo + shard, n)), key=lambda i: (-len(texts[i]), i))
        batches += [enc.tokenize([texts[i] for i in order[b:b + batch]]) for b in range(0, len(order), batch)]

    def bare() -> None:
        with torch.inference_mode():
            for feats in batches:
                enc.model(feats)

    cfg = make_config(tmp, text_encoder="all-MiniLM-L6-v2", batch_size=batch, shard_size=shard, threads=threads)

    for r in range(repeat):  # a fresh work directory per pass: nothing cached
        write_items(tmp / f"w{r}", rows, tmp)

    def stage(r: int) -> None:
        stage_run("text", enc, cfg, tmp / f"w{r}")

    return {**paired(bare, stage, n, repeat), "batch": batch, "load_s": load_s}


def bench_images(tmp: Path, n: int, batch: int, shard: int, threads: int, workers: int, repeat: int) -> dict:
    import torch

    from clearrec.models.encoders import load_image_encoder

    rows = write_images(tmp / "catalog", n)
    spec = "open_clip-untrained:ViT-S-32?seed=0"
    enc = load_image_encoder(spec)
    x = torch.randn(batch, 3, *enc.image_size)
    full, rest = divmod(n, batch)

    def bare() -> None:
        with torch.inference_mode():
            for _ in range(full):
                enc.model.encode_image(x)
            if rest:
                enc.model.encode_image(x[:rest])

    cfg = make_config(tmp, image_encoder=spec, text_encoder="none", batch_size=batch, shard_size=shard,
                      threads=threads, num_workers=workers)

    for r in range(repeat):
        write_items(tmp / f"w{r}", rows, tmp / "catalog")

    def stage(r: int) -> None:
        stage_run("image", enc, cfg, tmp / f"w{r}")

    return {**paired(bare, stage, n, repeat), "batch": batch, "workers": workers}


def tiny_sentence_model(folder: Path) -> Path:
    """The tests' 1-layer BERT sentence-transformers folder (``tests/encode_fixtures.py``), 32 tokens max."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from encode_fixtures import tiny_sentence_dir

    return tiny_sentence_dir(folder, seed=0, max_seq_length=32)


def memory_child(config_path: str, workdir: str) -> None:
    """Run the whole stage once; print RSS before it (libraries imported) and the peak after (KiB)."""
    from rich.console import Console

    from clearrec.pipeline.config import load_config
    from clearrec.pipeline.runner import Runner
    from clearrec.stages import encode

    from clearrec.models.encoders import load_text_encoder

    cfg = load_config(config_path)
    load_text_encoder(cfg.encode.modalities["text"].encoder)  # imports sentence-transformers / transformers before measuring
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    Runner([encode.SPEC], cfg, workdir, console=Console(stderr=True, quiet=True)).run()
    print(json.dumps({"rss_before_kib": before, "peak_kib": _status_kib("VmHWM"), "seconds": time.perf_counter() - t0}))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def bench_memory(tmp: Path, sizes: list[int]) -> list[dict]:
    model = tiny_sentence_model(tmp / "tiny")
    out = []
    for n in sizes:
        folder = tmp / f"mem{n}"
        folder.mkdir()
        write_items(folder / "w", texts_rows(n, seed=1), folder)
        (folder / "clearrec.toml").write_text(tomli_w.dumps({"encode": {
            "modalities": {"text": {"encoder": str(model)}}, "batch_size": 256, "threads": 1}}))
        res = subprocess.run([sys.executable, __file__, "--memory-child", str(folder / "clearrec.toml"),
                              str(folder / "w")], capture_output=True, text=True, check=True)
        out.append({"n": n, **json.loads(res.stdout.strip().splitlines()[-1])})
    return out


def _rates(r: dict) -> str:
    return (f"bare model {r['bare_items_s']:.1f} items/s, stage {r['stage_items_s']:.1f} items/s, "
            f"ratio {r['ratio']:.2f}; per CPU-second: bare {r['bare_items_cpu_s']:.1f}, "
            f"stage {r['stage_items_cpu_s']:.1f}, ratio {r['cpu_ratio']:.2f}")


def bench_profile(tmp: Path, n: int, batch: int, shard: int, threads: int, workers: int) -> dict:
    """Where an image's time goes: CPU ms per image of each preparation step (one thread, every file
    once after a warm-up pass) and of the model, plus a trace of one stage pass (the time before the
    first model call, after the last, and between calls)."""
    import hashlib

    import torch

    from clearrec.models.encoders import load_image_encoder
    from clearrec.models.images import safe_open_image

    rows = write_images(tmp / "catalog", n)
    spec = "open_clip-untrained:ViT-S-32?seed=0"
    enc = load_image_encoder(spec)
    paths = [tmp / "catalog" / r["image"] for r in rows]

    def cpu_ms(fn, items) -> float:
        for it in items[:8]:
            fn(it)
        c = time.process_time()
        for it in items:
            fn(it)
        return (time.process_time() - c) / len(items) * 1000

    data = [p.read_bytes() for p in paths]
    images = [safe_open_image(d) for d in data]
    out = {
        "read + sha256": cpu_ms(lambda p: hashlib.sha256(p.read_bytes()).digest(), paths),
        "decode (safe_open_image)": cpu_ms(safe_open_image, data),
        "resize + crop (preprocess)": cpu_ms(enc.preprocess, images),
    }
    pixels = torch.stack([enc.preprocess(im) for im in images[:batch]])
    out["ToTensor + Normalize, batched"] = cpu_ms(lambda _: enc._to_model_input(pixels), list(range(10))) / batch
    x = enc._to_model_input(pixels)
    with torch.inference_mode():
        out["model forward"] = cpu_ms(lambda _: enc.model.encode_image(x), list(range(3))) / batch

    calls = []
    forward = enc.model.encode_image

    def traced(*a, **k):
        t0 = time.perf_counter()
        res = forward(*a, **k)
        calls.append((t0, time.perf_counter()))
        return res

    enc.model.encode_image = traced
    cfg = make_config(tmp, image_encoder=spec, text_encoder="none", batch_size=batch, shard_size=shard,
                      threads=threads, num_workers=workers)
    write_items(tmp / "w", rows, tmp / "catalog")
    t0 = time.perf_counter()
    stage_run("image", enc, cfg, tmp / "w")
    t1 = time.perf_counter()
    out["trace"] = {"total_s": t1 - t0, "model_s": sum(b - a for a, b in calls), "before_first_s": calls[0][0] - t0,
                    "after_last_s": t1 - calls[-1][1], "between_s": sum(calls[i + 1][0] - calls[i][1]
                                                                         for i in range(len(calls) - 1))}
    return out


def part_child(part: str, n: int, threads: int, workers: int, repeat: int) -> None:
    """One throughput measurement (``text`` or ``image``, ``n`` items) in this fresh process; prints one line."""
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="clearrec-bench-encode-") as d:
        if part == "profile":
            p = bench_profile(Path(d), n, batch=32, shard=1024, threads=threads, workers=workers)
            tr = p.pop("trace")
            print("image profile, CPU ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
            print(f"image stage trace, {n} images: total {tr['total_s']:.2f} s, model {tr['model_s']:.2f} s, "
                  f"before the first model call {tr['before_first_s']:.3f} s, after the last {tr['after_last_s']:.3f} s, "
                  f"between calls {tr['between_s']:.3f} s", flush=True)
        elif part == "text":
            t = bench_text(Path(d), n, batch=64, shard=1024, threads=threads, repeat=repeat)
            print(f"text  MiniLM-L6, {t['n']} texts, batch {t['batch']}, best of {repeat}: {_rates(t)} "
                  f"(model load {t['load_s']:.1f}s, not in the stage figure)", flush=True)
        else:
            r = bench_images(Path(d), n, batch=32, shard=1024, threads=threads, workers=workers, repeat=repeat)
            print(f"image ViT-S-32 224px random weights, {r['n']} JPEG 256x256, batch {r['batch']}, "
                  f"{r['workers']} decode threads, best of {repeat}: {_rates(r)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    ap.add_argument("--parts", default="text,image,memory",
                    help="which measurements, comma-separated: text, image, memory, profile (where an image's time goes)")
    ap.add_argument("--texts", type=int, default=0, help="texts per throughput pass (0: 2048, or 128 with --quick)")
    ap.add_argument("--images", type=int, default=0, help="images per throughput pass (0: 1024, or 32 with --quick)")
    ap.add_argument("--repeat", type=int, default=0, help="bare / stage alternations per throughput part "
                                                          "(0: 3, or 2 with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = every CPU this process may use)")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads of the stage")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for this run (PASSIVE: idle OpenMP threads sleep instead of spinning, "
                         "which otherwise burns the CPU of a loaded machine unevenly between bare and stage; "
                         "'unset' leaves the environment as it is)")
    ap.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "WORKDIR"), help=argparse.SUPPRESS)
    ap.add_argument("--part-child", choices=("text", "image", "profile"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when torch's OpenMP starts (children inherit it)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    threads = args.threads or len(os.sched_getaffinity(0))
    repeat = args.repeat or (2 if args.quick else 3)
    counts = {"text": args.texts or (128 if args.quick else 2048), "image": args.images or (32 if args.quick else 1024)}
    counts["profile"] = counts["image"]
    if args.part_child:
        part_child(args.part_child, counts[args.part_child], threads, args.workers, repeat)
        return
    parts = args.parts.split(",")
    sizes = [2_000, 20_000] if args.quick else [10_000, 100_000]
    print(f"CPUs {os.cpu_count()}, torch threads {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average at start {os.getloadavg()}", flush=True)
    for part in ("text", "image", "profile"):  # each in a fresh process: nothing carried from one to the next
        if part in parts:
            cmd = [sys.executable, __file__, "--part-child", part, "--threads", str(threads), "--workers",
                   str(args.workers), "--repeat", str(repeat), "--texts", str(counts["text"]), "--images", str(counts["image"])]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                sys.exit(f"{part} measurement failed:\n{res.stderr[-3000:]}")
            print("\n".join(x for x in res.stdout.strip().splitlines() if x.startswith(("text", "image"))), flush=True)
    if "memory" in parts:
        with tempfile.TemporaryDirectory(prefix="clearrec-bench-encode-") as d:
            for m in bench_memory(Path(d), sizes):
                print(f"memory {m['n']:>7} texts (tiny BERT): RSS before run {m['rss_before_kib'] / 1024:.0f} MiB, "
                      f"peak {m['peak_kib'] / 1024:.0f} MiB, stage {m['seconds']:.1f}s")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
