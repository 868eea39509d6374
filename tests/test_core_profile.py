"""`matchrt profile`: per-stage and per-kernel time, and stage markers that cost nothing outside it."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import onnx
import pytest
import torch
from typer.testing import CliRunner

from matchrt.cli import app
from matchrt.host import create_host, get_host
from matchrt.profiler import POSTPROCESS, ROOT, UNMARKED, ProfileConfig, analyse, run_profile
from matchrt.profiling import (
    PREFIX, is_recording, mark_methods, mark_stages, marked, recording, stage,
)

from toy_plugin import ToyPlugin


@pytest.fixture()
def toy():
    with get_host().plugin(ToyPlugin(), "toy"):
        yield


def _stage_checks(stages: list[dict], total: float, expected: set[str]) -> dict[str, dict]:
    rows = {r["name"]: r for r in stages}
    assert expected <= set(rows), rows.keys()
    for name in expected:
        assert rows[name]["ms"] > 0 and rows[name]["calls"] > 0, rows[name]
    top = sum(r["ms"] for r in stages if r["depth"] == 0)
    assert top == pytest.approx(total, rel=1e-6) or top <= total  # the unmarked row closes the sum
    assert all(r["ms"] <= total * (1 + 1e-9) for r in stages)
    return rows


def test_profile_toy_stages_json_and_trace(toy, tmp_path):
    out, trace = tmp_path / "p.json", tmp_path / "trace.json"
    r = CliRunner().invoke(app, ["profile", "-m", "toy", "--random-weights", "--device", "cpu",
                                 "--runs", "2", "--warmup", "1", "--json", str(out),
                                 "--trace", str(trace)])
    assert r.exit_code == 0, r.output
    assert "encode" in r.output and "top" in r.output
    data = json.loads(out.read_text())
    assert data["time_kind"] == "CPU time" and data["runs"] == 2 and data["stage_markers"]
    rows = _stage_checks(data["stages"], data["total_ms"], {"encode", "encode/conv", "match", POSTPROCESS})
    # nested stage: inside its parent, counted per call (the backbone runs once per image)
    assert rows["encode/conv"]["depth"] == 1 and rows["encode/conv"]["calls"] == 2
    assert rows["encode/conv"]["ms"] <= rows["encode"]["ms"]
    kernels = data["kernels"]
    assert kernels and all(k["ms"] >= 0 for k in kernels)
    conv = [k for k in kernels if "conv" in k["name"]]
    assert conv and conv[0]["stage"] == "encode/conv"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == PREFIX + "encode" for e in events)


def test_profile_graph_sequence_and_onnxruntime(toy, tmp_path):
    """Stages of a two-graph plan; an ONNX backend profiles the total without stage markers."""
    torch_run, _ = run_profile(ProfileConfig("toy", random_weights=True, runs=1, warmup=1,
                                             options={"stages": 2}))
    names = {r.name for r in torch_run.stages}
    assert {"encode", "match", POSTPROCESS} <= names
    ort, _ = run_profile(ProfileConfig("toy", backend="onnxruntime", random_weights=True, runs=1,
                                       warmup=1, workdir=tmp_path))
    assert not ort.stage_markers and any("not available" in n for n in ort.notes)
    assert {r.name for r in ort.stages} <= {POSTPROCESS, UNMARKED} and ort.total_ms > 0


def test_profile_refuses_what_the_bench_refuses(toy):
    r = CliRunner().invoke(app, ["profile", "-m", "toy", "--random-weights", "--device", "cpu",
                                 "--precision", "fp16"])
    assert r.exit_code == 2 and "use --device cuda" in r.output


def test_profile_builds_packages_from_the_weights_it_loaded(toy, tmp_path, monkeypatch):
    """`profile --backend inductor` builds the package the bench builds, from the weights profile
    loaded: random weights, or the checkpoint given, reach the package's record (it asked for a
    --checkpoint that --random-weights had replaced before)."""
    import matchrt.package
    from matchrt.errors import MatchrtError

    seen = []

    def stop(host, plan, out, context, settings):
        seen.append(context)
        raise MatchrtError("stopped before compiling")

    monkeypatch.setattr(matchrt.package, "build_packages", stop)
    with pytest.raises(MatchrtError, match="stopped before compiling"):
        run_profile(ProfileConfig("toy", backend="inductor", random_weights=True, runs=1, warmup=0,
                                  workdir=tmp_path))
    assert seen[0].random_weights and set(seen[0].weights) == {"checkpoint"}


def test_profile_xfeat_small(tmp_path, one_thread):
    pytest.importorskip("matchrt_xfeat")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("MATCHRT_PLUGINS", "xfeat")
        host = create_host()
    report, _ = run_profile(ProfileConfig("xfeat", height=64, width=96, runs=1, warmup=1,
                                          options={"top_k": 128}), host=host)
    data = report.to_json()
    _stage_checks(data["stages"], data["total_ms"], {"backbone", "keypoints", "matching", POSTPROCESS})


def test_profile_eloftr_names_both_attention_stages(one_thread):
    """eloftr's deploy path runs each cross layer on both images through a method, not the layer's
    forward: its time still shows as the cross-attention stage, beside the self layers' stage."""
    report, _ = run_profile(ProfileConfig("eloftr", height=64, width=64, runs=1, warmup=1, random_weights=True,
                                          options={"max_matches": 64}))
    data = report.to_json()
    rows = _stage_checks(data["stages"], data["total_ms"], {"backbone", "coarse transformer"})
    attention = {r["name"].rsplit("/", 1)[-1]: r for r in data["stages"] if r["name"].endswith("attention")}
    assert set(attention) == {"self-attention", "cross-attention"}
    assert all(r["ms"] > 0 and r["calls"] == 4 and r["depth"] == 1 for r in attention.values())
    assert sum(r["ms"] for r in attention.values()) <= rows["coarse transformer"]["ms"]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        with stage("inline"):
            return x.softmax(1)


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_markers_are_free_outside_profiling(tmp_path):
    mark_methods(Net, {"head": "head"})
    mark_methods(Net, {"head": "head"})  # idempotent: a plugin module imported twice
    net = mark_stages(Net().eval(), {"first": "a", "second": ["b"]})
    assert set(marked(net)) == {"first", "second"}
    x = torch.rand(1, 1, 8, 8)
    before = net(x)
    assert _hooks(net) == 0 and not is_recording()  # marking registers nothing
    with recording(net) as names, torch.profiler.profile() as prof:
        assert names == ["first", "second"] and _hooks(net) == 4 and is_recording()
        during = net(x)
    seen = {e.name for e in prof.events()}
    assert {PREFIX + n for n in ("first", "second", "head", "inline")} <= seen
    assert _hooks(net) == 0 and not is_recording()  # removed again
    assert torch.equal(before, during) and torch.equal(before, net(x))
    # exported graphs carry no trace of the markers
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (x,), str(path), dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops == {"Conv", "Relu", "Softmax"}
    # torch.compile traces through the method marker without a graph break
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with pytest.raises(Exception, match="no submodule 'c'"):
        mark_stages(net, {"x": "c"})
    assert mark_stages(net, {"x": "c"}, strict=False) is net


