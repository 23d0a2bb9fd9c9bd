"""``[ingest]``: where the raw catalog is and how it becomes items / users / interactions."""

from __future__ import annotations

import codecs
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import FloatTriple, Section, Seed


MMREC_FEATURE_FILES = {"image": "image_feat.npy", "text": "text_feat.npy"}  # MMRec's own names


class ColumnMap(Section):
    """Names of the columns in the raw files (map your own names onto ours)."""

    item_id: str = "item_id"  # item id, in the items file and the interactions file (required)
    title: str = "title"  # item title (required in the items file)
    description: str = "description"  # item description (optional)
    image: str = "image"  # image path relative to catalog_root, or an http(s) URL (optional)
    user_id: str = "user_id"  # user id in the interactions file (required)
    timestamp: str = "timestamp"  # unix seconds or an ISO-8601 date (optional; needed by split = "temporal")
    rating: str = "rating"  # numeric rating (optional; used by min_rating)
    split: str = "split"  # train | valid | test (or val, 0/1/2) (optional; needed by split = "given")


class IngestConfig(Section):
    # "table": an items file + an interactions file (CSV, TSV, JSONL or Parquet, told apart by extension);
    # "mmrec": an MMRec benchmark folder: <name>.inter (+ optional image_feat.npy / text_feat.npy,
    #          i_id_mapping.csv / u_id_mapping.csv; other feature files through `features`);
    # "split-json": a folder with train.json / val.json / test.json ({userIdx: [itemIdx, ...]})
    #          + optional item2id.json / user2id.json
    format: Literal["table", "mmrec", "split-json"] = "table"
    items: str = "items.csv"  # items file (format "table" only), relative to the config file's folder
    interactions: str = "interactions.csv"  # interactions file; for mmrec / split-json the dataset folder
    catalog_root: str = "."  # image paths in the items file are relative to this folder (relative to the config)
    encoding: str = "utf-8"  # text encoding of CSV / TSV / JSONL files; rows that do not decode are rejected
    columns: ColumnMap = ColumnMap()
    min_rating: float | None = None  # reject interactions rated below this (rejects rows); None keeps all
    kcore: int = Field(0, ge=0, le=1_000_000)  # keep users and items with >= kcore interactions, iterated until stable; 0 = off
    # how interactions become train / valid / test (README "ingest"): "random" (per user, seeded),
    # "temporal" (per user, newest to test), "global-temporal" (one valid and one test cut-off time
    # for everyone: no training on the future), "leave-one-out" (per user: newest to test, the one
    # before to valid), "given" (keep the split column / files)
    split: Literal["random", "given", "temporal", "global-temporal", "leave-one-out"] = "random"
    split_ratios: FloatTriple = (0.8, 0.1, 0.1)  # train / valid / test share (unused by leave-one-out)
    seed: Seed = 2024  # seed of the random split
    # format "mmrec": modality name -> feature file in the dataset folder (rows follow itemID), written to
    # imported/<name>.parquet for encoder "imported"; e.g. {text = "all-MiniLM-L6-v2.npy", audio = "vggish.npy"}.
    # Files of the default mapping are optional; files named here otherwise must exist
    features: dict[str, str] = Field(default_factory=lambda: dict(MMREC_FEATURE_FILES))

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError as e:
            raise ValueError(f"unknown text encoding {value!r} (e.g. 'utf-8', 'latin-1', 'cp1252')") from e
        return value

    @model_validator(mode="after")
    def _check(self) -> "IngestConfig":
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) < 0:
            raise ValueError(f"split_ratios must be non-negative and sum to 1, got {self.split_ratios}")
        if self.split_ratios[0] <= 0:
            raise ValueError("split_ratios[0] (the train share) must be > 0")
        if self.format == "table" and not self.items:
            raise ValueError("format = 'table' needs an items file: set ingest.items")
        return self
