"""Reading raw tables for the ingest stage: CSV / TSV / JSONL / Parquet into string columns.

Every record read ends either in the returned frame or in :class:`Rejects` with a reason,
so ``records read = kept + rejected`` per file. Row numbers are what a person looks up:
the line number in a text file (the header is line 1), the 1-based row in a Parquet file.
Problems with a whole file (missing, unreadable, empty, a required column absent) raise
:class:`InputDataError` naming the file and the fix.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline.errors import InputDataError
from ..pipeline.lazy import lazy_module

pd = lazy_module("pandas")  # imported on first use (pipeline/lazy.py)
pc = lazy_module("pyarrow.compute")

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".inter": "\t"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
SUPPORTED = ", ".join(sorted([*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES]))
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"


class Rejects:
    """Rejected rows: (source file, row number, reason). A reason starts with a short code: ``"code: detail"``.

    Each reject also has a kind ("items" or "interactions", not written out) so that counts
    can be checked per (kind, source): records read = accepted + rejected.
    """

    def __init__(self) -> None:
        self._parts: list[pd.DataFrame] = []

    def add(self, kind: str, source: str | Sequence[str], rows: Sequence[int] | np.ndarray,
            reason: str | Sequence[str]) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows):
            self._parts.append(pd.DataFrame({"kind": kind, "source": source, "row": rows, "reason": reason}))

    def add_rows(self, kind: str, frame: pd.DataFrame, mask: np.ndarray | pd.Series,
                 reason: str | Callable[[pd.DataFrame], pd.Series]) -> pd.DataFrame:
        """Reject ``frame``'s rows where ``mask`` holds (``frame`` has ``_src`` / ``_row``); return the others.

        ``reason`` is a string, or a function of the rejected rows giving one reason per row.
        """
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return frame
        bad = frame[mask]
        why = reason if isinstance(reason, str) else np.asarray(reason(bad), dtype=object)
        self.add(kind, bad["_src"].to_numpy(), bad["_row"].to_numpy(), why)
        return frame[~mask]

    def add_bad(self, kind: str, path: Path) -> Callable[[list[int], list[str]], None]:
        """A callback that rejects rows of ``path`` by number (used while parsing)."""
        return lambda rows, reasons: self.add(kind, str(path), rows, reasons)

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def frame(self) -> pd.DataFrame:
        if not self._parts:
            return pd.DataFrame({"kind": pd.Series(dtype=object), "source": pd.Series(dtype=object),
                                 "row": pd.Series(dtype=np.int64), "reason": pd.Series(dtype=object)})
        return pd.concat(self._parts, ignore_index=True)

    def count(self, kind: str, source: str) -> int:
        df = self.frame()
        return int(((df["kind"] == kind) & (df["source"] == source)).sum())

    def to_arrow(self) -> pa.Table:
        df = self.frame()
        return pa.table({"source": pa.array(df["source"].astype(str).tolist(), pa.string()),
                         "row": pa.array(df["row"].to_numpy(np.int64), pa.int64()),
                         "reason": pa.array(df["reason"].astype(str).tolist(), pa.string())})

    def by_code(self) -> dict[str, int]:
        """Number of rejects per reason code, most frequent first."""
        codes = pd.Series([str(r).partition(":")[0] for r in self.frame()["reason"]], dtype=object)
        return {str(k): int(v) for k, v in codes.value_counts().items()}


@dataclass
class RawTable:
    """One raw file as string columns ("" = missing), plus the row number of each kept record."""

    path: Path
    frame: pd.DataFrame  # raw columns (object dtype, stripped strings) + "_src" + "_row"
    n_read: int  # records read, including those rejected while parsing

    @property
    def columns(self) -> list[str]:
        return [c for c in self.frame.columns if c not in ("_src", "_row")]


def read_table(path: Path, encoding: str, rejects: Rejects, kind: str) -> RawTable:
    """Read ``path`` (format by extension); malformed or undecodable ``kind`` records go to ``rejects``."""
    what = f"{kind} file"
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES and suffix not in JSONL_SUFFIXES and suffix not in PARQUET_SUFFIXES:
        raise InputDataError(f"{what} {path}: unknown file type {suffix or '(no extension)'!r}; "
                             f"use one of {SUPPORTED} (the format is told by the extension)")
    if not path.is_file():
        hint = "it is a folder, not a file" if path.is_dir() else "no such file"
        raise InputDataError(f"{what} {path} cannot be read: {hint}. Check the path in the [ingest] section "
                             "(relative paths are relative to the config file's folder).")
    if suffix in PARQUET_SUFFIXES:
        records, rows, n_read = _read_parquet(path, what)
    else:
        text = _read_text(path, encoding, what)
        if suffix in JSONL_SUFFIXES:
            records, rows, n_read = _read_jsonl(path, text, encoding, rejects.add_bad(kind, path))
        else:
            records, rows, n_read = _read_delimited(path, text, TEXT_SUFFIXES[suffix], encoding,
                                                    rejects.add_bad(kind, path), what)
    if n_read == 0:
        raise InputDataError(f"{what} {path} has no data rows; put at least one record in it "
                             "(CSV/TSV: a header line and then one line per record)")
    records["_src"] = str(path)
    records["_row"] = np.asarray(rows, dtype=np.int64)
    if suffix in PARQUET_SUFFIXES:
        records = _reject_undecodable(records, rejects, kind)
    return RawTable(path=path, frame=records.reset_index(drop=True), n_read=n_read)


def require_columns(table: RawTable, wanted: Mapping[str, str], what: str, fix: str | None = None) -> None:
    """Raise naming the file if a column in ``wanted`` (our name -> name in the file) is absent.

    ``fix`` says what to do; by default: rename the column or map it with ``ingest.columns.<ours>``.
    """
    have = table.columns
    for ours, theirs in wanted.items():
        if theirs not in have:
            close = difflib.get_close_matches(theirs, have, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            todo = fix or (f"Rename the column in the file or map it: set ingest.columns.{ours} = "
                           "\"<column name>\" in [ingest].")
            raise InputDataError(f"{what} {table.path} has no column {theirs!r} (the {ours} column); "
                                 f"its columns are {have}.{hint} {todo}")


def _read_text(path: Path, encoding: str, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputDataError(f"{what} {path} cannot be read ({e.strerror or e}); check its permissions") from e
    if not data.strip():
        raise InputDataError(f"{what} {path} is empty (0 records); put the data in it or point [ingest] at the "
                             "right file")
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding  # drop a UTF-8 byte-order mark
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return data.decode(codec, errors="surrogateescape")  # bad bytes survive as \udcXX; their rows are rejected


def _undecodable_reason(fields: Sequence[str], names: Sequence[str | None], encoding: str) -> str | None:
    """The reject reason for the first field holding an undecodable byte, or None."""
    for value, name in zip(fields, names):
        m = _UNDECODABLE.search(value)
        if m:
            where = f" in column {name!r}" if name is not None else ""
            return (f"not-{encoding}: byte 0x{ord(m.group()) - 0xDC00:02x}{where} is not valid {encoding} text; "
                    f"save the file as {encoding} or set ingest.encoding to the file's encoding")
    return None


def _read_delimited(path: Path, text: str, sep: str, encoding: str, reject: Callable[[list[int], list[str]], None],
                    what: str) -> tuple[pd.DataFrame, list[int], int]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    header: list[str] | None = None
    kept: list[list[str]] = []
    rows: list[int] = []
    bad_rows: list[int] = []
    bad_why: list[str] = []
    n_read = 0
    check_bytes = _UNDECODABLE.search(text) is not None
    last_line = 0
    while True:
        start = last_line + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            last_line = reader.line_num
            n_read += 1
            bad_rows.append(start)
            bad_why.append(f"malformed: {e}")
            continue
        last_line = reader.line_num
        if len(record) <= 1 and not "".join(record).strip():
            continue  # a blank line is not a record
        if header is None:
            header = [h.strip() for h in record]
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                raise InputDataError(f"{what} {path}: the header (line {start}) repeats column(s) {dup}; "
                                     "give every column a distinct name")
            continue
        n_read += 1
        if len(record) != len(header):
            span = f" (the record spans lines {start}-{last_line}: an unclosed quote?)" if last_line > start else ""
            bad_rows.append(start)
            bad_why.append(f"malformed: {len(record)} fields, the header has {len(header)}{span}")
            continue
        if check_bytes:
            why = _undecodable_reason(record, header, encoding)
            if why:
                bad_rows.append(start)
                bad_why.append(why)
                continue
        kept.append([field.strip() for field in record])
        rows.append(start)
    if header is None:
        raise InputDataError(f"{what} {path} is empty (no header line); put the data in it")
    reject(bad_rows, bad_why)
    return pd.DataFrame(kept, columns=header, dtype=object), rows, n_read


def _jsonl_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _read_jsonl(path: Path, text: str, encoding: str,
                reject: Callable[[list[int], list[str]], None]) -> tuple[pd.DataFrame, list[int], int]:
    kept: list[dict[str, str]] = []
    rows: list[int] = []
    bad_rows: list[int] = []
    bad_why: list[str] = []
    n_read = 0
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        n_read += 1
        why = _undecodable_reason([line], [None], encoding)
        if why:
            bad_rows.append(lineno)
            bad_why.append(why)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad_rows.append(lineno)
            bad_why.append(f"malformed: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            bad_rows.append(lineno)
            bad_why.append(f"malformed: expected a JSON object per line, got {type(obj).__name__}")
            continue
        kept.append({str(k): _jsonl_value(v).strip() for k, v in obj.items()})
        rows.append(lineno)
    reject(bad_rows, bad_why)
    frame = pd.DataFrame(kept, dtype=object).fillna("") if kept else pd.DataFrame()
    return frame, rows, n_read


def _read_parquet(path: Path, what: str) -> tuple[pd.DataFrame, list[int], int]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputDataError(f"{what} {path} is not a readable Parquet file ({e}); re-export it, "
                             "or use CSV / JSONL with the matching extension") from e
    columns = {}
    for name in table.column_names:
        columns[name] = _arrow_to_strings(table.column(name))
    frame = pd.DataFrame(columns, dtype=object) if columns else pd.DataFrame(index=range(table.num_rows))
    return frame, list(range(1, table.num_rows + 1)), table.num_rows


def _arrow_to_strings(col: pa.ChunkedArray) -> list[str]:
    """Any Arrow column -> Python strings ("" for null); timestamps / dates become unix seconds."""
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())  # sub-seconds dropped
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [v.decode("utf-8", errors="surrogateescape") if v is not None else "" for v in col.to_pylist()]
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return [v.strip() if v is not None else "" for v in col.to_pylist()]
    try:
        col = pc.cast(col, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return [_jsonl_value(v) for v in col.to_pylist()]
    return [v if v is not None else "" for v in col.to_pylist()]


def _reject_undecodable(frame: pd.DataFrame, rejects: Rejects, kind: str) -> pd.DataFrame:
    """Reject rows holding bytes that are not UTF-8 (Parquet binary columns decoded leniently)."""
    cols = [c for c in frame.columns if c not in ("_src", "_row")]
    mask = np.zeros(len(frame), dtype=bool)
    for c in cols:
        mask |= frame[c].str.contains(_UNDECODABLE, regex=True).to_numpy(dtype=bool)
    if not mask.any():
        return frame
    return rejects.add_rows(kind, frame, mask, lambda bad: [_undecodable_reason(list(r), cols, "utf-8")
                                                            for r in bad[cols].itertuples(index=False)])
