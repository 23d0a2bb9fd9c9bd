"""Reading raw tables for the ingest stage: CSV / TSV / JSONL / Parquet into string columns.

Every record read ends either in the returned frame or in :class:`Rejects` with a reason,
so ``records read = kept + rejected`` per file. Row numbers are what a person looks up:
the line number in a text file (the header is line 1), the 1-based row in a Parquet file.
Problems with a whole file (missing, unreadable, empty, a required column absent) raise
:class:`InputDataError` naming the file and the fix.
"""

from __future__ import annotations

import codecs
import difflib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..pipeline.errors import InputDataError
from ..pipeline.lazy import lazy_module

pd = lazy_module("pandas")  # imported on first use (pipeline/lazy.py)
pc = lazy_module("pyarrow.compute")
pacsv = lazy_module("pyarrow.csv")

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".inter": "\t"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
SUPPORTED = ", ".join(sorted([*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES]))
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"


class Rejects:
    """Rejected rows: (source file, row number, reason). A reason starts with a short code: ``"code: detail"``.

    Each reject also has a kind ("items" or "interactions", not written out) so that counts
    can be checked per (kind, source): records read = accepted + rejected. Parts are kept as
    Arrow arrays, a reason shared by a whole part (and every source) dictionary-encoded, so a
    few hundred thousand rejects cost their text once, not a Python object each. Reasons built per
    row can be :class:`Deferred`: made 64k rows at a time when written, never all at once.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[str, pa.DictionaryArray, np.ndarray, pa.Array | Deferred]] = []  # kind, source, row, reason

    def add(self, kind: str, source: str | Sequence[str] | pa.Array, rows: Sequence[int] | np.ndarray,
            reason: str | Sequence[str] | pa.Array | Deferred) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows):
            why = reason if isinstance(reason, Deferred) else _strings(reason, len(rows))
            self._parts.append((kind, _dictionary(source, len(rows)), rows, why))

    def add_rows(self, kind: str, frame: pd.DataFrame, mask: np.ndarray | pd.Series,
                 reason: str | Callable[[pd.DataFrame], pa.Array | pd.Series | Sequence[str]]) -> pd.DataFrame:
        """Reject ``frame``'s rows where ``mask`` holds (``frame`` has ``_src`` / ``_row``); return the others.

        ``reason`` is a string, or a function of the rejected rows giving one reason per row.
        """
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return frame
        sieve = Sieve(self, kind, frame)
        sieve.reject(mask, reason if isinstance(reason, str) else lambda rows, _: reason(rows))
        return frame[sieve.alive]

    def add_bad(self, kind: str, path: Path) -> Callable[[list[int], list[str]], None]:
        """A callback that rejects rows of ``path`` by number (used while parsing)."""
        return lambda rows, reasons: self.add(kind, str(path), rows, reasons)

    def __len__(self) -> int:
        return sum(len(rows) for _, _, rows, _ in self._parts)

    def count(self, kind: str, source: str) -> int:
        n = 0
        for k, src, _, _ in self._parts:
            if k == kind:
                hit = np.flatnonzero(np.asarray(src.dictionary.to_pylist(), dtype=object) == source)
                n += int(np.isin(src.indices.to_numpy(zero_copy_only=False), hit).sum())
        return n

    SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("reason", pa.string())])

    def to_arrow(self) -> pa.Table:
        """source, row, reason (plain strings) of every reject, in the order they were added."""
        return pa.Table.from_batches(list(self.batches()), schema=self.SCHEMA)

    def batches(self, max_rows: int = 1 << 16) -> Iterator[pa.RecordBatch]:
        """:meth:`to_arrow` as record batches of at most ``max_rows``, each made plain strings only when
        it is taken (for writing without holding every reject's source path as text at once)."""
        for _, src, rows, why in self._parts:
            for a in range(0, len(rows), max_rows):
                b = min(a + max_rows, len(rows))
                reasons = why.build(a, b) if isinstance(why, Deferred) else why[a:b]
                yield pa.record_batch([pc.cast(src[a:b], pa.string()), pa.array(rows[a:b]),
                                       pc.cast(reasons, pa.string())], schema=self.SCHEMA)

    def by_code(self, max_rows: int = 1 << 16) -> dict[str, int]:
        """Number of rejects per reason code, most frequent first."""
        counts: Counter[str] = Counter()
        for _, _, _, why in self._parts:
            if isinstance(why, Deferred):
                counts.update(why.codes)
            elif pa.types.is_dictionary(why.type):
                n = np.bincount(why.indices.to_numpy(zero_copy_only=False), minlength=len(why.dictionary))
                counts.update(dict(zip(_reason_codes(why.dictionary).to_pylist(), n.tolist())))
            else:
                for a in range(0, len(why), max_rows):  # slices: the codes of every reason never exist at once
                    vc = pc.value_counts(_reason_codes(why[a:a + max_rows]))
                    counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
        return dict(counts.most_common())


@dataclass(frozen=True)
class Deferred:
    """Per-row reasons of one part of :class:`Rejects`, ``codes[c]`` of them with the code ``c``: ``build(a, b)``
    gives those of its rows ``a:b`` (called when the rejects are written, one slice at a time)."""

    codes: Mapping[str, int]
    build: Callable[[int, int], pa.Array]


class Sieve:
    """Rows of one frame rejected step by step, the frame itself left as it is (no copy per step).

    Each :meth:`reject` sees only the rows no earlier step rejected, so a row gets the first
    reason that applies; ``alive`` marks the rows still kept.
    """

    def __init__(self, rejects: Rejects, kind: str, frame: pd.DataFrame) -> None:
        self.rejects, self.kind, self.frame = rejects, kind, frame
        self.alive = np.ones(len(frame), dtype=bool)

    def reject(self, mask: np.ndarray | pd.Series,
               reason: str | Callable[[pd.DataFrame, np.ndarray], pa.Array], *,
               code: str | Mapping[str, int] | None = None) -> None:
        """Reject the alive rows where ``mask`` holds. ``reason``: a string, or a function of the
        rejected rows (a frame) and their positions in the frame, giving one reason per row. With
        ``code`` (every reason's code, or the number of reasons per code) the function is called later,
        on slices of the rejected rows (:class:`Deferred`); it must then use nothing that changes after
        this call."""
        at = np.flatnonzero(np.asarray(mask, dtype=bool) & self.alive)
        if not len(at):
            return
        rows = self.frame.take(at).reset_index(drop=True)
        if code is not None and not isinstance(reason, str):
            fn = reason
            codes = {code: len(at)} if isinstance(code, str) else {c: n for c, n in code.items() if n}
            if sum(codes.values()) != len(at):
                raise ValueError(f"reason counts {codes} do not add up to the {len(at)} rows rejected")
            reason = Deferred(codes, lambda a, b: fn(rows.iloc[a:b].reset_index(drop=True), at[a:b]))
        elif not isinstance(reason, str):
            reason = reason(rows, at)
        self.rejects.add(self.kind, pa.array(rows["_src"]), rows["_row"].to_numpy(), reason)
        self.alive[at] = False


def _reason_codes(reasons: pa.Array) -> pa.Array:
    """The code of each reason: its text before the first ":"."""
    return pc.list_element(pc.split_pattern(reasons, ":", max_splits=1), 0)


def _dictionary(values: str | Sequence[str] | pa.Array, n: int) -> pa.DictionaryArray:
    """``n`` strings as a dictionary array (one value repeated when ``values`` is a str)."""
    if isinstance(values, str):
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([values], pa.string()))
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = pc.cast(arr, pa.string()).dictionary_encode()
    return pa.DictionaryArray.from_arrays(arr.indices, pc.cast(arr.dictionary, pa.string()))