def _event(name, start, end, *, cpu=True, id_=0, linked=0, kind=None, parent=None):
    e = SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                        device_type="DeviceType.CPU" if cpu else "DeviceType.CUDA", id=id_,
                        linked_correlation_id=linked, activity_type=kind, cpu_parent=parent,
                        cpu_children=[], is_async=False, is_user_annotation=False,
                        is_python_function=False)
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_gpu_kernels_are_charged_to_the_stages_that_launched_them():
    root = _event(ROOT, 0, 100, id_=1)
    outer = _event(PREFIX + "refiners", 0, 60, id_=2, parent=root)
    inner = _event(PREFIX + "refiner.8", 10, 40, id_=3, parent=outer)
    conv = _event("aten::conv2d", 12, 30, id_=4, parent=inner)
    add = _event("aten::add", 45, 50, id_=5, parent=outer)
    post = _event(PREFIX + POSTPROCESS, 70, 90, id_=6, parent=root)
    copy = _event("aten::copy_", 71, 80, id_=7, parent=post)
    bare = _event("aten::mm", 95, 99, id_=8, parent=root)
    device = [
        _event("sm90_conv_kernel", 20, 28, cpu=False, id_=4, linked=4, kind="kernel"),
        _event("sm90_conv_kernel", 28, 31, cpu=False, id_=9, linked=4, kind="kernel"),
        _event("add_kernel", 50, 51, cpu=False, id_=5, linked=5, kind="kernel"),
        _event("Memcpy DtoH", 75, 77, cpu=False, id_=7, linked=7, kind="gpu_memcpy"),
        _event("gemm", 96, 100, cpu=False, id_=8, linked=8, kind="kernel"),
        # a sync is not work
        _event("Context Sync", 60, 70, cpu=False, kind="cuda_sync"),
    ]
    events = [root, outer, inner, conv, add, post, copy, bare, *device]
    total, stages, kernels = analyse(events, runs=2, on_gpu=True)
    assert total == pytest.approx((8 + 3 + 1 + 2 + 4) / 1000 / 2)
    rows = {r.name: r for r in stages}
    assert [r.name for r in stages] == ["refiners", "refiners/refiner.8", POSTPROCESS, UNMARKED]
    assert rows["refiners"].ms == pytest.approx(12 / 2000)  # conv (11) + add (1), nested included
    assert rows["refiners/refiner.8"].ms == pytest.approx(11 / 2000)
    assert rows["refiners"].cpu_ms == pytest.approx(60 / 2000)
    assert rows[POSTPROCESS].ms == pytest.approx(2 / 2000)
    assert rows[UNMARKED].ms == pytest.approx(4 / 2000)  # the gemm outside every stage
    assert kernels[0].name == "sm90_conv_kernel" and kernels[0].calls == 1
    assert kernels[0].stage == "refiners/refiner.8"
    assert kernels[0].share == pytest.approx(11 / 18)


