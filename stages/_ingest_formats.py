"""The three raw layouts the ingest stage reads, each turned into one :class:`Catalog`.

- ``table``: an items file + an interactions file (CSV / TSV / JSONL / Parquet);
- ``mmrec``: the MMRec benchmark folder: ``<name>.inter`` (TSV: userID itemID rating timestamp
  x_label, x_label 0/1/2 = train/valid/test) + feature files whose rows follow itemID
  (``ingest.features``: modality name -> file, by default MMRec's ``image_feat.npy`` / ``text_feat.npy``);
- ``split-json``: ``train.json`` / ``val.json`` / ``test.json``, each ``{"<userIdx>": [itemIdx, ...]}``,
  + optional ``item2id.json`` / ``user2id.json`` (original id -> idx).

Items that no file lists (mmrec; split-json without item2id.json) are implied by their ids;
their ``_row`` is 0 (not a row of any file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np

from ..pipeline.config import Config
from ..pipeline.config.ingest import MMREC_FEATURE_FILES
from ..pipeline.errors import InputDataError
from ..pipeline.lazy import lazy_module
from ._ingest_readers import RawTable, Rejects, check_types, read_table, require_columns

pd = lazy_module("pandas")  # imported on first use (pipeline/lazy.py)

ITEM_FIELDS = ("item_id", "title", "description", "image")
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp", "rating", "split")
RESERVED_ITEM_COLUMNS = {"item_idx", "item_id", "title", "description", "text", "image"}
MMREC_COLUMNS = {"user_id": "userID", "item_id": "itemID", "rating": "rating", "timestamp": "timestamp",
                 "split": "x_label"}
SPLIT_FILES = {"train": ("train.json",), "valid": ("val.json", "valid.json"), "test": ("test.json",)}


@dataclass
class Catalog:
    """Raw items and interactions as strings ("" = missing), each row tagged with ``_src`` / ``_row``."""

    items: pd.DataFrame  # item_id, title, description, image, <extra columns>, _src, _row (+ _feature_row)
    interactions: pd.DataFrame  # user_id, item_id, timestamp, rating, split, _src, _row
    read: dict[str, int]  # "items: <file>" / "interactions: <file>" -> records read
    present: set[str]  # optional interaction columns the source has: timestamp, rating, split
    source: str  # what was read (for the items.parquet metadata)
    user_order: list[str] | None = None  # user ids in dense-index order; None = order of first appearance
    features: dict[str, Path] = field(default_factory=dict)  # modality -> .npy whose rows follow _feature_row

    def hand_over_interactions(self) -> pd.DataFrame:
        """The raw interactions, no longer held here: once cleaned, their strings can be freed."""
        frame, self.interactions = self.interactions, pd.DataFrame()
        return frame


def load_catalog(config: Config, rejects: Rejects, log: Callable[[str], None]) -> Catalog:
    fmt = config.ingest.format
    if fmt == "table":
        return _load_table(config, rejects, log)
    if fmt == "mmrec":
        return _load_mmrec(config, rejects)
    return _load_split_json(config, rejects)


def external_inputs(config: Config) -> list[Path]:
    """The raw files ingest reads (absent optional ones included, so their appearing makes ingest stale)."""
    cfg = config.ingest
    src = config.resolve(cfg.interactions)
    if cfg.format == "table":
        return [config.resolve(cfg.items), src]
    if cfg.format == "mmrec":
        folder = src.parent if src.suffix == ".inter" else src
        inter = [src] if src.suffix == ".inter" else sorted(folder.glob("*.inter"))
        return inter + [folder / name for name in config.ingest.features.values()]
    names = [n for names in SPLIT_FILES.values() for n in names] + ["item2id.json", "user2id.json"]
    return [src / n for n in names]


# ---- table ------------------------------------------------------------------------------
def _load_table(config: Config, rejects: Rejects, log: Callable[[str], None]) -> Catalog:
    cfg = config.ingest
    cols = cfg.columns
    enc = cfg.encoding
    items_raw = read_table(config.resolve(cfg.items), enc, rejects, "items")
    require_columns(items_raw, {"item_id": cols.item_id, "title": cols.title}, "items file")
    inter_raw = read_table(config.resolve(cfg.interactions), enc, rejects, "interactions")
    require_columns(inter_raw, {"user_id": cols.user_id, "item_id": cols.item_id}, "interactions file")
    items_map = {f: getattr(cols, f) for f in ITEM_FIELDS}
    check_types(items_raw, items_map, "items file")
    items = _canonical(items_raw, items_map, keep_extra=True)
    inter_map = {f: getattr(cols, f) for f in INTERACTION_FIELDS}
    check_types(inter_raw, inter_map, "interactions file")
    present = {f for f in ("timestamp", "rating", "split") if inter_map[f] in inter_raw.columns}
    missing = sorted({"timestamp", "rating"} - present)
    if missing:
        log(f"interactions file has no {' / '.join(repr(inter_map[f]) for f in missing)} column: left empty")
    ignored = [c for c in inter_raw.columns if c not in inter_map.values()]
    if ignored:
        log(f"interactions file columns not used: {ignored}")
    return Catalog(
        items=items,
        interactions=_canonical(inter_raw, inter_map, keep_extra=False),
        read={f"items: {items_raw.path}": items_raw.n_read, f"interactions: {inter_raw.path}": inter_raw.n_read},
        present=present,
        source=str(items_raw.path),
    )


def _canonical(raw: RawTable, mapping: dict[str, str], keep_extra: bool) -> pd.DataFrame:
    """Our column names from the file's (absent optional columns become ""); extras kept as strings."""
    frame = raw.frame
    out = pd.DataFrame(index=frame.index)
    for ours, theirs in mapping.items():
        out[ours] = frame[theirs] if theirs in frame.columns else ""
    if keep_extra:
        for col in raw.columns:
            if col not in mapping.values():
                out[f"raw_{col}" if col in RESERVED_ITEM_COLUMNS else col] = frame[col]
    out["_src"] = frame["_src"]
    out["_row"] = frame["_row"]
    return out


