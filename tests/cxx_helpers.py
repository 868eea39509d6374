"""A C++ compiler like the lent GPU machines' /opt/gcc/bin/g++: a g++ wrapper whose -B prefix holds
only libstdc++.a, so the shared objects it links carry their own copy of libstdc++."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _static_libstdcxx() -> str:
    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if os.sep not in archive:
        pytest.skip("no static libstdc++ here")
    return archive


def static_libstdcxx_compiler(tmp_path: Path) -> str:
    """Write the wrapper under tmp_path (skips the test where g++ or libstdc++.a is missing)."""
    prefix = tmp_path / "gcc"
    prefix.mkdir()
    (prefix / "libstdc++.a").symlink_to(_static_libstdcxx())
    wrapper = prefix / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} -B{prefix}/ "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)
