"""The whole pipeline on interactions alone (no images, no text): LightGCN end to end."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from clearrec.pipeline.cli import app


def _split_json_dataset(root, n_users=60, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    splits = {"train": {}, "val": {}, "test": {}}
    for u in range(n_users):
        items = rng.choice(n_items, size=8, replace=False).tolist()
        splits["train"][str(u)] = items[:6]
        splits["val"][str(u)] = items[6:7]
        splits["test"][str(u)] = items[7:]
    root.mkdir()
    for name, data in splits.items():
        (root / f"{name}.json").write_text(json.dumps(data))


def test_id_only_dataset_runs_every_stage_and_serves(tmp_path):
    _split_json_dataset(tmp_path / "data")
    config = tmp_path / "clearrec.toml"
    config.write_text(
        '[ingest]\nformat = "split-json"\ninteractions = "data"\nsplit = "given"\n'
        '[encode]\nmodalities = {}\n'
        '[train]\nbackbone = "lightgcn"\nepochs = 2\n'
    )
    work = tmp_path / "work"
    cli = CliRunner()
    result = cli.invoke(app, ["run", "--config", str(config), "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    assert json.loads((work / "clear" / "projector.json").read_text())["applied"] is False
    assert (work / "model" / "metrics.json").is_file() and (work / "index" / "items.faiss").is_file()

    status = cli.invoke(app, ["status", "--json", "--config", str(config), "--workdir", str(work)])
    states = json.loads(status.stdout)
    assert {s["state"] for s in states.values()} == {"up-to-date"}, states

    query = cli.invoke(app, ["query", "--user", "0", "-k", "5", "--json", "--config", str(config), "--workdir", str(work)])
    assert query.exit_code == 0, query.output
    hits = json.loads(query.stdout)
    assert len(hits) == 5 and all({"item_id", "score", "title"} <= set(h) for h in hits)
