"""The C++ compiler an AOTInductor build uses, checked against the C++ runtime the process loads.

AOTInductor compiles its wrapper with the compiler of ``torch._inductor.config.cpp.cxx`` (the
``CXX`` environment variable, else ``g++``), and the package's ``.so`` later runs against the
``libstdc++`` already loaded in the process. A compiler whose own ``libstdc++`` is newer than that
one inlines template code (``std::regex`` in the runtime's device-string parser) that the older
library cannot serve: every package, a two-layer CPU model included, then dies with SIGSEGV when
loaded. Seen on the lent GPU machines (``CXX=/opt/gcc/bin/g++``, a newer GCC than the system's
``libstdc++.so.6`` the process runs with): a native backtrace ends in
``torch::aot_inductor::parse_device_str`` -> ``std::__detail::_Compiler<regex_traits<char>>``.

API:
    libstdcxx_version(path) -> tuple | None      (6, 0, 33) from ``libstdc++.so.6.0.33``
    loaded_libstdcxx() -> Path | None            the libstdc++ mapped into this process
    compiler_libstdcxx(cxx) -> Path | None       the libstdc++ a compiler links against
    pick_compiler(configured, candidates, runtime, library_of) -> (compiler, note)   pure choice
    choose_compiler(user_configs) -> (inductor config updates, note)   for build_package
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from .errors import MatchrtError

Version = tuple[int, ...]
# compilers tried, in order, when the configured one is too new for the loaded libstdc++
FALLBACKS = ("g++", "/usr/bin/g++", "c++", "/usr/bin/c++")


def libstdcxx_version(path: Optional[Path]) -> Optional[Version]:
    """The version in a resolved ``libstdc++.so.6.0.N`` file name, or None."""
    if path is None:
        return None
    match = re.search(r"libstdc\+\+\.so\.(\d+(?:\.\d+)*)$", Path(path).name)
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def loaded_libstdcxx(maps: str = "/proc/self/maps") -> Optional[Path]:
    """The libstdc++ file mapped into this process (Linux), resolved; None if none or unknown."""
    try:
        with open(maps) as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "libstdc++.so" in path:
                    return Path(os.path.realpath(path))
    except OSError:
        pass
    return None


def compiler_libstdcxx(cxx: str) -> Optional[Path]:
    """The libstdc++ ``cxx`` links against (``-print-file-name``), resolved; None if it says nothing."""
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or os.sep not in out:  # a bare name: the compiler does not know one (clang without gcc)
        return None
    return Path(os.path.realpath(out))


def _too_new(library: Optional[Path], runtime: Version) -> bool:
    version = libstdcxx_version(library)
    return version is not None and version > runtime


def pick_compiler(configured: str, candidates: Iterable[str], runtime: Optional[Path],
                  library_of: Callable[[str], Optional[Path]]) -> tuple[str, Optional[str]]:
    """The compiler to build with and, when it is not ``configured``, why.

    ``configured`` stays unless its libstdc++ is newer than ``runtime`` (the loaded one); then the
    first of ``candidates`` that is not newer is taken. None of them: MatchrtError naming both
    libraries and the remedy.
    """
    runtime_version = libstdcxx_version(runtime)
    if runtime_version is None:
        return configured, None
    own = library_of(configured)
    if not _too_new(own, runtime_version):
        return configured, None
    for cxx in candidates:
        found = shutil.which(cxx)
        if not found or os.path.realpath(found) == os.path.realpath(shutil.which(configured) or configured):
            continue
        library = library_of(found)
        if library is not None and not _too_new(library, runtime_version):
            return found, (f"C++ compiler {configured} links {own}, newer than the {runtime} this process "
                           f"runs with (its packages would crash on load); building with {found} ({library})")
    raise MatchrtError(
        f"the C++ compiler {configured} links {own}, newer than the {runtime} this process runs with: "
        "AOTInductor packages it builds crash when loaded (SIGSEGV in the C++ runtime). Point CXX at a "
        "compiler of the same or an older GCC (usually the system's /usr/bin/g++), or pass "
        "--inductor-config cpp.cxx=PATH")


def configured_compiler() -> str:
    """The compiler torch's Inductor would use now (``cpp.cxx``'s first usable entry)."""
    import torch._inductor.config as config

    cxx: Any = config.cpp.cxx
    entries = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
    return str(entries[0]) if entries else os.environ.get("CXX", "g++")


def choose_compiler(user_configs: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
    """Inductor config updates that make the build use a compiler matching the loaded libstdc++.

    A ``cpp.cxx`` the user passed (``--inductor-config``) is taken as is.
    """
    if "cpp.cxx" in user_configs:
        return {}, None
    configured = configured_compiler()
    chosen, note = pick_compiler(configured, FALLBACKS, loaded_libstdcxx(), compiler_libstdcxx)
    if chosen == configured:
        return {}, None
    return {"cpp.cxx": (None, chosen)}, note


__all__ = ["libstdcxx_version", "loaded_libstdcxx", "compiler_libstdcxx", "pick_compiler",
           "configured_compiler", "choose_compiler"]
