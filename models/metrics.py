"""Full-ranking evaluation, in one place: Recall, NDCG, Precision and MAP at K.

Scores are ``user_vectors @ item_vectors.T``, computed in blocks of users so that at most
``max_block`` scores exist at once whatever the catalog size. A user's excluded items (their
training items) are set to ``-inf`` before ``torch.topk``; relevance is read from a boolean
(block, num_items) mask built from sparse indices. Per user, with ``hits`` the 0/1 relevance
of the top-K list and ``P`` the number of relevant items::

    recall@K    = sum(hits) / P
    precision@K = sum(hits) / K
    ndcg@K      = sum_j hits_j / log2(j + 1)  /  sum_{j <= min(P, K)} 1 / log2(j + 1)
    map@K       = sum_j precision@j * hits_j  /  min(P, K)

averaged over the users with at least one relevant item (the definitions of the MMRec /
RecBole evaluators).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

METRICS = ("recall", "ndcg", "precision", "map")


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
    for start in range(0, users.numel(), step):
        block = users[start : start + step]
        s = _masked_scores(user_vectors, item_vectors, block, exclude)  # (b, I)
        top = s.topk(kk, dim=1)
        ok = torch.isfinite(top.values)
        scores_out[start : start + block.numel(), :kk] = top.values
        items_out[start : start + block.numel(), :kk] = torch.where(ok, top.indices, -1)
    return scores_out, items_out


def _masked_scores(user_vectors: Tensor, item_vectors: Tensor, users: Tensor, exclude: ItemSets | None) -> Tensor:
    s = user_vectors[users] @ item_vectors.T  # (b, I)
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
) -> dict[str, float]:
    """Mean ``recall|ndcg|precision|map@K`` over users with relevant items in ``truth``.

    ``user_vectors`` (U, d), ``item_vectors`` (I, d); ``exclude`` (same users) is masked from the
    ranking. Returns e.g. ``{"recall@20": 0.07, ...}``; empty ``truth`` gives zeros.
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
    sums = torch.zeros(len(METRICS), len(ks), device=device, dtype=f64)  # (4, nk)
    step = _block_size(num_items, max_block)
    for start in range(0, users.numel(), step):
        block = users[start : start + step]
        s = _masked_scores(user_vectors, item_vectors, block, exclude)  # (b, I)
        top = s.topk(k_max, dim=1)
        relevant = torch.zeros_like(s, dtype=torch.bool)  # (b, I)
        relevant[truth.pairs(block)] = True
        hits = (relevant.gather(1, top.indices) & torch.isfinite(top.values)).to(f64)  # (b, K)
        n_rel = truth.counts()[block].to(f64)[:, None]  # (b, 1)
        n_ideal = torch.minimum(n_rel, cutoff)  # (b, nk)
        cum_hits = hits.cumsum(1)[:, at]  # (b, nk) hits in the top K
        dcg = (hits * discount).cumsum(1)[:, at]
        ap = (hits.cumsum(1) / ranks * hits).cumsum(1)[:, at]
        sums += torch.stack([
            (cum_hits / n_rel).sum(0),  # recall
            (dcg / ideal[n_ideal.long() - 1]).sum(0),  # ndcg
            (cum_hits / cutoff).sum(0),  # precision
            (ap / n_ideal).sum(0),  # map
        ])
    means = (sums / max(1, users.numel())).tolist()
    return {f"{m}@{k}": means[i][j] for i, m in enumerate(METRICS) for j, k in enumerate(ks)}
