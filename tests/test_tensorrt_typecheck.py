"""mypy over the TensorRT modules, against the TensorRT type stubs (tensorrt-stubs).

TensorRT itself cannot be installed everywhere, so its API use is checked statically. The stubs
cannot be an ordinary dependency (tensorrt-stubs requires the real `tensorrt` wheel, which
downloads from NVIDIA's index), and installed into site-packages they would leave an empty
`tensorrt` namespace package. Install them into a folder of their own and name it:

    python3 -m pip install --no-deps --target /tmp/trt-stubs tensorrt-stubs==10.13.0.35.1
    MATCHRT_TRT_STUBS=/tmp/trt-stubs python3 -m pytest -q tests/test_tensorrt_typecheck.py

The published stub files have a few Python syntax errors (parameters named `in`, a required
parameter after defaulted ones) that stop mypy; the test repairs a copy in a temp folder first.
A probe file with a deliberate misuse proves the stubs were really read (without them every
TensorRT name would silently be `Any` and the check would pass vacuously).
"""

from __future__ import annotations

import ast
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["core/engine.py", "core/provenance.py", "core/lint.py", "core/backends/tensorrt_backend.py"]
STUBS = os.environ.get("MATCHRT_TRT_STUBS")
KEYWORD_PARAM = re.compile(r"([(,]\s*)(" + "|".join(keyword.kwlist) + r")(\s*:)")


def repair_stub(text: str) -> str:
    """Rename parameters that are Python keywords; give defaults to parameters after defaulted ones."""
    lines = text.splitlines()
    for _ in range(1000):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n"
        except SyntaxError as exc:
            i = (exc.lineno or 1) - 1
            line = lines[i]
            fixed = KEYWORD_PARAM.sub(r"\1\2_\3", line)
            if fixed == line and "def " in line:
                head, _, rest = line.partition("(")
                params, _, tail = rest.rpartition(")")
                parts, defaulted = [], False
                for p in params.split(", "):
                    if "=" in p:
                        defaulted = True
                    elif defaulted and p.strip() and not p.strip().startswith("*"):
                        p += " = ..."
                    parts.append(p)
                fixed = f"{head}({', '.join(parts)}){tail}"
            if fixed == line:
                raise
            lines[i] = fixed
    raise RuntimeError("stub repair did not converge")


def test_repair_stub_makes_valid_python():
    bad = "class A:\n    def f(self, in: int, out: int) -> None: ...\n    def g(self, a: int = 1, b: int) -> None: ...\n"
    fixed = repair_stub(bad)
    ast.parse(fixed)
    assert "in_: int" in fixed and "b: int = ..." in fixed


@pytest.mark.skipif(not STUBS, reason="set MATCHRT_TRT_STUBS to a folder holding tensorrt-stubs "
                    "(pip install --no-deps --target DIR tensorrt-stubs==10.13.0.35.1)")
def test_mypy_passes_against_tensorrt_stubs(tmp_path):
    pytest.importorskip("mypy")
    src = Path(STUBS)  # type: ignore[arg-type]
    if not (src / "tensorrt" / "__init__.pyi").exists():
        pytest.skip(f"{src} holds no tensorrt/__init__.pyi")
    stubs = tmp_path / "stubs"
    for pkg in ("tensorrt", "tensorrt_bindings"):
        if (src / pkg).is_dir():
            shutil.copytree(src / pkg, stubs / pkg)
    for f in stubs.rglob("*.pyi"):
        f.write_text(repair_stub(f.read_text()))
    probe = tmp_path / "probe_misuse.py"
    probe.write_text("import tensorrt as trt\n\n"
                     "def misuse() -> None:\n"
                     "    trt.OnnxParser(1, 2)\n")
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), *MODULES, str(probe)]
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    lines = [ln for ln in report.splitlines() if ": error:" in ln]
    ours = [ln for ln in lines if "probe_misuse.py" not in ln]
    assert not ours, report
    # the stubs were read: the misuse is caught with the stub's parameter types
    assert any("probe_misuse.py" in ln and "INetworkDefinition" in ln for ln in lines), report
