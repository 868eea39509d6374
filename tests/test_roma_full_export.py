"""roma_full export: ONNX Runtime parity with the torch model for both GP solves, graph hygiene,
the runner's graph sequence with the exact solve between the graphs, and refused sizes/options.

Certainty tolerance: the certainty output is a probability whose maximum here is ~0.1, and the
GP amplifies the ~2e-6 feature differences between two fp32 runtimes about 100 times (cond of
K_yy + 0.1 I ~ 2.5e3 with the deterministic weights). The torch model itself moves the certainty
by 1.1e-4 (relative) between fp32 and fp64, so the test allows 3e-4 on it; the warp meets 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from matchrt.engine import layer_matches
from matchrt.errors import MatchrtError
from matchrt.export import load_manifest
from matchrt.host import create_host
from matchrt.images import read_image
from matchrt.lint import count_errors, format_problems, lint_onnx
from matchrt.plugins.roma_full import export as export_mod
from matchrt.plugins.roma_full import hooks
from matchrt.runner import torch_pipeline
from matchrt.types import ExportOptions

from roma_full_helpers import (
    IMAGES, exported, loaded_model, max_abs, max_rel, reference_run, run_onnx_at,
    threads,
)

WARP_TOL, CERT_TOL = 1e-4, 3e-4


def torch_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """The torch model (exact GP solve) in the export's output layout."""
    out = reference_run()
    with torch.no_grad():
        return export_mod.ToWarp()(out["gm_cls"], out["gm_certainty"])


def run_onnx(manifest: Path) -> dict[str, torch.Tensor]:
    return run_onnx_at(manifest, 224)


@pytest.mark.parametrize("gp_solve", ["iterative", "exact"])
def test_onnx_matches_torch(gp_solve: str) -> None:
    manifest = exported(gp_solve)
    stages = load_manifest(manifest)["stages"]
    assert [s["name"] for s in stages] == (["main"] if gp_solve == "iterative" else ["encode", "decode"])
    got = run_onnx(manifest)
    warp, cert = torch_reference()
    assert got["warp"].shape == (1, 16, 32, 4) and got["certainty"].shape == (1, 16, 32)
    assert max_rel(got["warp"], warp) < WARP_TOL
    assert max_rel(got["certainty"], cert) < CERT_TOL
    assert max_abs(got["certainty"], cert) < 3e-5


@pytest.mark.parametrize("gp_solve", ["iterative", "exact"])
def test_graphs_are_tensorrt_clean(gp_solve: str) -> None:
    manifest = exported(gp_solve)
    data = json.loads(Path(manifest).read_text())
    assert data["options"]["gp_solve"] == gp_solve and data["opset"] == 17
    for stage in data["stages"]:
        path = Path(manifest).parent / stage["file"]
        problems = lint_onnx(path)
        assert count_errors(problems) == 0 and not problems, format_problems(problems)
        model = onnx.load(str(path), load_external_data=False)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"NonZero", "TopK", "Einsum", "Loop", "If", "GridSample"}
        for node in model.graph.node:
            if node.op_type == "Resize":  # the position grid: bilinear, half-pixel, as torch
                attrs = {a.name: a for a in node.attribute}
                assert attrs["mode"].s == b"linear"
                assert attrs["coordinate_transformation_mode"].s == b"half_pixel"
        metadata = {p.key: p.value for p in model.metadata_props}
        patterns = json.loads(metadata["matchrt.fp32_layers"])
        assert patterns == export_mod.FP32_LAYERS
        # the fp32 patterns cover the GP's matmuls (kernel, solve, posterior) and nothing of DINOv2
        kept = [n.name for n in model.graph.node if layer_matches(n.name, patterns)]
        assert not [n for n in kept if n.startswith("/features/")]
        gp_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and "gp_" in n.name]
        assert gp_matmuls and set(gp_matmuls) <= set(kept)


def test_exact_sequence_passes_the_solve_between_graphs() -> None:
    data = load_manifest(exported("exact"))
    encode, decode = data["stages"]
    assert encode["outputs"] == [export_mod.FEATS, export_mod.KSS, export_mod.BASIS]
    assert decode["inputs"] == [export_mod.FEATS, export_mod.ALPHA]
    assert encode["input_shapes"]["image0"] == [1, 3, 224, 224]
    # the bridge is a real solve of what graph 1 produced
    k = torch.eye(4)[None] * 2.0
    basis = torch.arange(8.0).reshape(1, 4, 2)
    out = hooks.bridge_stages("roma_full", "encode", {export_mod.KSS: k, export_mod.BASIS: basis}, {})
    assert torch.allclose(out[export_mod.ALPHA], basis / 2.0)
    assert hooks.bridge_stages("eloftr", "encode", {}, {}) is None