def _strings(values: str | Sequence[str] | pa.Array, n: int) -> pa.Array:
    """``n`` reasons: a str becomes one dictionary value repeated, anything else plain Arrow strings."""
    if isinstance(values, str):
        return _dictionary(values, n)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        return pc.cast(arr, pa.string())
    if isinstance(values, pd.Series):
        values = values.astype("str")
    return pa.array(values, pa.string(), from_pandas=True)


@dataclass
class RawTable:
    """One raw file as string columns ("" = missing), plus the row number of each kept record."""

    path: Path
    frame: pd.DataFrame  # raw columns (object dtype, stripped strings) + "_src" + "_row"
    n_read: int  # records read, including those rejected while parsing
    types: dict[str, pa.DataType] = field(default_factory=dict)  # Parquet column types (empty for text files)

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
    types: dict[str, pa.DataType] = {}
    if suffix in PARQUET_SUFFIXES:
        records, rows, n_read = _read_parquet(path, what)
        types = {f.name: f.type for f in pq.read_schema(path)}
    else:
        data = _read_bytes(path, encoding, what)
        if suffix in JSONL_SUFFIXES:
            records, rows, n_read = _read_jsonl(path, data, encoding, rejects.add_bad(kind, path), what)
        else:
            records, rows, n_read = _read_delimited(path, data, TEXT_SUFFIXES[suffix], encoding,
                                                    rejects.add_bad(kind, path), what)
    if n_read == 0:
        raise InputDataError(f"{what} {path} has no data rows; put at least one record in it "
                             "(CSV/TSV: a header line and then one line per record)")
    records["_src"] = pd.Categorical.from_codes(np.zeros(len(records), dtype=np.int8), [str(path)])  # one value
    records["_row"] = np.asarray(rows, dtype=np.int64)
    if suffix in PARQUET_SUFFIXES:
        records = _reject_undecodable(records, rejects, kind)
    return RawTable(path=path, frame=records.reset_index(drop=True), n_read=n_read, types=types)


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


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