def test_the_gpu_copy_of_a_package_call_range_is_not_counted_as_a_kernel():
    """torch 2.11's events carry no activity type: the GPU copy of the inductor backend's range
    around a package call looked like one kernel as long as the call, and doubled the total."""
    from matchrt.trace_regions import PACKAGE_CALL

    name = f"{PACKAGE_CALL} m.pt2 ##"
    root = _event(ROOT, 0, 100, id_=1)
    call = _event(name, 0, 50, id_=2, parent=root)
    call.is_user_annotation = True
    launch = _event("cudaGraphLaunch", 1, 2, id_=3, parent=call)
    device = [
        _event(name, 5, 45, cpu=False, id_=10),  # the range's copy on the GPU timeline
        _event("gemm", 5, 25, cpu=False, id_=11, linked=3),
        _event("triton_poi_fused_add_0", 25, 45, cpu=False, id_=12, linked=3),
    ]
    total, _, kernels = analyse([root, call, launch, *device], runs=1, on_gpu=True)
    assert total == pytest.approx(40 / 1000)
    assert [k.name for k in kernels] == ["gemm", "triton_poi_fused_add_0"]
    # also when the CPU side does not say it is an annotation: the name gives the range away
    call.is_user_annotation = False
    assert analyse([root, call, launch, *device], runs=1, on_gpu=True)[0] == pytest.approx(40 / 1000)


def test_builtin_plugins_mark_their_stages():
    """Every stage path resolves on the current models (a renamed module fails here, by name)."""
    from matchrt.plugins.eloftr import hooks as eloftr
    from matchrt.plugins.roma_full import hooks as roma_full
    from matchrt.plugins.roma_plus import hooks as roma_plus
    from matchrt.types import ExportOptions

    expected = {
        "eloftr": {"backbone", "coarse transformer", "self-attention", "cross-attention",
                   "coarse matching", "fine preprocess", "fine matching"},
        "roma_full": {"dinov2", "proj", "gp", "decoder", "anchor soft-argmax + warp layout"},
        "roma_plus": {"encoder.vgg", "dinov2", "proj", "gp", "decoder", "anchor soft-argmax",
                      "refiner.16", "refiner.8", "refiner.4", "refiner.2", "refiner.1",
                      "flow resize", "flow update", "certainty + warp layout"},
    }
    for plugin, size in ((eloftr, 64), (roma_full, 56), (roma_plus, 56)):
        with torch.device("meta"):  # structure only: no weights, no compute
            model = plugin.create_model(plugin.NAME, {})
            plan = plugin.export_plan(plugin.NAME, model, ExportOptions(size, size))
        names = set()
        for graph in plan.graphs:
            found = marked(graph.module)
            names |= set(found)
            if plugin is eloftr:  # 4 x (self, cross) layers
                assert len(found["self-attention"]) == len(found["cross-attention"]) == 4
        assert names == expected[plugin.NAME], plugin.NAME
    # the stages that are methods
    from matchrt.plugins.eloftr.model import AggregatedAttentionLayer, ELoFTR
    from matchrt.plugins.roma_plus.model import RomaPlus

    methods = {ELoFTR.confidence: "dual softmax", AggregatedAttentionLayer.both_ways: "cross-attention",
               RomaPlus.after_coarse: "first pass", RomaPlus.upsampling_pass: "upsample pass"}
    assert {getattr(m, "__matchrt_stage__", None) for m in methods} == set(methods.values())


