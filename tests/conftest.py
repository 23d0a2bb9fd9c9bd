"""Shared fixtures and paths for the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
AMAZON_BABY = SHARED_DATASETS / "amazon-baby"


@pytest.fixture
def amazon_baby() -> Path:
    if not (AMAZON_BABY / "train.json").is_file():
        pytest.skip(f"real-data check: {AMAZON_BABY} is absent (it ships in ../shared beside the repo)")
    return AMAZON_BABY
