"""Numbers that show what CLEAR did: spectra, cross-modal neighbour overlap, score densities, variance.

- :func:`energy_curve`: cumulative share of cross-covariance energy ``sum_{i<=j} s_i^2 / sum s_i^2``.
- :func:`top_neighbours`: exact cosine top-K neighbours of every row among the others (FAISS
  ``IndexFlatIP`` on L2-normalised vectors), the row itself left out.
- :func:`neighbour_overlap`: for each item, the share of its top-K neighbours under one modality
  that are also among its top-K under the other, averaged over items.
- :func:`score_density`: histogram density of neighbour similarity scores.
- :class:`Moments`: streaming total variance ``E ||x - E x||^2`` of one feature space.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def energy_curve(spectrum: np.ndarray) -> np.ndarray:
    """``(r,)`` cumulative energy share of the singular values (all zeros for a zero spectrum)."""
    energy = np.asarray(spectrum, dtype=np.float64) ** 2
    total = energy.sum()
    return np.zeros_like(energy) if total == 0 else np.cumsum(energy) / total


def top_neighbours(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-``k`` neighbours of each row of ``X (M, d)`` among the other rows.

    Returns ``(scores (M, k) float32, ids (M, k) int64)``, best first; ``-1`` ids (score
    ``nan``) pad rows when ``M - 1 < k``. Zero rows have similarity 0 to everything.
    """
    import faiss

    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (items x features), got shape {X.shape}")
    m = len(X)
    Xn = np.array(X, dtype=np.float32, order="C")  # (M, d) copy, normalised in place
    norms = np.linalg.norm(Xn, axis=1, keepdims=True)
    np.divide(Xn, norms, out=Xn, where=norms > 0)
    index = faiss.IndexFlatIP(Xn.shape[1])
    index.add(Xn)
    kk = min(k + 1, m)
    scores, ids = index.search(Xn, kk)  # (M, kk)
    # drop each row's own id (or, when ties pushed it out, the last hit)
    is_self = ids == np.arange(m)[:, None]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, : min(k, m - 1)]
    scores, ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
    return scores, ids


def neighbour_overlap(ids_a: np.ndarray, ids_b: np.ndarray, ks: Sequence[int]) -> list[float]:
    """Mean over rows of ``|topK_a ∩ topK_b| / K`` for each K in ``ks`` (ids best first, -1 ignored)."""
    if ids_a.shape != ids_b.shape:
        raise ValueError(f"ids_a has shape {ids_a.shape}, ids_b has shape {ids_b.shape}: they must match")
    out = []
    for k in ks:
        if not 1 <= k <= ids_a.shape[1]:
            raise ValueError(f"K = {k} is outside 1..{ids_a.shape[1]} (the neighbours searched)")
        a, b = ids_a[:, :k], ids_b[:, :k]
        both = np.sort(np.concatenate([a, b], axis=1), axis=1)  # (M, 2K)
        shared = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)  # ids are unique within a row
        out.append(float(shared.sum(axis=1).mean() / k) if len(a) else float("nan"))
    return out


def score_density(scores: np.ndarray, bins: int = 50, lo: float = -1.0, hi: float = 1.0) -> dict[str, Any]:
    """Histogram density (integrates to 1) of the finite ``scores``, with mean and quartiles."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return {"edges": [], "density": [], "mean": None, "quartiles": None}
    density, edges = np.histogram(s, bins=bins, range=(lo, hi), density=True)
    return {
        "edges": edges.tolist(),
        "density": density.tolist(),
        "mean": float(s.mean()),
        "quartiles": np.quantile(s, [0.25, 0.5, 0.75]).tolist(),
    }


def cross_modal_report(xv: np.ndarray, xt: np.ndarray, k: int, ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Top-K neighbours of the same items under ``xv (M, dv)`` and ``xt (M, dt)``: overlap and scores."""
    if len(xv) != len(xt):
        raise ValueError(f"xv has shape {xv.shape}, xt has shape {xt.shape}: they must have the same rows")
    ks = sorted({*(ks or ()), k})
    kmax = max(ks)
    sv, iv = top_neighbours(xv, kmax)
    st, it = top_neighbours(xt, kmax)
    curve = neighbour_overlap(iv, it, ks)
    return {
        "overlap": curve[ks.index(k)],
        "overlap_curve": dict(zip(ks, curve)),
        "scores_image": sv[:, :k],  # (M, k)
        "scores_text": st[:, :k],
    }


class Moments:
    """Streaming total variance ``sum_j Var(x_j)`` of rows added in chunks (float64, shifted)."""

    def __init__(self, shift: np.ndarray | None = None) -> None:
        self.n = 0
        self._shift = None if shift is None else np.asarray(shift, dtype=np.float64)
        self._sum: np.ndarray | None = None  # (d,) sum of (x - shift)
        self._sq = 0.0  # sum of ||x - shift||^2

    def update(self, x: np.ndarray) -> None:
        if x.ndim != 2:
            raise ValueError(f"rows must be 2-D (n, d), got shape {x.shape}")
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0, dtype=np.float64)
        y = x - self._shift.astype(x.dtype)  # (n, d)
        s = np.sum(y, axis=0, dtype=np.float64)
        self._sum = s if self._sum is None else self._sum + s
        self._sq += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.n += len(x)

    def total_variance(self) -> float:
        if self.n == 0:
            return float("nan")
        mean = self._sum / self.n
        return max(self._sq / self.n - float(mean @ mean), 0.0)