# ---- mmrec ------------------------------------------------------------------------------
def _load_mmrec(config: Config, rejects: Rejects) -> Catalog:
    src = config.resolve(config.ingest.interactions)
    if src.is_dir():
        found = sorted(src.glob("*.inter"))
        if len(found) != 1:
            what = "no *.inter file" if not found else f"{len(found)} .inter files ({[p.name for p in found]})"
            raise InputDataError(f"MMRec folder {src} has {what}; set ingest.interactions to the .inter file")
        inter_path, folder = found[0], src
    elif src.suffix == ".inter":
        inter_path, folder = src, src.parent
    else:
        raise InputDataError(f"format = 'mmrec' expects ingest.interactions to be an MMRec folder or a .inter "
                             f"file, got {src}")
    raw = read_table(inter_path, "utf-8", rejects, "interactions")
    require_columns(raw, {"user_id": "userID", "item_id": "itemID"}, "MMRec interactions file",
                    fix="An MMRec .inter file starts with the header line: userID itemID rating timestamp x_label "
                        "(tab-separated).")
    inter = _canonical(raw, MMREC_COLUMNS, keep_extra=False)
    present = {f for f in ("timestamp", "rating", "split") if MMREC_COLUMNS[f] in raw.columns}
    for col in ("user_id", "item_id"):  # "007" and "7" are the same index
        num = pd.to_numeric(inter[col], errors="coerce")
        ok = num.notna() & (num >= 0) & (num == np.floor(num))
        bad = ~ok.to_numpy()
        inter = rejects.add_rows("interactions", inter, bad, lambda rows: f"malformed: {MMREC_COLUMNS[col]} "
                                 + rows[col].map(repr) + " is not a non-negative integer")
        inter = inter.assign(**{col: num[ok].astype(np.int64).astype(str)})
    n_items = int(pd.to_numeric(inter["item_id"]).max()) + 1 if len(inter) else 0
    named = config.ingest.features
    absent = [n for n in named.values() if not (folder / n).is_file()]
    if absent and named != MMREC_FEATURE_FILES:
        raise InputDataError(f"ingest.features names {absent}, not found in the MMRec folder {folder} "
                             f"(it has {sorted(p.name for p in folder.glob('*.npy'))})")
    features = {m: folder / name for m, name in named.items() if (folder / name).is_file()}
    sizes = {path.name: _npy_rows(path) for path in features.values()}
    if len(set(sizes.values())) > 1:
        raise InputDataError(f"feature files in {folder} disagree on the number of items: {sizes}")
    for name, rows in sizes.items():
        if rows < n_items:
            raise InputDataError(f"{folder / name} has {rows} rows but itemIDs in {inter_path.name} go up to "
                                 f"{n_items - 1}; its rows must follow itemID (row i = item i): regenerate it")
        n_items = rows
    ids = np.arange(n_items)
    items = pd.DataFrame({"item_id": ids.astype(str), "title": "", "description": "", "image": "",
                          "_src": str(inter_path), "_row": 0, "_feature_row": ids})
    read = {f"items: {inter_path}": n_items, f"interactions: {inter_path}": raw.n_read}
    users = np.unique(inter["user_id"].to_numpy(np.int64)).astype(str).tolist()  # userID order
    return Catalog(items=items, interactions=inter, read=read, present=present, source=str(inter_path),
                   user_order=users, features=features)


