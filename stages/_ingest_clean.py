"""Validating, filtering and splitting raw items / interactions for the ingest stage.

Every row removed here becomes a rejects row whose reason starts with a code:
``empty-id``, ``duplicate-item``, ``image-path``, ``bad-timestamp``, ``bad-rating``,
``bad-split``, ``unknown-item``, ``rejected-item``, ``below-min-rating``, ``no-timestamp``,
``duplicate-interaction``, ``kcore-user``, ``kcore-item``, ``no-train``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..models.text import DEFAULT_TEXT_TEMPLATE, apply_text_template_columns
from ..pipeline.errors import InputDataError
from ..pipeline.lazy import lazy_module
from ._ingest_readers import Rejects, Sieve

pd = lazy_module("pandas")  # imported on first use (pipeline/lazy.py)
pc = lazy_module("pyarrow.compute")

SPLITS = ("train", "valid", "test")
TIMED_SPLITS = ("temporal", "global-temporal", "leave-one-out")  # split policies that order by timestamp
SPLIT_ALIASES = {"train": 0, "training": 0, "0": 0, "valid": 1, "val": 1, "validation": 1, "dev": 1, "1": 1,
                 "test": 2, "testing": 2, "2": 2}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ITEMS, INTER = "items", "interactions"


def _text(part: str | pd.Series) -> str | pa.Array:
    """One piece of a reason: a literal, or a column's values as Arrow strings (floats as pandas prints them)."""
    if isinstance(part, str):
        return part
    if part.dtype.kind == "f":
        part = part.astype("str")
    return pc.cast(pa.array(part, from_pandas=True), pa.string())  # Arrow-backed and categorical columns: no copy


def _join(*parts: str | pd.Series) -> pa.Array:
    """One reason per row: the literals and columns of ``parts`` concatenated in Arrow (no Python string per row)."""
    return pc.binary_join_element_wise(*map(_text, parts), "")


def _q(values: pd.Series) -> tuple[str, pd.Series, str]:
    """A value quoted for a reason text ('x'): the pieces for :func:`_join`."""
    return "'", values, "'"


def _where(src: pd.Series, row: pd.Series) -> tuple[pd.Series, str, pd.Series]:
    """ "file.csv row N" per row: the pieces for :func:`_join`."""
    src = src.astype("category")
    return src.cat.rename_categories([Path(s).name for s in src.cat.categories]), " row ", row


# ---- vectorised helpers (Arrow compute on string columns, instead of Python per value) ------
def arrow_strings(values: pd.Series | pd.Index | np.ndarray) -> pa.Array | pa.ChunkedArray:
    """Strings as Arrow (a pandas str column's chunks as they are: no copy)."""
    return pa.array(values.to_numpy() if isinstance(values, pd.Index) else values, type=pa.large_string(),
                    from_pandas=True)


def _value_set(values: pd.Series | pd.Index) -> pa.Array:
    arr = arrow_strings(values)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def isin(values: pd.Series, allowed: pd.Series | pd.Index) -> np.ndarray:
    """(N,) bool: ``values[i]`` is one of ``allowed`` (strings)."""
    return pc.is_in(arrow_strings(values), value_set=_value_set(allowed)).to_numpy(zero_copy_only=False)