# what each of our columns may be in a Parquet file: (test, description)
COLUMN_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "item_id": (lambda t: _is_text(t) or pa.types.is_integer(t), "strings or integers"),
    "user_id": (lambda t: _is_text(t) or pa.types.is_integer(t), "strings or integers"),
    "title": (_is_text, "strings"),
    "description": (_is_text, "strings"),
    "image": (_is_text, "strings (paths or URLs)"),
    "timestamp": (lambda t: _is_text(t) or _is_number(t) or pa.types.is_timestamp(t) or pa.types.is_date(t),
                  "unix seconds, timestamps, dates or strings"),
    "rating": (lambda t: _is_text(t) or _is_number(t), "numbers or strings"),
    "split": (lambda t: _is_text(t) or pa.types.is_integer(t), "strings or integers"),
}


def check_types(table: RawTable, wanted: Mapping[str, str], what: str) -> None:
    """Raise naming the file, column and type when a Parquet column of ours has a type that would
    be stringified into something else (a float id "1.0", a list title "[...]", a numeric path)."""
    for ours, theirs in wanted.items():
        t = table.types.get(theirs)
        test, allowed = COLUMN_TYPES[ours]
        if t is not None and not test(t):
            raise InputDataError(f"{what} {table.path}: column {theirs!r} (the {ours} column) has type {t}; it must "
                                 f"hold {allowed}. Convert the column (e.g. pandas: df[{theirs!r}].astype(str)) "
                                 "and write the file again")


