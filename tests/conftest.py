"""Shared test fixtures: test data paths and a plugin host free of installed third-party plugins."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# installed third-party plugins never leak into the tests: built-ins only
os.environ["MATCHRT_PLUGINS"] = ""
# generated files (random-weight checkpoints) stay out of the user's cache
os.environ.setdefault("MATCHRT_CACHE_DIR", tempfile.mkdtemp(prefix="matchrt-test-cache-"))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def image_pair() -> tuple[Path, Path]:
    return DATA / "images" / "02928139_3448003521.jpg", DATA / "images" / "17295357_9106075285.jpg"
