"""``[index]``: the FAISS indexes built for serving, and ``[index.serve]``: how they are served."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section, Seed


class ServeConfig(Section):
    """Query-time settings (``clearrec query`` / ``clearrec serve``); they never trigger a rebuild."""

    host: str = "127.0.0.1"  # address `clearrec serve` binds to
    port: int = Field(8000, ge=1, le=65535)  # TCP port of `clearrec serve`
    max_body_bytes: int = Field(8 * 2**20, ge=1024, le=2**31)  # request bodies above this size (bytes) get 413
    omp_threads: int = Field(1, ge=0, le=1024)  # FAISS OpenMP threads at query time; 1 suits single queries; 0 = leave as is
    # `clearrec serve` runs the text query encoder in this many child processes (their own GIL; batches of
    # concurrent queries run at the same time, one per process); 0 = in the server process
    text_encoder_processes: int = Field(2, ge=0, le=64)


class IndexConfig(Section):
    factory: str = "auto"  # "auto" or a FAISS index_factory string (e.g. "HNSW32", "IVF1024,PQ16"), inner product
    memory_budget_mb: int = Field(2048, ge=1, le=1 << 24)  # MiB; the auto choice keeps each index under this size
    exact_max_items: int = Field(50_000, ge=0, le=1 << 40)  # auto: catalogs up to this many items get exact search (Flat)
    hnsw_m: int = Field(32, ge=4, le=512)  # auto: graph degree M of HNSW indexes
    ef_construction: int = Field(80, ge=8, le=65536)  # HNSW build-time candidate list size
    recall_target: float = Field(0.95, gt=0, le=1)  # efSearch / nprobe tuned to reach this recall@K vs exact
    recall_k: int = Field(20, ge=1, le=1000)  # K of the recall measured at build time
    tune_queries: int = Field(500, ge=2, le=1_000_000)  # held-out queries: half tune the knob, half measure the recall
    content: bool = True  # also build the content index (one block per modality; similar, text / image search)
    # what the content index holds: "raw" encoder features (keep the meaning the modalities share, e.g. the
    # category), or "projected" (the *_clear features, without the shared directions); RESULTS.md measures both
    content_features: Literal["raw", "projected"] = "raw"
    seed: Seed = 0  # seed of the query sample and of IVF / PQ training
    serve: ServeConfig = ServeConfig()

    @field_validator("factory")
    @classmethod
    def _valid_factory(cls, v: str) -> str:
        if v == "auto":
            return v
        from ...models.ann import validate_factory

        return validate_factory(v)

    @classmethod
    def build_keys(cls) -> tuple[str, ...]:
        """Dotted keys that shape the built indexes (the ``serve`` table does not)."""
        return tuple(f"index.{name}" for name in cls.model_fields if name != "serve")