def _read_bytes(path: Path, encoding: str, what: str) -> bytes:
    """The file's bytes as UTF-8 (a byte-order mark dropped); bytes that do not decode in ``encoding``
    survive as invalid UTF-8, so that their rows are rejected. Raises for an empty or binary file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputDataError(f"{what} {path} cannot be read ({e.strerror or e}); check its permissions") from e
    if not data.strip():
        raise InputDataError(f"{what} {path} is empty (0 records); put the data in it or point \\[ingest] at the "
                             "right file")
    if codecs.lookup(encoding).name == "utf-8":
        data = data.removeprefix(codecs.BOM_UTF8)
    else:
        data = data.decode(encoding, errors="surrogateescape").encode("utf-8", errors="surrogateescape")
    nul = data.find(b"\x00", 0, 8192)
    if nul >= 0:
        raise InputDataError(f"{what} {path} is not {encoding} text: it holds a NUL byte at offset {nul}, as binary "
                             "files do; export the data as CSV / TSV / JSONL text, or set ingest.encoding if it is "
                             "UTF-16 or UTF-32")
    return data


def _undecodable_reason(fields: Sequence[str], names: Sequence[str | None], encoding: str) -> str | None:
    """The reject reason for the first field holding an undecodable byte, or None."""
    for value, name in zip(fields, names):
        m = _UNDECODABLE.search(value)
        if m:
            where = f" in column {name!r}" if name is not None else ""
            return (f"not-{encoding}: byte 0x{ord(m.group()) - 0xDC00:02x}{where} is not valid {encoding} text; "
                    f"save the file as {encoding} or set ingest.encoding to the file's encoding")
    return None


@dataclass
class _Records:
    """Where the records of a delimited file are: one per line break outside quotes (RFC 4180)."""

    start: np.ndarray  # (R,) byte offset of each record
    end: np.ndarray  # (R,) byte offset of its end (its line break, or the end of the file)
    first_line: np.ndarray  # (R,) 1-based line of its first byte
    last_line: np.ndarray  # (R,) 1-based line of its last byte
    unclosed: bool  # the last record ends inside an open quote
    quoted: bool  # some field is quoted (only then can a value hold a line break)


def _records(data: bytes, sep: str) -> _Records:
    """Split ``data`` into records: a line break ends one unless it lies inside a quoted field.

    As in pyarrow's parser, a quote opens a quoted field only at the start of a field (after a
    separator or a line break); inside one, a doubled quote is a literal quote and a single quote
    closes it; elsewhere a quote is a literal character. Only the quotes are walked in Python.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    dt = np.int32 if len(data) < 2**31 - 1 else np.int64  # offsets and line numbers: 4 bytes each where they fit
    newlines, quotes = _positions(buf, 10, dt), _positions(buf, 34, dt)
    prev = buf[np.maximum(quotes - 1, 0)]
    opener = (quotes == 0) | (prev == ord(sep)) | (prev == 10) | (prev == 13)
    spans: list[int] = []  # open, close, open, close, ... positions of quoted fields
    inside, skip = False, -1
    qs, ops = quotes.tolist(), opener.tolist()
    for i, q in enumerate(qs):
        if q == skip:
            continue
        if not inside:
            if ops[i]:
                inside = True
                spans.append(q)
        elif i + 1 < len(qs) and qs[i + 1] == q + 1:
            skip = q + 1  # a doubled quote inside a quoted field
        else:
            inside = False
            spans.append(q)
    if inside:
        spans.append(len(data))
    ends = newlines[np.searchsorted(np.asarray(spans, dtype=np.int64), newlines) % 2 == 0] if spans else newlines
    start = np.concatenate((np.zeros(1, dt), ends + 1))
    end = np.concatenate((ends, np.full(1, len(data), dt)))
    if start[-1] >= len(data):  # the file ends with a line break
        start, end = start[:-1], end[:-1]
    if not spans:  # no quoted field: record k is line k + 1
        lines = np.arange(1, len(start) + 1, dtype=dt)
        return _Records(start, end, lines, lines, unclosed=False, quoted=False)
    first = (np.searchsorted(newlines, start) + 1).astype(dt)
    last = (np.searchsorted(newlines, np.maximum(end - 1, start)) + 1).astype(dt)
    return _Records(start, end, first, last, unclosed=inside, quoted=True)


