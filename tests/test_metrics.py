"""models/metrics.py against a slow, obviously correct reference on random data."""

from __future__ import annotations

import math

import pytest
import torch
from clearrec.models.metrics import ItemSets, ranking_metrics, topk_items


def _reference(user_vecs, item_vecs, truth: dict[int, set[int]], exclude: dict[int, set[int]], ks, popularity=None):
    """One user at a time, plain Python."""
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg", "precision", "map", "hit", "mrr") for k in ks}
    users = [u for u, items in truth.items() if items]
    num_items = len(item_vecs)
    shown = {k: [0] * num_items for k in ks}  # how often each item is recommended
    for u in users:
        scores = (item_vecs @ user_vecs[u]).tolist()
        ranked = sorted((i for i in range(len(scores)) if i not in exclude.get(u, set())), key=lambda i: -scores[i])
        rel = truth[u]
        for k in ks:
            top = ranked[:k]
            hits = [1 if i in rel else 0 for i in top]
            sums[f"recall@{k}"] += sum(hits) / len(rel)
            sums[f"precision@{k}"] += sum(hits) / k
            dcg = sum(h / math.log2(j + 2) for j, h in enumerate(hits))
            idcg = sum(1 / math.log2(j + 2) for j in range(min(len(rel), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
            ap, found = 0.0, 0
            for j, h in enumerate(hits):
                if h:
                    found += 1
                    ap += found / (j + 1)
            sums[f"map@{k}"] += ap / min(len(rel), k)
            sums[f"hit@{k}"] += 1.0 if any(hits) else 0.0
            sums[f"mrr@{k}"] += 1 / (hits.index(1) + 1) if any(hits) else 0.0
            for i in top:
                shown[k][i] += 1
    out = {name: v / len(users) for name, v in sums.items()}
    for k in ks:
        out[f"coverage@{k}"] = sum(1 for c in shown[k] if c) / num_items
        x, n = sorted(shown[k]), num_items  # Gini: mean absolute difference / (2 * mean)
        out[f"gini@{k}"] = sum(abs(a - b) for a in x for b in x) / (2 * n * sum(x))
        if popularity is not None:
            pct = [sum(1 for q in popularity if q < p) / num_items for p in popularity]
            out[f"popularity@{k}"] = sum(c * pct[i] for i, c in enumerate(shown[k])) / sum(shown[k])
    return out


def _random_sets(num_users, num_items, max_per_user, seed, empty_share=0.2):
    g = torch.Generator().manual_seed(seed)
    sets = {}
    for u in range(num_users):
        n = 0 if torch.rand(1, generator=g).item() < empty_share else int(torch.randint(1, max_per_user + 1, (1,), generator=g))
        sets[u] = set(torch.randperm(num_items, generator=g)[:n].tolist())
    return sets


def _to_item_sets(sets, num_users, num_items):
    users = torch.tensor([u for u, items in sets.items() for _ in items], dtype=torch.long)
    items = torch.tensor([i for _, s in sets.items() for i in s], dtype=torch.long)
    return ItemSets.from_pairs(users, items, num_users, num_items)


@pytest.mark.parametrize("seed,num_items,max_block", [(0, 60, 1 << 20), (1, 200, 600), (2, 30, 31)])
def test_ranking_metrics_match_reference(seed, num_items, max_block):
    num_users, ks = 70, (1, 5, 10, 20, 50)
    g = torch.Generator().manual_seed(seed)
    user_vecs, item_vecs = torch.randn(num_users, 8, generator=g), torch.randn(num_items, 8, generator=g)
    exclude = _random_sets(num_users, num_items, 12, seed + 100)
    truth = {u: s - exclude[u] for u, s in _random_sets(num_users, num_items, 6, seed + 200).items()}
    popularity = torch.randint(0, 5, (num_items,), generator=g)  # many ties
    got = ranking_metrics(user_vecs, item_vecs, _to_item_sets(truth, num_users, num_items),
                          _to_item_sets(exclude, num_users, num_items), ks, max_block=max_block,
                          item_popularity=popularity)
    expected = _reference(user_vecs, item_vecs, truth, exclude, ks, popularity.tolist())
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name


def test_perfect_ranking_scores_one():
    # item i's vector is e_i; user u likes items {u, u+1}: put them first
    item_vecs = torch.eye(10)
    user_vecs = torch.zeros(5, 10)
    truth = {}
    for u in range(5):
        user_vecs[u, [u, u + 1]] = 1.0
        truth[u] = {u, u + 1}
    got = ranking_metrics(user_vecs, item_vecs, _to_item_sets(truth, 5, 10), None, (2, 5))
    assert got["recall@2"] == pytest.approx(1.0) and got["ndcg@2"] == pytest.approx(1.0)
    assert got["map@5"] == pytest.approx(1.0) and got["precision@2"] == pytest.approx(1.0)
    assert got["precision@5"] == pytest.approx(0.4)


def test_catalog_metrics_of_extreme_recommenders():
    # every user gets the same top items -> low coverage, high gini, top popularity; distinct -> the reverse
    num_items, num_users, k = 20, 10, 2
    popularity = torch.arange(num_items)  # item 19 most popular
    truth = _to_item_sets({u: {u} for u in range(num_users)}, num_users, num_items)
    same = ranking_metrics(torch.ones(num_users, 1), torch.arange(num_items, dtype=torch.float32)[:, None], truth,
                           None, (k,), item_popularity=popularity)
    assert same["coverage@2"] == pytest.approx(2 / 20) and same["popularity@2"] == pytest.approx(18.5 / 20)
    assert same["gini@2"] == pytest.approx(0.9)  # 2 of 20 items take every slot: 1 - 2/20
    items = torch.eye(num_items)
    users = items[:num_users] * 2 + items[num_users:]  # user u: items u, then u + 10
    spread = ranking_metrics(users, items, truth, None, (k,), item_popularity=popularity)
    assert spread["coverage@2"] == 1.0 and spread["gini@2"] == pytest.approx(0.0)
    assert spread["hit@2"] == 1.0 and spread["mrr@2"] == 1.0 and spread["popularity@2"] == pytest.approx(9.5 / 20)
    assert "popularity@2" not in ranking_metrics(users, items, truth, None, (k,))


def test_excluded_items_are_never_ranked():
    item_vecs = torch.eye(6)
    user_vecs = torch.ones(1, 6) + torch.arange(6.0)  # prefers item 5, then 4, ...
    truth = _to_item_sets({0: {5}}, 1, 6)
    exclude = _to_item_sets({0: {5}}, 1, 6)
    assert ranking_metrics(user_vecs, item_vecs, truth, exclude, (1,))["recall@1"] == 0.0
    _, items = topk_items(user_vecs, item_vecs, torch.tensor([0]), 3, exclude)
    assert items.tolist() == [[4, 3, 2]]


def test_topk_fills_with_minus_one_when_items_run_out():
    item_vecs = torch.randn(4, 3)
    exclude = _to_item_sets({0: {0, 1}}, 1, 4)
    scores, items = topk_items(torch.randn(1, 3), item_vecs, torch.tensor([0]), 6, exclude)
    assert items.shape == (1, 6)
    assert sorted(items[0, :2].tolist()) == [2, 3] and items[0, 2:].tolist() == [-1] * 4
    assert torch.isinf(scores[0, 2:]).all()


def test_item_sets_round_trip():
    users = torch.tensor([2, 0, 2, 2, 0])
    items = torch.tensor([5, 1, 3, 5, 0])
    s = ItemSets.from_pairs(users, items, 4, 6)
    assert s.counts().tolist() == [2, 0, 2, 0]
    assert s.users().tolist() == [0, 2]
    rows, its = s.pairs(torch.tensor([2, 0]))
    assert rows.tolist() == [0, 0, 1, 1] and its.tolist() == [3, 5, 0, 1]


def test_no_relevant_users_gives_zeros():
    empty = ItemSets.from_pairs(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3, 4)
    got = ranking_metrics(torch.randn(3, 2), torch.randn(4, 2), empty, None, (5,))
    assert all(v == 0.0 for v in got.values())


def test_topk_in_blocks_of_users_equals_one_block_and_each_user_alone():
    g = torch.Generator().manual_seed(3)
    num_users, num_items = 13, 40
    user_vecs, item_vecs = torch.randn(num_users, 5, generator=g), torch.randn(num_items, 5, generator=g)
    exclude = _to_item_sets({u: {u, (3 * u + 1) % num_items} for u in range(num_users)}, num_users, num_items)
    users = torch.tensor([12, 0, 5, 5, 7, 1, 3, 9, 2, 11, 4])
    whole = topk_items(user_vecs, item_vecs, users, 6, exclude, max_block=1 << 20)
    blocks = topk_items(user_vecs, item_vecs, users, 6, exclude, max_block=3 * num_items)  # 3 users a block, last 2
    assert torch.equal(whole[1], blocks[1]) and torch.allclose(whole[0], blocks[0], atol=1e-5)  # other product sizes
    for row, u in enumerate(users.tolist()):
        alone = topk_items(user_vecs, item_vecs, torch.tensor([u]), 6, exclude)
        assert torch.equal(alone[1][0], blocks[1][row]) and torch.allclose(alone[0][0], blocks[0][row], atol=1e-5)