def index_in(values: pd.Series, index: pd.Series | pd.Index) -> np.ndarray:
    """(N,) int64 position of each value in ``index`` (unique strings), -1 when absent."""
    found = pc.index_in(arrow_strings(values), value_set=_value_set(index))
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def codes(values: pd.Series) -> np.ndarray:
    """(N,) int32 code per string, numbered in order of first appearance (like ``pd.factorize``)."""
    encoded = arrow_strings(values).dictionary_encode()  # one dictionary across the chunks
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    return np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks] or [np.zeros(0, np.int32)])


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer keys, made unique by their position
    (key * N + position) where that fits in int64, so that the faster default sort gives the same order."""
    n = len(keys)
    if n and int(keys.max()) < (2**62) // n:
        return np.argsort(keys.astype(np.int64) * n + np.arange(n))
    return np.argsort(keys, kind="stable")


def first_of_pair(u: np.ndarray, i: np.ndarray) -> np.ndarray:
    """(N,) position of the first row with the same (``u``, ``i``) pair: a stable sort of the pair keys
    (less memory than ``np.unique`` with its index and inverse)."""
    key = u.astype(np.int64) * (int(i.max(initial=0)) + 1) + i
    order = stable_argsort(key)
    key = key[order]
    new = np.ones(len(key), dtype=bool)
    np.not_equal(key[1:], key[:-1], out=new[1:])
    del key
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))]
    return first


def to_float(values: pd.Series) -> np.ndarray:
    """Strings -> (N,) float64, NaN for "" and for text that is not a number."""
    arr = arrow_strings(values)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
    try:
        return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # some value is not a number: parse value by value
        return pd.to_numeric(pd.Series(arr.to_pandas(), dtype=object), errors="coerce").to_numpy(np.float64)


# ---- items --------------------------------------------------------------------------------
def clean_items(items: pd.DataFrame, rejects: Rejects, root: Path) -> tuple[pd.DataFrame, pd.Series]:
    """Drop items without an id, repeated ids and images outside ``root``; add ``text``.

    Returns the kept items and, for rejected items that had an id, a Series id -> "file row N".
    """
    items = rejects.add_rows(ITEMS, items, items["item_id"] == "", "empty-id: the item_id is empty")
    first = items.groupby("item_id", sort=False)["_row"].transform("first")
    items = rejects.add_rows(ITEMS, items.assign(_first=first), items["item_id"].duplicated(keep="first"),
                             lambda bad: _join("duplicate-item: item_id ", *_q(bad["item_id"]), " already at row ",
                                               bad["_first"], " (the first row is kept)"))
    images = items["image"].astype(object)
    refs = images.copy()
    odd = ~_plain_relative(items["image"])  # only these need normalising (or are rejected)
    refs[odd] = [_image_ref(v, root) for v in images[odd].tolist()]
    bad = np.zeros(len(items), dtype=bool)
    bad[odd] = [isinstance(r, ValueError) for r in refs[odd].tolist()]
    gone = items[bad]
    items = rejects.add_rows(ITEMS, items.assign(_ref=refs), bad,
                             lambda rows: _join("image-path: ", rows["_ref"].astype(str)))
    items = items.assign(image=items["_ref"]).drop(columns=["_ref", "_first"])
    fields = {c: arrow_strings(items[c]) for c in ("title", "description")}
    text = apply_text_template_columns(DEFAULT_TEXT_TEMPLATE, fields, len(items))  # as encode joins them
    items["text"] = text.to_pandas().set_axis(items.index)
    rejected = pd.Series(_join(*_where(gone["_src"], gone["_row"])).to_pylist() if len(gone) else [],
                         index=gone["item_id"].to_numpy(), dtype=object)
    return items, rejected


def _plain_relative(values: pd.Series) -> np.ndarray:
    """(N,) bool: a non-empty relative path that ``os.path.normpath`` leaves as it is (no "//", no "."
    or ".." segment, no leading or trailing "/"), so :func:`_image_ref` would return it unchanged."""
    v = values.astype("str")
    odd = (v == "") | (v == ".") | v.str.startswith("/") | v.str.startswith("./") | v.str.endswith("/")
    odd |= v.str.endswith("/.") | v.str.contains("//", regex=False) | v.str.contains("/./", regex=False)
    odd |= v.str.contains("..", regex=False)
    return ~odd.to_numpy(dtype=bool)


def _image_ref(value: str, root: Path) -> str | None | ValueError:
    """A POSIX path relative to ``root``, an http(s) URL, None (no image), or the error to reject with."""
    if not value:
        return None
    if _URL.match(value):
        if value.lower().startswith(("http://", "https://")):
            return value
        return ValueError(f"image {value!r} uses an unsupported URL scheme; use http(s) or a path under catalog_root")
    path = os.path.normpath(value)
    if os.path.isabs(path):
        path = os.path.relpath(path, root)
    if path in (".", "..") or path.startswith(".." + os.sep):
        return ValueError(f"image {value!r} is outside catalog_root {str(root)!r}; move the image under it "
                          "or set ingest.catalog_root")
    return path.replace(os.sep, "/")


# ---- interactions -------------------------------------------------------------------------
def parse_timestamps(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (float64 unix seconds with NaN for empty, bool mask of unparseable values)."""
    empty = (values == "").to_numpy()
    num = np.array(to_float(values), dtype=np.float64)  # a writable copy
    todo = np.isnan(num) & ~empty
    if todo.any():
        dates = pd.to_datetime(values[todo], errors="coerce", utc=True, format="ISO8601")
        secs = (dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        num[todo] = secs.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(num) & ~empty
    return np.floor(num), bad


def clean_interactions(inter: pd.DataFrame, items: pd.DataFrame, rejected_items: pd.Series, rejects: Rejects,
                       *, split_policy: str, min_rating: float | None) -> pd.DataFrame:
    """Parse timestamp / rating / split and drop rows that cannot be used. ``inter`` is consumed: its
    timestamp / rating / split columns are dropped once parsed.

    Returns user_id, item_id, ts (float64 seconds, NaN = none), rating (float64, NaN = none),
    split (0/1/2 with ``split_policy == "given"``, else -1), _src, _row.
    """
    sieve = Sieve(rejects, INTER, inter)
    for col in ("user_id", "item_id"):
        sieve.reject(inter[col] == "", f"empty-id: the {col} is empty")
    ts, bad = parse_timestamps(inter["timestamp"])
    sieve.reject(bad, lambda rows, _: _join(
        "bad-timestamp: ", *_q(rows["timestamp"]), " is neither unix seconds nor an ISO-8601 date"))
    rating = to_float(inter["rating"])
    sieve.reject((inter["rating"] != "").to_numpy() & ~np.isfinite(rating),
                 lambda rows, _: _join("bad-rating: ", *_q(rows["rating"]), " is not a number"))
    if split_policy == "given":
        alias = pc.index_in(pc.utf8_lower(arrow_strings(inter["split"])), value_set=pa.array(list(SPLIT_ALIASES)))
        alias = alias.fill_null(-1).to_numpy(zero_copy_only=False)
        sieve.reject(alias < 0, lambda rows, _: _join(
            "bad-split: ", *_q(rows["split"]), " is not train / valid / test (or val, 0 / 1 / 2)"))
        split = np.where(alias < 0, -1, np.array(list(SPLIT_ALIASES.values()), dtype=np.int8)[alias]).astype(np.int8)
    else:
        split = np.full(len(inter), -1, dtype=np.int8)
    for parsed in ("timestamp", "rating", "split"):
        del inter[parsed]  # free the raw strings (the frame is this function's; the sieve sees the same frame)
    known = isin(inter["item_id"], items["item_id"])
    pos = index_in(inter["item_id"], rejected_items.index)
    sieve.reject(~known & (pos >= 0), lambda rows, at: _join(
        "rejected-item: item_id ", *_q(rows["item_id"]), " was rejected (items ",
        pd.Series(rejected_items.to_numpy(dtype=object)[pos[at]], dtype="str"), ")"))
    sieve.reject(~known, lambda rows, _: _join(
        "unknown-item: item_id ", *_q(rows["item_id"]), " is not among the items read; add it to the items file "
        "(or fix its rejected row there) or remove this row"))
    known = pos = None  # no longer needed: free them before the pair search
    if min_rating is not None:
        sieve.reject(rating < min_rating, lambda rows, at: _join(
            "below-min-rating: rating ", pd.Series(rating[at]), f" < ingest.min_rating = {min_rating}"))
    if split_policy in TIMED_SPLITS:
        sieve.reject(np.isnan(ts), f"no-timestamp: split = '{split_policy}' needs a timestamp on every interaction")
    alive = np.flatnonzero(sieve.alive)
    first = alive[first_of_pair(codes(inter["user_id"])[alive], codes(inter["item_id"])[alive])]
    later = first != alive  # a later row of a (user, item) pair; first[later] is the pair's first row
    dup = np.zeros(len(inter), dtype=bool)
    dup[alive[later]] = True
    dup_at, first = alive[later], first[later]
    src, row = inter["_src"], inter["_row"].to_numpy()
    first_src, first_row = src.take(first).reset_index(drop=True), row[first]
    first = None

    def duplicate(rows: pd.DataFrame, at: np.ndarray) -> pa.Array:
        j = np.searchsorted(dup_at, at)  # the rows' places among the duplicates
        return _join("duplicate-interaction: user ", *_q(rows["user_id"]), " and item ", *_q(rows["item_id"]),
                     " already at ", *_where(first_src.take(j), pd.Series(first_row[j])), " (the first is kept)")

    sieve.reject(dup, duplicate, code="duplicate-interaction")
    keep = np.flatnonzero(sieve.alive)
    return pd.DataFrame({"user_id": inter["user_id"].take(keep).reset_index(drop=True),
                         "item_id": inter["item_id"].take(keep).reset_index(drop=True),
                         "ts": ts[keep], "rating": rating[keep], "split": split[keep],
                         "_src": src.take(keep).reset_index(drop=True), "_row": row[keep]})


# ---- k-core and the train rule ------------------------------------------------------------
def filter_core(inter: pd.DataFrame, items: pd.DataFrame, rejects: Rejects, *, k: int,
                need_train: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Iterated k-core on users and items (until no count changes); with ``need_train`` also drop the
    valid/test rows of users left without a train row. Returns (interactions, items) kept."""
    u = codes(inter["user_id"])
    i = index_in(inter["item_id"], items["item_id"])
    n_u, n_i = int(u.max()) + 1 if len(u) else 0, len(items)
    train = (inter["split"] == 0).to_numpy()
    alive = np.ones(len(inter), dtype=bool)
    code = np.zeros(len(inter), dtype=np.int8)  # 1 kcore-user, 2 kcore-item, 3 no-train
    left = np.zeros(len(inter), dtype=np.int64)  # the count that fell short
    rnd = np.zeros(len(inter), dtype=np.int64)  # the round that removed the row
    item_left = np.zeros(n_i, dtype=np.int64)  # per item: its count when it fell below k
    item_round = np.zeros(n_i, dtype=np.int64)  # per item: that round (0 = kept)
    r = 0
    while True:
        r += 1
        drop = np.zeros(len(inter), dtype=bool)
        if k > 0:
            per_item = np.bincount(i[alive], minlength=n_i)
            newly = (per_item < k) & (item_round == 0)
            item_left[newly], item_round[newly] = per_item[newly], r
            cu = np.bincount(u[alive], minlength=n_u)[u]
            ci = per_item[i]
            by_user = alive & (cu < k)
            by_item = alive & ~by_user & (ci < k)
            code[by_user], left[by_user] = 1, cu[by_user]
            code[by_item], left[by_item] = 2, ci[by_item]
            drop |= by_user | by_item
        if need_train:
            keep = alive & ~drop
            no_train = keep & (np.bincount(u[keep & train], minlength=n_u)[u] == 0)
            code[no_train] = 3
            drop |= no_train
        if not drop.any():
            break
        rnd[drop] = r
        alive &= ~drop
    sieve = Sieve(rejects, INTER, inter)
    gone = np.flatnonzero(~alive)
    code, left, rnd = code[gone], left[gone], rnd[gone]  # kept for the reasons, which are made when written
    n = np.bincount(code, minlength=4)
    sieve.reject(~alive, _core_reasons(k, gone, code, left, rnd),
                 code={"kcore-user": int(n[1]), "kcore-item": int(n[2]), "no-train": int(n[3])})
    inter = inter.take(np.flatnonzero(sieve.alive)).reset_index(drop=True)
    if k > 0:
        items = rejects.add_rows(ITEMS, items.assign(_left=item_left, _round=item_round), item_round > 0,
                                 lambda rows: _join(
            "kcore-item: item ", *_q(rows["item_id"]), " had ", rows["_left"], " interaction(s) left in round ",
            rows["_round"], f", fewer than kcore = {k}"))
        items = items.drop(columns=["_left", "_round"])
    return inter, items


def _core_reasons(k: int, gone: np.ndarray, code: np.ndarray, left: np.ndarray, rnd: np.ndarray):
    """Reasons for the rows ``filter_core`` removed (positions ``gone``): per removed row ``code`` 1 kcore-user,
    2 kcore-item, 3 no-train, with the count that fell short (``left``) and the round (``rnd``)."""
    def reasons(rows: pd.DataFrame, at: np.ndarray) -> pa.Array:
        j = np.searchsorted(gone, at)
        by_user = code[j] != 2  # kcore-user and no-train name the user, kcore-item the item
        who = pa.array(np.where(by_user, "user", "item"))
        ids = pc.if_else(pa.array(by_user), _text(rows["user_id"]), _text(rows["item_id"]))
        kcore = pc.binary_join_element_wise("kcore-", who, ": ", who, " '", ids, "' had ", _text(pd.Series(left[j])),
                                            " interaction(s) left in round ", _text(pd.Series(rnd[j])),
                                            f", fewer than kcore = {k}", "")
        no_train = pc.binary_join_element_wise(
            "no-train: user '", ids, "' has no train interaction left; a user in valid / test needs one", "")
        return pc.if_else(pa.array(code[j] == 3), no_train, kcore)

    return reasons


# ---- splits ---------------------------------------------------------------------------------
def split_sizes(n: np.ndarray, ratios: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (n_valid, n_test): rounded shares, at least one each where the share is > 0, and at
    least one train row; with 2 rows the second goes to test, with 1 row it stays in train."""
    n = np.asarray(n, dtype=np.int64)
    n_valid = np.floor(n * ratios[1] + 0.5).astype(np.int64)
    n_test = np.floor(n * ratios[2] + 0.5).astype(np.int64)
    if ratios[1] > 0:
        n_valid = np.maximum(n_valid, 1)
    if ratios[2] > 0:
        n_test = np.maximum(n_test, 1)
    over = np.maximum(n_valid + n_test - (n - 1), 0)  # rows to give back to train
    cut = np.minimum(over, n_valid)
    n_valid -= cut
    n_test -= np.minimum(over - cut, n_test)
    return n_valid, n_test


def assign_split(user: np.ndarray, ts: np.ndarray, policy: str, ratios: tuple[float, float, float],
                 seed: int) -> np.ndarray:
    """Split code per row (0 train, 1 valid, 2 test) for ``policy`` "random", "temporal" or "leave-one-out".

    random: each user's rows in a seeded random order; temporal and leave-one-out: newest first
    (ties: later row newer). The first n_test of that order go to test, the next n_valid to valid:
    ``split_sizes`` of ``ratios``, or for leave-one-out one test row (users with 2+ rows) and one
    valid row (users with 3+ rows).
    """
    n = len(user)
    if policy == "random":  # by user, then by a seeded random key (np.lexsort((key, user)), in two sorts)
        within = np.argsort(np.random.default_rng(seed).random(n))
    else:  # by user, then newest first, then later row first (np.lexsort((-np.arange(n), -ts, user)))
        backwards = np.arange(n)[::-1]
        within = backwards[np.argsort(-ts[backwards], kind="stable")]
    order = within[stable_argsort(user[within])]
    sorted_user = user[order]
    counts = np.bincount(user)
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n) - start[sorted_user]  # position within the user's ordering
    if policy == "leave-one-out":
        n_valid, n_test = (counts >= 3).astype(np.int64), (counts >= 2).astype(np.int64)
    else:
        n_valid, n_test = split_sizes(counts, ratios)
    code = np.zeros(n, dtype=np.int8)
    code[order[rank < n_test[sorted_user]]] = 2
    code[order[(rank >= n_test[sorted_user]) & (rank < (n_test + n_valid)[sorted_user])]] = 1
    return code


def global_temporal_split(ts: np.ndarray, ratios: tuple[float, float, float]) -> tuple[np.ndarray, dict[str, int]]:
    """One pair of cut-off times for every user: (split code per row, {"valid_from", "test_from"}).

    The newest ``round(N * ratios[2])`` rows set the test cut-off and the ``round(N * ratios[1])``
    before them the valid cut-off; every row at or after a cut-off time is in that split (rows
    sharing the cut-off's timestamp go to the later split), so each split is one time interval and
    nothing in train is newer than anything in valid or test. ``ts`` (N,) unix seconds, no NaN.
    """
    n = len(ts)
    ordered = np.sort(ts)
    n_test = int(np.floor(n * ratios[2] + 0.5))
    n_valid = int(np.floor(n * ratios[1] + 0.5))
    test_from = ordered[n - n_test] if n_test else np.inf
    valid_from = ordered[n - n_test - n_valid] if n_valid else test_from
    code = np.zeros(n, dtype=np.int8)
    code[ts >= valid_from] = 1
    code[ts >= test_from] = 2
    if not (code == 0).any():
        raise InputDataError(
            f"split = 'global-temporal': every interaction is at or after the valid cut-off "
            f"(unix time {int(valid_from)}), so train would be empty; the timestamps are (nearly) all equal; "
            "use split = 'temporal' (per user) or 'random'")
    cutoffs = {name: int(t) for name, t in (("valid_from", valid_from), ("test_from", test_from)) if np.isfinite(t)}
    return code, cutoffs
