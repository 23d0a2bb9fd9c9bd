"""How a content vector is built from per-modality features: one block per modality.

A content row is ``concat(l2n(x_image), l2n(x_text))`` in the layout's block order: each
modality's vector L2-normalised into its own block, so the inner product of two rows is the
sum of the per-modality cosines. A modality an item has no vector for is a zero block (the
project stage already gave such items the fill vector when ``encode.missing = "mean"``). A
query of one modality fills that block alone (zeros elsewhere), so it scores that
modality's cosine alone.

The index stage builds the content index with :meth:`ContentLayout.rows`; serving encodes
queries and new items with the same layout, read back from ``index/index_info.json``
(:meth:`ContentLayout.from_json`), so the two sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

NORMALIZATION = "l2-per-block"


@dataclass(frozen=True)
class Block:
    """One modality's slice ``[start, start + dim)`` of a content row."""

    modality: str
    start: int
    dim: int


class ContentLayout:
    """The blocks of a content row, in order (see the module doc)."""

    def __init__(self, dims: Mapping[str, int]):
        blocks, start = [], 0
        for modality, dim in dims.items():
            blocks.append(Block(modality, start, int(dim)))
            start += int(dim)
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.dim = start
        self._by_name = {b.modality: b for b in self.blocks}

    @property
    def modalities(self) -> list[str]:
        return [b.modality for b in self.blocks]

    def block(self, modality: str) -> Block:
        return self._by_name[modality]

    def rows(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per-modality ``(N, d_m)`` features (a subset of the blocks) -> content rows ``(N, dim)``."""
        n = len(next(iter(features.values())))
        out = np.zeros((n, self.dim), dtype=np.float32)  # (N, D)
        for modality, x in features.items():
            b = self._by_name[modality]
            out[:, b.start : b.start + b.dim] = l2n(x)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"normalization": NORMALIZATION, "dim": self.dim,
                "blocks": [{"modality": b.modality, "start": b.start, "dim": b.dim} for b in self.blocks]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ContentLayout":
        """The layout of :meth:`to_json` (a block list with ``modality`` / ``dim`` in order)."""
        if data.get("normalization", NORMALIZATION) != NORMALIZATION:
            raise ValueError(f"content layout normalisation {data.get('normalization')!r} is not {NORMALIZATION!r}")
        layout = cls({b["modality"]: b["dim"] for b in data["blocks"]})
        starts = [b.get("start", lb.start) for b, lb in zip(data["blocks"], layout.blocks)]
        if starts != [b.start for b in layout.blocks]:
            raise ValueError(f"content blocks start at {starts}, expected {[b.start for b in layout.blocks]}")
        return layout


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, float32 (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x, dtype=np.float32), where=norm > 0)
