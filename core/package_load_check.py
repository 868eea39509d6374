"""A package's first load on a machine happens in a child process, so a crashing loader is an error.

torch's AOTInductor loader can die with a segmentation fault instead of raising: on the lent H200 and
H100 machines (torch 2.11.0+cu130) every package did, a two-layer toy included, because their CXX
(/opt/gcc/bin/g++) linked libstdc++ statically into it (see cxx_toolchain, which now prevents that
at build time). A segfault ends the user's process without a
word (a `match-pairs` job loses its progress bar, a bench its other rows). So before the first load
of a CUDA package in a given environment, matchrt loads it once in a child process: a crash there
becomes a MatchrtError that says what happened and what to run instead, and a success is remembered
(a marker in the cache, keyed by the package file and the environment) so later loads skip the check.

MATCHRT_INDUCTOR_LOAD_CHECK: "0" skips the check, "always" runs it for CPU packages too (tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from .cxx_toolchain import signal_name
from .errors import MatchrtError
from .atomic import atomic_write

ENV = "MATCHRT_INDUCTOR_LOAD_CHECK"
# what the child runs: load the package as the backend does (argv: path, device index)
CHILD_CODE = (
    "import sys\nfrom pathlib import Path\n"
    "from matchrt.backends.inductor_backend import _load\n"
    "_load(Path(sys.argv[1]), int(sys.argv[2]), False)\n"
)


def wanted(device_type: str) -> bool:
    """Is the child-process check on for a package of this device type?"""
    mode = os.environ.get(ENV, "1").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    return device_type == "cuda" or mode == "always"


def marker_path(package: Path, environment: Mapping[str, Any], cache: Path) -> Path:
    """Where a passed check is remembered: one file per package file and environment."""
    st = Path(package).stat()
    key = json.dumps({"package": str(Path(package).resolve()), "bytes": st.st_size,
                      "mtime_ns": st.st_mtime_ns,
                      "env": {k: environment.get(k) for k in ("torch", "cuda", "driver", "gpu")}},
                     sort_keys=True)
    return cache / "inductor-load-checks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".ok")


def check_load_in_child(package: Path, device_index: int, environment: Mapping[str, Any],
                        cache: Path, timeout: Optional[float] = 900.0) -> bool:
    """Load `package` once in a child process unless a marker says it loaded here before.

    Returns True when a child ran; raises MatchrtError when the child crashed or failed."""
    marker = marker_path(package, environment, cache)
    if marker.exists():
        return False
    cmd = [sys.executable, "-c", CHILD_CODE, str(package), str(device_index)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MatchrtError(f"loading {package} did not finish within {timeout:.0f} s in a child process; "
                           f"run the model with --backend torch-compile, or set {ENV}=0 to load it "
                           "without this check") from None
    where = f"torch {environment.get('torch')}"
    if environment.get("gpu"):
        where += f" on {environment.get('gpu')} (driver {environment.get('driver')})"
    if proc.returncode < 0:
        raise MatchrtError(
            f"torch's AOTInductor loader crashed ({signal_name(proc.returncode)}) loading {package} "
            f"with {where}. A package whose C++ compiler linked libstdc++ statically crashes so (its copy "
            "clashes with torch's); matchrt now probes the compiler before building, so rebuild it with "
            "`matchrt build ... --backend inductor --force`. If the rebuilt package crashes too, run the "
            "model with --backend torch-compile (or torch) instead, or try another torch release. "
            f"(Checked in a child process; set {ENV}=0 to load in this process anyway.)")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise MatchrtError(f"torch could not load {package} with {where} ({last}). Rebuild it with "
                           "`matchrt build ... --backend inductor --force`")
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"package": str(package), "environment": dict(environment)}).encode()
    atomic_write(marker, lambda f: f.write(record))
    return True
