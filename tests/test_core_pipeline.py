"""The core end to end with a toy plugin: weights -> export -> onnxruntime -> match -> picture."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import matchrt
from matchrt.cli import app
from matchrt.host import get_host
from matchrt.weights import write_random_checkpoint

from toy_plugin import LAYOUT, ToyPlugin

runner = CliRunner()


@pytest.fixture()
def toy():
    plugin = ToyPlugin()
    with get_host().plugin(plugin, "toy"):
        yield plugin


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(LAYOUT, tmp_path_factory.mktemp("w") / "toy.ckpt", lightning=True)


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_toy_end_to_end_through_cli(toy, toy_ckpt, tmp_path, image_pair):
    r = invoke("weights", "--matcher", "toy", "--checkpoint", toy_ckpt, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["sources"][0]["mapped"] == 2

    onnx_path = tmp_path / "toy.onnx"
    r = invoke("export", "--matcher", "toy", "--checkpoint", toy_ckpt, "--height", 64, "--width", 96,
               "--output", onnx_path, "--max-matches", 8)
    assert r.exit_code == 0, r.output
    assert onnx_path.exists()
    manifest = json.loads((tmp_path / "toy.onnx.matchrt.json").read_text())
    assert manifest["matcher"] == "toy" and manifest["options"]["max_matches"] == 8

    out = tmp_path / "out"
    r = invoke("match", *image_pair, "--onnx", onnx_path, "--output-dir", out, "--model", "F")
    assert r.exit_code == 0, r.output
    data = json.loads((out / "matches.json").read_text())
    assert {"keypoints0", "keypoints1", "confidence", "inliers", "model", "metadata"} <= set(data)
    assert len(data["keypoints0"]) == len(data["inliers"]) <= 8
    assert data["metadata"]["backend"] == "onnxruntime"
    # keypoints come back in original pixels of each image
    h0, w0 = cv2.imread(str(image_pair[0])).shape[:2]
    k0 = np.asarray(data["keypoints0"])
    assert k0[:, 0].max() < w0 and k0[:, 1].max() < h0 and k0[:, 0].max() > 96
    picture = cv2.imread(str(out / "matches.png"))
    assert picture is not None and picture.shape[1] > w0


def test_torch_and_onnxruntime_agree_and_check_command(toy, toy_ckpt, tmp_path, image_pair):
    onnx_path = tmp_path / "toy.onnx"
    assert invoke("export", "-m", "toy", "-c", toy_ckpt, "-o", onnx_path).exit_code == 0
    r = invoke("check", *image_pair, "--matcher", "toy", "--checkpoint", toy_ckpt, "--onnx", onnx_path)
    assert r.exit_code == 0, r.output
    for name in ("keypoints0", "keypoints1", "confidence", "valid"):
        assert name in r.output


def test_two_stage_export_runs_the_bridge(toy, toy_ckpt, tmp_path, image_pair):
    from matchrt.images import read_image
    from matchrt.runner import open_pipeline

    onnx_path = tmp_path / "toy.onnx"
    r = invoke("export", "-m", "toy", "-c", toy_ckpt, "-o", onnx_path, "-O", "stages=2")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "toy.encode.onnx").exists() and (tmp_path / "toy.match.onnx").exists()
    im0, im1 = read_image(image_pair[0]), read_image(image_pair[1])
    seq = open_pipeline(None, "onnxruntime", artifact=onnx_path).match(im0, im1)
    ref = open_pipeline("toy", "torch", {"checkpoint": toy_ckpt}).match(im0, im1)
    assert "bridge_stages" in toy.calls
    np.testing.assert_allclose(seq.keypoints0, ref.keypoints0, atol=1e-3)
    np.testing.assert_allclose(seq.confidence, ref.confidence, rtol=1e-4, atol=1e-6)


def test_onnxruntime_build_writes_an_optimised_graph(toy, toy_ckpt, tmp_path):
    onnx_path = tmp_path / "toy.onnx"
    assert invoke("export", "-m", "toy", "-c", toy_ckpt, "-o", onnx_path).exit_code == 0
    r = invoke("build", "--onnx", onnx_path, "--backend", "onnxruntime", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    built = tmp_path / "toy.ort.onnx"
    assert built.exists()
    manifest = json.loads((tmp_path / "toy.ort.onnx.matchrt.json").read_text())
    assert manifest["stages"][0]["file"] == "toy.ort.onnx"


def test_plugins_lists_hooks_and_builtins(toy):
    r = invoke("plugins", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert {"torch", "onnxruntime"} <= set(rows)
    assert "open_session" in rows["torch"]["hooks"]
    assert rows["torch"]["distribution"] == "matchrt"


def test_info_shows_contract(toy):
    r = invoke("info", "--matcher", "toy")
    assert r.exit_code == 0
    assert "multiple of 8" in r.output and "max_matches" in r.output


def test_help_is_fast_and_lists_pipeline_commands():
    r = invoke("--help")
    for cmd in ("plugins", "export", "build", "match", "check", "lint"):
        assert cmd in r.output


def test_every_hookspec_is_documented_and_exercised(toy, toy_ckpt, tmp_path, image_pair):
    """Run the pipeline once with hook-call monitoring and require every spec to be called."""
    from matchrt import hookspecs

    host = get_host()
    called: set[str] = set()
    undo = host.pm.add_hookcall_monitoring(lambda name, impls, kw: called.add(name),
                                           lambda *a: None)
    try:
        host.invalidate()
        onnx_path = tmp_path / "toy.onnx"
        assert invoke("export", "-m", "toy", "-c", toy_ckpt, "-o", onnx_path, "-O", "stages=2").exit_code == 0
        assert invoke("build", "--onnx", onnx_path, "--backend", "onnxruntime", "--precision",
                      "fp32").exit_code == 0
        assert invoke("match", *image_pair, "--onnx", onnx_path).exit_code == 0
        # a backend that builds from the torch model (build_package): a bf16 AOTInductor package
        package = tmp_path / "toy.pt2"
        r = invoke("build", "-m", "toy", "-c", toy_ckpt, "--backend", "inductor", "--precision", "bf16",
                   "--device", "cpu", "-o", package)
        assert r.exit_code == 0, r.output
        assert invoke("match", *image_pair, "--engine", package).exit_code == 0
    finally:
        undo()
    specs = [n for n in dir(hookspecs) if not n.startswith("_")
             and hasattr(getattr(hookspecs, n), "matchrt_spec")]
    assert len(specs) >= 8
    for name in specs:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
        assert name in called, f"hook {name} never called"


def test_hookimpl_is_reexported():
    assert matchrt.hookimpl is matchrt.hookspecs.hookimpl


def test_cli_import_stays_light():
    """`matchrt --help` must not pay for torch, onnx or OpenCV."""
    import subprocess
    import sys

    code = ("import sys, matchrt.cli; heavy = [m for m in ('torch', 'onnx', 'cv2', 'onnxruntime') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
