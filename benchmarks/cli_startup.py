"""Start-up of the command line: `clearrec --help`, `clearrec status`, and `clearrec serve` until it answers.

For each tree (this checkout, and optionally an earlier one given with ``--before``), runs each
measure ``--repeat`` times, interleaved (a, b, a, b, ...), so both trees see the same machine
load, and prints the median wall time per measure and the ratio before / now:

- ``help``: ``python -m clearrec --help``, spawn to exit.
- ``status``: ``python -m clearrec status`` on the built work directory, spawn to exit.
- ``help: CPU`` / ``status: CPU``: CPU seconds (user + system) of those two commands, which other
  jobs on the machine inflate less than wall time; ``... peak MiB``: their peak resident memory.
- ``serve: says serving``: spawn of ``clearrec serve`` until it prints "serving ... on".
- ``serve: /health answers``: spawn until GET /health returns 200.
- ``serve: text search answers``: spawn until the first POST /search with a text returns 200
  (includes loading the text encoder).
- ``serve: said before answering``: how long "serving ... on" came before /health answered
  (negative: it was printed after).

    .venv/bin/clearrec run --config sample_data/clearrec.toml --workdir work
    git archive --prefix=clearrec/ <commit> | tar -x -C /tmp/before     # an earlier tree, optional
    .venv/bin/python benchmarks/cli_startup.py --config sample_data/clearrec.toml --workdir work \\
        --before /tmp/before --repeat 3                                  # --no-serve: help and status only
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import httpx

MEASURES = ("help", "status", "help: CPU", "status: CPU", "help: peak MiB", "status: peak MiB", "serve: says serving", "serve: /health answers", "serve: text search answers",
            "serve: said before answering")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tree: Path | None) -> dict[str, str]:
    """The environment that makes ``python -m clearrec`` import ``tree/clearrec`` (None: this checkout).

    ``PYTHONDONTWRITEBYTECODE`` is dropped: a user's shell caches bytecode, and without the cache every
    start compiles the package's modules from source again (about 0.1 s of ``status`` on this machine).
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Seconds from spawn to exit, the command's CPU seconds (user + system), its peak resident memory in MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def serve_times(base: list[str], where: list[str], env: dict[str, str], timeout: float = 300.0) -> dict[str, float]:
    """Seconds from spawning ``clearrec serve`` to: its "serving" line, /health 200, a text search 200."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*base, "serve", *where, "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said: list[float] = []

    def watch() -> None:
        for line in proc.stderr:
            if "serving" in line and not said:
                said.append(time.perf_counter() - t0)

    threading.Thread(target=watch, daemon=True).start()
    out: dict[str, float] = {}
    url = f"http://127.0.0.1:{port}"
    try:
        while "serve: text search answers" not in out:
            if proc.poll() is not None:
                raise RuntimeError(f"clearrec serve exited with {proc.returncode}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"clearrec serve did not answer within {timeout:.0f} s")
            try:
                if "serve: /health answers" not in out:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        out["serve: /health answers"] = time.perf_counter() - t0
                elif httpx.post(f"{url}/search", json={"text": "wooden toy", "k": 5}, timeout=120).status_code == 200:
                    out["serve: text search answers"] = time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.05)
        deadline = time.perf_counter() + 10
        while not said and time.perf_counter() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out["serve: says serving"] = said[0] if said else float("nan")
    out["serve: said before answering"] = out["serve: /health answers"] - out["serve: says serving"]
    return out


def measure(tree: Path | None, config: Path, workdir: Path, serve: bool = True) -> dict[str, float]:
    env = env_for(tree)
    base = [sys.executable, "-m", "clearrec"]
    where = ["--config", str(config), "--workdir", str(workdir)]
    res: dict[str, float] = {}
    for name, args in (("help", ["--help"]), ("status", ["status", *where])):
        res[name], res[f"{name}: CPU"], res[f"{name}: peak MiB"] = timed([*base, *args], env)
    if serve:
        res.update(serve_times(base, where, env))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="a work directory built by clearrec run")
    ap.add_argument("--before", type=Path, help="a folder holding an earlier tree as clearrec/ (git archive)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-serve", action="store_true", help="measure --help and status only")
    a = ap.parse_args()
    measures = MEASURES[:6] if a.no_serve else MEASURES
    trees: dict[str, Path | None] = {"now": None}
    if a.before is not None:
        if not (a.before / "clearrec" / "__init__.py").is_file():
            raise SystemExit(f"{a.before} has no clearrec/__init__.py; see the usage at the top of this file")
        trees = {"before": a.before.resolve(), "now": None}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"{date.today()}; load average {os.getloadavg()[0]:.1f} at start")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for tree in trees.values():  # one untimed start per tree writes its bytecode cache, as a user's first start does
        timed([sys.executable, "-m", "clearrec", "status", "--config", str(a.config.resolve()), "--workdir", str(a.workdir.resolve())], env_for(tree))
    for i in range(a.repeat):
        for name, tree in trees.items():
            runs[name].append(measure(tree, a.config.resolve(), a.workdir.resolve(), serve=not a.no_serve))
            print(f"  run {i + 1} {name}: " + ", ".join(f"{m} {runs[name][-1][m]:.2f}{'' if 'MiB' in m else 's'}" for m in measures), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end; medians of {a.repeat} runs (seconds, or MiB where named):")
    print("| measure | " + " | ".join(trees) + (" | before / now |" if len(trees) > 1 else " |"))
    print("|---|" + "---|" * (len(trees) + (len(trees) > 1)))
    for m in measures:
        med = {name: statistics.median(r[m] for r in runs[name]) for name in trees}
        row = f"| {m} | " + " | ".join(f"{med[n]:.2f}" for n in trees)
        if len(trees) > 1:
            ratio = med["before"] / med["now"] if m != MEASURES[-1] and med["now"] > 0 else float("nan")
            row += f" | {ratio:.2f}x" if ratio == ratio else " | "
        print(row + " |")


if __name__ == "__main__":
    main()
