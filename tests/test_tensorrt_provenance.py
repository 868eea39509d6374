"""TensorRT engine provenance, build cache, profiles and build plans: pure logic, runs on CPU.

Nothing here needs TensorRT: the decisions (may this engine run here? can this build be skipped?
which shapes and flags?) are plain functions of synthetic records and small ONNX graphs.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from matchrt import engine as eng
from matchrt.backends import tensorrt_backend as trb
from matchrt.engine import GraphInput, Profile, layer_matches, parse_size, plan_build, resolve_profiles
from matchrt.errors import MatchrtError
from matchrt.provenance import (
    build_inputs,
    cache_decision,
    check_compatible,
    compatibility_problems,
    provenance_path,
    read_provenance,
    rebuild_command,
    write_provenance,
)
from matchrt.types import InputContract
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

# plugins still being written may fail to load in a host made here; that is not what these tests test
pytestmark = pytest.mark.filterwarnings("ignore:matchrt plugin")

H100 = {"tensorrt": "10.13.0.35", "cuda": "12.9", "driver": "575.57", "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0"}


def record(**changes):
    rec = {
        "schema": 1,
        "engine": "m.engine",
        "onnx": {"path": "/models/m.onnx", "file": "m.onnx", "sha256": "a" * 64},
        "matcher": "eloftr", "matcher_version": "1",
        "build": {"precision": "fp16", "strongly_typed": False, "autocast": False, "tf32": True,
                  "profiles": {"image0": {"min": [1, 1, 320, 320], "opt": [1, 1, 320, 320],
                                          "max": [1, 1, 320, 320]}},
                  "fp32_layers": ["/coarse_matching/*"], "workspace_gb": 8.0, "opt_level": 3,
                  "sizes": {"min": None, "opt": None, "max": None}},
        "environment": dict(H100),
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            rec[section] = dict(rec[section], **{field: value})
        else:
            rec[section] = value
    return rec


# --- may this engine run here? ----------------------------------------------------------------------------
def test_same_machine_is_compatible():
    assert compatibility_problems(record(), H100) == []
    # the CUDA runtime and driver versions do not bind an engine
    assert compatibility_problems(record(), dict(H100, cuda="12.4", driver="550.1")) == []


@pytest.mark.parametrize("key,value,label", [
    ("gpu", "NVIDIA A100-SXM4-80GB", "GPU"),
    ("compute_capability", "8.0", "compute capability"),
    ("tensorrt", "10.8.0.43", "TensorRT version"),
])
def test_mismatch_is_reported(key, value, label):
    problems = compatibility_problems(record(), dict(H100, **{key: value}))
    assert len(problems) == 1
    assert label in problems[0] and str(H100[key]) in problems[0] and value in problems[0]


def test_unknown_values_are_not_held_against_the_engine():
    assert compatibility_problems(record(), dict(H100, gpu=None)) == []


def test_refusal_names_the_rebuild_command(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    write_provenance(engine, record())
    assert provenance_path(engine).name == "m.engine.json"
    with pytest.raises(MatchrtError) as exc:
        check_compatible(engine, read_provenance(engine), dict(H100, compute_capability="8.9",
                                                               gpu="NVIDIA L4"))
    text = str(exc.value)
    assert "compute capability" in text and "8.9" in text and "NVIDIA L4" in text
    assert f"matchrt build --onnx /models/m.onnx --output {engine} --precision fp16" in text
    assert text.rstrip().endswith("--force")
    check_compatible(engine, None, H100)  # no record: nothing to compare, TensorRT decides


def test_session_refuses_before_tensorrt_reads_the_engine(tmp_path, monkeypatch):
    """The check runs before `import tensorrt` in the session, so it works on any machine."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"garbage that TensorRT would fail to deserialise")
    write_provenance(engine, record())
    monkeypatch.setattr(trb, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trb, "current_environment", lambda device=0: dict(H100, tensorrt="11.0.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it now would raise ImportError
    with pytest.raises(MatchrtError, match="(?s)TensorRT version: engine built for 10.13.0.35.*--force"):
        trb.TensorRTSession(engine, {"device": "cuda"})


def test_rebuild_command_keeps_the_settings():
    rec = record(build__strongly_typed=True, build__precision="bf16", build__opt_level=5,
                 build__sizes={"min": [320, 320], "opt": [480, 640], "max": [640, 640]})
    cmd = rebuild_command(rec, "out/m.engine")
    assert cmd.startswith("matchrt build --onnx /models/m.onnx --output out/m.engine --precision bf16")
    for part in ("--strongly-typed", "--opt-level 5", "--min-size 320x320", "--opt-size 480x640",
                 "--max-size 640x640", "--workspace 8"):
        assert part in cmd


# --- can this build be skipped? ------------------------------------------------------------------------------
def test_identical_inputs_skip_the_build():
    assert cache_decision(record(), record(), engine_exists=True) is None
    # JSON round trips (tuples become lists) and key order do not count as changes
    again = json.loads(json.dumps(record()))
    again["build"] = dict(reversed(list(again["build"].items())))
    assert cache_decision(record(), again) is None
    # neither do the things that do not change the engine
    assert cache_decision(record(), record(environment=dict(H100, driver="999"), matcher_version="2")) is None


@pytest.mark.parametrize("changes,field", [
    ({"build__precision": "fp32"}, "precision"),
    ({"build__fp32_layers": []}, "fp32_layers"),
    ({"build__opt_level": 5}, "opt_level"),
    ({"build__workspace_gb": 4.0}, "workspace_gb"),
    ({"onnx__sha256": "b" * 64}, "onnx_sha256"),
    ({"environment__tensorrt": "10.14.1"}, "tensorrt"),
    ({"environment__gpu": "NVIDIA H200"}, "gpu"),
])
def test_changed_inputs_rebuild(changes, field):
    reason = cache_decision(record(), record(**changes))
    assert reason is not None and field in reason
    assert build_inputs(record())[field] != build_inputs(record(**changes))[field]


def test_missing_engine_or_record_builds():
    assert cache_decision(record(), record(), engine_exists=False) == "no engine yet"
    assert "no provenance" in cache_decision(None, record())


# --- shapes ------------------------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("480x640") == (480, 640)
    assert parse_size("480,640") == (480, 640)
    assert parse_size("512") == (512, 512)
    assert parse_size((32, 64)) == (32, 64)
    assert parse_size(None) is None
    for bad in ("480x", "axb", "0x10", "1x2x3"):
        with pytest.raises(MatchrtError):
            parse_size(bad)


STATIC = [GraphInput("image0", (1, 1, 320, 320)), GraphInput("image1", (1, 1, 320, 320))]
DYNAMIC = [GraphInput("image0", ("batch", 1, "height", "width")),
           GraphInput("image1", ("batch", 1, "height", "width")),
           GraphInput("prior", ("batch", 2, "height", "width"))]


def test_fixed_graph_profiles():
    p = resolve_profiles(STATIC)
    assert p == {n: Profile((1, 1, 320, 320), (1, 1, 320, 320), (1, 1, 320, 320)) for n in ("image0", "image1")}
    assert not any(v.dynamic for v in p.values())
    with pytest.raises(MatchrtError, match="fixed size 320x320"):
        resolve_profiles(STATIC, opt_size="480x640")


def test_dynamic_graph_profiles_from_sizes():
    p = resolve_profiles(DYNAMIC, min_size="224x224", opt_size="480x640", max_size="640x832", batch=2)
    assert p["image0"] == Profile((2, 1, 224, 224), (2, 1, 480, 640), (2, 1, 640, 832))
    assert p["image1"] == p["image0"]
    # the symbols learnt from the images fill the other input
    assert p["prior"] == Profile((2, 2, 224, 224), (2, 2, 480, 640), (2, 2, 640, 832))
    only_opt = resolve_profiles(DYNAMIC, opt_size=(480, 640))
    assert only_opt["image0"].min == only_opt["image0"].opt == only_opt["image0"].max == (1, 1, 480, 640)


def test_dynamic_graph_defaults_and_contract_checks():
    contract = InputContract(channels=1, side_multiple=32, default_height=480, default_width=640)
    p = resolve_profiles(DYNAMIC, contract=contract)
    assert p["image0"].opt == (1, 1, 480, 640)
    assert resolve_profiles(DYNAMIC, default_size=(320, 320), contract=contract)["image0"].opt == (1, 1, 320, 320)
    with pytest.raises(MatchrtError, match="multiple of 32"):
        resolve_profiles(DYNAMIC, opt_size="480x630", contract=contract)
    with pytest.raises(MatchrtError, match="min <= opt <= max"):
        resolve_profiles(DYNAMIC, min_size="640x640", opt_size="480x640")
    with pytest.raises(MatchrtError, match="--opt-size"):
        resolve_profiles(DYNAMIC)
    square = InputContract(1, 14, 560, 560, square=True)
    with pytest.raises(MatchrtError, match="square"):
        resolve_profiles(DYNAMIC, opt_size="560x644", contract=square)


def test_unresolvable_inputs_need_explicit_shapes():
    inputs = [GraphInput("tokens", (1, "n", 256))]
    with pytest.raises(MatchrtError, match="tokens"):
        resolve_profiles(inputs)
    p = resolve_profiles(inputs, shapes={"tokens": ((1, 16, 256), (1, 64, 256), (1, 128, 256))})
    assert p["tokens"] == Profile((1, 16, 256), (1, 64, 256), (1, 128, 256))
    with pytest.raises(MatchrtError, match="fixed at 256"):
        resolve_profiles(inputs, shapes={"tokens": ((1, 16, 255), (1, 64, 256), (1, 128, 256))})
    with pytest.raises(MatchrtError, match="unknown inputs"):
        resolve_profiles(inputs, shapes={"tokens": ((1, 1, 256),) * 3, "other": ((1,),) * 3})


# --- fp32 layers ------------------------------------------------------------------------------------------------
def test_layer_patterns_follow_the_parser_naming():
    pats = ["/coarse_matching/*", "/loftr_coarse/*/norm*", "/fine/Softmax"]
    assert layer_matches("/coarse_matching/Softmax", pats)
    assert layer_matches("/loftr_coarse/layers.0/norm1/LayerNormalization", pats)
    assert layer_matches("/fine/Softmax", pats) and layer_matches("/fine/Softmax_3", pats)
    assert not layer_matches("/fine/Softmax2", pats)
    assert not layer_matches("/backbone/conv1/Conv", pats)
    assert not layer_matches("(Unnamed Layer* 12) [Shuffle]", pats)


# --- build plans ------------------------------------------------------------------------------------------------
def _graph(tmp_path, dynamic=False, fp32_layers=("/head/*",), extra_meta=None):
    dims = ["batch", 1, "height", "width"] if dynamic else [1, 1, 64, 96]
    nodes = [h.make_node("Conv", ["image0", "w"], ["f"], name="/backbone/Conv"),
             h.make_node("Softmax", ["f"], ["scores"], name="/head/Softmax", axis=1)]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("image0", T.FLOAT, dims)],
                         [h.make_tensor_value_info("scores", T.FLOAT, None)],
                         [nh.from_array(np.ones((2, 1, 1, 1), np.float32), "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    for k, v in {"matchrt.matcher": "toy", "matchrt.version": "3", "matchrt.stage": "main",
                 "matchrt.input_size": json.dumps([64, 96]),
                 "matchrt.fp32_layers": json.dumps(list(fp32_layers)), **(extra_meta or {})}.items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path / "toy.onnx"
    onnx.save(model, str(path))
    return path


def test_plan_reads_metadata_and_chooses_flags(tmp_path):
    path = _graph(tmp_path)
    plan = plan_build(path, precision="fp16", fp32_layers=["/extra/*", "/head/*"])
    assert plan.output == tmp_path / "toy.engine"
    assert plan.fp32_layers == ["/head/*", "/extra/*"]  # metadata first, no duplicates
    assert not plan.strongly_typed and not plan.autocast and plan.tf32 and not plan.dynamic
    assert plan.profiles["image0"].opt == (1, 1, 64, 96)
    rec = plan.record({"tensorrt": "10.13", "gpu": "G", "compute_capability": "9.0"}, "c" * 64)
    assert (rec["matcher"], rec["matcher_version"], rec["stage"]) == ("toy", "3", "main")
    assert rec["build"]["fp32_layers"] == ["/head/*", "/extra/*"]
    assert cache_decision(rec, plan.record(rec["environment"], "c" * 64)) is None

    fp32 = plan_build(path, precision="fp32")
    assert fp32.fp32_layers == [] and fp32.tf32 is False  # fp32 engines meet the fp32 tolerance
    # TensorRT 11 has no precision flags: reduced precision goes strongly typed through AutoCast
    t11 = plan_build(path, precision="fp16", weak_typing=False)
    assert t11.strongly_typed and t11.autocast
    assert not plan_build(path, precision="fp32", weak_typing=False).autocast
    with pytest.raises(MatchrtError, match="precision"):
        plan_build(path, precision="int8")
    with pytest.raises(MatchrtError, match="opt-level"):
        plan_build(path, opt_level=7)
    with pytest.raises(MatchrtError, match="does not exist"):
        plan_build(tmp_path / "missing.onnx")


def test_graph_can_forbid_tf32_in_reduced_precision_engines(tmp_path):
    """roma_plus's strict coarse stage: its fp32 layers must be IEEE fp32, also in fp16 engines."""
    path = _graph(tmp_path, extra_meta={"matchrt.tf32": "false"})
    plan = plan_build(path, precision="fp16")
    assert plan.tf32 is False
    assert "--noTF32" in eng.trtexec_command(plan)
    assert plan_build(path, precision="fp16", tf32=True).tf32 is True  # the user's word wins
    assert plan_build(_graph(tmp_path, extra_meta={"matchrt.tf32": "true"}), precision="fp32").tf32 is False
    with pytest.raises(MatchrtError, match="matchrt.tf32"):
        plan_build(_graph(tmp_path, extra_meta={"matchrt.tf32": "maybe"}), precision="fp16")


def test_trtexec_command(tmp_path):
    static = plan_build(_graph(tmp_path), precision="fp16", timing_cache=tmp_path / "t.cache",
                        workspace_gb=4, opt_level=5)
    cmd = eng.trtexec_command(static, ["/head/Softmax"])
    for part in (f"--onnx={tmp_path / 'toy.onnx'}", f"--saveEngine={tmp_path / 'toy.engine'}", "--fp16",
                 "--precisionConstraints=obey", "--layerPrecisions=/head/Softmax:fp32",
                 "--memPoolSize=workspace:4096M", "--builderOptimizationLevel=5",
                 f"--timingCacheFile={tmp_path / 't.cache'}"):
        assert part in cmd
    assert "Shapes" not in cmd and "--noTF32" not in cmd

    dyn_path = _graph(tmp_path, dynamic=True)
    dyn = plan_build(dyn_path, precision="fp32", min_size="32x32", opt_size="64x96", max_size="128x128")
    cmd = eng.trtexec_command(dyn)
    assert "--minShapes=image0:1x1x32x32" in cmd and "--optShapes=image0:1x1x64x96" in cmd
    assert "--maxShapes=image0:1x1x128x128" in cmd and "--noTF32" in cmd and "--fp16" not in cmd
    strong = plan_build(dyn_path, precision="fp16", strongly_typed=True, opt_size="64x96")
    assert "--stronglyTyped" in eng.trtexec_command(strong, ["/head/Softmax"])
    assert "--layerPrecisions" not in eng.trtexec_command(strong, ["/head/Softmax"])


# --- the backend without TensorRT -------------------------------------------------------------------------------
def test_without_tensorrt_the_backend_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(eng, "tensorrt_module", lambda: None)
    monkeypatch.setattr(trb, "tensorrt_module", lambda: None)
    reason = trb.unavailable()
    assert reason is not None and "pip install 'matchrt[tensorrt]'" in reason and "NVIDIA GPU" in reason
    with pytest.raises(MatchrtError, match=r"matchrt\[tensorrt\]"):
        eng.build_engine(_graph(tmp_path))

    from matchrt.host import create_host

    host = create_host()
    info = host.backends()["tensorrt"]
    assert info.artifact == "engine" and set(info.precisions) == {"fp32", "fp16", "bf16"}
    with pytest.raises(MatchrtError, match=r"not usable here.*matchrt\[tensorrt\]"):
        host.backend("tensorrt")


def test_stub_only_tensorrt_is_not_tensorrt(tmp_path, monkeypatch):
    """tensorrt-stubs installed without TensorRT leaves an importable, empty namespace package."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.modules.pop("tensorrt", None)
    try:
        import tensorrt  # noqa: F401 - the namespace package imports fine

        assert eng.tensorrt_module() is None
    finally:  # later tests must not find the empty package
        sys.modules.pop("tensorrt", None)
        if saved is not None:
            sys.modules["tensorrt"] = saved


def test_cli_options_map_onto_build_engine():
    opts = trb.engine_options({"precision": "bf16", "strongly_typed": True, "workspace_gb": 2.0,
                               "opt_level": 0, "min_size": "32x32", "opt_size": None, "max_size": "64x64",
                               "timing_cache": "/tmp/t.cache", "force": True,
                               "fp32_layers": ["/a/*"], "matcher": "no-such-matcher"})
    assert opts["precision"] == "bf16" and opts["strongly_typed"] is True
    assert opts["workspace_gb"] == 2.0 and opts["opt_level"] == 0 and opts["force"] is True
    assert opts["min_size"] == "32x32" and opts["max_size"] == "64x64"
    assert opts["fp32_layers"] == ["/a/*"] and opts["contract"] is None
    assert trb.engine_options({})["precision"] == "fp16" and trb.engine_options({})["opt_level"] == 3
