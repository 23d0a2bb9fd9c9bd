"""Hostile catalogs that used to lose or smuggle data: huge CSV fields, over-long text, wrong-typed Parquet."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from encode_fixtures import tiny_sentence_dir
from rich.console import Console

from clearrec.models.encoders import load_text_encoder
from clearrec.pipeline.config import EncodeConfig, load_config
from clearrec.pipeline.errors import InputDataError
from clearrec.pipeline.stage import StageContext
from clearrec.pipeline.store import ArtifactStore
from clearrec.stages import encode, ingest

INTERACTIONS = "user_id,item_id\nu1,real\nu1,after\nu2,real\n"


def run_stage(stage, tmp_path: Path, workdir: str = "work", **sections) -> tuple[dict, ArtifactStore]:
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps(sections))
    store = ArtifactStore(tmp_path / workdir)
    ctx = StageContext(store=store, config=load_config(path), console=Console(file=io.StringIO()))
    return stage.run(ctx).counts, store


def frame(store: ArtifactStore, name: str):
    return store.read_parquet(name).to_pandas()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    return str(tiny_sentence_dir(tmp_path_factory.mktemp("models") / "st"))


# ---- 1. a field over Python's csv limit rejects (or keeps) its own row, nothing else -----------------
def test_a_huge_quoted_field_cannot_smuggle_items_and_keeps_its_own_row(tmp_path):
    # 200 KiB of description whose lines look like item records
    smuggled = "".join(f"evil{i},Evil item {i},planted\n" for i in range(8000))
    (tmp_path / "items.csv").write_text(f'item_id,title,description\nreal,Real item,"{smuggled}"\nafter,After,ok\n')
    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    counts, store = run_stage(ingest, tmp_path, ingest={"items": "items.csv", "interactions": "interactions.csv"})
    items = frame(store, "items.parquet")
    assert items["item_id"].tolist() == ["real", "after"]
    assert items["description"].iloc[0] == smuggled.strip()
    assert counts["items_read"] == 2 and counts["items_rejected"] == 0
    assert counts["interactions_accepted"] == 3  # not "unknown-item" / "rejected-item"
    assert frame(store, "rejects.parquet").empty


def test_a_malformed_record_rejects_only_its_own_line(tmp_path):
    long = "x" * 300_000
    (tmp_path / "items.csv").write_text(f'item_id,title,description\nreal,Real,"{long}"\nbad,"two\nlines",x,extra\n'
                                        "after,After,ok\n")
    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    counts, store = run_stage(ingest, tmp_path, ingest={"items": "items.csv", "interactions": "interactions.csv"})
    assert frame(store, "items.parquet")["item_id"].tolist() == ["real", "after"]
    rej = frame(store, "rejects.parquet")
    assert rej["row"].tolist() == [3]
    assert rej["reason"].iloc[0] == ("malformed: 4 fields, the header has 3 (the record spans lines 3-4: an unclosed "
                                     "quote?)")
    assert counts["items_read"] == 3


# ---- 2. over-long text: capped per item, flagged, never tokenized past the window ------------------
def test_max_text_chars_has_a_documented_default():
    assert EncodeConfig().max_text_chars == 20_000
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "max_text_chars" in readme and "20,000" in readme


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_over_long_descriptions_are_truncated_and_flagged_in_every_format(tmp_path, text_model, ext):
    rows = [{"item_id": "long", "title": "Long", "description": "word " * 60_000},
            {"item_id": "short", "title": "Short", "description": "fine"}]
    if ext == ".csv":
        (tmp_path / "items.csv").write_text("item_id,title,description\n"
                                            + "".join(f"{r['item_id']},{r['title']},{r['description']}\n" for r in rows))
    elif ext == ".jsonl":
        (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "items.parquet")
    (tmp_path / "interactions.csv").write_text("user_id,item_id\nu1,long\nu1,short\n")
    sections = {"ingest": {"items": f"items{ext}", "interactions": "interactions.csv"},
                "encode": {"modalities": {"text": {"encoder": text_model}}, "threads": 1, "max_text_chars": 1000}}
    counts, _ = run_stage(ingest, tmp_path, **sections)
    assert counts["items_accepted"] == 2  # the long item is kept, not rejected
    _, store = run_stage(encode, tmp_path, **sections)
    text = frame(store, "features/text.parquet")
    assert text["status"].tolist() == ["ok", "ok"]
    assert text["truncated"].tolist() == [True, False]
    capped = ("Long. " + "word " * 60_000)[:1000].rstrip()
    assert text["content_sha256"].iloc[0] == hashlib.sha256(capped.encode()).hexdigest()


def test_the_tokenizer_never_sees_more_than_the_model_window(tmp_path, text_model):
    encoder = load_text_encoder(text_model)
    seen: list[int] = []
    name = "preprocess" if getattr(encoder.model, "preprocess", None) else "tokenize"  # what the encoder calls
    tokenize = getattr(encoder.model, name)

    def recording(texts):
        seen.extend(len(t) for t in texts)
        return tokenize(texts)

    setattr(encoder.model, name, recording)
    full = encoder.encode(["abc " * 100_000])
    window = encoder.model.max_seq_length
    assert seen and max(seen) <= window * 32 < 400_000
    # cutting at the window changes nothing the model keeps
    setattr(encoder.model, name, tokenize)
    assert encoder.encode(["abc " * (window * 8)]) == pytest.approx(full, abs=1e-6)


# ---- 3. wrong-typed Parquet columns are refused, naming the column and type -------------------------
@pytest.mark.parametrize("column, values, ours, type_name", [
    ("item_id", pa.array([1.0, 2.0]), "item_id", "double"),
    ("title", pa.array([["a", "b"], ["c"]]), "title", "list<"),
    ("title", pa.array([{"en": "a"}, {"en": "b"}]), "title", "struct<en: string>"),
    ("image", pa.array([3, 4]), "image", "int64"),
])
def test_wrong_typed_parquet_columns_are_refused(tmp_path, column, values, ours, type_name):
    cols = {"item_id": pa.array(["1", "2"]), "title": pa.array(["A", "B"]), "image": pa.array(["a.png", "b.png"])}
    cols[column] = values
    pq.write_table(pa.table(cols), tmp_path / "items.parquet")
    (tmp_path / "interactions.csv").write_text("user_id,item_id\nu1,1\nu1,2\n")
    with pytest.raises(InputDataError) as e:
        run_stage(ingest, tmp_path, ingest={"items": "items.parquet", "interactions": "interactions.csv"})
    message = str(e.value)
    assert "items.parquet" in message and f"column {column!r} (the {ours} column)" in message
    assert type_name in message


def test_float_user_ids_in_parquet_interactions_are_refused(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n")
    pq.write_table(pa.table({"user_id": pa.array([7.0]), "item_id": pa.array([1])}), tmp_path / "inter.parquet")
    with pytest.raises(InputDataError, match=r"inter.parquet: column 'user_id' \(the user_id column\) has type double"):
        run_stage(ingest, tmp_path, ingest={"items": "items.csv", "interactions": "inter.parquet"})