def _npy_rows(path: Path) -> int:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputDataError(f"{path} is not a readable numeric .npy array ({e}); re-save it with numpy.save "
                             "as a 2-D float array (one row per item)") from e
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise InputDataError(f"{path} holds a {arr.ndim}-D {arr.dtype} array; expected 2-D floats (items x dim)")
    return int(arr.shape[0])


# ---- split-json -------------------------------------------------------------------------
def _load_split_json(config: Config, rejects: Rejects) -> Catalog:
    folder = config.resolve(config.ingest.interactions)
    if not folder.is_dir():
        raise InputDataError(f"format = 'split-json' expects ingest.interactions to be a folder with train.json / "
                             f"val.json / test.json; {folder} is not a folder")
    item_ids, item_rows = _id_map(folder / "item2id.json")
    user_ids, _ = _id_map(folder / "user2id.json")
    frames, read = [], {}
    for split, names in SPLIT_FILES.items():
        path = next((folder / n for n in names if (folder / n).is_file()), folder / names[0])
        frame, n_read = _read_split_file(path, split, rejects)
        for col, known, map_file in (("user", user_ids, "user2id.json"), ("item", item_ids, "item2id.json")):
            if known is not None:
                unknown = ~frame[col].isin(known.index).to_numpy()
                frame = rejects.add_rows("interactions", frame, unknown, lambda rows: f"unknown-{col}: {col}Idx "
                                         + rows[col].astype(str) + f" is not in {map_file}")
        frames.append(frame)
        read[f"interactions: {path}"] = n_read
    pairs = pd.concat(frames, ignore_index=True)
    users = user_ids if user_ids is not None else _implied(pairs["user"])
    items = item_ids if item_ids is not None else _implied(pairs["item"])
    inter = pd.DataFrame({"user_id": users.reindex(pairs["user"]).to_numpy(),
                          "item_id": items.reindex(pairs["item"]).to_numpy(),
                          "timestamp": "", "rating": "", "split": pairs["split"].to_numpy(),
                          "_src": pairs["_src"].to_numpy(), "_row": pairs["_row"].to_numpy()})
    if item_ids is not None:
        item_src, rows = str(folder / "item2id.json"), item_rows.reindex(items.index).to_numpy()
    else:
        item_src, rows = str(folder), np.zeros(len(items), dtype=np.int64)
    read[f"items: {item_src}"] = len(items)
    item_frame = pd.DataFrame({"item_id": items.to_numpy(), "title": "", "description": "", "image": "",
                               "_src": item_src, "_row": rows})
    return Catalog(items=item_frame, interactions=inter, read=read, present={"split"}, source=str(folder),
                   user_order=users.tolist())


def _load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InputDataError(f"{path} cannot be read ({e.strerror or e}); check that it exists and is readable") from e
    except UnicodeDecodeError as e:
        raise InputDataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from e
    except json.JSONDecodeError as e:
        raise InputDataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                             "fix the file (it must be one JSON object)") from e


