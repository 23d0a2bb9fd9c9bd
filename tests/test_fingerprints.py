"""A config change that leaves a stage's inputs byte-identical never reruns anything downstream of it.

The real project, train and index stages over a small work directory: after a full run,
``project.seed`` (which only seeds the diagnostics sample when the directions are the shared
ones) reruns the project stage alone, with CLEAR off and in static mode; with random
directions the seed changes the projection, so train and index rerun too.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from clearrec.pipeline.config import Config
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.store import ArtifactStore
from clearrec.stages import index, project, train

from test_train_stage import write_workdir

STAGES = (project.SPEC, train.SPEC, index.SPEC)


def raw_workdir(root) -> ArtifactStore:
    """users / items / interactions and the encode stage's features/{image,text}.parquet."""
    store = write_workdir(root, projector=None, clear_enabled=False)
    for m in ("image", "text"):
        store.path(f"features/{m}_clear.parquet").rename(store.path(f"features/{m}.parquet"))
    return store


def run(root, **overrides) -> list[str]:
    base = {"train.epochs": 2, "train.batch_size": 128, "train.embedding_size": 8, "train.threads": 1,
            "train.backbone": "vbpr", "project.k": 2, "project.diagnostics_items": 20, "index.tune_queries": 20}
    cfg = Config().with_overrides({**base, **overrides})
    return Runner(STAGES, cfg, root, console=Console(file=io.StringIO())).run()


@pytest.mark.parametrize("setting", [{"project.enabled": False}, {"project.mode": "static"},
                                     {"project.mode": "dynamic"}])
def test_a_seed_that_changes_no_output_reruns_only_the_project_stage(tmp_path, setting):
    raw_workdir(tmp_path)
    assert run(tmp_path, **setting) == ["project", "train", "index"]
    before = ArtifactStore(tmp_path).read_json("manifest.json")["stages"]
    assert run(tmp_path, **setting, **{"project.seed": 7}) == ["project"]
    after = ArtifactStore(tmp_path).read_json("manifest.json")["stages"]
    for stage in ("train", "index"):
        assert after[stage]["fingerprint"] == before[stage]["fingerprint"]


def test_a_seed_that_changes_the_projection_retrains(tmp_path):
    raw_workdir(tmp_path)
    random = {"project.directions": "random"}
    assert run(tmp_path, **random) == ["project", "train", "index"]
    assert run(tmp_path, **random, **{"project.seed": 7}) == ["project", "train", "index"]