def _positions(buf: np.ndarray, byte: int, dtype: type, chunk: int = 1 << 23) -> np.ndarray:
    """Offsets of ``byte`` in ``buf`` as ``dtype``, found a chunk at a time (no full-size temporary)."""
    parts = [np.flatnonzero(buf[a:a + chunk] == byte).astype(dtype) + dtype(a) for a in range(0, len(buf), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _blank(data: bytes, rec: _Records, strip: bool) -> np.ndarray:
    """(R,) bool: the record is an empty line ("" or "\\r"), or with ``strip`` only whitespace."""
    buf = np.frombuffer(data, dtype=np.uint8)
    length = rec.end - rec.start
    first = buf[np.minimum(rec.start, len(buf) - 1)]
    blank = (length == 0) | ((length == 1) & (first == 13))
    if strip:  # look closer only at records that start with whitespace
        for r in np.flatnonzero(~blank & np.isin(first, list(b" \t\r\x0b\x0c"))):
            blank[r] = not data[rec.start[r]:rec.end[r]].strip()
    return blank


def _read_delimited(path: Path, data: bytes, sep: str, encoding: str, reject: Callable[[list[int], list[str]], None],
                    what: str) -> tuple[pd.DataFrame, np.ndarray, int]:
    """Parse with ``pyarrow.csv`` (quoting, embedded line breaks, no field size limit). Each record's
    line number comes from :func:`_records`; a record with the wrong number of fields, an unclosed
    quote or bytes that are not ``encoding`` text is rejected alone."""
    rec = _records(data, sep)
    blank = _blank(data, rec, strip=True)
    if blank.all():
        raise InputDataError(f"{what} {path} is empty (no header line); put the data in it")
    h = int(np.argmax(~blank))
    header_bytes = data[rec.start[h]:rec.end[h]]
    raw_names, names = _header_names(header_bytes, sep, path, what, rec.first_line[h], encoding)
    if len(names) == 1:  # with one column a line of spaces is a (blank) value, as pyarrow reads it
        blank = _blank(data, rec, strip=False)
    if rec.unclosed and h == len(rec.start) - 1:
        raise InputDataError(f"{what} {path}: the header (line {rec.first_line[h]}) opens a quote that is never "
                             "closed; fix the header line")
    data_idx = np.flatnonzero(~blank[h + 1:]) + h + 1  # records after the header that are not blank lines
    if len(data_idx) == 0 and rec.end[h] == len(data):  # the header runs to the end: no line break at all
        raise InputDataError(f"{what} {path} is a single line of {len(header_bytes):,} bytes with no line break, so "
                             f"it has a header and no data rows; a {'tab' if sep == chr(9) else repr(sep)}-separated "
                             "file needs one line per record after the header")
    bad_rows: list[int] = []
    bad_why: list[str] = []
    n_read = len(data_idx)
    body_end = len(data)
    if rec.unclosed and len(data_idx):  # the last record runs to the end of the file inside a quote
        last = int(data_idx[-1])
        bad_rows.append(int(rec.first_line[last]))
        bad_why.append(f"malformed: a quote opened on line {rec.first_line[last]} is never closed (the record "
                       f"spans lines {rec.first_line[last]}-{rec.last_line[last]}, to the end of the file)")
        body_end = int(rec.start[last])
        data_idx = data_idx[:-1]
    invalid: list[tuple[int, int, str]] = []  # (fields, expected, text) per record pyarrow could not use, in order

    def on_invalid(row: pacsv.InvalidRow) -> str:
        if row.text.strip():  # a line of spaces is a blank line, not a record
            invalid.append((row.actual_columns, row.expected_columns, row.text))
        return "skip"

    body = memoryview(data)[rec.start[h]:body_end]  # no copy
    longest = int((rec.end - rec.start).max()) + 2
    table = _parse(body, sep, raw_names, on_invalid, block_size=max(1 << 22, 2 * longest), quoted=rec.quoted)
    if table.num_rows + len(invalid) != len(data_idx):  # pyarrow split records otherwise (a stray quote)
        raise InputDataError(f"{what} {path}: quoting is inconsistent (pyarrow read {table.num_rows + len(invalid)} "
                             f"records, line breaks outside quotes give {len(data_idx)}); a field holding a \" must be "
                             "quoted with the quote doubled (\"5\"\" tall\")")
    ok = np.ones(len(data_idx), dtype=bool)
    if invalid:
        bad = _invalid_positions(data, rec, data_idx, [t for _, _, t in invalid], sep, len(names))
        if len(bad) != len(invalid):
            raise InputDataError(f"{what} {path}: cannot tell which records have the wrong number of fields; "
                                 "check its quoting")
        ok[bad] = False
        for j, (fields, expected, _) in zip(bad, invalid):
            r = int(data_idx[j])
            span = (f" (the record spans lines {rec.first_line[r]}-{rec.last_line[r]}: an unclosed quote?)"
                    if rec.last_line[r] > rec.first_line[r] else "")
            bad_rows.append(int(rec.first_line[r]))
            bad_why.append(f"malformed: {fields} fields, the header has {expected}{span}")
    rows = rec.first_line[data_idx[ok]]
    columns, undecodable = {}, np.zeros(table.num_rows, dtype=bool)
    for name, col in zip(names, table.columns):
        values, bad_bytes = _binary_to_strings(col)
        columns[name] = values
        undecodable |= bad_bytes
    frame = pd.DataFrame(columns) if columns else pd.DataFrame(index=range(table.num_rows))
    if undecodable.any():
        for i in np.flatnonzero(undecodable):
            bad_rows.append(int(rows[i]))
            bad_why.append(_undecodable_reason([frame[n].iat[i] for n in names], names, encoding) or "")
        frame = frame[~undecodable]
        rows = rows[~undecodable]
    reject(bad_rows, bad_why)
    return frame, rows, n_read


def _binary_to_strings(col: pa.ChunkedArray) -> tuple[pd.Series, np.ndarray]:
    """Bytes -> (stripped strings, Arrow-backed; mask of rows holding bytes that are not UTF-8)."""
    try:
        text = pc.cast(col, pa.large_string())  # validates UTF-8, no copy (pandas' str holds large strings)
        if any(_may_have_edge_space(chunk) for chunk in text.chunks):  # strip only where there may be something to
            text = pc.utf8_trim_whitespace(text)
    except pa.ArrowInvalid:  # some value is not UTF-8: decode leniently, row by row
        values = [v.decode("utf-8", errors="surrogateescape").strip() for v in col.to_pylist()]
        return pd.Series(values, dtype=object), np.array([bool(_UNDECODABLE.search(v)) for v in values])
    return text.to_pandas(), np.zeros(len(text), dtype=bool)


def _may_have_edge_space(arr: pa.Array) -> bool:
    """Whether a value of ``arr`` (large strings) may start or end with Unicode White_Space: an ASCII
    space / tab / line break, or any non-ASCII character (tested on the first and last byte only)."""
    _, offsets, data = arr.buffers()
    if data is None or len(arr) == 0:
        return False
    offsets = np.frombuffer(offsets, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data, dtype=np.uint8)
    start, end = offsets[:-1], offsets[1:]
    filled = end > start
    edges = np.concatenate((data[start[filled]], data[end[filled] - 1]))
    return bool(((edges == 32) | ((edges >= 9) & (edges <= 13)) | (edges >= 0x80)).any())


def _header_names(header: bytes, sep: str, path: Path, what: str, line: int,
                  encoding: str) -> tuple[list[str], list[str]]:
    """The header's column names as written and stripped; raises if it does not decode or repeats one."""
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputDataError(f"{what} {path}: the header (line {line}) is not {encoding} text (byte "
                             f"0x{header[e.start]:02x} at offset {e.start}); save the file as {encoding} or set "
                             "ingest.encoding to the file's encoding") from e
    raw = _parse(header + b"\n", sep, None, None, block_size=len(header) + 2).column_names
    names = [n.strip() for n in raw]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputDataError(f"{what} {path}: the header (line {line}) repeats column(s) {dup}; "
                             "give every column a distinct name")
    return raw, names


def _parse(body: bytes | memoryview, sep: str, names: list[str] | None, on_invalid: Callable | None,
           block_size: int, quoted: bool = True) -> pa.Table:
    """``pyarrow.csv`` on ``body`` (header line first), every column read as bytes; without ``quoted``
    no value can hold a line break, and the parser is told so (it is faster then)."""
    convert = pacsv.ConvertOptions(column_types={n: pa.large_binary() for n in names} if names else None,
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    parse = pacsv.ParseOptions(delimiter=sep, newlines_in_values=quoted, invalid_row_handler=on_invalid)
    while True:
        try:
            return pacsv.read_csv(pa.BufferReader(pa.py_buffer(body)), read_options=pacsv.ReadOptions(block_size=block_size,
                                                                                    use_threads=False),
                                  parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            if "straddl" not in str(e) or block_size > len(body):
                raise
            block_size = len(body) + 2  # a record longer than a block: read the file as one block


def _invalid_positions(data: bytes, rec: _Records, data_idx: np.ndarray, texts: list[str], sep: str,
                       n_fields: int) -> np.ndarray:
    """Positions (into ``data_idx``) of the records pyarrow rejected, matched in file order by their
    text (or, for text pyarrow could not show as it is, by their count of separators)."""
    out: list[int] = []
    j = 0
    for text in texts:
        want = text.encode("utf-8", errors="surrogateescape")
        while j < len(data_idx):
            r = data_idx[j]
            raw = data[rec.start[r]:rec.end[r]].removesuffix(b"\r")
            j += 1
            if raw == want or (raw.count(sep.encode()) + 1 != n_fields and b'"' not in raw):
                out.append(j - 1)
                break
    return np.asarray(out, dtype=np.int64)


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


def _read_jsonl(path: Path, data: bytes, encoding: str, reject: Callable[[list[int], list[str]], None],
                what: str) -> tuple[pd.DataFrame, list[int], int]:
    if data.lstrip().startswith(b"["):
        raise InputDataError(f"{what} {path} holds a JSON array, not JSON Lines: a .jsonl file has one JSON object "
                             "per line. Convert it (e.g. jq -c '.[]' file.json > file.jsonl) or save it as Parquet")
    text = data.decode("utf-8", errors="surrogateescape")  # bad bytes survive as \udcXX; their rows are rejected
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


def _read_parquet(path: Path, what: str) -> tuple[pd.DataFrame, np.ndarray, int]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputDataError(f"{what} {path} is not a readable Parquet file ({e}); re-export it, "
                             "or use CSV / JSONL with the matching extension") from e
    columns = {}
    for name in table.column_names:
        columns[name] = _arrow_to_strings(table.column(name))
    frame = pd.DataFrame(columns, dtype=object) if columns else pd.DataFrame(index=range(table.num_rows))
    return frame, np.arange(1, table.num_rows + 1), table.num_rows


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
