"""The C++ compiler of AOTInductor builds must not be newer than the libstdc++ the process runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from matchrt.cxx_toolchain import compiler_libstdcxx, libstdcxx_version, loaded_libstdcxx, pick_compiler
from matchrt.errors import MatchrtError

RUNTIME = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33")
NEWER = Path("/opt/gcc/lib64/libstdc++.so.6.0.34")
OLDER = Path("/usr/lib/gcc/libstdc++.so.6.0.30")


def test_versions_come_from_the_resolved_file_name() -> None:
    assert libstdcxx_version(RUNTIME) == (6, 0, 33)
    assert libstdcxx_version(Path("libstdc++.so.6")) == (6,)
    assert libstdcxx_version(Path("/lib/libc.so.6")) is None and libstdcxx_version(None) is None


def test_a_compiler_newer_than_the_runtime_is_replaced_by_one_that_is_not(monkeypatch) -> None:
    """The lent GPU machines: CXX=/opt/gcc/bin/g++ (newer GCC) while the process runs the system's
    libstdc++; the system g++ is taken instead, and the note says why."""
    libraries = {"/opt/gcc/bin/g++": NEWER, "/usr/bin/g++": RUNTIME}
    monkeypatch.setattr(shutil, "which", lambda name: name if name.startswith("/") else None)
    chosen, note = pick_compiler("/opt/gcc/bin/g++", ["g++", "/usr/bin/g++"], RUNTIME, libraries.get)
    assert chosen == "/usr/bin/g++"
    assert note and "/opt/gcc/bin/g++" in note and str(RUNTIME) in note


def test_a_compiler_as_old_as_the_runtime_or_older_stays() -> None:
    for library in (RUNTIME, OLDER, None):  # None: the compiler names no libstdc++ (e.g. clang)
        assert pick_compiler("g++", ["/usr/bin/g++"], RUNTIME, lambda cxx: library) == ("g++", None)
    # nothing known about the runtime: no opinion
    assert pick_compiler("g++", [], None, lambda cxx: NEWER) == ("g++", None)


def test_no_usable_compiler_is_refused_with_the_remedy(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: name)
    with pytest.raises(MatchrtError, match="CXX.*--inductor-config cpp.cxx"):
        pick_compiler("/opt/gcc/bin/g++", ["/usr/bin/g++"], RUNTIME, lambda cxx: NEWER)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")
def test_this_machine_loads_a_libstdcxx_and_its_g_plus_plus_is_not_newer() -> None:
    import torch  # noqa: F401  (loads libstdc++ into the process)

    runtime = loaded_libstdcxx()
    assert runtime is not None and runtime.exists()
    library = compiler_libstdcxx("g++")
    assert library is not None and library.exists()
    assert pick_compiler("g++", [], runtime, compiler_libstdcxx) == ("g++", None)
