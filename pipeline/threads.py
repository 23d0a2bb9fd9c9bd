"""Thread counts for one block of work, restored afterwards (torch's intra-op pool, FAISS's OpenMP), and the
torch device a ``device`` setting names."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import ConfigError


@contextmanager
def _scoped(get: Callable[[], int], set_: Callable[[int], None], n: int | None) -> Iterator[None]:
    """``set_(n)`` for the block, then the previous value back; ``n`` None or 0 changes nothing."""
    if not n:
        yield
        return
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)


def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads (process-wide) for the block."""
    import torch

    return _scoped(torch.get_num_threads, torch.set_num_threads, n)


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