def _id_map(path: Path) -> tuple[pd.Series | None, pd.Series | None]:
    """``{"original id": idx}`` -> (Series idx -> original id sorted by idx, Series idx -> 1-based position)."""
    if not path.is_file():
        return None, None
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise InputDataError(f"{path} must be a non-empty JSON object {{\"original id\": index, ...}}")
    ids = list(data)
    idx = list(data.values())
    bad = next((i for i, v in enumerate(idx) if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad is not None:
        raise InputDataError(f"{path}: entry {bad + 1} ({ids[bad]!r}: {idx[bad]!r}) is not a non-negative integer "
                             "index; every value must be an index")
    s = pd.Series(ids, index=idx, dtype=object)
    if s.index.has_duplicates:
        dup = s.index[s.index.duplicated()][0]
        raise InputDataError(f"{path}: index {dup} is given to several ids ({s[dup].tolist()[:3]}); "
                             "each index must name one id")
    return s.sort_index(), pd.Series(np.arange(1, len(idx) + 1), index=idx).sort_index()


def _implied(idx: pd.Series) -> pd.Series:
    uniq = np.unique(idx.to_numpy(np.int64))
    return pd.Series(uniq.astype(str), index=uniq, dtype=object)


def _read_split_file(path: Path, split: str, rejects: Rejects) -> tuple[pd.DataFrame, int]:
    """``{"<userIdx>": [itemIdx, ...]}`` -> (user, item, split, _src, _row) with _row = 1-based pair position."""
    if not path.is_file():
        raise InputDataError(f"split-json folder {path.parent} has no {path.name}; it needs train.json, "
                             "val.json and test.json")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise InputDataError(f"{path} must be a JSON object {{\"<userIdx>\": [itemIdx, ...]}}, "
                             f"got a {type(data).__name__}")
    plain = _plain_split_pairs(data)
    if plain is not None:
        users_arr, items_arr = plain
        frame = pd.DataFrame({"user": users_arr, "item": items_arr, "split": split, "_src": str(path),
                              "_row": np.arange(1, len(items_arr) + 1, dtype=np.int64)})
        if not len(frame):
            raise InputDataError(f"{path} holds no interactions; it must map user indices to lists of item indices")
        return frame, len(frame)
    users: list[int] = []
    items: list[int] = []
    rows: list[int] = []
    bad_rows: list[int] = []
    bad_why: list[str] = []
    row = 0
    for key, values in data.items():
        if not isinstance(values, list):
            row += 1
            bad_rows.append(row)
            bad_why.append(f"malformed: the value of user {key!r} is a {type(values).__name__}, not a list of items")
            continue
        user = int(key) if key.isascii() and key.isdigit() else None
        for v in values:
            row += 1
            if user is None:
                bad_rows.append(row)
                bad_why.append(f"malformed: user key {key!r} is not a non-negative integer index")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad_rows.append(row)
                bad_why.append(f"malformed: item {v!r} of user {key} is not a non-negative integer index")
            else:
                users.append(user)
                items.append(v)
                rows.append(row)
    if row == 0:
        raise InputDataError(f"{path} holds no interactions; it must map user indices to lists of item indices")
    rejects.add("interactions", str(path), bad_rows, bad_why)
    frame = pd.DataFrame({"user": np.asarray(users, np.int64), "item": np.asarray(items, np.int64),
                          "split": split, "_src": str(path), "_row": np.asarray(rows, np.int64)})
    return frame, row


def _plain_split_pairs(data: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(user, item) int64 arrays when every key is a non-negative integer and every value a list of
    non-negative ints (the common case, checked without a Python loop per pair); None otherwise."""
    keys, lists = list(data), list(data.values())
    digits = "".join(keys)
    if set(map(type, lists)) - {list} or "" in data or not (digits.isascii() and digits.isdigit()):
        return None
    flat = list(chain.from_iterable(lists))
    if set(map(type, flat)) - {int}:  # bool and float are not item indices
        return None
    try:
        items = np.array(flat, dtype=np.int64)
    except OverflowError:
        return None
    if (items < 0).any():
        return None
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    return np.repeat(np.array([int(k) for k in keys], dtype=np.int64), lengths), items