def test_gpu_kernels_are_charged_by_the_device_side_copies_of_the_stage_ranges():
    """As CUDA records them: kernels link to runtime calls, not to ops; ranges are mirrored on the GPU."""
    root = _event(ROOT, 0, 100, id_=1)
    outer = _event(PREFIX + "refiners", 0, 60, id_=2, parent=root)
    inner = _event(PREFIX + "refiner.8", 10, 40, id_=3, parent=outer)
    device = [
        _event(PREFIX + "refiners", 120, 160, cpu=False, kind="gpu_user_annotation"),
        _event(PREFIX + "refiner.8", 121, 140, cpu=False, kind="gpu_user_annotation"),
        _event("conv", 121, 130, cpu=False, linked=777, kind="kernel"),  # no CPU event has id 777
        _event("conv", 131, 139, cpu=False, linked=778, kind="kernel"),
        _event("add", 150, 155, cpu=False, linked=779, kind="kernel"),
        _event("gemm", 170, 180, cpu=False, linked=780, kind="kernel"),
    ]
    total, stages, kernels = analyse([root, outer, inner, *device], runs=1, on_gpu=True)
    rows = {r.name: r for r in stages}
    assert total == pytest.approx(32 / 1000)
    assert rows["refiners"].ms == pytest.approx(22 / 1000)
    assert rows["refiners/refiner.8"].ms == pytest.approx(17 / 1000)
    assert rows[UNMARKED].ms == pytest.approx(10 / 1000)
    assert kernels[0].name == "conv" and kernels[0].stage == "refiners/refiner.8"


def test_device_side_ranges_take_their_nesting_from_the_cpu_side():
    """As seen on an H200: a range's GPU copy spans only the kernels it launched itself, so a wrapper
    stage ("first pass") has none and the same child name under two parents must not merge."""
    root = _event(ROOT, 0, 100, id_=1)
    first = _event(PREFIX + "first pass", 0, 40, id_=2, parent=root)
    r8a = _event(PREFIX + "refiner.8", 1, 20, id_=3, parent=first)
    r4a = _event(PREFIX + "refiner.4", 21, 39, id_=4, parent=first)
    up = _event(PREFIX + "upsample pass", 41, 90, id_=5, parent=root)
    vgg = _event(PREFIX + "encoder.vgg", 42, 50, id_=6, parent=up)
    r8b = _event(PREFIX + "refiner.8", 51, 70, id_=7, parent=up)
    device = [
        _event(PREFIX + "refiner.8", 110, 120, cpu=False, kind="gpu_user_annotation"),
        _event(PREFIX + "refiner.4", 120, 130, cpu=False, kind="gpu_user_annotation"),
        # the upsample pass launched a resize itself, before its encoder: its copy ends there
        _event(PREFIX + "upsample pass", 130, 132, cpu=False, kind="gpu_user_annotation"),
        _event(PREFIX + "encoder.vgg", 132, 140, cpu=False, kind="gpu_user_annotation"),
        _event(PREFIX + "refiner.8", 140, 160, cpu=False, kind="gpu_user_annotation"),
        _event("conv8", 110, 118, cpu=False, linked=901, kind="kernel"),
        _event("conv4", 121, 129, cpu=False, linked=902, kind="kernel"),
        _event("resize", 130, 132, cpu=False, linked=903, kind="kernel"),
        _event("vgg", 133, 139, cpu=False, linked=904, kind="kernel"),
        _event("conv8", 141, 159, cpu=False, linked=905, kind="kernel"),
    ]
    total, stages, kernels = analyse([root, first, r8a, r4a, up, vgg, r8b, *device], runs=1, on_gpu=True)
    rows = {r.name: r.ms * 1000 for r in stages}
    assert rows["first pass"] == pytest.approx(16)
    assert rows["first pass/refiner.8"] == pytest.approx(8)
    assert rows["first pass/refiner.4"] == pytest.approx(8)
    assert rows["upsample pass"] == pytest.approx(2 + 6 + 18)
    assert rows["upsample pass/encoder.vgg"] == pytest.approx(6)
    assert rows["upsample pass/refiner.8"] == pytest.approx(18)
    assert "refiner.8" not in rows and rows.get(UNMARKED, 0.0) == pytest.approx(0)
    assert total == pytest.approx(42 / 1000)


