"""The stage graph: every stage, in the order the pipeline runs them.

``STAGES`` (the specs) imports the stage modules on first access; the names and one-line
descriptions are listed here as well, so that ``clearrec --help`` needs no stage import
(``tests/test_cli_startup.py`` checks that they match the specs).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stage import StageSpec

    STAGES: tuple[StageSpec, ...]

DESCRIPTIONS: dict[str, str] = {  # stage name (in run order) -> its StageSpec.description
    "ingest": "raw items + interactions -> items / users / interactions (split) / rejects",
    "encode": "encode each declared modality into feature vectors (features/<name>.parquet)",
    "project": "fit the CLEAR projector; write projected features and diagnostics",
    "train": "train the graph recommender (BPR, early stopping on valid) and export user / item vectors",
    "index": "FAISS indexes over the item vectors and the item content, tuned to a recall target",
}


def stage_names() -> list[str]:
    return list(DESCRIPTIONS)


def __getattr__(name: str) -> Any:
    if name == "STAGES":
        specs = tuple(importlib.import_module(f"..stages.{n}", __package__).SPEC for n in DESCRIPTIONS)
        globals()["STAGES"] = specs
        return specs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
