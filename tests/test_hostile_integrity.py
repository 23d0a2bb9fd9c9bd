"""Integrity and resume under damage: flipped bytes in the encode cache, a --force run killed midway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tomli_w
from encode_fixtures import tiny_sentence_dir, write_catalog, write_items
from rich.console import Console

from clearrec.pipeline.config import load_config
from clearrec.pipeline.runner import STALE, Runner
from clearrec.pipeline.store import ArtifactStore, arrow_to_vectors
from clearrec.stages import encode

QUIET = Console(stderr=True, quiet=True)


# ---- 7. cache shards are verified by the checksum in their marker -----------------------------------
def _text_config(tmp_path: Path) -> object:
    model = tiny_sentence_dir(tmp_path / "models" / "st")
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"encode": {"modalities": {"text": {"encoder": str(model)}}, "threads": 1,
                                              "shard_size": 4}}))
    return load_config(path)


def _vectors(workdir: Path) -> np.ndarray:
    table = ArtifactStore(workdir).read_parquet("features/text.parquet")
    assert set(table.column("status").to_pylist()) == {"ok"}
    return arrow_to_vectors(table.column("vector"))[0]


def _damage(shard: Path) -> None:
    """Flip one byte so that the shard still reads, with other vectors, at the same size."""
    good = pq.read_table(shard)
    data = bytearray(shard.read_bytes())
    for offset in range(len(data) // 3, len(data)):
        data[offset] ^= 0x10
        shard.write_bytes(bytes(data))
        try:
            bad = pq.read_table(shard)
            if not bad.column("vector").equals(good.column("vector")):
                return
        except Exception:  # noqa: BLE001 - any decoding failure: try the next byte
            pass
        data[offset] ^= 0x10
    raise AssertionError(f"no single flipped byte of {shard} gives a readable shard with other vectors")


def test_a_damaged_cache_shard_is_redone_and_counted(tmp_path):
    cfg = _text_config(tmp_path)
    write_items(tmp_path / "w", write_catalog(tmp_path / "cat", 10), tmp_path / "cat")
    runner = Runner([encode.SPEC], cfg, tmp_path / "w", console=QUIET)
    runner.run()
    clean = _vectors(tmp_path / "w")
    shards = sorted((tmp_path / "w" / "features" / ".cache" / "text").glob("*/*.parquet"))
    assert len(shards) == 3
    marker = json.loads(shards[1].with_suffix(".done").read_text())
    _damage(shards[1])
    assert shards[1].stat().st_size == marker["bytes"]  # the size alone cannot tell

    runner.run(force=True)  # the README's procedure after a change in place
    np.testing.assert_array_equal(_vectors(tmp_path / "w"), clean)
    counts = runner.manifest()["stages"]["encode"]["counts"]
    assert counts["text_shards_bad"] == 1 and counts["text_shards_run"] == 1 and counts["text_shards_reused"] == 2
    runner.run(force=True)
    assert runner.manifest()["stages"]["encode"]["counts"]["text_shards_bad"] == 0


# ---- 8. a forced stage stays forced until it completes ----------------------------------------------
STAGE = textwrap.dedent('''
    """A stage that writes out.txt; with KILL set it dies (SIGKILL) while working, before writing it."""
    import os
    import signal

    from clearrec.pipeline.stage import StageResult, StageSpec


    def run(ctx):
        if os.environ.get("KILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.store.write_text("out.txt", "done")
        return StageResult(outputs=["out.txt"])


    SPEC = StageSpec(name="make", run=run, outputs=("out.txt",))
''')


def _runner(folder: Path) -> Runner:
    sys.path.insert(0, str(folder))
    try:
        import killable_stage
    finally:
        sys.path.remove(str(folder))
    (folder / "clearrec.toml").write_text("")
    return Runner([killable_stage.SPEC], load_config(folder / "clearrec.toml"), folder / "w", console=QUIET)


@pytest.fixture
def stage_folder(tmp_path):
    (tmp_path / "killable_stage.py").write_text(STAGE)
    yield tmp_path
    sys.modules.pop("killable_stage", None)


def test_a_killed_forced_run_is_not_up_to_date(stage_folder):
    runner = _runner(stage_folder)
    assert runner.run() == ["make"]
    assert runner.run() == []  # up to date
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import killable_stage\n"
              "from rich.console import Console\n"
              "from clearrec.pipeline.config import load_config\n"
              "from clearrec.pipeline.runner import Runner\n"
              "Runner([killable_stage.SPEC], load_config(sys.argv[1] + '/clearrec.toml'), sys.argv[1] + '/w',\n"
              "       console=Console(quiet=True)).run(force=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(stage_folder)], env={**os.environ, "KILL": "1"},
                          timeout=120)
    assert proc.returncode == -9
    state = runner.status()["make"]
    assert state.state == STALE and "--force run" in state.reason and "did not complete" in state.reason
    assert runner.run() == ["make"]  # resumed by a plain run
    assert runner.run() == []
