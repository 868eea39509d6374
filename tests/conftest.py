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
# AOTInductor/Inductor builds get a cache of their own (subprocesses inherit it): a compiled
# header left in the shared /tmp/torchinductor_<user> by another torch install broke a CPU build
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="matchrt-test-inductor-"))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def image_pair() -> tuple[Path, Path]:
    return DATA / "images" / "02928139_3448003521.jpg", DATA / "images" / "17295357_9106075285.jpg"


@pytest.fixture()
def one_thread():
    """Torch on one thread for the test: small graphs run faster so (much faster on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
