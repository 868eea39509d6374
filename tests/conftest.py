"""Shared test fixtures: test data paths and a plugin host free of installed third-party plugins."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _session_folder(variable: str, prefix: str) -> None:
    """Point ``variable`` at a temporary folder of this test session, removed at exit (each session left
    its checkpoints and Inductor builds behind: 1.7 GB after 224 runs); a value set by the caller stays."""
    if variable not in os.environ:
        path = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, path, True)
        os.environ[variable] = path


# installed third-party plugins never leak into the tests: built-ins only
os.environ["MATCHRT_PLUGINS"] = ""
# generated files (random-weight checkpoints) stay out of the user's cache
_session_folder("MATCHRT_CACHE_DIR", "matchrt-test-cache-")
# AOTInductor/Inductor builds get a cache of their own (subprocesses inherit it): a compiled
# header left in the shared /tmp/torchinductor_<user> by another torch install broke a CPU build
_session_folder("TORCHINDUCTOR_CACHE_DIR", "matchrt-test-inductor-")

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
