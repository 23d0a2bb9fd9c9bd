"""Full-ranking evaluation, in one place: accuracy and catalog measures at K.

Scores are ``user_vectors @ item_vectors.T``, computed in blocks of users so that at most
``max_block`` scores exist at once whatever the catalog size. A user's excluded items (their
training items) are set to ``-inf`` before ``torch.topk``; relevance is read from a boolean
(block, num_items) mask built from sparse indices. The block of scores and the mask are allocated
once per call and written again for each block of users. Per user, with ``hits`` the 0/1 relevance
of the top-K list and ``P`` the number of relevant items::

    recall@K    = sum(hits) / P
    precision@K = sum(hits) / K
    ndcg@K      = sum_j hits_j / log2(j + 1)  /  sum_{j <= min(P, K)} 1 / log2(j + 1)
    map@K       = sum_j precision@j * hits_j  /  min(P, K)
    hit@K       = 1 if sum(hits) > 0 else 0
    mrr@K       = 1 / (rank of the first hit), 0 without a hit in the top K

averaged over the users with at least one relevant item (the definitions of the MMRec /
RecBole evaluators). Over the same users' top-K lists, with ``item_popularity`` given (e.g.
each item's number of training interactions)::

    coverage@K   = share of the catalog's items in at least one top-K list
    popularity@K = mean, over every recommended slot, of the item's popularity percentile
                   (share of catalog items strictly less popular; 0 = least popular tier)
    gini@K       = Gini coefficient of how often each catalog item is recommended
                   (0 = every item equally often, near 1 = a few items take every slot)

coverage and gini need no popularity and are always computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

METRICS = ("recall", "ndcg", "precision", "map", "hit", "mrr")  # per user, averaged
CATALOG_METRICS = ("coverage", "popularity", "gini")  # over all top-K lists together


@dataclass(frozen=True)
class ItemSets:
    """Per-user item sets in CSR form: user ``u`` has ``items[indptr[u]:indptr[u+1]]`` (sorted, unique)."""

    indptr: Tensor  # (num_users + 1,) int64
    items: Tensor  # (nnz,) int64

    @classmethod
    def from_pairs(cls, users: Tensor, items: Tensor, num_users: int, num_items: int) -> ItemSets:
        """From (E,) user and item indices; duplicates are dropped."""
        key = torch.unique(users.long() * num_items + items.long())  # sorted by user, then item
        counts = torch.bincount(key // num_items, minlength=num_users)
        indptr = torch.zeros(num_users + 1, dtype=torch.long, device=key.device)
        indptr[1:] = counts.cumsum(0)
        return cls(indptr, key % num_items)

    @property
    def num_users(self) -> int:
        return self.indptr.numel() - 1

    def counts(self) -> Tensor:
        """(num_users,) size of each user's set."""
        return self.indptr[1:] - self.indptr[:-1]

    def users(self) -> Tensor:
        """Users whose set is not empty."""
        return torch.nonzero(self.counts() > 0).squeeze(1)

    def pairs(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """For (B,) users: ``(row, item)`` of every member, row = position in ``users`` -> ((M,), (M,))."""
        start, stop = self.indptr[users], self.indptr[users + 1]
        lens = stop - start
        rows = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), lens)
        offsets = torch.arange(rows.numel(), device=users.device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        return rows, self.items[torch.repeat_interleave(start, lens) + offsets]

    def to(self, device: torch.device | str) -> ItemSets:
        return ItemSets(self.indptr.to(device), self.items.to(device))


def _block_size(num_items: int, max_block: int) -> int:
    return max(1, max_block // max(1, num_items))


def topk_items(
    user_vectors: Tensor,
    item_vectors: Tensor,
    users: Tensor,
    k: int,
    exclude: ItemSets | None = None,
    max_block: int = 1 << 23,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` items by dot product for (B,) users -> (scores (B, k), items (B, k)).

    Items in ``exclude`` are never returned; slots that cannot be filled hold ``-inf`` / ``-1``.
    """
    num_items = item_vectors.shape[0]
    kk = min(k, num_items)
    scores_out = torch.full((users.numel(), k), float("-inf"), device=item_vectors.device)
    items_out = torch.full((users.numel(), k), -1, dtype=torch.long, device=item_vectors.device)
    step = _block_size(num_items, max_block)
    buffer = _score_buffer(user_vectors, item_vectors, min(step, users.numel()))
    for start in range(0, users.numel(), step):
        block = users[start : start + step]
        s = _masked_scores(user_vectors, item_vectors, block, exclude, buffer)  # (b, I)
        top = s.topk(kk, dim=1)
        ok = torch.isfinite(top.values)
        scores_out[start : start + block.numel(), :kk] = top.values
        items_out[start : start + block.numel(), :kk] = torch.where(ok, top.indices, -1)
    return scores_out, items_out


def _score_buffer(user_vectors: Tensor, item_vectors: Tensor, rows: int) -> Tensor:
    """One (rows, I) block of scores, written again for every block of users: a fresh block per
    block of users has its pages faulted in again (Amazon Baby's validation pass on one thread,
    19,445 x 7,050 scores: 0.99-1.08 -> 0.90-0.94 s, BENCHMARKS.md)."""
    dtype = torch.result_type(user_vectors, item_vectors)
    return torch.empty(rows, item_vectors.shape[0], dtype=dtype, device=item_vectors.device)


def _masked_scores(user_vectors: Tensor, item_vectors: Tensor, users: Tensor, exclude: ItemSets | None,
                   buffer: Tensor) -> Tensor:
    with torch.no_grad():
        s = torch.mm(user_vectors[users], item_vectors.T, out=buffer[: users.numel()])  # (b, I)
    if exclude is not None:
        rows, cols = exclude.pairs(users)
        s[rows, cols] = float("-inf")
    return s


def ranking_metrics(
    user_vectors: Tensor,
    item_vectors: Tensor,
    truth: ItemSets,
    exclude: ItemSets | None = None,
    ks: Sequence[int] = (5, 10, 20, 50),
    max_block: int = 1 << 23,
    item_popularity: Tensor | None = None,
) -> dict[str, float]:
    """Mean ``recall|ndcg|precision|map|hit|mrr@K`` over users with relevant items in ``truth``,
    and ``coverage|gini@K`` (+ ``popularity@K`` with ``item_popularity``) of their top-K lists.

    ``user_vectors`` (U, d), ``item_vectors`` (I, d); ``exclude`` (same users) is masked from the
    ranking; ``item_popularity`` (I,) any count per item. Returns e.g. ``{"recall@20": 0.07, ...}``;
    empty ``truth`` gives zeros.
    """
    ks = sorted({int(k) for k in ks})
    num_items = item_vectors.shape[0]
    k_max = min(ks[-1], num_items)
    device = item_vectors.device
    f64 = torch.float64
    users = truth.users().to(device)
    at = torch.tensor([min(k, k_max) - 1 for k in ks], device=device)  # (nk,) column of each K
    cutoff = torch.tensor(ks, device=device, dtype=f64)  # (nk,)
    discount = 1.0 / torch.log2(torch.arange(2, k_max + 2, device=device, dtype=f64))  # (K,)
    ideal = discount.cumsum(0)  # (K,) ideal DCG for 1..K relevant items
    ranks = torch.arange(1, k_max + 1, device=device, dtype=f64)  # (K,)
    sums = torch.zeros(len(METRICS), len(ks), device=device, dtype=f64)  # (6, nk)
    exposure = torch.zeros(len(ks), num_items + 1, device=device, dtype=f64)  # (nk, I + 1) last = empty slot
    step = _block_size(num_items, max_block)
    buffer = _score_buffer(user_vectors, item_vectors, min(step, users.numel()))
    marks = torch.zeros(buffer.shape, dtype=torch.bool, device=device)  # (b, I) relevant items, cleared after use
    for start in range(0, users.numel(), step):
        block = users[start : start + step]
        s = _masked_scores(user_vectors, item_vectors, block, exclude, buffer)  # (b, I)
        top = s.topk(k_max, dim=1)
        relevant = marks[: block.numel()]
        pairs = truth.pairs(block)
        relevant[pairs] = True
        filled = torch.isfinite(top.values)  # (b, K)
        hits = (relevant.gather(1, top.indices) & filled).to(f64)  # (b, K)
        relevant[pairs] = False
        n_rel = truth.counts()[block].to(f64)[:, None]  # (b, 1)
        n_ideal = torch.minimum(n_rel, cutoff)  # (b, nk)
        cum_hits = hits.cumsum(1)[:, at]  # (b, nk) hits in the top K
        dcg = (hits * discount).cumsum(1)[:, at]
        ap = (hits.cumsum(1) / ranks * hits).cumsum(1)[:, at]
        first_rr = (hits / ranks).cummax(1).values[:, at]  # (b, nk) 1 / rank of the first hit so far
        sums += torch.stack([
            (cum_hits / n_rel).sum(0),  # recall
            (dcg / ideal[n_ideal.long() - 1]).sum(0),  # ndcg
            (cum_hits / cutoff).sum(0),  # precision
            (ap / n_ideal).sum(0),  # map
            (cum_hits > 0).to(f64).sum(0),  # hit
            first_rr.sum(0),  # mrr
        ])
        slot_item = torch.where(filled, top.indices, num_items)  # (b, K)
        for j, k in enumerate(ks):
            exposure[j].index_add_(0, slot_item[:, :k].reshape(-1), torch.ones(slot_item[:, :k].numel(),
                                                                                device=device, dtype=f64))
    means = (sums / max(1, users.numel())).tolist()
    out = {f"{m}@{k}": means[i][j] for i, m in enumerate(METRICS) for j, k in enumerate(ks)}
    out.update(_catalog_metrics(exposure[:, :num_items], ks, item_popularity))
    return out


def popularity_percentiles(item_popularity: Tensor) -> Tensor:
    """(I,) counts -> (I,) float64 share of items strictly less popular than each item, in [0, 1)."""
    pop = item_popularity.to(torch.float64)
    return torch.searchsorted(pop.sort().values, pop, side="left").to(torch.float64) / max(1, pop.numel())


def _catalog_metrics(exposure: Tensor, ks: Sequence[int], item_popularity: Tensor | None) -> dict[str, float]:
    """``coverage|gini|popularity@K`` from (nk, I) counts of how often each item is recommended."""
    num_items = exposure.shape[1]
    out: dict[str, float] = {}
    pct = popularity_percentiles(item_popularity.to(exposure.device)) if item_popularity is not None else None
    ascending = exposure.sort(dim=1).values  # (nk, I)
    weight = 2.0 * torch.arange(1, num_items + 1, device=exposure.device, dtype=exposure.dtype) - num_items - 1
    for j, k in enumerate(ks):
        total = float(exposure[j].sum())
        out[f"coverage@{k}"] = float((exposure[j] > 0).sum()) / max(1, num_items)
        out[f"gini@{k}"] = float((weight * ascending[j]).sum()) / (num_items * total) if total else 0.0
        if pct is not None:
            out[f"popularity@{k}"] = float((exposure[j] * pct).sum()) / total if total else 0.0
    return out