def _trace_event(cat, name, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_trace_regions_charge_kernels_to_the_graph_or_eager_region_that_launched_them():
    """Without stage markers (compiled runs) the chrome trace still says who launched each kernel:
    an Inductor graph call, an AOTInductor package's call, eager code inside a compiled frame, a
    matchrt stage, or nothing; a
    region whose launching ranges hold the CPU longer than its kernels run is called launch-bound."""
    from matchrt.profiler import RegionRow, _launch_bound
    from matchrt.trace_regions import regions

    events = [
        _trace_event("user_annotation", "Torch-Compiled Region: 0/0", 0, 1000),
        _trace_event("user_annotation", "## Call CompiledFxGraph fabcdef0123456789 ##", 10, 100),
        _trace_event("user_annotation", "## Call AOTInductor package m-64x96-fp16-cuda.pt2 ##", 1200, 300),
        _trace_event("cuda_runtime", "cudaGraphLaunch", 1210, 5, corr=6),
        _trace_event("kernel", "triton_per_fused", 1220, 200, tid=9, corr=6),
        _trace_event("user_annotation", "Torch-Compiled Region: 5/0", 200, 600),  # eager split region
        _trace_event("user_annotation", PREFIX + POSTPROCESS, 1100, 50),
        _trace_event("cuda_driver", "cuLaunchKernel", 20, 2, corr=1),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 300, 2, corr=2),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 400, 2, corr=3),
        _trace_event("cuda_runtime", "cudaMemcpyAsync", 1110, 2, corr=4),
        _trace_event("cuda_runtime", "cudaMemcpyAsync", 2000, 2, corr=5),  # outside every range
        _trace_event("kernel", "triton_poi_fused", 30, 80, tid=9, corr=1),
        _trace_event("kernel", "nvjet_gemm", 310, 100, tid=9, corr=2),
        _trace_event("kernel", "pieces_kernel", 410, 20, tid=9, corr=3),
        _trace_event("gpu_memcpy", "Memcpy DtoH", 1115, 10, tid=9, corr=4),
        _trace_event("gpu_memcpy", "Memcpy HtoD", 2005, 40, tid=9, corr=5),
        _trace_event("cpu_op", "aten::mm", 299, 5),  # an op without a region label changes nothing
    ]
    rows = {r.name: r for r in regions(events, runs=2)}
    assert set(rows) == {"compiled graph fabcdef01234", "eager in compiled frame 5/0",
                         "stage " + POSTPROCESS, "eager", "package m-64x96-fp16-cuda.pt2"}
    package = rows["package m-64x96-fp16-cuda.pt2"]  # an AOTInductor package's call (a CUDA-graph replay)
    assert package.gpu_ms == pytest.approx(200 / 2000) and package.span_ms == pytest.approx(200 / 2000)
    frame = rows["eager in compiled frame 5/0"]
    assert frame.gpu_ms == pytest.approx(120 / 2000) and frame.launches == 1.0
    assert frame.cpu_ms == pytest.approx(600 / 2000)  # one range, counted once for both launches
    graph = rows["compiled graph fabcdef01234"]
    assert graph.gpu_ms == pytest.approx(80 / 2000) and graph.cpu_ms == pytest.approx(100 / 2000)
    assert rows["eager"].gpu_ms == pytest.approx(40 / 2000) and rows["eager"].cpu_ms == 0
    assert sum(r.share for r in rows.values()) == pytest.approx(1.0)
    assert _launch_bound(list(rows.values())) == []  # all below 1 ms of CPU here
    # as profiled on an H100 (roma_plus compiled, session 8): DINOv2's eager region, a graph, the inputs
    bound = RegionRow("eager in compiled frame 5/0", gpu_ms=18.9, cpu_ms=47.2, launches=583, share=0.3)
    notes = _launch_bound([bound, RegionRow("compiled graph fan7", 29.5, 31.6, 772, 0.4),
                           RegionRow("eager", 3.5, 0.0, 4, 0.05)])
    assert len(notes) == 1 and notes[0].startswith("eager in compiled frame 5/0") and "launch-bound" in notes[0]


