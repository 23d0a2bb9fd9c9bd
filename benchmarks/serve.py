"""Load test of `clearrec serve` on 127.0.0.1: latency percentiles and errors.

Starts ``clearrec serve`` on a free port in a subprocess over a built work directory, then
runs ``--clients`` concurrent clients (asyncio, one keep-alive connection each, a minimal
HTTP/1.1 client so that the load generator costs little CPU) for ``--seconds``:
each sends GET /recommend/{user} or GET /similar/{item} (ids drawn from the work
directory; ``--text-share`` of requests are POST /search with a text) at ``--rate``
requests/s per client (0 = closed loop: the next request as soon as the last answered).
Latency is measured from each request's scheduled start, so a client that falls behind
counts its waiting time. The server is stopped at the end.

    .venv/bin/clearrec run --config sample_data/clearrec.toml --workdir work
    .venv/bin/python benchmarks/serve.py --workdir work                # 50 clients x 10/s, 20 s
    .venv/bin/python benchmarks/serve.py --workdir work --rate 0       # closed loop (saturation)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pyarrow.parquet as pq

TEXTS = ["soft toy", "baby bottle", "wooden blocks", "stroller", "blanket", "teething ring", "car seat", "bib"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clearrec", "serve", "--workdir", str(workdir), "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log, "wb") as f:  # cwd without a clearrec.toml: the defaults apply
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server did not answer /health within 180 s: {log.read_text()[-2000:]}")


class Connection:
    """A minimal HTTP/1.1 keep-alive client (the load generator must cost less CPU than the server)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def client(port: int, users: list[str], items: list[str], args: argparse.Namespace, end: float,
                 out: list[tuple[str, float, int]], seed: int) -> None:
    rng = random.Random(seed)
    period = 1.0 / args.rate if args.rate > 0 else 0.0
    conn = Connection("127.0.0.1", port)
    due = time.perf_counter() + rng.random() * period  # spread the clients' phases
    try:
        while due < end:
            if period:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            start = due if period else time.perf_counter()
            r = rng.random()
            try:
                if r < args.text_share:
                    kind = "search"
                    body = json.dumps({"text": rng.choice(TEXTS), "k": args.k}).encode()
                    status = await conn.request("POST", "/search", body)
                elif r < args.text_share + args.similar_share:
                    kind = "similar"
                    status = await conn.request("GET", f"/similar/{quote(rng.choice(items))}?k={args.k}")
                else:
                    kind = "recommend"
                    status = await conn.request("GET", f"/recommend/{quote(rng.choice(users))}?k={args.k}")
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                status = -1
                conn.close()
                conn = Connection("127.0.0.1", port)
            out.append((kind, time.perf_counter() - start, status))
            due = due + period if period else time.perf_counter()
    finally:
        conn.close()


async def load(port: int, users: list[str], items: list[str], args: argparse.Namespace) -> list:
    out: list[tuple[str, float, int]] = []
    end = time.perf_counter() + args.seconds
    await asyncio.gather(*(client(port, users, items, args, end, out, seed) for seed in range(args.clients)))
    return out


def report(results: list[tuple[str, float, int]], seconds: float) -> None:
    lat = np.array([r[1] for r in results]) * 1e3
    errors = sum(1 for r in results if r[2] != 200)
    print(f"requests {len(results)}  throughput {len(results) / seconds:.0f}/s  errors {errors}")
    print(f"latency ms: p50 {np.percentile(lat, 50):.2f}  p90 {np.percentile(lat, 90):.2f}  "
          f"p99 {np.percentile(lat, 99):.2f}  max {lat.max():.2f}")
    for kind in sorted({r[0] for r in results}):
        k_lat = np.array([r[1] for r in results if r[0] == kind]) * 1e3
        k_err = sum(1 for r in results if r[0] == kind and r[2] != 200)
        print(f"  {kind:<9} n={len(k_lat):<6} {len(k_lat) / seconds:.0f}/s  errors {k_err}  "
              f"p50 {np.percentile(k_lat, 50):.2f}  p99 {np.percentile(k_lat, 99):.2f}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc: every thread's ``children`` list)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="a work directory with a built index")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=10.0, help="requests/s per client; 0 = closed loop")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--similar-share", type=float, default=0.3)
    p.add_argument("--text-share", type=float, default=0.0, help="share of POST /search text requests")
    args = p.parse_args()
    workdir = args.workdir.resolve()
    users = pq.read_table(workdir / "model" / "user_vectors.parquet", columns=["user_id"])["user_id"].to_pylist()
    items = pq.read_table(workdir / "index" / "content_ids.parquet" if (workdir / "index" / "content_ids.parquet")
                          .is_file() else workdir / "index" / "items_ids.parquet", columns=["item_id"])["item_id"]
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(workdir, port, log)
    try:
        if args.text_share > 0:  # the text encoder loads after start-up: time the load, then measure steady state
            t0 = time.perf_counter()
            httpx.post(f"http://127.0.0.1:{port}/search", json={"text": TEXTS[0], "k": args.k},
                       timeout=600).raise_for_status()
            print(f"first text search answered {time.perf_counter() - t0:.1f} s after start-up (encoder load)")
        offered = "closed loop" if args.rate <= 0 else f"{args.rate:g}/s each ({args.rate * args.clients:g}/s offered)"
        print(f"{args.clients} clients, {offered}, {args.seconds:g} s, k={args.k}, {len(users)} users, "
              f"{len(items)} items; load average before {os.getloadavg()}")
        t0 = time.perf_counter()
        children = _children(server.pid)  # the text encoder processes, started by now
        cpu0 = _cpu_seconds(server.pid), time.process_time(), [_cpu_seconds(c) for c in children]
        results = asyncio.run(load(port, users, items.to_pylist(), args))
        elapsed = time.perf_counter() - t0
        report(results, elapsed)
        encoders = sum(_cpu_seconds(c) - c0 for c, c0 in zip(children, cpu0[2]))
        print(f"CPU seconds over the run: server {_cpu_seconds(server.pid) - cpu0[0]:.1f}, "
              f"its {len(children)} child process(es) {encoders:.1f}, load generator "
              f"{time.process_time() - cpu0[1]:.1f} (of {elapsed * (os.cpu_count() or 1):.0f} "
              "available on all cores)")
        print(f"load average after {os.getloadavg()}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
