"""AOTInductor packages end to end on CPU with the toy plugin: build, load in a new process, reuse,
--force, refusal on another machine's package, the precision policy, match/check/bench.

One real CPU compile (the module fixture, ~10-30 s on 2 cores) serves every test here; the
multi-stage bf16 build is marked slow, the CUDA one needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from matchrt.cli import app
from matchrt.errors import MatchrtError
from matchrt.host import get_host
from matchrt.package import (
    check_package,
    export_program,
    package_cache_decision,
    package_problems,
    package_rebuild_command,
)
from matchrt.provenance import provenance_path, read_provenance, write_provenance
from matchrt.runner import open_pipeline
from matchrt.types import GraphSpec
from matchrt.weights import write_random_checkpoint

from toy_plugin import LAYOUT, ToyPlugin

pytestmark = pytest.mark.filterwarnings("ignore:matchrt plugin", "ignore::FutureWarning")
CHILD = Path(__file__).parent / "package_child.py"
OUTPUTS = ("keypoints0", "keypoints1", "confidence", "valid")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy():
    with get_host().plugin(ToyPlugin(), "toy"):
        yield


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory):
    """A real fp32 CPU package of the toy matcher, named as the bench names its packages."""
    work = tmp_path_factory.mktemp("inductor")
    ckpt = write_random_checkpoint(LAYOUT, work / "toy.ckpt", lightning=True)
    path = work / "toy-64x96-fp32-cpu.pt2"
    start = time.perf_counter()
    # no --backend: -m without --onnx builds an inductor package; on CPU the default precision is fp32
    r = invoke("build", "-m", "toy", "-c", ckpt, "--device", "cpu", "-o", path)
    assert r.exit_code == 0, r.output
    return SimpleNamespace(dir=work, ckpt=ckpt, path=path, seconds=time.perf_counter() - start,
                           output=r.output)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(1, 1, 64, 96, generator=g) for n in ("image0", "image1")}


def test_build_writes_package_provenance_and_manifest(built):
    assert built.path.exists() and "wrote" in built.output
    record = read_provenance(built.path)
    assert record["matcher"] == "toy" and record["stage"] == "main"
    assert record["build"]["precision"] == "fp32" and record["build"]["device"] == "cpu"
    assert record["build"]["tf32"] is False
    assert record["environment"]["torch"] == torch.__version__ and record["environment"]["vec_isa"]
    assert len(record["weights"]["checkpoint"]["sha256"]) == 64
    assert len(record["plugin"]["source_sha256"]) == 64
    assert record["package_sha256"] and record["bytes"] == built.path.stat().st_size
    assert record["rebuild"].startswith(f"matchrt build -m toy -c {built.ckpt.resolve()}")
    assert f"--precision fp32 --device cpu -o {built.path}" in record["rebuild"]
    manifest = json.loads((built.dir / (built.path.name + ".matchrt.json")).read_text())
    assert manifest["backend"] == "inductor" and manifest["stages"][0]["file"] == built.path.name
    assert manifest["input_size"] == [64, 96] and manifest["device"] == "cpu"
    assert not list(built.dir.glob("*partial*")), "no temporary file is left behind"


def test_package_runs_in_a_new_process_like_eager_fp32(built, tmp_path):
    inputs = _inputs()
    torch.save(inputs, tmp_path / "in.pt")
    r = subprocess.run([sys.executable, str(CHILD), str(built.path), str(tmp_path / "in.pt"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, env=dict(os.environ),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    child = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = open_pipeline("toy", "torch", {"checkpoint": built.ckpt}).run(inputs)
    for name in OUTPUTS:
        torch.testing.assert_close(child["outputs"][name], ref[name], rtol=1e-4, atol=1e-5)
    assert child["dtypes"]["confidence"] == "torch.float32" and child["dtypes"]["valid"] == "torch.bool"
    assert child["load_s"] < 10.0, f"loading took {child['load_s']:.1f} s"
    print(f"\nCPU toy package: build {built.seconds:.1f} s, {built.path.stat().st_size / 1e6:.1f} MB, "
          f"load in a new process {child['load_s'] * 1000:.0f} ms, run {child['run_ms']:.2f} ms")


def test_profiles_charge_the_package_s_kernels_to_its_call(built):
    """A package's call is a named profiler range, so `matchrt profile` charges its kernels to the
    package (trace_regions: ``package <file>``) instead of to eager code."""
    from matchrt.backends.inductor_backend import InductorSession
    from matchrt.trace_regions import _label

    session = InductorSession(built.path, {"device": "cpu"})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        session.run(_inputs())
    names = {e.name for e in prof.events()}
    ranges = [n for n in names if _label(n) == f"package {built.path.name}"]
    assert ranges, sorted(names)[:20]


def test_loading_skips_torchs_cpu_isa_probe(built, monkeypatch):
    """Loading a package does not run torch's CPU vector-ISA probe (child Python processes that
    each import torch: 47 s before the first load in a process on the lent H100)."""
    import torch._inductor.cpu_vec_isa as isa
    from matchrt.backends.inductor_backend import InductorSession

    def probe(*args, **kwargs):
        raise AssertionError("the ISA probe ran")

    monkeypatch.setattr(isa, "pick_vec_isa", probe)
    monkeypatch.setattr(isa, "valid_vec_isa_list", probe)
    session = InductorSession(built.path, {"device": "cpu"})
    out = session.run(_inputs())
    assert set(OUTPUTS) <= set(out)


def test_match_and_check_pick_the_backend_from_the_suffix(built, tmp_path, image_pair):
    out = tmp_path / "out"
    r = invoke("match", *image_pair, "--engine", built.path, "--output-dir", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "matches.json").read_text())["metadata"]["backend"] == "inductor"
    r = invoke("check", *image_pair, "--engine", built.path, "-c", built.ckpt)
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in OUTPUTS) and "(tol 0.0001)" in r.output


def test_second_build_is_a_no_op_and_force_rebuilds(built, monkeypatch):
    before = read_provenance(built.path)
    mtime = built.path.stat().st_mtime_ns
    r = invoke("build", "-m", "toy", "-c", built.ckpt, "--backend", "inductor", "--precision", "fp32",
               "--device", "cpu", "-o", built.path)
    assert r.exit_code == 0, r.output
    assert "up to date" in r.output and built.path.stat().st_mtime_ns == mtime
    assert read_provenance(built.path)["built_at"] == before["built_at"]

    # --force compiles again; the compiler is replaced by a copy of the existing package, so this
    # checks the decision and the atomic replacement, not torch (the fixture compiled for real)
    import torch._inductor

    calls = []
    original = built.path.read_bytes()

    def fake_compile(program, package_path, inductor_configs):
        calls.append(inductor_configs)
        Path(package_path).write_bytes(original)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    # what a build killed half-way left (its process is gone) is cleaned up by the next build
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = built.dir / f".{built.path.stem}.{dead}.partial.pt2"
    stale.write_bytes(b"half a package")
    r = invoke("build", "-m", "toy", "-c", built.ckpt, "--backend", "inductor", "--precision", "fp32",
               "--device", "cpu", "-o", built.path, "--force")
    assert r.exit_code == 0, r.output
    assert "forced" in r.output and len(calls) == 1
    assert json.loads(calls[0]["aot_inductor.metadata"]["matchrt.outputs"]) == list(OUTPUTS)
    after = read_provenance(built.path)
    assert after["built_at"] >= before["built_at"] and after["package_sha256"] == before["package_sha256"]
    assert not stale.exists() and not list(built.dir.glob(".*partial*"))


def test_a_graph_s_inductor_settings_reach_the_compiler_and_the_record(built, tmp_path, monkeypatch):
    """A plugin's GraphSpec names the Inductor settings its graph needs (roma_plus's split products:
    emulate_precision_casts); the builder passes them on, records them (so the rebuild command and
    the package's identity carry them), and a setting the user gives wins over the graph's."""
    import torch._inductor

    from matchrt.package import build_package, package_context

    calls = []

    def fake_compile(program, package_path, inductor_configs):
        calls.append(dict(inductor_configs))
        Path(package_path).write_bytes(b"package")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    module = torch.nn.Linear(4, 2).eval()
    graph = GraphSpec("main", module, (torch.rand(3, 4),), ["x"], ["y"],
                      inductor_configs={"emulate_precision_casts": True, "max_autotune": False})
    out = tmp_path / "linear.pt2"
    context = package_context(get_host(), "toy", {"checkpoint": built.ckpt}, [module], {}, 64, 96, out)
    build_package(graph, out, context, device="cpu", inductor_configs={"max_autotune": True})
    assert calls[0]["emulate_precision_casts"] is True and calls[0]["max_autotune"] is True
    record = read_provenance(out)
    assert record["build"]["inductor_configs"] == {"emulate_precision_casts": True, "max_autotune": True}
    assert "--inductor-config emulate_precision_casts=" in record["rebuild"]


def test_package_from_another_torch_or_device_is_refused_before_loading(built, tmp_path, monkeypatch):
    import shutil

    import torch._inductor

    def must_not_load(*args, **kwargs):
        raise AssertionError("torch was asked to load a refused package")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", must_not_load)
    foreign = tmp_path / built.path.name  # another machine's package, copied with its manifest
    shutil.copy(built.path, foreign)
    shutil.copy(built.dir / (built.path.name + ".matchrt.json"), tmp_path)
    record = read_provenance(built.path)
    record["environment"]["torch"] = "2.99.0+cu999"
    write_provenance(foreign, record)
    import cv2
    import numpy as np

    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.full((64, 96), 128, np.uint8))
    r = invoke("match", tmp_path / "a.png", tmp_path / "b.png", "--engine", foreign)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "torch: package built for 2.99.0+cu999, this machine has " + torch.__version__ in text
    assert "matchrt build -m toy -c" in text and text.endswith("--force")

    record["environment"]["torch"] = torch.__version__
    record["build"]["device"] = "cuda"
    record["environment"].update(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    gpu_env = dict(record["environment"], gpu="NVIDIA L4", compute_capability="8.9")
    problems = package_problems(record, gpu_env)
    assert any("compute capability: package built for 9.0, this machine has 8.9" in p for p in problems)
    assert any("GPU: package built for NVIDIA H100" in p for p in problems)
    if not torch.cuda.is_available():
        write_provenance(foreign, record)
        with pytest.raises(MatchrtError, match="runs on a CUDA GPU, and torch sees none here"):
            open_pipeline(None, "inductor", artifact=foreign)
    cpu_record = read_provenance(built.path)
    other_cpu = dict(cpu_record["environment"], cpu="Some Other CPU", vec_isa="avx2")
    with pytest.raises(MatchrtError, match="(?s)CPU: package built for.*--device cpu"):
        check_package(foreign, cpu_record, other_cpu)


def test_cache_decision_names_what_changed(built):
    record = read_provenance(built.path)
    assert package_cache_decision(record, json.loads(json.dumps(record))) is None

    def changed(section, key, value):
        other = json.loads(json.dumps(record))
        other[section][key] = value
        return package_cache_decision(record, other)

    assert "precision" in changed("build", "precision", "bf16")
    assert "options" in changed("build", "options", {"max_matches": 8})
    assert "torch" in changed("environment", "torch", "2.11.0+cu130")
    assert "weights_sha256" in changed("weights", "checkpoint", {"sha256": "0" * 64})
    assert "plugin_sha256" in changed("plugin", "source_sha256", "1" * 64)
    assert changed("environment", "driver", "999") is None  # not part of what binds a package
    assert package_cache_decision(record, record, package_exists=False) == "no package yet"
    assert "no provenance" in package_cache_decision(None, record)
    cmd = package_rebuild_command(dict(record, random_weights=True, weights={
        "checkpoint": {"path": "/x/toy-random.pt", "sha256": "a", "random": True}}), "o.pt2")
    assert "--random-weights" in cmd and "-c" not in cmd.split()


def test_cli_refuses_mixed_up_build_inputs(toy, tmp_path, built):
    r = invoke("build", "--onnx", tmp_path / "m.onnx", "--backend", "inductor")
    assert r.exit_code == 2 and "builds from the torch model" in r.output
    r = invoke("build", "--onnx", tmp_path / "m.onnx", "-c", built.ckpt)
    assert r.exit_code == 2 and "--checkpoint belong to --backend inductor" in " ".join(r.output.split())
    r = invoke("build", "-m", "toy", "--backend", "tensorrt")
    assert r.exit_code == 2 and "matchrt export" in r.output
    r = invoke("build", "-m", "toy", "-c", built.ckpt, "--precision", "fp16", "--device", "cpu",
               "-o", tmp_path / "t.pt2")
    assert r.exit_code == 2 and "fp16 packages are for CUDA GPUs" in r.output
    r = invoke("build", "-m", "toy", "-c", built.ckpt, "-o", tmp_path / "t.engine")
    assert r.exit_code == 2 and "must end in .pt2" in " ".join(r.output.split())
    assert not list(tmp_path.glob("*.pt2"))


def test_cuda_graphs_of_a_cpu_package_are_refused(built):
    from matchrt.backends.inductor_backend import InductorSession

    with pytest.raises(MatchrtError, match="CUDA graphs need a CUDA package"):
        InductorSession(built.path, {"cuda_graph": True})


def test_reduced_precision_keeps_autocast_off_regions_fp32():
    """bf16 on CPU: the wrapper's autocast is captured in the program, and a region the plugin runs
    under roma's `strict_fp32` stays float32 after decomposition (what Inductor compiles)."""
    from matchrt.plugins.roma_full.ops import strict_fp32

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            with strict_fp32(x.device.type):
                z = self.b(y.float())
            return y, z

    graph = GraphSpec("main", Mixed().eval(), (torch.rand(2, 8),), ["x"], ["y", "z"])
    program = export_program(graph, "bf16", torch.device("cpu")).run_decompositions()
    mms = [n for n in program.graph.nodes if n.op == "call_function" and "addmm" in str(n.target)]
    assert [n.meta["val"].dtype for n in mms] == [torch.bfloat16, torch.float32]
    outputs = [a.meta["val"].dtype for a in next(iter(reversed(program.graph.nodes))).args[0]]
    assert outputs == [torch.float32, torch.float32]  # the packages speak float32
    fp32 = export_program(graph, "fp32", torch.device("cpu")).run_decompositions()
    assert all(n.meta["val"].dtype == torch.float32 for n in fp32.graph.nodes
               if n.op == "call_function" and "addmm" in str(n.target))


def test_bench_reuses_the_package_and_reports_load_as_setup(built, tmp_path, image_pair):
    out_json = tmp_path / "bench.json"
    r = invoke("bench", "--matcher", "toy", "--backend", "torch,inductor,inductor-cudagraph",
               "--precision", "fp32,fp16", "--synthetic", "1", "--images", image_pair[0], "--runs", "2",
               "--warmup", "1", "--device", "cpu", "-c", built.ckpt, "--json", out_json,
               "--workdir", built.dir, "--markdown", tmp_path / "b.md")
    assert r.exit_code == 0, r.output
    rows = {(x["backend"], x["precision"]): x for x in json.loads(out_json.read_text())["rows"]}
    pkg = rows[("inductor", "fp32")]
    assert pkg["status"] == "ok", pkg["reason"]
    assert pkg["match_agreement"] == 1.0
    assert pkg["build_s"] < built.seconds and pkg["setup_s"] < 10  # the fixture's package, reused
    assert "CUDA" in rows[("inductor-cudagraph", "fp32")]["reason"]
    assert rows[("inductor", "fp16")]["status"] == "skipped"
    assert "| toy | inductor | fp32 |" in (tmp_path / "b.md").read_text()


@pytest.mark.slow
def test_two_stage_bf16_package_matches_eager_within_tolerance(toy, tmp_path):
    """gp_solve=exact-like sequences: one package per stage, the bridge between them in Python."""
    ckpt = write_random_checkpoint(LAYOUT, tmp_path / "toy.ckpt", lightning=True)
    out = tmp_path / "toy2.pt2"
    r = invoke("build", "-m", "toy", "-c", ckpt, "-O", "stages=2", "--precision", "bf16", "--device",
               "cpu", "-o", out)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "toy2.encode.pt2").exists() and (tmp_path / "toy2.match.pt2").exists()
    inputs = _inputs(1)
    seq = open_pipeline(None, "inductor", artifact=out).run(inputs)
    ref = open_pipeline("toy", "torch", {"checkpoint": ckpt}, extra={"stages": 2}).run(inputs)
    assert seq["confidence"].dtype == torch.float32
    torch.testing.assert_close(seq["confidence"], ref["confidence"], rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_package_with_and_without_cuda_graphs(toy, tmp_path):
    from matchrt.runner import artifact_pipeline

    ckpt = write_random_checkpoint(LAYOUT, tmp_path / "toy.ckpt", lightning=True)
    out = tmp_path / "toy-cuda.pt2"
    r = invoke("build", "-m", "toy", "-c", ckpt, "--precision", "fp16", "--device", "cuda", "-o", out)
    assert r.exit_code == 0, r.output
    record = read_provenance(out)
    assert record["build"]["device"] == "cuda" and record["environment"]["compute_capability"]
    ref = open_pipeline("toy", "torch", {"checkpoint": ckpt}, backend_options={"device": "cuda"})
    plain = artifact_pipeline(get_host(), out, "inductor", {"device": "cuda"})
    graphed = artifact_pipeline(get_host(), out, "inductor", {"device": "cuda", "cuda_graph": True})
    for seed in (0, 1, 2):  # new inputs each time: the graph's static buffers must follow
        inputs = _inputs(seed)
        want = ref.run(inputs)
        for pipe in (plain, graphed):
            got = pipe.run(inputs)
            assert got["confidence"].dtype == torch.float32 and got["confidence"].is_cuda
            torch.testing.assert_close(got["confidence"], want["confidence"], rtol=1e-2, atol=1e-2)
    record["environment"]["compute_capability"] = "1.0"
    write_provenance(out, record)
    with pytest.raises(MatchrtError, match="compute capability: package built for 1.0"):
        artifact_pipeline(get_host(), out, "inductor", {"device": "cuda"})
    assert provenance_path(out).exists()


def test_first_load_is_checked_in_a_child_and_a_crashing_loader_is_an_error(built, tmp_path, monkeypatch):
    """As on the H200s (torch 2.11): the loader segfaults. The user gets an error naming the crash and
    the backend to use instead, not a dead process; a load that passed once is not checked again."""
    import matchrt.package_load_check as load_check
    from matchrt.backends.inductor_backend import InductorSession

    monkeypatch.setenv("MATCHRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(load_check.ENV, "always")  # CUDA packages only by default; the fixture's is a CPU one
    crash = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    monkeypatch.setattr(load_check, "CHILD_CODE", crash)
    with pytest.raises(MatchrtError, match="(?s)loader crashed \\(SIGSEGV\\).*--backend torch-compile"):
        InductorSession(built.path, {"device": "cpu"})
    assert not list((tmp_path / "cache").rglob("*.ok"))  # a crash is not remembered as a pass

    monkeypatch.undo()
    monkeypatch.setenv("MATCHRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(load_check.ENV, "always")
    session = InductorSession(built.path, {"device": "cpu"})  # a real child load, then this process
    assert len(list((tmp_path / "cache").rglob("*.ok"))) == 1
    assert session.run(_inputs())["valid"].shape[0] == 1

    def no_child(*args, **kwargs):
        raise AssertionError("the check ran again for a package that loaded here before")

    monkeypatch.setattr(load_check.subprocess, "run", no_child)
    InductorSession(built.path, {"device": "cpu"})
    monkeypatch.setenv(load_check.ENV, "0")
    assert not load_check.wanted("cuda")


def _build_with(compiler_setting, built, tmp_path, *extra):
    """Build the toy package into tmp_path with inductor's configured compiler set to `compiler_setting`."""
    import torch._inductor.config as inductor_config

    out = tmp_path / "toy-64x96-fp32-cpu.pt2"
    with inductor_config.patch({"cpp.cxx": (None, compiler_setting)}):
        r = invoke("build", "-m", "toy", "-c", built.ckpt, "--device", "cpu", "-o", out, *extra)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_a_compiler_that_links_libstdcxx_statically_is_replaced(built, tmp_path, monkeypatch):
    """The GPU machines' failure, on CPU: CXX links libstdc++ into the package, which then crashed
    every load. The build notices, builds with the system compiler instead, and the package loads
    in a child process (the check that turned the old crash into an error)."""
    import matchrt.package_load_check as load_check
    from cxx_helpers import static_libstdcxx_compiler

    from matchrt.backends.inductor_backend import InductorSession

    bad = static_libstdcxx_compiler(tmp_path)
    out, output = _build_with(bad, built, tmp_path)
    record = read_provenance(out)
    assert record["build"]["cxx"] != bad and "statically" in " ".join(output.split())
    monkeypatch.setenv("MATCHRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(load_check.ENV, "always")
    assert InductorSession(out, {"device": "cpu"}).run(_inputs())["valid"].shape[0] == 1
    # the compiler is part of the package's identity: the fixture's package (built with the
    # configured compiler) is not taken for this one
    assert "cxx" in (package_cache_decision(read_provenance(built.path), record) or "")


@pytest.mark.slow
def test_a_package_built_by_a_static_libstdcxx_compiler_crashes_on_load(built, tmp_path, monkeypatch):
    """Why the probe exists (slow: a second compile): forced through --inductor-config cpp.cxx, the
    same compiler makes a package that cannot load, reported as an error."""
    import matchrt.package_load_check as load_check
    from cxx_helpers import static_libstdcxx_compiler

    from matchrt.backends.inductor_backend import InductorSession

    bad = static_libstdcxx_compiler(tmp_path)
    out, _ = _build_with("g++", built, tmp_path, "--inductor-config", f"cpp.cxx={bad}")
    assert read_provenance(out)["build"]["cxx"] == bad
    monkeypatch.setenv("MATCHRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(load_check.ENV, "always")
    # SIGSEGV on the GPU machines; here the two C++ runtimes' clash surfaces as std::bad_cast,
    # which torch's C API turns into "API call failed"
    with pytest.raises(MatchrtError, match="(?s)loader crashed|could not load.*API call failed"):
        InductorSession(out, {"device": "cpu"})
