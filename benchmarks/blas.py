"""The matrix products that bound VBPR's epoch on Amazon Baby, timed in PyTorch's BLAS and in NumPy's.

VBPR's training pass is dominated by its content layer over a batch's distinct items (about
2,880 x 4,480 features times a 4,480 x 64 weight, and the weight's gradient, 64 x 2,880 times
2,880 x 4,480); its validation pass by the score blocks (1,189 users x 128 times 128 x 7,050
items). This script times those shapes on one thread, in ``torch`` (the BLAS PyTorch was built
with) and in ``numpy`` (its own BLAS), with the same float32 inputs, and prints the best of
``--repeat`` runs, the GFLOP/s and the ratio: how far the products can go on this machine, and
whether the other BLAS would shorten them.

    .venv/bin/python benchmarks/blas.py
    .venv/bin/python benchmarks/blas.py --repeat 15
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

SHAPES = {  # name -> (m, k, n, transpose the left operand)
    "VBPR content forward (X_batch @ W.T)": (2880, 4480, 64, False),
    "VBPR content weight grad (G.T @ X_batch)": (64, 2880, 4480, True),
    "score block (users @ items.T)": (1189, 128, 7050, False),
}


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per product (the best is printed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, numpy {np.__version__}; one thread; best of {args.repeat}")
    with threadpool_limits(limits=1, user_api="blas"):
        for name, (m, k, n, left_t) in SHAPES.items():
            a = torch.randn(k, m, generator=gen).T if left_t else torch.randn(m, k, generator=gen)
            b = torch.randn(k, n, generator=gen)
            out = torch.empty(m, n)
            an, bn, outn = a.numpy(), b.numpy(), out.numpy()
            t_torch = best_ms(lambda: torch.mm(a, b, out=out), args.repeat)
            t_numpy = best_ms(lambda: np.matmul(an, bn, out=outn), args.repeat)
            gflop = 2 * m * k * n / 1e9
            print(f"{name:42s} {m}x{k} @ {k}x{n}: torch {t_torch:6.2f} ms ({gflop / t_torch * 1e3:5.1f} GFLOP/s), "
                  f"numpy {t_numpy:6.2f} ms ({gflop / t_numpy * 1e3:5.1f} GFLOP/s), torch / numpy {t_torch / t_numpy:.2f}")


if __name__ == "__main__":
    main()
