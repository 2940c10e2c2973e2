"""Shared fixtures. Tests read real data from the offline copy beside the checkout (../shared/data) or from
$CIL_TEST_DATA_ROOT, and never write into it."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIL_TEST_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"offline data copy not found at {SHARED_DATA} (set CIL_TEST_DATA_ROOT)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoding caches go to a per-session temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("CIL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cil-cache"))