def test_trace_regions_give_the_gpu_span_of_each_call_and_name_the_idle_time():
    """A CUDA-graph replay launches its kernels under one graph call: the span from its first kernel
    to its last, summed over calls, shows the GPU idling between them (launch gaps, memset nodes)."""
    from matchrt.profiler import _idle_inside
    from matchrt.trace_regions import regions

    events = []
    for call, t0 in enumerate((0, 10_000)):  # two profiled pairs, one graph replay each
        events.append(_trace_event("user_annotation", "## Call CompiledFxGraph f0123456789abcdef ##", t0, 50))
        events.append(_trace_event("cuda_runtime", "cudaGraphLaunch", t0 + 10, 30, corr=10 + call))
        # 3 kernels and a memset: 1000 us of work in a 1300 us span (gaps 100, 150, 50 us)
        for begin, dur, cat in ((100, 400, "kernel"), (600, 10, "gpu_memset"), (760, 290, "kernel"),
                                (1100, 300, "kernel")):
            events.append(_trace_event(cat, "k", t0 + begin, dur, tid=9, corr=10 + call))
    events.append(_trace_event("cuda_runtime", "cudaMemcpyAsync", 20_000, 2, corr=99))  # "eager": no span
    events.append(_trace_event("gpu_memcpy", "Memcpy HtoD", 20_005, 40, tid=9, corr=99))
    rows = {r.name: r for r in regions(events, runs=2)}
    graph = rows["compiled graph f0123456789a"]
    assert graph.gpu_ms == pytest.approx(1.0) and graph.span_ms == pytest.approx(1.3) and graph.launches == 4
    assert rows["eager"].span_ms is None
    notes = _idle_inside(list(rows.values()))
    assert len(notes) == 1 and "idles 0.30 ms of its 1.30 ms span" in notes[0]
    back_to_back = [_trace_event("user_annotation", "## Call CompiledFxGraph f0123456789abcdef ##", 0, 50),
                    _trace_event("cuda_runtime", "cudaGraphLaunch", 10, 30, corr=1)]
    back_to_back += [_trace_event("kernel", "k", begin, 300, tid=9, corr=1) for begin in (100, 400, 700)]
    (row,) = regions(back_to_back)
    assert row.span_ms == pytest.approx(row.gpu_ms) and _idle_inside([row]) == []


def test_wall_time_without_the_profiler_comes_from_pairs_after_the_warm_up():
    """The warm-up pairs compile and record CUDA graphs (eloftr compiled: 25.6 ms a warm-up pair against 6.2
    profiled); the figure "without the profiler" must not be theirs."""
    import time
    from types import SimpleNamespace

    from matchrt.profiler import _profile_pipeline

    calls = []

    def run(inputs):
        calls.append(1)
        time.sleep(0.2 if len(calls) <= 3 else 0.002)  # the warm-up pairs are slow
        return {}

    pipe = SimpleNamespace(prepare=lambda a, b: ({}, None), run=run, postprocess=lambda out, ctx: None,
                           stages=[], backend="torch-compile", options={})
    config = ProfileConfig("toy", backend="torch-compile", device="cpu", runs=2, warmup=3)
    report, _ = _profile_pipeline(pipe, config, (None, None), lambda message: None)
    assert len(calls) == 3 + 2 + 2  # warm-up, unprofiled, profiled
    assert report.wall_ms["unprofiled"] < 100
