"""``[project]``: the CLEAR cross-modal null-space projection."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Section, Seed


class ProjectConfig(Section):
    enabled: bool = True  # false: pass features through unchanged (CLEAR off); *_clear files are still written
    k: int | None = Field(8, ge=1, le=65536)  # rank of the removed shared subspace (ignored when ratio is set)
    ratio: float | None = Field(None, gt=0, le=1)  # "dynamic ratio": smallest k reaching this energy share
    strength: float = Field(1.0, ge=0, le=1)  # lambda: 1 = hard null-space projection, 0 = identity
    center: bool = True  # centre features before the cross-covariance
    fit_on: Literal["all", "train"] = "all"  # fit on all items or only items seen in training
    project_centered: bool = False  # true: X' = mu + (X - mu) P (the mean is kept); false: X' = X P
    # per modality name, whether CLEAR projects it (default true); one set false keeps its features as they
    # are but still shapes the other modalities' shared directions, e.g. {image = false}
    modalities: dict[str, bool] = {}
    directions: Literal["shared", "random"] = "shared"  # random: remove k random orthonormal directions (control)
    seed: Seed = 0  # seed of the random directions and of the diagnostics sample
    # dynamic: the stage passes features through and train projects the backbone's embeddings every epoch
    mode: Literal["static", "dynamic"] = "static"
    overlap_k: int = Field(10, ge=1, le=1000)  # K of the cross-modal top-K overlap diagnostic
    diagnostics_items: int = Field(10000, ge=2, le=10_000_000)  # items sampled (seeded) for the overlap / score diagnostics
    chunk_rows: int = Field(16384, ge=1, le=1 << 24)  # rows per streamed chunk; peak memory ~ chunk_rows x (dv + dt) x 40 B

    @classmethod
    def retired(cls, key: str, data: dict[str, Any], where: str) -> str | None:
        if key not in ("visual", "text"):
            return None
        name = "image" if key == "visual" else "text"
        return (f"project.{key} {where} is no longer read: CLEAR's per-modality switch is "
                f"project.modalities, e.g. modalities = {{{name} = {'true' if data[key] else 'false'}}}")

    @model_validator(mode="after")
    def _check(self) -> "ProjectConfig":
        if self.k is None and self.ratio is None:
            raise ValueError("set project.k (fixed rank) or project.ratio (energy share)")
        return self
