"""AOTInductor builds probe their C++ compiler: one that links libstdc++ statically makes packages
that crash on load (the lent GPU machines' CXX=/opt/gcc/bin/g++), so another one builds them.

The static-linking compiler is reproduced here as on those machines: a g++ wrapper whose -B prefix
holds only libstdc++.a.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cxx_helpers import static_libstdcxx_compiler

from matchrt.cxx_toolchain import compiler_problem, pick_compiler
from matchrt.errors import MatchrtError


@pytest.fixture
def static_gxx(tmp_path: Path) -> str:
    return static_libstdcxx_compiler(tmp_path)


def test_pick_keeps_a_good_compiler_and_replaces_a_bad_one(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: name if name.startswith("/") else None)
    problems = {"/opt/gcc/bin/g++": "links libstdc++ statically"}
    assert pick_compiler("/usr/bin/g++", ["/usr/bin/c++"], problems.get) == ("/usr/bin/g++", None)
    chosen, note = pick_compiler("/opt/gcc/bin/g++", ["g++", "/opt/gcc/bin/g++", "/usr/bin/g++"], problems.get)
    assert chosen == "/usr/bin/g++"  # "g++" is not on this fake PATH; the bad one is not retried
    assert note and "/opt/gcc/bin/g++" in note and "statically" in note


def test_no_usable_compiler_is_refused_with_the_remedy(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: name)
    with pytest.raises(MatchrtError, match="(?s)statically.*CXX.*--inductor-config cpp.cxx"):
        pick_compiler("/opt/gcc/bin/g++", ["/usr/bin/g++"], lambda cxx: "links libstdc++ statically")


def test_the_probe_fails_a_static_libstdcxx_compiler_and_passes_the_system_one(static_gxx) -> None:
    assert compiler_problem("g++") is None
    problem = compiler_problem(static_gxx)
    assert problem and "statically" in problem
