"""The C++ compiler of an AOTInductor build, probed before the build so its packages can load.

AOTInductor compiles its wrapper with ``torch._inductor.config.cpp.cxx`` (the ``CXX`` environment
variable, else ``g++``). The package's ``.so`` then runs inside a process where torch has already
loaded the shared ``libstdc++.so.6``. A compiler that links ``libstdc++`` statically into shared
objects (a wrapper script whose ``-B`` prefix holds only ``libstdc++.a``, as ``/opt/gcc/bin/g++``
on the lent GPU machines) gives every package its own copy of the C++ runtime; the two copies'
locale facets clash and the runtime's ``std::regex`` device-string parser crashes (SIGSEGV there,
``std::bad_cast`` here), for CPU and CUDA packages alike, before the model is even created.

The probe: compile a tiny shared object that uses ``std::regex`` with the compiler, load it in a
child process after ``import torch`` and call it. A compiler that fails is replaced by the first
of ``FALLBACKS`` that passes (the note says so); none: MatchrtError with the remedy.

API:
    compiler_problem(cxx) -> str | None           why ``cxx``'s shared objects cannot run here
    signal_name(returncode) -> str                the signal that ended a child process
    pick_compiler(configured, candidates, problem_of) -> (compiler, note)   pure choice
    configured_compiler() -> str                  what Inductor would use now
    choose_compiler(user_configs) -> (inductor config updates, compiler, note)
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional

from .errors import MatchrtError

# compilers tried, in order, when the configured one fails the probe
FALLBACKS = ("/usr/bin/g++", "g++", "/usr/bin/c++", "c++")
PROBE_SOURCE = r"""
#include <regex>
#include <string>
extern "C" int matchrt_probe(const char* text) {
  static const std::regex pattern("([a-zA-Z_]+)(?::([0-9]+))?");
  std::smatch match;
  std::string s(text);
  return std::regex_match(s, match, pattern) ? 1 : 0;
}
"""
LOAD_PROBE = ("import ctypes, sys, torch\n"
              "sys.exit(0 if ctypes.CDLL(sys.argv[1]).matchrt_probe(b'cuda:0') == 1 else 3)\n")


def signal_name(returncode: int) -> str:
    """The signal that ended a child process (its negative return code), e.g. "SIGSEGV"."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _how_it_ended(returncode: int) -> str:
    return f"died with {signal_name(returncode)}" if returncode < 0 else f"exited with status {returncode}"


@functools.lru_cache(maxsize=None)
def compiler_problem(cxx: str) -> Optional[str]:
    """None when a shared object built by ``cxx`` runs std::regex in a process that imported
    torch; else what went wrong. A compiler that cannot build the probe is not judged (None):
    Inductor's own error will be clearer."""
    with tempfile.TemporaryDirectory(prefix="matchrt-cxx-") as tmp:
        source, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(source, "w") as f:
            f.write(PROBE_SOURCE)
        try:
            built = subprocess.run([cxx, "-shared", "-fPIC", "-O1", "-std=c++17", source, "-o", lib],
                                   capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.SubprocessError):
            return None
        if built.returncode != 0 or not os.path.exists(lib):
            return None
        try:
            ran = subprocess.run([sys.executable, "-c", LOAD_PROBE, lib], capture_output=True, text=True,
                                 timeout=180)
        except subprocess.TimeoutExpired:
            return "a shared object it built hung when loaded next to torch"
        if ran.returncode == 0:
            return None
        return (f"a shared object it built using std::regex {_how_it_ended(ran.returncode)} when called "
                "next to torch (it carries its own copy of libstdc++: the compiler links it statically)")


def pick_compiler(configured: str, candidates: Iterable[str],
                  problem_of: Callable[[str], Optional[str]]) -> tuple[str, Optional[str]]:
    """The compiler to build with and, when it is not ``configured``, why; MatchrtError if no
    candidate passes ``problem_of`` either."""
    problem = problem_of(configured)
    if problem is None:
        return configured, None
    seen = {os.path.realpath(shutil.which(configured) or configured)}
    for cxx in candidates:
        found = shutil.which(cxx)
        if not found or os.path.realpath(found) in seen:
            continue
        seen.add(os.path.realpath(found))
        if problem_of(found) is None:
            return found, (f"C++ compiler {configured}: {problem}; AOTInductor packages it builds would "
                           f"crash when loaded, so {found} builds this one")
    raise MatchrtError(
        f"C++ compiler {configured}: {problem}. AOTInductor packages it builds crash when loaded, and none "
        f"of {', '.join(candidates)} does better. Point CXX at a compiler that links libstdc++ dynamically "
        "(usually the system's /usr/bin/g++) or pass --inductor-config cpp.cxx=PATH")


def configured_compiler() -> str:
    """The compiler torch's Inductor would use now (``cpp.cxx``'s first named entry)."""
    import torch._inductor.config as config

    cxx: Any = config.cpp.cxx
    entries = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
    return str(entries[0]) if entries else os.environ.get("CXX", "g++")


def choose_compiler(user_configs: Mapping[str, Any]) -> tuple[dict[str, Any], str, Optional[str]]:
    """(Inductor config updates, the compiler, a note) for a build whose packages can load.

    A ``cpp.cxx`` the user passed (``--inductor-config``) is used as given, unprobed.
    """
    if "cpp.cxx" in user_configs:
        given = user_configs["cpp.cxx"]
        return {}, str(given[-1] if isinstance(given, (list, tuple)) else given), None
    configured = configured_compiler()
    chosen, note = pick_compiler(configured, FALLBACKS, compiler_problem)
    updates = {"cpp.cxx": (None, chosen)} if chosen != configured else {}
    return updates, chosen, note


__all__ = ["compiler_problem", "pick_compiler", "configured_compiler", "choose_compiler", "signal_name",
           "FALLBACKS"]
