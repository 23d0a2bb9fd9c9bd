"""Hostile raw files get a clear error naming the file and what is wrong, never a bare crash."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

from clearrec.pipeline.config import load_config
from clearrec.pipeline.errors import InputDataError
from clearrec.pipeline.stage import StageContext
from clearrec.pipeline.store import ArtifactStore
from clearrec.stages import ingest

INTERACTIONS = "user_id,item_id\nu1,i1\n"


def ingest_error(tmp_path: Path, items_name: str, content: bytes) -> str:
    (tmp_path / items_name).write_bytes(content)
    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"ingest": {"items": items_name, "interactions": "interactions.csv"}}))
    ctx = StageContext(store=ArtifactStore(tmp_path / "w"), config=load_config(path),
                       console=Console(file=io.StringIO()))
    with pytest.raises(InputDataError) as e:
        ingest.run(ctx)
    message = str(e.value)
    assert str(tmp_path / items_name) in message
    return message


def test_a_binary_file_named_csv(tmp_path):
    message = ingest_error(tmp_path, "items.csv", os.urandom(4096) + b"\x00" + bytes(range(256)) * 8)
    assert "not utf-8 text" in message and "NUL byte" in message


def test_an_undecodable_header(tmp_path):
    message = ingest_error(tmp_path, "items.csv", b"item_id,t\xefitle\xff\ni1,Lamp\n")
    assert "the header (line 1) is not utf-8 text" in message and "0xef" in message and "ingest.encoding" in message


def test_one_huge_line_without_a_line_break_is_not_called_empty(tmp_path):
    message = ingest_error(tmp_path, "items.csv", b"item_id,title," + b"x" * 3_000_000)
    assert "empty" not in message
    assert "single line of 3,000,014 bytes with no line break" in message and "no data rows" in message


def test_a_jsonl_file_holding_one_json_array(tmp_path):
    rows = [{"item_id": "i1", "title": "Lamp"}, {"item_id": "i2", "title": "Clock"}]
    message = ingest_error(tmp_path, "items.jsonl", json.dumps(rows, indent=2).encode())
    assert "holds a JSON array, not JSON Lines" in message and "no column" not in message
