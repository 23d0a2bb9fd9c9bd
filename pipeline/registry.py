"""The stage graph: every stage, in the order the pipeline runs them."""

from __future__ import annotations

from ..stages import encode, index, ingest, project, train
from .stage import StageSpec

STAGES: tuple[StageSpec, ...] = (ingest.SPEC, encode.SPEC, project.SPEC, train.SPEC, index.SPEC)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
