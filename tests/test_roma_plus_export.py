"""roma_plus export: TensorRT-clean ONNX graphs that onnxruntime runs like the torch model (224 setting).

gp_solve=exact: two graphs with roma_full's Cholesky solve between them (bridge_stages);
gp_solve=iterative (default): one graph, here also with the upsampling pass (inputs image*_upsampled).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json

import numpy as np
import onnx
import pytest
import torch

from matchrt.errors import MatchrtError
from matchrt.export import export_plan, load_manifest
from matchrt.host import create_host
from matchrt.images import read_image
from matchrt.lint import lint_onnx
from matchrt.plugins.roma_plus import hooks
from matchrt.runner import artifact_pipeline
from matchrt.types import ExportOptions
from roma_plus_helpers import (
    CERT_RTOL, FLOW_RTOL, PAIR, inputs, loaded_model, reference, reference_warp, rel, run_224, workdir,
)

SIDE = 224
UPSAMPLE = 280  # a CI-sized upsampling pass (multiple of 8)


def _export(name: str, **extra):
    plan = hooks.export_plan("roma_plus", loaded_model(), ExportOptions(SIDE, SIDE, extra=extra))
    path = workdir() / f"{name}.onnx"
    export_plan(plan, path)
    return plan, path


@pytest.fixture(scope="module")
def host():
    return create_host()


@pytest.fixture(scope="module")
def exact(host):
    """gp_solve=exact without upsampling through the runner's onnxruntime pipeline: raw outputs
    on the torch-resized inputs, and Matches from the original images (the runner resizes)."""
    plan, path = _export("roma_plus_exact", upsample_res=0, gp_solve="exact")
    pipe = artifact_pipeline(host, path, "onnxruntime", {})
    a, b = inputs(SIDE)
    out = pipe.run({"image0": a, "image1": b})
    matches = pipe.match(read_image(PAIR[0]), read_image(PAIR[1]), {"num_samples": 500, "seed": 3})
    return plan, path, matches, out


@pytest.fixture(scope="module")
def single(host):
    """The default plan (gp_solve=iterative: one graph) with an upsampling pass to 280."""
    plan, path = _export("roma_plus_single", upsample_res=UPSAMPLE)
    a, b = inputs(SIDE)
    au, bu = inputs(UPSAMPLE)
    feeds = {"image0": a, "image1": b, "image0_upsampled": au, "image1_upsampled": bu}
    with torch.no_grad():
        want = plan.graphs[0].module(a, b, au, bu)
    out = artifact_pipeline(host, path, "onnxruntime", {}).run(feeds)
    return plan, path, None, out, dict(zip(("warp", "certainty"), want))


def test_exact_plan_is_a_two_graph_split(exact) -> None:
    plan, path, _, _ = exact
    assert [g.name for g in plan.graphs] == ["encode", "refine"]
    manifest = load_manifest(path)
    encode, refine = manifest["stages"]
    assert encode["inputs"] == ["image0", "image1"]
    assert encode["input_shapes"]["image0"] == [1, 3, SIDE, SIDE]
    assert "gp_kss" in encode["outputs"] and "gp_alpha" in refine["inputs"]
    assert refine["outputs"] == ["warp", "certainty"]
    assert manifest["options"]["gp_solve"] == "exact"


def test_exact_split_matches_torch_and_upstream(exact) -> None:
    _, _, _, out = exact
    ref = reference()
    warp, cert = np.asarray(out["warp"]), np.asarray(out["certainty"])
    assert warp.shape == (1, SIDE, 2 * SIDE, 4) and cert.shape == (1, SIDE, 2 * SIDE)
    assert rel(warp, run_224()["warp"]) <= FLOW_RTOL
    assert rel(cert, run_224()["certainty"]) <= CERT_RTOL
    assert rel(warp[0], reference_warp(ref["s1_flow"], ref["warp_grid"])) <= FLOW_RTOL
    assert rel(cert[0], ref["certainty"]) <= CERT_RTOL


def test_single_graph_with_upsampling_matches_torch(single) -> None:
    plan, path, _, out, want = single
    manifest = load_manifest(path)
    assert len(manifest["stages"]) == 1 and manifest["options"]["gp_solve"] == "iterative"
    shapes = manifest["stages"][0]["input_shapes"]
    assert shapes["image0_upsampled"] == [1, 3, UPSAMPLE, UPSAMPLE] and shapes["image1"] == [1, 3, SIDE, SIDE]
    warp, cert = np.asarray(out["warp"]), np.asarray(out["certainty"])
    assert warp.shape == (1, UPSAMPLE, 2 * UPSAMPLE, 4)
    assert rel(warp, want["warp"]) <= FLOW_RTOL
    assert rel(cert, want["certainty"]) <= CERT_RTOL


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    domain: str
    attrs: tuple


@dataclasses.dataclass(frozen=True)
class Graph:
    """What the tests read of an exported graph (the protos hold 1.7 GB of weights: not kept)."""

    opsets: tuple
    nodes: tuple
    output_dims: tuple
    metadata: tuple
    lint_errors: tuple  # matchrt.lint's errors (what TensorRT's ONNX parser would refuse)


@functools.lru_cache(maxsize=None)
def _graphs(path) -> tuple[Graph, ...]:
    manifest = load_manifest(path)
    out = []
    for st in manifest["stages"]:
        model = onnx.load(str(path.parent / st["file"]), load_external_data=False)
        nodes = tuple(
            Node(n.name, n.op_type, n.domain,
                 tuple((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)
                 if n.op_type == "GridSample" else ())
            for n in model.graph.node)
        out.append(Graph(
            tuple((o.domain, o.version) for o in model.opset_import), nodes,
            tuple((o.name, tuple(d.dim_value for d in o.type.tensor_type.shape.dim)) for o in model.graph.output),
            tuple((p.key, p.value) for p in model.metadata_props),
            tuple(str(p) for p in lint_onnx(model) if p.is_error)))
        del model
    return tuple(out)


@pytest.mark.parametrize("which", ["exact", "single"])
def test_graphs_are_tensorrt_clean(which, request) -> None:
    path = request.getfixturevalue(which)[1]
    for graph in _graphs(path):
        assert not graph.lint_errors, graph.lint_errors
        assert all(domain in ("", "ai.onnx") and version == 17 for domain, version in graph.opsets)
        ops = {n.op_type for n in graph.nodes}
        assert not ops & {"NonZero", "Loop", "If", "Scan"}, ops
        assert all(n.domain in ("", "ai.onnx") for n in graph.nodes)
        for n in graph.nodes:
            if n.op_type == "GridSample":
                attrs = dict(n.attrs)
                assert attrs.get("mode", b"bilinear") == b"bilinear"
                assert attrs.get("padding_mode", b"zeros") == b"zeros"
                assert attrs.get("align_corners", 0) == 0
        # no data-dependent shapes: every output shape is static
        for name, dims in graph.output_dims:
            assert dims and all(d > 0 for d in dims), name


def test_correlation_is_one_gridsample_per_scale(single) -> None:
    (graph,) = _graphs(single[1])
    corr = [n.name for n in graph.nodes
            if n.op_type == "GridSample" and fnmatch.fnmatchcase(n.name, "*/corr*/GridSample")]
    # scales 16, 8, 4 in the first pass, 8 and 4 again in the upsampling pass (at this size each
    # window fits one chunk; larger ones are sampled in chunks, next test)
    assert len(corr) == 5


def test_chunked_correlation_exports_and_runs_like_torch(monkeypatch, tmp_path) -> None:
    """A window larger than WINDOW_CHUNK_BYTES becomes several GridSamples and a Concat in ONNX;
    onnxruntime computes what torch computes."""
    import onnxruntime as ort

    from matchrt.plugins.roma_plus import refiner

    b, c, h, w, r = 2, 16, 9, 11, 3  # 49 offsets
    monkeypatch.setattr(refiner, "WINDOW_CHUNK_BYTES", 10 * b * c * h * w * 4)  # 10 offsets a chunk
    torch.manual_seed(0)
    fa, fb = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    flow = torch.rand(b, 2, h, w) * 1.8 - 0.9
    module = refiner.LocalCorrelation(r).eval()
    path = tmp_path / "corr.onnx"
    torch.onnx.export(module, (fa, fb, flow), str(path), input_names=["a", "b", "flow"],
                      output_names=["corr"], opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "GridSample" for n in graph.node) == 5  # 49 offsets, 10 a chunk
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"a": fa.numpy(), "b": fb.numpy(), "flow": flow.numpy()})[0]
    want = module(fa, fb, flow).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("which", ["exact", "single"])
def test_every_fp32_pattern_pins_nodes(which, request) -> None:
    path = request.getfixturevalue(which)[1]
    manifest = load_manifest(path)
    names = [n.name for g in _graphs(path) for n in g.nodes]
    patterns = {p for st in manifest["stages"] for p in st["fp32_layers"]}
    assert patterns
    for pattern in patterns:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern
    pinned = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    # every sampling of coordinates and every flow resize, in both passes, stays fp32
    nodes = [n for g in _graphs(path) for n in g.nodes]
    for n in nodes:
        if "/dinov2/" in n.name or "/embedding_decoder/" in n.name:
            continue  # attention softmaxes subtract their max; the ViT's own position resize
        if n.op_type in ("GridSample", "Softmax", "ArgMax", "Sigmoid", "Resize"):
            assert n.name in pinned, n.name
    meta = dict(_graphs(path)[0].metadata)
    assert json.loads(meta["matchrt.fp32_layers"])
    # default coarse_precision=fp32: the coarse stage is pinned too, and engines keep TF32 off
    assert any("/dinov2/" in n for n in pinned) and any("/embedding_decoder/" in n for n in pinned)
    assert meta["matchrt.tf32"] == "false"


def test_reduced_coarse_precision_leaves_the_coarse_stage_to_the_builder() -> None:
    from matchrt.plugins.roma_plus import export as export_mod

    strict = hooks.export_plan("roma_plus", loaded_model(), ExportOptions(SIDE, SIDE, extra={}))
    reduced = hooks.export_plan("roma_plus", loaded_model(),
                                ExportOptions(SIDE, SIDE, extra={"coarse_precision": "reduced"}))
    assert strict.graphs[0].tf32 is False and reduced.graphs[0].tf32 is None
    assert set(export_mod.COARSE_FP32_LAYERS.values()) <= set(strict.graphs[0].fp32_layers)
    assert reduced.graphs[0].fp32_layers == export_mod.FP32_LAYERS
    assert reduced.graphs[0].module.model.coarse_precision == "reduced"
    assert loaded_model().coarse_precision == "bf16x2-flash"  # the default; the plan's view leaves the model alone
    # tf32: the coarse stage stays pinned to fp32 layers, with TF32 allowed in them
    tf32 = hooks.export_plan("roma_plus", loaded_model(), ExportOptions(SIDE, SIDE, extra={"coarse_precision": "tf32"}))
    assert tf32.graphs[0].tf32 is True and set(export_mod.COARSE_FP32_LAYERS.values()) <= set(tf32.graphs[0].fp32_layers)
    # reduced:dinov2 leaves DINOv2 to the builder; proj.16 and the decoder stay IEEE fp32, TF32 off
    mixed = hooks.export_plan("roma_plus", loaded_model(),
                              ExportOptions(SIDE, SIDE, extra={"coarse_precision": "reduced: DINOv2"}))
    layers = mixed.graphs[0].fp32_layers
    assert mixed.graphs[0].tf32 is False and mixed.options["coarse_precision"] == "reduced:dinov2"
    assert "*/dinov2/*" not in layers and {"*/proj16/*", "*/embedding_decoder/*"} <= set(layers)
    # the split policies (torch runs): exported graphs keep DINOv2 and the decoder as IEEE fp32 layers
    for kind in ("tf32x3", "bf16x3", "bf16x3-flash", "bf16x2", "bf16x2-flash"):
        split = hooks.export_plan("roma_plus", loaded_model(), ExportOptions(SIDE, SIDE, extra={"coarse_precision": kind}))
        assert split.graphs[0].tf32 is False
        assert set(export_mod.COARSE_FP32_LAYERS.values()) <= set(split.graphs[0].fp32_layers)
    for bad in ("fp8", "reduced:", "reduced:vgg"):
        with pytest.raises(MatchrtError, match="coarse_precision"):
            hooks.export_plan("roma_plus", loaded_model(), ExportOptions(SIDE, SIDE, extra={"coarse_precision": bad}))


def test_runner_matches_from_original_images(exact) -> None:
    _, _, matches, _ = exact
    image0, image1 = read_image(PAIR[0]), read_image(PAIR[1])
    assert 0 < len(matches) <= 500
    for kp, img in ((matches.keypoints0, image0), (matches.keypoints1, image1)):
        assert kp[:, 0].min() >= 0 and kp[:, 0].max() <= img.shape[1] - 1
        assert kp[:, 1].min() >= 0 and kp[:, 1].max() <= img.shape[0] - 1
    assert matches.warp is not None and matches.warp.shape == (SIDE, 2 * SIDE, 4)
    assert matches.certainty is not None and matches.certainty.shape == (SIDE, 2 * SIDE)
    assert matches.metadata["sample_mode"] == "balanced"