def test_torch_pipeline_matches_pictures_and_pixels() -> None:
    """The torch backend runs the same wrapper; Matches are in original pixels with the warp attached."""
    threads()
    host = create_host()
    pipe = torch_pipeline(host, "roma_full", loaded_model(), ExportOptions(224, 224), {})
    image0, image1 = (read_image(p) for p in IMAGES)
    matches = pipe.match(image0, image1)
    assert len(matches) == 2 * 16 * 16  # every coarse cell of both directions (threshold 0)
    assert matches.warp.shape == (16, 32, 4) and matches.certainty.shape == (16, 32)
    for kp, img in ((matches.keypoints0, image0), (matches.keypoints1, image1)):
        assert (kp >= 0).all() and (kp[:, 0] <= img.shape[1] - 1).all() and (kp[:, 1] <= img.shape[0] - 1).all()
    assert np.all(np.diff(matches.confidence) <= 0)
    # the A->B cell centres land on the 16 x 16 grid of image A's original pixels
    cell_x = (np.arange(16) + 0.5) * image0.shape[1] / 16
    a_to_b = np.isin(np.round(matches.keypoints0[:, 0], 3), np.round(cell_x, 3))
    assert a_to_b.sum() >= 256


@pytest.mark.parametrize("size", [(225, 225), (230, 230), (0, 0)])
def test_sizes_off_the_patch_grid_are_refused(size) -> None:
    with pytest.raises(MatchrtError, match="multiple of 14") as err:
        export_mod.build_plan(loaded_model(), ExportOptions(*size))
    if size[0] == 225:
        assert "224" in str(err.value) and "238" in str(err.value)


def test_non_square_dynamic_and_unknown_options_are_refused() -> None:
    model = loaded_model()
    with pytest.raises(MatchrtError, match="square"):
        export_mod.build_plan(model, ExportOptions(224, 280))
    with pytest.raises(MatchrtError, match="static"):
        export_mod.build_plan(model, ExportOptions(224, 224, dynamic=True))
    with pytest.raises(MatchrtError, match="gp_solve"):
        export_mod.build_plan(model, ExportOptions(224, 224, extra={"gp_solve": "softmax"}))
    with pytest.raises(MatchrtError, match="gp_iters"):
        export_mod.build_plan(model, ExportOptions(224, 224, extra={"gp_iters": 0}))


def test_gp_and_warp_layout_stay_fp32_under_autocast() -> None:
    """What the fp32 layer list promises TensorRT holds under torch autocast too: the GP's kernel,
    solve and posterior and the soft-argmax are computed in fp32, not in bf16/fp16."""
    from matchrt.plugins.roma_full.gp import GaussianProcess

    torch.manual_seed(0)
    feat = torch.randn(2, 512, 4, 4)
    gm_cls, gm_cert = torch.randn(2, 4096, 4, 4), torch.randn(2, 1, 4, 4)
    support, solver = export_mod.GPSupport(GaussianProcess()), export_mod.IterativeSolve("newton_schulz", None)
    posterior, to_warp = export_mod.GPPosterior(), export_mod.ToWarp()

    def run():
        k_ss, basis = support(feat)
        alpha = solver(k_ss, basis)
        return (k_ss, basis, alpha, posterior(feat, alpha), *to_warp(gm_cls, gm_cert))

    with torch.no_grad():
        want = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run()
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and max_rel(g, w) < 1e-6


def test_registered_contract() -> None:
    info = create_host().matcher("roma_full")
    c = info.contract
    assert (c.channels, c.side_multiple, c.default_height, c.default_width) == (3, 14, 560, 560)
    assert c.square and c.resize == "stretch" and c.interpolation == "linear"
    assert info.output == "dense" and info.options["gp_solve"] == "iterative"
    assert [s.name for s in info.weight_sources] == ["checkpoint", "dinov2"]
    assert all(s.layout is not None and s.layout.exists() for s in info.weight_sources)
