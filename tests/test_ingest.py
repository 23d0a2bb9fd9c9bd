"""The ingest stage: formats, column mapping, bad input, k-core, split policies, importers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from rich.console import Console

from clearrec.pipeline.config import load_config
from clearrec.pipeline.errors import InputDataError
from clearrec.models.text import DEFAULT_TEXT_TEMPLATE, apply_text_template
from clearrec.pipeline.stage import StageContext, StageResult
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors
from clearrec.stages import ingest

ITEMS = [
    {"item_id": "i1", "title": "Oak Table Lamp", "description": "A sturdy lamp.", "image": "images/i1.jpg",
     "price": "10"},
    {"item_id": "i2", "title": "Wall Clock.", "description": "Quiet.", "image": "./images/../images/i2.jpg",
     "price": "12"},
    {"item_id": "i3", "title": "Kite", "description": "", "image": "", "price": ""},
    {"item_id": "i4", "title": "Coaster", "description": "Cork.", "image": "https://example.com/i4.jpg",
     "price": "3"},
]
INTERACTIONS = [
    {"user_id": "u1", "item_id": "i1", "timestamp": "100", "rating": "5"},
    {"user_id": "u1", "item_id": "i2", "timestamp": "2024-01-02T00:00:00Z", "rating": "4"},
    {"user_id": "u1", "item_id": "i3", "timestamp": "300", "rating": ""},
    {"user_id": "u2", "item_id": "i2", "timestamp": "150", "rating": "3.5"},
    {"user_id": "u2", "item_id": "i4", "timestamp": "", "rating": "2"},
]


# ---- helpers ------------------------------------------------------------------------------
def write(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` (all values strings) as CSV / JSONL / Parquet by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, dtype=object)
    if path.suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="," if path.suffix == ".csv" else "\t")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pandas(frame.astype(str), preserve_index=False), path)
    return path


def config(tmp_path: Path, **ingest_keys):
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"ingest": ingest_keys}))
    return load_config(path)


def run(tmp_path: Path, workdir: str = "work", **ingest_keys) -> tuple[StageResult, ArtifactStore, str]:
    """Run the stage directly; returns (result, store, what it logged)."""
    log = io.StringIO()
    store = ArtifactStore(tmp_path / workdir)
    ctx = StageContext(store=store, config=config(tmp_path, **ingest_keys), console=Console(file=log, width=300))
    result = ingest.run(ctx)
    assert_conserved(result, store)
    return result, store, log.getvalue()


def assert_conserved(result: StageResult, store: ArtifactStore) -> None:
    c = result.counts
    for kind in ("items", "interactions"):
        assert c[f"{kind}_read"] == c[f"{kind}_accepted"] + c[f"{kind}_rejected"]
    for counts in c["sources"].values():
        assert counts["read"] == counts["accepted"] + counts["rejected"]
    assert pq.read_metadata(store.path("rejects.parquet")).num_rows == c["items_rejected"] + c["interactions_rejected"]
    assert pq.read_metadata(store.path("items.parquet")).num_rows == c["items_accepted"]
    assert pq.read_metadata(store.path("interactions.parquet")).num_rows == c["interactions_accepted"]
    assert c["train"] + c["valid"] + c["test"] == c["interactions_accepted"]


def table(store: ArtifactStore, name: str) -> pd.DataFrame:
    return store.read_parquet(name).to_pandas()


def rejects(store: ArtifactStore) -> pd.DataFrame:
    return table(store, "rejects.parquet")


def catalog(tmp_path: Path, ext: str = ".csv", items=ITEMS, interactions=INTERACTIONS) -> dict:
    write(tmp_path / f"items{ext}", items)
    write(tmp_path / f"interactions{ext}", interactions)
    return {"items": f"items{ext}", "interactions": f"interactions{ext}"}


def assert_error(exc: pytest.ExceptionInfo, *needles: str) -> None:
    for needle in needles:
        assert needle in str(exc.value), f"{needle!r} not in: {exc.value}"


# ---- formats and outputs --------------------------------------------------------------------
def test_csv_catalog_gives_contract_tables(tmp_path):
    result, store, _ = run(tmp_path, **catalog(tmp_path))
    items = table(store, "items.parquet")
    assert items["item_idx"].tolist() == [0, 1, 2, 3]
    assert items.columns.tolist() == ["item_idx", "item_id", "title", "description", "text", "image", "price"]
    # the text column is what encode reads with the default template (one join of the fields)
    assert items["text"].tolist() == ["Oak Table Lamp. A sturdy lamp.", "Wall Clock.. Quiet.", "Kite.", "Coaster. Cork."]
    assert items["text"].tolist() == [apply_text_template(DEFAULT_TEXT_TEMPLATE, r) for r in items.to_dict("records")]
    images = store.read_parquet("items.parquet").column("image").to_pylist()
    assert images == ["images/i1.jpg", "images/i2.jpg", None, "https://example.com/i4.jpg"]
    assert store.parquet_metadata("items.parquet")["catalog_root"] == str(tmp_path.resolve())
    users = table(store, "users.parquet")
    assert users.to_dict("list") == {"user_idx": [0, 1], "user_id": ["u1", "u2"]}
    inter = store.read_parquet("interactions.parquet")
    assert inter.schema.field("timestamp").type == pa.int64() and inter.schema.field("rating").type == pa.float64()
    df = inter.to_pandas()
    assert df["user_idx"].tolist() == [0, 0, 0, 1, 1] and df["item_idx"].tolist() == [0, 1, 2, 1, 3]
    assert df["timestamp"].tolist()[:3] == [100, 1704153600, 300] and pd.isna(df["timestamp"].iloc[4])
    assert pd.isna(df["rating"].iloc[2]) and df["rating"].iloc[3] == 3.5
    assert set(df["split"]) <= {"train", "valid", "test"}
    assert result.counts["items_read"] == 4 and result.counts["interactions_read"] == 5
    assert rejects(store).empty and result.outputs[:4] == list(ingest.OUTPUTS)


@pytest.mark.parametrize("ext", [".tsv", ".jsonl", ".parquet"])
def test_tsv_jsonl_and_parquet_inputs_match_csv(tmp_path, ext):
    _, csv_store, _ = run(tmp_path / "csv", **catalog(tmp_path / "csv"))
    _, other, _ = run(tmp_path / "other", **catalog(tmp_path / "other", ext))
    for name in ("items.parquet", "users.parquet", "interactions.parquet"):
        pd.testing.assert_frame_equal(table(csv_store, name), table(other, name))


def test_typed_parquet_columns_become_strings_and_bad_bytes_are_rejected(tmp_path):
    keys = catalog(tmp_path, ".parquet")
    pq.write_table(pa.table({
        "item_id": pa.array([1, 2, 3], pa.int64()),
        "title": pa.array([b"Lamp", b"Caf\xe9", b"Kite"], pa.binary()),
        "added": pa.array([1.5, None, 3.0], pa.float64()),
    }), tmp_path / "items.parquet")
    pq.write_table(pa.table({
        "user_id": pa.array(["u1", "u1", "u2"]),
        "item_id": pa.array([1, 3, 2], pa.int64()),
        "timestamp": pa.array([0, 86_400_000_000, None], pa.timestamp("us", tz="UTC")),
    }), tmp_path / "interactions.parquet")
    _, store, _ = run(tmp_path, **keys)
    items = table(store, "items.parquet")
    assert items["item_id"].tolist() == ["1", "3"] and items["added"].tolist() == ["1.5", "3"]
    assert rejects(store)["reason"].tolist() == [
        "not-utf-8: byte 0xe9 in column 'title' is not valid utf-8 text; save the file as utf-8 or set "
        "ingest.encoding to the file's encoding",
        "unknown-item: item_id '2' is not among the items read; add it to the items file (or fix its rejected row "
        "there) or remove this row"]
    assert table(store, "interactions.parquet")["timestamp"].tolist() == [0, 86_400]


def test_utf8_byte_order_mark_and_blank_lines_are_ignored(tmp_path):
    keys = catalog(tmp_path)
    raw = (tmp_path / "items.csv").read_bytes()
    (tmp_path / "items.csv").write_bytes(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\n\n", 1))
    result, store, _ = run(tmp_path, **keys)
    assert table(store, "items.parquet")["item_id"].tolist() == ["i1", "i2", "i3", "i4"]
    assert result.counts["items_read"] == 4 and rejects(store).empty


def test_column_mapping(tmp_path):
    items = [{"asin": r["item_id"], "name": r["title"], "blurb": r["description"], "pic": r["image"]} for r in ITEMS]
    inter = [{"reviewer": r["user_id"], "asin": r["item_id"], "when": r["timestamp"], "stars": r["rating"]}
             for r in INTERACTIONS]
    keys = catalog(tmp_path, items=items, interactions=inter)
    columns = {"item_id": "asin", "title": "name", "description": "blurb", "image": "pic", "user_id": "reviewer",
               "timestamp": "when", "rating": "stars"}
    _, store, _ = run(tmp_path, columns=columns, **keys)
    _, plain, _ = run(tmp_path / "plain", **catalog(tmp_path / "plain"))
    got = table(store, "items.parquet")
    want = table(plain, "items.parquet").drop(columns=["price"])
    pd.testing.assert_frame_equal(got, want)
    pd.testing.assert_frame_equal(table(store, "interactions.parquet"), table(plain, "interactions.parquet"))


def test_extra_item_column_named_like_ours_is_kept_renamed(tmp_path):
    items = [{**r, "text": "raw text", "title": r["title"]} for r in ITEMS]
    _, store, _ = run(tmp_path, **catalog(tmp_path, items=items))
    got = table(store, "items.parquet")
    assert got["raw_text"].tolist() == ["raw text"] * 4 and got["text"].iloc[0] == "Oak Table Lamp. A sturdy lamp."


# ---- bad input: clear errors --------------------------------------------------------------
def test_missing_column_names_file_column_and_fix(tmp_path):
    keys = catalog(tmp_path, items=[{"item_id": "i1", "titel": "x"}])
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **keys)
    assert_error(e, "items.csv", "'title'", "ingest.columns.title", "Did you mean 'titel'?")
    keys = catalog(tmp_path, interactions=[{"user": "u1", "item_id": "i1"}])
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **keys)
    assert_error(e, "interactions.csv", "'user_id'", "ingest.columns.user_id")


@pytest.mark.parametrize("content", ["", "\n\n", "item_id,title,description\n"])
def test_empty_file_is_an_error(tmp_path, content):
    keys = catalog(tmp_path)
    (tmp_path / "items.csv").write_text(content)
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **keys)
    assert_error(e, "items.csv")
    assert "empty" in str(e.value) or "no data rows" in str(e.value)


def test_empty_parquet_and_jsonl_are_errors(tmp_path):
    keys = catalog(tmp_path, ".parquet")
    pq.write_table(pa.table({"item_id": pa.array([], pa.string()), "title": pa.array([], pa.string())}),
                   tmp_path / "items.parquet")
    with pytest.raises(InputDataError, match="no data rows"):
        run(tmp_path, **keys)
    keys = catalog(tmp_path, ".jsonl")
    (tmp_path / "interactions.jsonl").write_text("\n")
    with pytest.raises(InputDataError, match="interactions.jsonl is empty"):
        run(tmp_path, **keys)


def test_unreadable_files_are_errors(tmp_path):
    keys = catalog(tmp_path)
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **{**keys, "items": "nope.csv"})
    assert_error(e, "nope.csv", "no such file", "[ingest]")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(InputDataError, match="folder, not a file"):
        run(tmp_path, **{**keys, "items": "folder.csv"})
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **{**keys, "items": "broken.parquet"})
    assert_error(e, "broken.parquet", "not a readable Parquet file")
    (tmp_path / "items.xlsx").write_bytes(b"x")
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **{**keys, "items": "items.xlsx"})
    assert_error(e, "items.xlsx", ".csv", ".jsonl", ".parquet")


def test_nothing_left_is_an_error_after_writing_rejects(tmp_path):
    keys = catalog(tmp_path, interactions=[{"user_id": "u1", "item_id": "zz"}])
    with pytest.raises(InputDataError) as e:
        run(tmp_path, **keys)
    assert_error(e, "no interactions left", "unknown-item 1", "rejects.parquet")
    assert rejects(ArtifactStore(tmp_path / "work"))["reason"].str.startswith("unknown-item").all()


# ---- bad input: rejects rows ---------------------------------------------------------------
def test_duplicate_item_ids_are_rejected_keeping_the_first(tmp_path):
    items = ITEMS + [{"item_id": "i2", "title": "Second clock", "description": "", "image": "", "price": ""},
                     {"item_id": "", "title": "No id", "description": "", "image": "", "price": ""}]
    result, store, _ = run(tmp_path, **catalog(tmp_path, items=items))
    got = table(store, "items.parquet")
    assert got["item_id"].tolist() == ["i1", "i2", "i3", "i4"] and got["title"].iloc[1] == "Wall Clock."
    rej = rejects(store)
    assert rej["row"].tolist() == [7, 6]
    assert rej["reason"].tolist()[0].startswith("empty-id")
    assert "duplicate-item: item_id 'i2' already at row 3" in rej["reason"].iloc[1]
    assert set(rej["source"]) == {str(tmp_path / "items.csv")}
    assert result.counts["items_read"] == 6 and result.counts["items_rejected"] == 2


def test_unknown_items_and_empty_ids_are_rejected(tmp_path):
    inter = INTERACTIONS + [{"user_id": "u3", "item_id": "nope", "timestamp": "", "rating": ""},
                            {"user_id": "", "item_id": "i1", "timestamp": "", "rating": ""}]
    result, store, _ = run(tmp_path, **catalog(tmp_path, interactions=inter))
    rej = rejects(store).set_index("row")["reason"]
    assert rej[7].startswith("unknown-item: item_id 'nope' is not among the items read; add it to the items file")
    assert rej[8] == "empty-id: the user_id is empty"
    assert result.counts["users"] == 2 and result.counts["interactions_rejected"] == 2


def test_csv_values_are_kept_as_written(tmp_path):
    (tmp_path / "items.csv").write_text('item_id , title ,code\n007, Lamp ,0.50\n"8","a ""b"", c",NULL\n')
    (tmp_path / "interactions.csv").write_text("user_id,item_id\nu1,007\nu1,8\n")
    _, store, _ = run(tmp_path, items="items.csv", interactions="interactions.csv")
    items = table(store, "items.parquet")
    assert items[["item_id", "title", "code"]].values.tolist() == [["007", "Lamp", "0.50"], ["8", 'a "b", c', "NULL"]]


def test_values_lose_unicode_whitespace_at_their_ends_only(tmp_path):
    """Stripping is skipped for a column none of whose values starts or ends with whitespace; a column
    that has one is stripped of every Unicode White_Space character at the ends, as before."""
    (tmp_path / "items.csv").write_text("item_id,title\n\u00a0i1\u3000,Lamp\u2028\ni2,\tClock  x\x0b\n",
                                        encoding="utf-8")
    (tmp_path / "interactions.csv").write_text("user_id,item_id\nu1,i1\nu1,i2\n")
    _, store, _ = run(tmp_path, items="items.csv", interactions="interactions.csv")
    items = table(store, "items.parquet")
    assert items[["item_id", "title"]].values.tolist() == [["i1", "Lamp"], ["i2", "Clock  x"]]


def test_reject_counts_by_code_add_up_over_shared_and_per_row_reasons(tmp_path):
    """A reason shared by a whole check and reasons built per row are counted together by code."""
    inter = INTERACTIONS + [{"user_id": "", "item_id": "i1", "timestamp": "", "rating": ""},
                            {"user_id": "u1", "item_id": "i1", "timestamp": "5", "rating": ""},
                            {"user_id": "u2", "item_id": "i2", "timestamp": "6", "rating": ""},
                            {"user_id": "u3", "item_id": "nope", "timestamp": "", "rating": ""}]
    result, store, _ = run(tmp_path, **catalog(tmp_path, interactions=inter))
    rej = rejects(store)
    assert result.counts["reject_reasons"] == {"duplicate-interaction": 2, "empty-id": 1, "unknown-item": 1}
    assert rej["reason"].str.split(":").str[0].value_counts().to_dict() == result.counts["reject_reasons"]
    assert rej["row"].tolist() == [7, 10, 8, 9]  # lines, in the order of the checks: empty id, unknown item, duplicates


def test_rejects_are_written_batch_by_batch_as_they_were_added(tmp_path):
    from clearrec.stages._ingest_readers import Rejects

    rej = Rejects()
    rej.add("interactions", "a.csv", [2, 3, 4, 5, 6], [f"bad-rating: row {i}" for i in range(5)])
    rej.add("items", "b.csv", [9], "empty-id: the item_id is empty")
    assert [b.num_rows for b in rej.batches(max_rows=2)] == [2, 2, 1, 1]
    store = ArtifactStore(tmp_path)
    store.write_parquet_batches("rejects.parquet", Rejects.SCHEMA, rej.batches(max_rows=2), metadata={"k": 1})
    back = store.read_parquet("rejects.parquet")
    assert back.schema.remove_metadata() == Rejects.SCHEMA and store.parquet_metadata("rejects.parquet") == {"k": 1}
    assert back.to_pylist() == rej.to_arrow().to_pylist()
    assert back.column("source").to_pylist() == ["a.csv"] * 5 + ["b.csv"]
    assert pq.ParquetFile(store.path("rejects.parquet")).num_row_groups == 4
    rej.add("interactions", "a.csv", [7, 8], ["kcore-user: u", "bad-rating: again"])
    assert rej.by_code(max_rows=2) == rej.by_code() == {"bad-rating": 6, "empty-id": 1, "kcore-user": 1}


def test_malformed_csv_rows_are_rejected_with_line_numbers(tmp_path):
    keys = catalog(tmp_path)
    text = (tmp_path / "interactions.csv").read_text()
    text += 'u3,i1,5\nu3,i2,7,4,extra\nu3,i3,"bad quote,1\nu4,i1,1,1\n'
    (tmp_path / "interactions.csv").write_text(text)
    result, store, _ = run(tmp_path, **keys)
    rej = rejects(store).set_index("row")["reason"]
    assert rej[7] == "malformed: 3 fields, the header has 4"
    assert rej[8] == "malformed: 5 fields, the header has 4"
    assert rej[9].startswith("malformed: a quote opened on line 9 is never closed") and "spans lines 9-10" in rej[9]
    assert result.counts["interactions_read"] == 8


def test_malformed_jsonl_rows_are_rejected(tmp_path):
    keys = catalog(tmp_path, ".jsonl")
    with open(tmp_path / "interactions.jsonl", "a") as f:
        f.write('{"user_id": "u3", "item_id": \n[1, 2]\n\n{"user_id": "u3", "item_id": "i1", "timestamp": "x"}\n')
    result, store, _ = run(tmp_path, **keys)
    rej = rejects(store).set_index("row")["reason"]
    assert rej[6].startswith("malformed: not valid JSON")
    assert rej[7] == "malformed: expected a JSON object per line, got list"
    assert rej[9] == "bad-timestamp: 'x' is neither unix seconds nor an ISO-8601 date"
    assert result.counts["interactions_read"] == 8  # the blank line is not a record


def test_bad_rating_is_rejected(tmp_path):
    inter = INTERACTIONS + [{"user_id": "u2", "item_id": "i1", "timestamp": "1", "rating": "five"}]
    _, store, _ = run(tmp_path, **catalog(tmp_path, interactions=inter))
    assert rejects(store)["reason"].tolist() == ["bad-rating: 'five' is not a number"]


def test_non_utf8_rows_are_rejected_or_read_with_the_set_encoding(tmp_path):
    keys = catalog(tmp_path)
    raw = (tmp_path / "items.csv").read_bytes() + "i5,Caf\xe9 Mug,Nice,,2\n".encode("latin-1")
    (tmp_path / "items.csv").write_bytes(raw)
    result, store, _ = run(tmp_path, **keys)
    rej = rejects(store)
    assert rej["row"].tolist() == [6]
    assert rej["reason"].iloc[0].startswith("not-utf-8: byte 0xe9 in column 'title'")
    assert "ingest.encoding" in rej["reason"].iloc[0]
    assert result.counts["items_read"] == 5
    _, store, _ = run(tmp_path, workdir="latin", encoding="latin-1", **keys)
    assert table(store, "items.parquet")["title"].iloc[-1] == "Café Mug" and rejects(store).empty


def test_non_utf8_jsonl_line_is_rejected(tmp_path):
    keys = catalog(tmp_path, ".jsonl")
    with open(tmp_path / "items.jsonl", "ab") as f:
        f.write(b'{"item_id": "i9", "title": "Caf\xe9"}\n')
    _, store, _ = run(tmp_path, **keys)
    assert rejects(store)["reason"].iloc[0].startswith("not-utf-8: byte 0xe9 is not valid utf-8 text")


def test_image_outside_catalog_root_rejects_the_item_and_its_interactions(tmp_path):
    items = ITEMS + [{"item_id": "i5", "title": "Escape", "description": "", "image": "../../etc/passwd",
                      "price": ""},
                     {"item_id": "i6", "title": "Abs", "description": "",
                      "image": str(tmp_path.resolve() / "images/x.jpg"), "price": ""},
                     {"item_id": "i7", "title": "Ftp", "description": "", "image": "ftp://host/x.jpg", "price": ""}]
    inter = INTERACTIONS + [{"user_id": "u2", "item_id": "i5", "timestamp": "", "rating": ""}]
    _, store, _ = run(tmp_path, **catalog(tmp_path, items=items, interactions=inter))
    got = table(store, "items.parquet").set_index("item_id")["image"]
    assert got["i6"] == "images/x.jpg" and "i5" not in got and "i7" not in got
    rej = rejects(store).set_index("row")["reason"]
    assert rej[6].startswith("image-path: image '../../etc/passwd' is outside catalog_root")
    assert rej[8].startswith("image-path: image 'ftp://host/x.jpg' uses an unsupported URL scheme")
    assert rej[7] == "rejected-item: item_id 'i5' was rejected (items items.csv row 6)"


def test_duplicate_interactions_are_rejected_keeping_the_first(tmp_path):
    inter = INTERACTIONS + [{"user_id": "u1", "item_id": "i1", "timestamp": "999", "rating": "1"}]
    _, store, _ = run(tmp_path, **catalog(tmp_path, interactions=inter))
    assert rejects(store)["reason"].tolist() == [
        "duplicate-interaction: user 'u1' and item 'i1' already at interactions.csv row 2 (the first is kept)"]
    assert 999 not in table(store, "interactions.parquet")["timestamp"].tolist()


def test_min_rating_rejects_low_ratings_and_keeps_unrated(tmp_path):
    result, store, _ = run(tmp_path, min_rating=3.0, **catalog(tmp_path))
    assert rejects(store)["reason"].tolist() == ["below-min-rating: rating 2.0 < ingest.min_rating = 3.0"]
    assert result.counts["interactions_accepted"] == 4  # the unrated row stays


# ---- k-core ---------------------------------------------------------------------------------
def test_kcore_is_iterated_until_stable(tmp_path):
    # k = 2. Round 1 drops user D (1 row); then item z has 1 row left (round 2 drops it), which
    # leaves user C with 1 row (round 3). One pass would keep (C, z) and (C, y).
    pairs = [("A", "x"), ("A", "y"), ("B", "x"), ("B", "y"), ("C", "y"), ("C", "z"), ("D", "z")]
    items = [{"item_id": i, "title": i.upper()} for i in ("x", "y", "z", "w")]
    inter = [{"user_id": u, "item_id": i} for u, i in pairs]
    result, store, _ = run(tmp_path, kcore=2, **catalog(tmp_path, items=items, interactions=inter))
    assert table(store, "users.parquet")["user_id"].tolist() == ["A", "B"]
    assert table(store, "items.parquet")["item_id"].tolist() == ["x", "y"]
    rej = rejects(store)
    by_row = rej[rej["source"].str.endswith("interactions.csv")].set_index("row")["reason"]
    assert by_row[8] == "kcore-user: user 'D' had 1 interaction(s) left in round 1, fewer than kcore = 2"
    assert by_row[7] == "kcore-item: item 'z' had 1 interaction(s) left in round 2, fewer than kcore = 2"
    assert by_row[6] == "kcore-user: user 'C' had 1 interaction(s) left in round 3, fewer than kcore = 2"
    item_rej = rej[rej["source"].str.endswith("items.csv")].set_index("row")["reason"]
    assert item_rej[4].startswith("kcore-item: item 'z' had 1 interaction(s) left in round 2")
    assert item_rej[5].startswith("kcore-item: item 'w' had 0 interaction(s) left in round 1")
    assert result.counts["reject_reasons"] == {"kcore-user": 2, "kcore-item": 3}


def test_reasons_made_at_write_time_are_the_same_in_slices_of_one_row(tmp_path, monkeypatch):
    """Duplicate and k-core reasons are built when rejects.parquet is written, slice by slice: each row's
    reason must be its own (first row of its pair, its count and round) whatever the slice size."""
    from clearrec.stages._ingest_readers import Rejects

    pairs = [("A", "x"), ("A", "y"), ("A", "x"), ("B", "x"), ("B", "y"), ("C", "y"), ("B", "x"), ("C", "z"),
             ("A", "y"), ("D", "z"), ("A", "x")]
    items = [{"item_id": i, "title": i.upper()} for i in ("x", "y", "z", "w")]
    keys = catalog(tmp_path, items=items, interactions=[{"user_id": u, "item_id": i} for u, i in pairs])
    whole = rejects(run(tmp_path, "whole", kcore=2, **keys)[1])
    monkeypatch.setattr(Rejects.batches, "__defaults__", (1,))
    result, store, _ = run(tmp_path, "sliced", kcore=2, **keys)
    sliced = rejects(store)
    assert sliced.values.tolist() == whole.values.tolist()
    by_row = sliced[sliced["source"].str.endswith("interactions.csv")].set_index("row")["reason"]
    assert by_row[4] == "duplicate-interaction: user 'A' and item 'x' already at interactions.csv row 2 (the first is kept)"
    assert by_row[8] == "duplicate-interaction: user 'B' and item 'x' already at interactions.csv row 5 (the first is kept)"
    assert by_row[10] == "duplicate-interaction: user 'A' and item 'y' already at interactions.csv row 3 (the first is kept)"
    assert by_row[12] == "duplicate-interaction: user 'A' and item 'x' already at interactions.csv row 2 (the first is kept)"
    assert by_row[11] == "kcore-user: user 'D' had 1 interaction(s) left in round 1, fewer than kcore = 2"
    assert by_row[9] == "kcore-item: item 'z' had 1 interaction(s) left in round 2, fewer than kcore = 2"
    assert by_row[7] == "kcore-user: user 'C' had 1 interaction(s) left in round 3, fewer than kcore = 2"
    assert result.counts["reject_reasons"] == {"duplicate-interaction": 4, "kcore-user": 2, "kcore-item": 3}


# ---- split policies -----------------------------------------------------------------------
def random_catalog(tmp_path: Path, n_users: int = 80, n_items: int = 120, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    items = [{"item_id": f"i{j}", "title": f"Item {j}"} for j in range(n_items)]
    inter = []
    for u in range(n_users):
        n = 1 if u < 3 else 2 if u < 6 else 3 if u < 9 else int(rng.integers(10, 40))
        for j, t in zip(rng.choice(n_items, size=n, replace=False), rng.permutation(n)):
            inter.append({"user_id": f"u{u}", "item_id": f"i{j}", "timestamp": str(1000 + int(t))})
    return catalog(tmp_path, items=items, interactions=inter)


def merged(store: ArtifactStore) -> pd.DataFrame:
    inter = table(store, "interactions.parquet")
    users = table(store, "users.parquet").set_index("user_idx")["user_id"]
    return inter.assign(user=inter["user_idx"].map(users))


def assert_train_rule(df: pd.DataFrame) -> None:
    has_train = set(df.loc[df["split"] == "train", "user_idx"])
    assert set(df["user_idx"]) == has_train  # no user in valid/test without train


def test_random_split_is_seeded_per_user_8_1_1(tmp_path):
    keys = random_catalog(tmp_path)
    _, a, _ = run(tmp_path, workdir="a", split="random", seed=1, **keys)
    _, b, _ = run(tmp_path, workdir="b", split="random", seed=1, **keys)
    _, c, _ = run(tmp_path, workdir="c", split="random", seed=7, **keys)
    df = merged(a)
    pd.testing.assert_frame_equal(df, merged(b))
    assert not df["split"].equals(merged(c)["split"])
    assert_train_rule(df)
    share = df["split"].value_counts(normalize=True)
    assert 0.75 < share["train"] < 0.85 and 0.08 < share["valid"] < 0.13 and 0.08 < share["test"] < 0.13
    per_user = df.groupby("user")["split"].agg(lambda s: tuple(sorted(s.value_counts().items())))
    assert per_user["u0"] == (("train", 1),)  # 1 row: train only
    assert per_user["u3"] == (("test", 1), ("train", 1))  # 2 rows: train + test
    assert per_user["u6"] == (("test", 1), ("train", 1), ("valid", 1))  # 3 rows: one each
    big = df[df.groupby("user")["split"].transform("size") >= 10]
    counts = big.groupby("user")["split"].value_counts().unstack(fill_value=0)
    assert (counts["valid"] >= 1).all() and (counts["test"] >= 1).all()


@pytest.mark.parametrize("policy", ["random", "temporal", "leave-one-out"])
def test_split_order_is_the_lexicographic_one(policy):
    """The split codes are those of the plain lexsort formulation (by user, then the random key, or
    newest first with the later row first on ties), so a seed gives the same split as it always has."""
    from clearrec.stages._ingest_clean import SPLITS, assign_split, split_sizes, stable_argsort

    rng = np.random.default_rng(3)
    n = 5000
    user = rng.integers(0, 400, n)
    ts = rng.integers(0, 30, n).astype(np.float64)  # many ties
    if policy == "random":
        order = np.lexsort((np.random.default_rng(11).random(n), user))
    else:
        order = np.lexsort((-np.arange(n), -ts, user))
    counts = np.bincount(user)
    if policy == "leave-one-out":
        n_valid, n_test = (counts >= 3).astype(np.int64), (counts >= 2).astype(np.int64)
    else:
        n_valid, n_test = split_sizes(counts, (0.8, 0.1, 0.1))
    rank = np.arange(n) - np.concatenate(([0], np.cumsum(counts)[:-1]))[user[order]]
    expected = np.zeros(n, dtype=np.int8)
    expected[order[rank < n_test[user[order]]]] = SPLITS.index("test")
    expected[order[(rank >= n_test[user[order]]) & (rank < (n_test + n_valid)[user[order]])]] = SPLITS.index("valid")
    np.testing.assert_array_equal(assign_split(user, ts, policy, (0.8, 0.1, 0.1), 11), expected)
    for keys in (user, np.array([2**62, 0, 2**62, 5]), np.zeros(0, dtype=np.int64)):  # the second: no room to widen
        np.testing.assert_array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


def test_split_ratios_are_configurable(tmp_path):
    keys = random_catalog(tmp_path)
    result, _, _ = run(tmp_path, split="random", split_ratios=[0.6, 0.2, 0.2], **keys)
    n = result.counts["interactions_accepted"]
    assert 0.55 < result.counts["train"] / n < 0.65 and 0.17 < result.counts["test"] / n < 0.23


def test_temporal_split_puts_the_latest_in_test(tmp_path):
    keys = random_catalog(tmp_path)
    _, store, _ = run(tmp_path, split="temporal", **keys)
    df = merged(store)
    assert_train_rule(df)
    for _, rows in df.groupby("user_idx"):
        if len(rows) < 3:
            continue
        order = rows.sort_values("timestamp", ascending=False)["split"].tolist()
        n_test, n_valid = order.count("test"), order.count("valid")
        assert order == ["test"] * n_test + ["valid"] * n_valid + ["train"] * (len(rows) - n_test - n_valid)


def test_temporal_split_needs_timestamps(tmp_path):
    keys = catalog(tmp_path, interactions=[{k: v for k, v in r.items() if k != "timestamp"} for r in INTERACTIONS])
    with pytest.raises(InputDataError) as e:
        run(tmp_path, split="temporal", **keys)
    assert_error(e, "interactions.csv", "timestamp", "ingest.columns.timestamp", "split = 'random'")
    result, store, _ = run(tmp_path, split="temporal", **catalog(tmp_path))
    assert rejects(store)["reason"].tolist() == ["no-timestamp: split = 'temporal' needs a timestamp on every "
                                                 "interaction"]


def test_global_temporal_split_uses_one_cut_off_for_everyone(tmp_path):
    keys = random_catalog(tmp_path)
    result, store, log = run(tmp_path, split="global-temporal", **keys)
    df = merged(store)
    assert_train_rule(df)
    by_split = df.groupby("split")["timestamp"]
    assert by_split.max()["train"] < by_split.min()["valid"] <= by_split.max()["valid"] < by_split.min()["test"]
    cut = result.counts["split_cutoffs"]
    assert cut["valid_from"] == by_split.min()["valid"] and cut["test_from"] == by_split.min()["test"]
    assert "global-temporal split: valid from 1970-01-01 00:" in log
    share = df["split"].value_counts(normalize=True)  # ties at a cut-off go to the later split
    assert 0.7 < share["train"] < 0.85 and 0.05 < share["test"] < 0.2
    # per-user temporal would put recent rows of every user in test; here the light users (all rows
    # at 1000..1002) are entirely in train
    assert set(df.loc[df["user"].isin(["u0", "u3", "u6"]), "split"]) == {"train"}


def test_global_temporal_rejects_users_first_seen_after_the_cut_off(tmp_path):
    items = [{"item_id": f"i{j}", "title": f"Item {j}"} for j in range(4)]
    inter = [{"user_id": "old", "item_id": f"i{j}", "timestamp": str(t)} for j, t in enumerate((1, 2, 3, 4))]
    inter += [{"user_id": "new", "item_id": "i0", "timestamp": "10"}, {"user_id": "new", "item_id": "i1",
                                                                        "timestamp": "11"}]
    result, store, _ = run(tmp_path, split="global-temporal", split_ratios=[0.5, 0.2, 0.3],
                           **catalog(tmp_path, items=items, interactions=inter))
    df = merged(store)
    assert df.loc[df["user"] == "old", "split"].tolist() == ["train"] * 3 + ["valid"]
    assert "new" not in set(df["user"])  # only after the cut-offs: no train row, both rows rejected
    assert rejects(store)["reason"].str.startswith("no-train: user 'new'").sum() == 2
    assert result.counts["split_cutoffs"] == {"valid_from": 4, "test_from": 10}
    same = [{"user_id": f"u{j}", "item_id": "i0", "timestamp": "5"} for j in range(20)]
    with pytest.raises(InputDataError, match="train would be empty"):
        run(tmp_path / "same", split="global-temporal", **catalog(tmp_path / "same", items=items, interactions=same))


def test_leave_one_out_holds_out_the_last_two_interactions(tmp_path):
    keys = random_catalog(tmp_path)
    result, store, _ = run(tmp_path, split="leave-one-out", **keys)
    df = merged(store)
    assert_train_rule(df)
    for user, rows in df.groupby("user"):
        order = rows.sort_values("timestamp", ascending=False)["split"].tolist()
        newest_two = ["test", "valid"] + ["train"] * (len(order) - 2)
        expected = {1: ["train"], 2: ["test", "train"]}.get(len(order), newest_two)
        assert order == expected, user
    assert result.counts["test"] == 80 - 3 and result.counts["valid"] == 80 - 6
    keys = catalog(tmp_path / "no-ts", interactions=[{k: v for k, v in r.items() if k != "timestamp"}
                                                     for r in INTERACTIONS])
    with pytest.raises(InputDataError, match="split = 'leave-one-out' needs a timestamp column"):
        run(tmp_path / "no-ts", split="leave-one-out", **keys)


def test_given_split_is_kept_and_users_without_train_are_rejected(tmp_path):
    split = ["train", "val", "TEST", "0", "2"]
    inter = [{**r, "split": s} for r, s in zip(INTERACTIONS, split)]
    inter += [{"user_id": "u3", "item_id": "i1", "timestamp": "", "rating": "", "split": "test"},
              {"user_id": "u3", "item_id": "i2", "timestamp": "", "rating": "", "split": "holdout"}]
    result, store, _ = run(tmp_path, split="given", **catalog(tmp_path, interactions=inter))
    df = merged(store)
    assert df["split"].tolist() == ["train", "valid", "test", "train", "test"]
    rej = rejects(store).set_index("row")["reason"]
    assert rej[8] == "bad-split: 'holdout' is not train / valid / test (or val, 0 / 1 / 2)"
    assert rej[7] == "no-train: user 'u3' has no train interaction left; a user in valid / test needs one"
    with pytest.raises(InputDataError, match="split = 'given' needs a split column"):
        run(tmp_path / "plain", split="given", **catalog(tmp_path / "plain"))


# ---- MMRec importer ------------------------------------------------------------------------
def mmrec_folder(root: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray, np.ndarray]:
    """5 items (item 4 only in the feature files), 4 users, x_label split; image row 3 is NaN."""
    folder = root / "mini"
    folder.mkdir(parents=True)
    rows = [(10, 1, 3, 99, 0),  # user 10 comes first in the file but is numbered last (userID order)
            (0, 0, 5, 100, 0), (0, 1, 4, 101, 0), (0, 2, 3, 102, 2), (1, 1, 5, 103, 0), (1, 2, 2, 104, 1),
            (1, 3, 4, 105, 0), (2, 0, 1, 106, 0), (2, 3, 3, 107, 2), (0, 0, 5, 108, 0), (2, "x", 1, 1, 0)]
    lines = ["userID\titemID\trating\ttimestamp\tx_label"] + ["\t".join(map(str, r)) for r in rows]
    (folder / "mini.inter").write_text("\n".join(lines) + "\n")
    image = rng.standard_normal((5, 6)).astype(np.float32)
    image[3, 2] = np.nan
    text = rng.standard_normal((5, 4))
    np.save(folder / "image_feat.npy", image)
    np.save(folder / "text_feat.npy", text)
    return folder, image, text


def test_mmrec_importer_writes_imported_features(tmp_path):
    folder, image, text = mmrec_folder(tmp_path, np.random.default_rng(0))
    result, store, _ = run(tmp_path, format="mmrec", interactions="mini", split="given")
    items = table(store, "items.parquet")
    assert items["item_id"].tolist() == ["0", "1", "2", "3", "4"] and items["item_idx"].tolist() == [0, 1, 2, 3, 4]
    assert table(store, "users.parquet")["user_id"].tolist() == ["0", "1", "2", "10"]
    df = merged(store)
    assert df["split"].value_counts().to_dict() == {"train": 6, "test": 2, "valid": 1}
    rej = rejects(store).set_index("row")["reason"]
    assert rej[11].startswith("duplicate-interaction: user '0' and item '0' already at mini.inter row 3")
    assert rej[12] == "malformed: itemID 'x' is not a non-negative integer"
    assert result.counts["items_read"] == 5 and result.counts["interactions_read"] == 11
    assert "imported/image.parquet" in result.outputs and "imported/text.parquet" in result.outputs
    img = store.read_parquet("imported/image.parquet")
    assert img.column_names == ["item_idx", "item_id", "vector", "status", "error", "content_sha256"]
    vec, valid = arrow_to_vectors(img.column("vector"))
    assert valid.tolist() == [True, True, True, False, True]
    np.testing.assert_array_equal(vec[valid], image[valid])
    assert img.column("status").to_pylist()[3] == "non_finite" and "row 3" in img.column("error").to_pylist()[3]
    meta = store.parquet_metadata("imported/image.parquet")
    assert meta["modality"] == "image" and meta["dim"] == 6 and meta["encoder"] == "imported"
    txt, _ = arrow_to_vectors(store.read_parquet("imported/text.parquet").column("vector"))
    np.testing.assert_allclose(txt, text.astype(np.float32))


def test_mmrec_importer_keeps_feature_rows_aligned_after_kcore(tmp_path):
    folder, image, _ = mmrec_folder(tmp_path, np.random.default_rng(1))
    _, store, _ = run(tmp_path, format="mmrec", interactions="mini/mini.inter", kcore=2, split="random")
    items = table(store, "items.parquet")
    assert items["item_id"].tolist() == ["0", "1", "2", "3"]  # item 4 has no interactions
    img = store.read_parquet("imported/image.parquet")
    vec, valid = arrow_to_vectors(img.column("vector"))
    rows = items["item_id"].astype(int).to_numpy()
    np.testing.assert_array_equal(vec[valid], image[rows][valid])
    # switching to a catalog without features removes the stale import
    (folder / "image_feat.npy").unlink()
    (folder / "text_feat.npy").unlink()
    result, store, _ = run(tmp_path, format="mmrec", interactions="mini", split="given")
    assert not store.exists("imported/image.parquet") and "imported/image.parquet" not in result.outputs
    assert table(store, "items.parquet")["item_id"].tolist() == ["0", "1", "2", "3"]  # ids up to the max itemID


def test_mmrec_feature_rows_must_cover_the_item_ids(tmp_path):
    folder, _, _ = mmrec_folder(tmp_path, np.random.default_rng(2))
    np.save(folder / "image_feat.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(InputDataError) as e:
        run(tmp_path, format="mmrec", interactions="mini", split="given")
    assert_error(e, "disagree on the number of items")
    np.save(folder / "text_feat.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(InputDataError) as e:
        run(tmp_path, format="mmrec", interactions="mini", split="given")
    assert_error(e, "image_feat.npy has 3 rows", "go up to 3")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.inter").write_text("userID\titemID\n0\t0\n")
    (tmp_path / "two" / "b.inter").write_text("userID\titemID\n0\t0\n")
    with pytest.raises(InputDataError, match="2 .inter files"):
        run(tmp_path, format="mmrec", interactions="two")


# ---- split-json importer --------------------------------------------------------------------
def split_json_folder(root: Path) -> Path:
    folder = root / "sj"
    folder.mkdir()
    files = {
        "train.json": {"0": [0, 1], "1": [1, 2], "3": [2]},
        "val.json": {"0": [2], "1": [9]},  # item 9 is not in item2id.json
        "test.json": {"1": [0, "q"], "2": [1], "abc": [1], "0": "oops"},  # user 2 has no train
        "item2id.json": {"B00A": 0, "B00B": 1, "B00C": 2, "B00D": 3},
        "user2id.json": {"alice": 0, "bob": 1, "carol": 2, "dave": 3},
    }
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj))
    return folder


def test_split_json_importer(tmp_path):
    folder = split_json_folder(tmp_path)
    result, store, _ = run(tmp_path, format="split-json", interactions="sj", split="given")
    items = table(store, "items.parquet")
    assert items["item_id"].tolist() == ["B00A", "B00B", "B00C", "B00D"]  # B00D: no interactions, kept (no k-core)
    df = merged(store)
    assert list(zip(df["user"], df["item_idx"], df["split"])) == [
        ("alice", 0, "train"), ("alice", 1, "train"), ("alice", 2, "valid"), ("bob", 1, "train"),
        ("bob", 2, "train"), ("bob", 0, "test"), ("dave", 2, "train")]
    rej = rejects(store)
    reasons = dict(zip(zip(rej["source"].map(lambda s: Path(s).name), rej["row"]), rej["reason"]))
    assert reasons[("val.json", 2)] == "unknown-item: itemIdx 9 is not in item2id.json"
    assert reasons[("test.json", 2)] == "malformed: item 'q' of user 1 is not a non-negative integer index"
    assert reasons[("test.json", 4)] == "malformed: user key 'abc' is not a non-negative integer index"
    assert reasons[("test.json", 5)].startswith("malformed: the value of user '0' is a str")
    assert reasons[("test.json", 3)].startswith("no-train: user 'carol'")
    assert result.counts["sources"][f"items: {folder / 'item2id.json'}"] == {"read": 4, "accepted": 4, "rejected": 0}
    assert result.counts["users"] == 3 and result.counts["interactions_read"] == 12


def test_split_json_needs_all_three_files(tmp_path):
    folder = split_json_folder(tmp_path)
    (folder / "test.json").unlink()
    with pytest.raises(InputDataError, match="has no test.json"):
        run(tmp_path, format="split-json", interactions="sj", split="given")
    (folder / "test.json").write_text("{not json")
    with pytest.raises(InputDataError) as e:
        run(tmp_path, format="split-json", interactions="sj", split="given")
    assert_error(e, "test.json is not valid JSON", "line 1")


@pytest.mark.realdata
def test_amazon_baby_via_split_json(tmp_path, amazon_baby):
    result, store, _ = run(tmp_path, format="split-json", interactions=str(amazon_baby), split="given")
    c = result.counts
    assert (c["users"], c["items_accepted"], c["interactions_accepted"]) == (19_445, 7_050, 160_792)
    assert (c["train"], c["valid"], c["test"]) == (119_674, 20_559, 20_559)
    assert c["interactions_rejected"] == 0 and c["items_rejected"] == 0
    item2id = json.loads((amazon_baby / "item2id.json").read_text())
    items = table(store, "items.parquet")
    assert (items["item_id"].map(item2id) == items["item_idx"]).all()  # dense indices = the dataset's own
    user2id = json.loads((amazon_baby / "user2id.json").read_text())
    users = table(store, "users.parquet")
    assert (users["user_id"].map(user2id) == users["user_idx"]).all()
    df = table(store, "interactions.parquet")
    assert_train_rule(df)
    train = json.loads((amazon_baby / "train.json").read_text())
    got = df[(df["user_idx"] == 3) & (df["split"] == "train")]["item_idx"].tolist()
    assert got == train["3"]
