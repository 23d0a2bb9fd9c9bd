"""Thread counts for one block of work, restored afterwards (torch's intra-op pool, FAISS's OpenMP), the
thread count that suits a shared machine (:class:`ThreadGovernor`), and the torch device a ``device``
setting names."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError


@contextmanager
def _scoped(get: Callable[[], int], set_: Callable[[int], None], n: int | None) -> Iterator[None]:
    """``set_(n)`` for the block, then the previous value back; ``n`` None or 0, or the count already
    set, changes nothing (setting a pool's size costs more than many a query it runs)."""
    before = get() if n else None
    if not n or before == n:
        yield
        return
    set_(n)
    try:
        yield
    finally:
        set_(before)


def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads (process-wide) for the block."""
    import torch

    return _scoped(torch.get_num_threads, torch.set_num_threads, n)


def _cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_ticks() -> tuple[int, int, int] | None:
    """``(busy, total, own)`` clock ticks so far: every CPU's busy and all ticks (``/proc/stat``),
    and this process's user + system time (``/proc/self/stat``); None where /proc is absent."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total, int(own[11]) + int(own[12])


class ThreadGovernor:
    """torch threads = the CPUs that other processes leave free, measured again at every :meth:`update`.

    A parallel region waits for its slowest thread, so on a machine where another process keeps
    a core busy, a thread per CPU makes each step several times slower than one thread. Over the
    interval since the last measurement: other processes' load = (all CPUs' busy ticks - this
    process's ticks) / elapsed ticks per CPU, in CPUs; threads = the CPUs this process may use
    minus that load, rounded, at least 1 and at most ``limit``. Where ``/proc`` is absent
    (not Linux) it leaves torch's setting as it is. Changing the count between epochs changes
    the order of floating-point sums, so results may differ in the last bits from a run with a
    fixed count.
    """

    def __init__(self, set_threads: Callable[[int], None], limit: int | None = None, sample_s: float = 0.1,
                 ticks: Callable[[], tuple[int, int, int] | None] = _cpu_ticks, cpus: int | None = None):
        self._set, self._ticks = set_threads, ticks
        self.cpus = cpus or _cpus()
        self.limit = min(limit or self.cpus, self.cpus)
        self.threads: int | None = None
        self._last = ticks()
        self._system_cpus = os.cpu_count() or self.cpus
        if self._last is not None and sample_s > 0:
            time.sleep(sample_s)  # a first measurement before any work
            self.update()

    def free_cpus(self) -> float | None:
        """CPUs left free by other processes since the last measurement (None: unknown)."""
        now = self._ticks()
        if now is None or self._last is None:
            return None
        busy, total, own = (a - b for a, b in zip(now, self._last))
        self._last = now
        if total <= 0:
            return None
        others = max(0.0, (busy - own) / (total / self._system_cpus))
        return min(self.cpus, self._system_cpus - others)

    def update(self) -> int | None:
        """Measure and set torch's threads; returns the count (None: unknown, nothing changed)."""
        free = self.free_cpus()
        if free is None:
            return self.threads
        n = max(1, min(self.limit, int(free + 0.5)))
        if n != self.threads:
            self._set(n)
            self.threads = n
        return n


@contextmanager
def adaptive_torch_threads() -> Iterator[ThreadGovernor]:
    """A :class:`ThreadGovernor` for torch during the block (call its ``update`` between units of
    work, e.g. epochs); torch's thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    try:
        yield ThreadGovernor(torch.set_num_threads, limit=before)
    finally:
        torch.set_num_threads(before)


def omp_threads(n: int | None) -> Iterator[None]:
    """This thread's OpenMP thread count for FAISS searches in the block."""
    import faiss

    return _scoped(faiss.omp_get_max_threads, faiss.omp_set_num_threads, n)


def select_device(name: str, key: str) -> str:
    """A torch device name from a ``device`` setting: ``auto`` is CUDA when present, else CPU.

    ``key`` names the setting in the error raised when CUDA is asked for but absent.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key} = {name!r} but CUDA is not available; set {key} = 'cpu' or 'auto'")
    return name
