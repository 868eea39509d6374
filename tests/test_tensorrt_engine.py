"""TensorRT engines end to end: build, provenance, cache, runtime, CUDA graphs, dynamic shapes.

These need TensorRT and an NVIDIA GPU (`pip install 'matchrt[tensorrt]'`); elsewhere every test
here is skipped with the reason the `tensorrt` backend gives. Run them with `pytest -m tensorrt`.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from matchrt.backends import tensorrt_backend as trb
from matchrt.compare import compare_outputs, match_set_agreement
from matchrt.engine import build_engine, plan_build
from matchrt.errors import MatchrtError
from matchrt.provenance import onnx_sha256, provenance_path, read_provenance, sha256_file

REASON = trb.unavailable()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=str(REASON)),
              pytest.mark.filterwarnings("ignore:matchrt plugin")]


class Head(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.amax(dim=1, keepdim=True)  # softmax with the max subtracted
        return torch.softmax(x * 8.0, dim=1)


class Tiny(torch.nn.Module):
    """Conv features and a sharp softmax head (the fp16-sensitive part, pinned to fp32)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.head = Head()

    def forward(self, image0: torch.Tensor):
        f = self.conv2(torch.relu(self.conv1(image0)))
        scores = self.head(f)
        return scores, scores.amax(dim=1)


