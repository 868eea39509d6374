"""eloftr export: one TensorRT-clean ONNX graph that onnxruntime runs like the torch model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from eloftr_helpers import (
    assert_same_matches, export_plan_at, loaded_model, reference, reference_images, robust_threshold,
    run_onnxruntime, run_wrapper,
)
from matchrt.errors import MatchrtError
from matchrt.export import export_plan, manifest_path
from matchrt.plugins.eloftr import hooks
from matchrt.plugins.eloftr.model import COARSE_STRIDE, RepVGGBlock
from matchrt.types import ExportOptions

THRESHOLD = float(reference()["threshold"])
K = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The reference pair through the exported graph (fused, K=64, threshold 2e-5)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    plan = export_plan_at(320, 320, threshold=THRESHOLD, max_matches=K)
    path = tmp_path_factory.mktemp("eloftr") / "eloftr.onnx"
    export_plan(plan, path)
    image0, image1 = reference_images()
    return plan, path, run_wrapper(plan, image0, image1), run_onnxruntime(path, image0, image1)


def test_plan_and_manifest(exported) -> None:
    plan, path, _, _ = exported
    graph = plan.graphs[0]
    assert graph.input_names == ["image0", "image1"]
    assert graph.output_names == ["keypoints0", "keypoints1", "confidence", "valid"]
    assert plan.options["max_matches"] == K and plan.options["threshold"] == THRESHOLD
    assert plan.options["fuse"] is True and plan.input_size == (320, 320)
    assert graph.fp32_layers
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["matcher"] == "eloftr" and manifest["options"]["max_matches"] == K
    # fused for export by default, the loaded model itself untouched
    blocks = [m for m in graph.module.modules() if isinstance(m, RepVGGBlock)]
    assert blocks and all(b.rbr_reparam is not None for b in blocks)
    assert all(b.rbr_reparam is None for b in loaded_model().modules() if isinstance(b, RepVGGBlock))
    unfused = export_plan_at(320, 320, fuse=False).graphs[0].module
    assert all(b.rbr_reparam is None for b in unfused.modules() if isinstance(b, RepVGGBlock))


def test_outputs_shapes_and_order(exported) -> None:
    _, _, ours, runtime = exported
    for out in (ours, runtime):
        assert out["keypoints0"].shape == (1, K, 2) and out["keypoints1"].shape == (1, K, 2)
        assert out["confidence"].shape == (1, K) and out["valid"].shape == (1, K)
        assert out["valid"].dtype == np.bool_ and out["confidence"].dtype == np.float32
        conf = out["confidence"][0]
        assert np.all(np.diff(conf) <= 0), "confidence must be sorted descending"
        n = int(out["valid"][0].sum())
        assert out["valid"][0, :n].all() and not out["valid"][0, n:].any()
        assert np.all(conf[n:] == 0) and np.all(out["keypoints0"][0, n:] == 0)


def test_graph_matches_upstream_set(exported) -> None:
    _, _, ours, _ = exported
    ref = reference()
    valid = ours["valid"][0]
    assert valid.sum() == 43
    # the coarse cell of an image-0 keypoint is recoverable: |offset| <= 3.5 px from its anchor
    cells0 = np.rint(ours["keypoints0"][0, valid] / COARSE_STRIDE).astype(int)
    ref_cells0 = np.rint(ref["mkpts0_f"] / COARSE_STRIDE).astype(int)
    assert sorted(map(tuple, cells0)) == sorted(map(tuple, ref_cells0))
    # same keypoints as upstream: pair every upstream match with our nearest in (kp0, kp1)
    ours4 = np.concatenate([ours["keypoints0"][0, valid], ours["keypoints1"][0, valid]], 1)
    ref4 = np.concatenate([ref["mkpts0_f"], ref["mkpts1_f"]], 1)
    dist = np.abs(ref4[:, None, :] - ours4[None, :, :]).max(-1)  # 43 x 43, L-inf
    nearest = dist.argmin(1)
    assert sorted(nearest.tolist()) == list(range(43)), "not a one-to-one correspondence"
    assert float(dist.min(1).max()) <= 1e-3


def test_onnxruntime_parity(exported) -> None:
    _, _, ours, runtime = exported
    assert ours["valid"].sum() == 43
    assert_same_matches(ours, runtime)


def test_graph_passes_the_tensorrt_lint(exported) -> None:
    from matchrt.lint import format_problems, lint_onnx

    problems = lint_onnx(exported[1])
    assert not problems, format_problems(problems)


def plan_layers(exported) -> list[str]:
    return exported[0].graphs[0].fp32_layers


def test_graph_is_tensorrt_clean(exported) -> None:
    _, path, _, _ = exported
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonZero", "Unique", "Loop", "If", "Scan", "Shape"}
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert 1 <= len(topk) <= 2  # one, or the exact two-stage selection (topk_flat)
    for node in topk:  # every TopK keeps exactly K, within TensorRT's K <= 3840
        k_name = node.input[1]
        k_value = onnx.numpy_helper.to_array(consts[k_name] if k_name in consts else inits[k_name])
        assert int(k_value.reshape(-1)[0]) == K
    # INT64 data only where ONNX mandates it (TopK/ArgMax indices), cast to INT32 at once
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        for name in n.output:
            if types.get(name) == onnx.TensorProto.INT64:
                assert n.op_type in ("TopK", "ArgMax"), f"INT64 tensor from {n.op_type} {n.name}"
                for c in consumers[name]:
                    assert c.op_type == "Cast" and c.attribute[0].i == onnx.TensorProto.INT32
    # integer Div only on INT32, never an index through a float type
    for n in model.graph.node:
        if n.op_type == "Div" and types.get(n.input[0]) in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            assert types[n.input[0]] == onnx.TensorProto.INT32
    # the fp32 layer patterns (globs on node names, as the engine builder reads them) name real
    # nodes, the coarse dual softmax among them
    from matchrt.engine import layer_matches

    names = [n.name for n in model.graph.node]
    for pattern in plan_layers(exported):
        assert any(layer_matches(name, [pattern]) for name in names), pattern
    pinned = [name for name in names if layer_matches(name, plan_layers(exported))]
    # the dual softmax's exponent and its two log-sum-exps
    assert any(n.startswith("/coarse_matching/Exp") for n in pinned)
    assert sum(n.startswith("/coarse_matching/ReduceMax") for n in pinned) == 2
    # every softmax sees its input minus its max
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Softmax":
            src = producers[n.input[0]]
            assert src.op_type == "Sub" and producers[src.input[1]].op_type == "ReduceMax", n.name


def test_non_square_export(tmp_path) -> None:
    h, w = 256, 352
    gen = torch.Generator().manual_seed(0)
    image0, image1 = reference_images()
    image0 = image0[:, :, 32:32 + h, :].repeat(1, 1, 1, 2)[..., :w].contiguous()
    image1 = image1[:, :, 32:32 + h, :].repeat(1, 1, 1, 2)[..., :w].contiguous()
    image1 = (image1 + 0.02 * torch.rand(image1.shape, generator=gen)).clamp(0, 1)
    threshold, count = robust_threshold(image0, image1, 20, 50)
    plan = export_plan_at(h, w, threshold=threshold, max_matches=K)
    path = tmp_path / "eloftr_256x352.onnx"
    export_plan(plan, path)
    ours, runtime = run_wrapper(plan, image0, image1), run_onnxruntime(path, image0, image1)
    assert runtime["keypoints0"].shape == (1, K, 2)
    assert ours["valid"][0].sum() == count
    assert_same_matches(ours, runtime)
    valid = ours["valid"][0]
    kp = runtime["keypoints0"][0, valid]
    assert kp[:, 0].max() < w and kp[:, 1].max() < h and kp.min() > -4


def test_batch_of_pairs_matches_single_pairs() -> None:
    image0, image1 = reference_images()
    batch0, batch1 = torch.cat([image0, image1.flip(-1)]), torch.cat([image1, image0.flip(-1)])
    plan2 = export_plan_at(320, 320, batch=2, threshold=THRESHOLD, max_matches=K)
    assert plan2.graphs[0].example_inputs[0].shape == (2, 1, 320, 320)
    both = run_wrapper(plan2, batch0, batch1)
    plan = export_plan_at(320, 320, threshold=THRESHOLD, max_matches=K)
    for b in range(2):
        single = run_wrapper(plan, batch0[b:b + 1], batch1[b:b + 1])
        for name, value in single.items():
            np.testing.assert_allclose(both[name][b:b + 1], value, atol=1e-4, rtol=0, err_msg=name)
    assert both["valid"][0].sum() == 43


def test_max_matches_limit_is_refused() -> None:
    with pytest.raises(MatchrtError, match="3840"):
        export_plan_at(320, 320, max_matches=3841)
    with pytest.raises(MatchrtError, match="static"):
        hooks.export_plan("eloftr", loaded_model(), ExportOptions(320, 320, dynamic=True))
    assert export_plan_at(320, 320, max_matches=3840).options["max_matches"] == 3840


def test_matcher_info() -> None:
    info = hooks.INFO
    assert info.name == "eloftr" and info.output == "sparse"
    assert info.contract.channels == 1 and info.contract.side_multiple == 32
    assert (info.contract.default_height, info.contract.default_width) == (832, 832)
    assert info.contract.resize == "stretch"
    assert info.options == {"max_matches": 2048, "threshold": 0.1, "fuse": True, "resize": "stretch"}
    assert any("3840" in note for note in info.notes)
    src = info.weight_sources[0]
    assert src.name == "checkpoint" and src.layout is not None and src.layout.is_file()


@pytest.mark.slow
def test_default_size_onnxruntime_parity(tmp_path, image_pair) -> None:
    """832 x 832, K = 2048 on the real pair: about 1000 matches, identical in onnxruntime."""
    from matchrt.images import read_image, resize, to_channels

    torch.set_num_threads(min(2, torch.get_num_threads()))
    images = []
    for p in image_pair:
        im, _ = resize(to_channels(read_image(p), 1), 832, 832, "stretch", "area")
        images.append(torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))[None])
    threshold, count = robust_threshold(images[0], images[1], 900, 1100)
    plan = export_plan_at(832, 832, threshold=threshold)
    path = tmp_path / "eloftr_832.onnx"
    export_plan(plan, path)
    ours, runtime = run_wrapper(plan, *images), run_onnxruntime(path, *images)
    valid = ours["valid"][0]
    assert valid.sum() == count
    assert_same_matches(ours, runtime)