def export_tiny(path, dynamic=False, size=(64, 96)):
    x = torch.rand(1, 1, *size)
    axes = {"image0": {2: "height", 3: "width"}, "scores": {2: "height", 3: "width"},
            "peak": {1: "height", 2: "width"}} if dynamic else None
    torch.onnx.export(Tiny().eval(), (x,), str(path), input_names=["image0"], output_names=["scores", "peak"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    for k, v in {"matchrt.matcher": "tiny", "matchrt.version": "1", "matchrt.stage": "main",
                 "matchrt.input_size": json.dumps(list(size)), "matchrt.fp32_layers": '["/head/*"]'}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def ort_run(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, (torch.from_numpy(v) for v in session.run(names, {"image0": x.numpy()}))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    onnx_path = export_tiny(d / "tiny.onnx")
    engine = build_engine(onnx_path, d / "tiny-fp32.engine", precision="fp32", progress=False,
                          timing_cache=d / "timing.cache")
    return d, onnx_path, engine


def test_fp32_engine_matches_onnxruntime(tiny):
    _, onnx_path, engine = tiny
    session = trb.TensorRTSession(engine, {"device": "cuda"})
    assert session.input_names == ["image0"] and set(session.output_names) == {"scores", "peak"}
    x = torch.rand(1, 1, 64, 96)
    out = session.run({"image0": x})
    assert all(t.is_cuda for t in out.values())
    rows = compare_outputs(ort_run(onnx_path, x), out, rtol=1e-4)
    assert all(r.ok for r in rows), "\n".join(map(str, rows))


def test_provenance_record(tiny):
    d, onnx_path, engine = tiny
    import tensorrt as trt

    rec = read_provenance(engine)
    assert provenance_path(engine).exists() and rec is not None
    assert rec["onnx"]["sha256"] == onnx_sha256(onnx_path)
    assert rec["engine_sha256"] == sha256_file(engine)
    assert (rec["matcher"], rec["matcher_version"], rec["stage"]) == ("tiny", "1", "main")
    env = rec["environment"]
    props = torch.cuda.get_device_properties(0)
    assert env["tensorrt"] == trt.__version__ and env["gpu"] == props.name
    assert env["compute_capability"] == f"{props.major}.{props.minor}"
    assert rec["build"]["precision"] == "fp32" and rec["build"]["tf32"] is False
    assert rec["build"]["profiles"]["image0"]["opt"] == [1, 1, 64, 96]
    assert "--noTF32" in rec["trtexec"] and "matchrt build" in rec["rebuild"]
    assert (d / "timing.cache").stat().st_size > 0


def test_identical_build_is_skipped_and_force_rebuilds(tiny):
    d, onnx_path, engine = tiny
    before = engine.stat().st_mtime_ns
    assert build_engine(onnx_path, engine, precision="fp32", progress=False,
                        timing_cache=d / "timing.cache") == engine
    assert engine.stat().st_mtime_ns == before
    built_at = read_provenance(engine)["built_at"]
    build_engine(onnx_path, engine, precision="fp32", progress=False, timing_cache=d / "timing.cache",
                 force=True)
    assert engine.stat().st_mtime_ns != before or read_provenance(engine)["built_at"] != built_at


def test_reduced_precision_pins_the_fp32_layers(tiny):
    d, onnx_path, _ = tiny
    import tensorrt as trt

    plan = plan_build(onnx_path, precision="fp16", weak_typing=hasattr(trt.BuilderFlag, "FP16"))
    if plan.autocast:
        pytest.importorskip("modelopt.onnx.autocast", reason="TensorRT 11 fp16 needs nvidia-modelopt")
    engine = build_engine(onnx_path, d / "tiny-fp16.engine", precision="fp16", progress=False)
    rec = read_provenance(engine)
    if not plan.autocast:
        matched = rec["fp32_layers_matched"]
        assert matched and all(n.startswith("/head/") for n in matched), matched
        assert "--precisionConstraints=obey" in rec["trtexec"]
    x = torch.rand(1, 1, 64, 96)
    rows = compare_outputs(ort_run(onnx_path, x), trb.TensorRTSession(engine, {}).run({"image0": x}), 1e-2)
    assert all(r.ok for r in rows), "\n".join(map(str, rows))


def test_cuda_graph_replays_match_and_outputs_are_not_overwritten(tiny):
    _, _, engine = tiny
    plain = trb.TensorRTSession(engine, {})
    graphed = trb.TensorRTSession(engine, {"cuda_graph": True})
    x1, x2 = torch.rand(1, 1, 64, 96), torch.rand(1, 1, 64, 96)
    a = graphed.run({"image0": x1})
    b = graphed.run({"image0": x2})
    assert graphed._graph is not None, "the CUDA graph was not captured"
    for got, x in ((a, x1), (b, x2)):  # `a` still holds x1's result after the second replay
        want = plain.run({"image0": x})
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_dynamic_engine_covers_its_profile(tmp_path):
    onnx_path = export_tiny(tmp_path / "dyn.onnx", dynamic=True)
    engine = build_engine(onnx_path, tmp_path / "dyn.engine", precision="fp32", progress=False,
                          min_size="32x32", opt_size="64x96", max_size="96x128")
    rec = read_provenance(engine)
    assert rec["build"]["profiles"]["image0"] == {"min": [1, 1, 32, 32], "opt": [1, 1, 64, 96],
                                                  "max": [1, 1, 96, 128]}
    assert "--minShapes=image0:1x1x32x32" in rec["trtexec"]
    session = trb.TensorRTSession(engine, {"cuda_graph": True})
    for size in ((32, 32), (96, 128), (64, 96)):
        x = torch.rand(1, 1, *size)
        rows = compare_outputs(ort_run(onnx_path, x), session.run({"image0": x}), rtol=1e-4)
        assert all(r.ok for r in rows), (size, [str(r) for r in rows])
    with pytest.raises(MatchrtError, match="outside the engine's profile"):
        session.run({"image0": torch.rand(1, 1, 128, 128)})


def test_foreign_engine_is_refused_with_the_rebuild_command(tiny, tmp_path):
    _, _, engine = tiny
    copy = tmp_path / "foreign.engine"
    copy.write_bytes(engine.read_bytes())
    rec = read_provenance(engine)
    rec["environment"]["compute_capability"] = "1.0"
    provenance_path(copy).write_text(json.dumps(rec))
    with pytest.raises(MatchrtError, match="(?s)compute capability.*matchrt build --onnx"):
        trb.TensorRTSession(copy, {})


def test_parser_errors_name_the_node(tmp_path):
    from onnx import TensorProto as T
    from onnx import helper as h

    graph = h.make_graph([h.make_node("Unique", ["x"], ["y"], name="the_unique_node")], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, [8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n"])])
    path = tmp_path / "bad.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    with pytest.raises(MatchrtError, match="(?s)the_unique_node.*matchrt lint"):
        build_engine(path, tmp_path / "bad.engine", precision="fp32", progress=False)


def test_backend_hooks(tiny, tmp_path):
    from matchrt.host import create_host

    _, onnx_path, _ = tiny
    host = create_host()
    assert host.backend("tensorrt").artifact == "engine"
    built = host.pm.hook.build_engine(backend="tensorrt", onnx_path=onnx_path, output=tmp_path / "h.engine",
                                      options={"precision": "fp32", "progress": False})
    session = host.pm.hook.open_session(backend="tensorrt", graph=built, options={"device": "cuda"})
    x = torch.rand(1, 1, 64, 96)
    assert all(r.ok for r in compare_outputs(ort_run(onnx_path, x), session.run({"image0": x}), 1e-4))


@pytest.mark.slow
def test_eloftr_engine_against_onnxruntime(tmp_path):
    """The real matcher: fp32 within the plugin's fp32 tolerance, fp16 keeps the match set."""
    helpers = pytest.importorskip("eloftr_helpers")
    from matchrt.export import export_plan
    from matchrt.plugins.eloftr import hooks
    from matchrt.types import ExportOptions

    info = next(i for i in _infos(hooks) if i.name == "eloftr")
    plan = hooks.export_plan("eloftr", helpers.loaded_model(), ExportOptions(320, 320))
    manifest = export_plan(plan, tmp_path / "eloftr.onnx")
    onnx_path = manifest.parent / json.loads(manifest.read_text())["stages"][0]["file"]
    image0, image1 = helpers.reference_images()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, (torch.from_numpy(v) for v in
                           sess.run(names, {"image0": image0.numpy(), "image1": image1.numpy()}))))
    for precision in ("fp32", "fp16"):
        engine = build_engine(onnx_path, tmp_path / f"eloftr-{precision}.engine", precision=precision,
                              progress=False, contract=info.contract)
        out = trb.TensorRTSession(engine, {}).run({"image0": image0, "image1": image1})
        if precision == "fp32":
            rows = compare_outputs(ref, out, info.tolerances["fp32"])
            assert all(r.ok for r in rows), "\n".join(map(str, rows))
        else:
            agreement = match_set_agreement(ref, out)
            assert agreement is not None and agreement >= 0.9, agreement


def _infos(hooks):
    found = []
    hooks.register_matchers(found.append)
    return found
