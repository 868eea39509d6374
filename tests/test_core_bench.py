"""The benchmark harness runs every combination on the same inputs and hides no skipped one."""

from __future__ import annotations

import json
import re

import cv2
import pytest
from typer.testing import CliRunner

import matchrt
from matchrt.cli import app
from matchrt.host import get_host

from toy_plugin import ToyPlugin


@pytest.fixture()
def toy():
    with get_host().plugin(ToyPlugin(), "toy"):
        yield


def test_bench_toy_side_by_side(toy, tmp_path, image_pair):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = CliRunner().invoke(app, [
        "bench", "--matcher", "toy", "--backend", "torch,onnxruntime,tensorrt",
        "--precision", "fp32,fp16", "--synthetic", "3", "--images", str(image_pair[0]),
        "--images", str(image_pair[1]), "--runs", "3", "--warmup", "1", "--device", "cpu",
        "--random-weights", "--json", str(out_json), "--plot", str(out_png),
        "--workdir", str(tmp_path / "work"), "--size", "64", "--markdown", str(tmp_path / "b.md")])
    assert r.exit_code == 0, r.output
    assert "RANDOM WEIGHTS" in r.output
    # not a terminal (a log, CI): each step a line with the seconds since the start, not a silent spinner
    assert re.search(r"^\[ *\d+\.\d s\] toy / torch / fp32: timing", r.output, re.M), r.output
    data = json.loads(out_json.read_text())
    rows = {(x["backend"], x["precision"]): x for x in data["rows"]}
    assert len(rows) == 6  # every combination listed, none dropped
    ok = rows[("torch", "fp32")]
    assert ok["status"] == "ok" and ok["model_ms"]["n"] == 3
    assert ok["late_compiles"] == 0 and "more graph(s) after the first call" not in r.output
    assert ok["match_agreement"] == 1.0 and ok["unchecked_pairs"] == 0  # sparse: the match set is the figure
    assert "outputs unchecked" not in r.output
    assert ok["model_ms"]["p10"] <= ok["model_ms"]["median"] <= ok["model_ms"]["p90"]
    assert ok["mean_corner_err"] is not None and set(ok["auc"]) == {"auc@3px", "auc@5px", "auc@10px"}
    ort = rows[("onnxruntime", "fp32")]
    assert ort["status"] == "ok" and ort["match_agreement"] == 1.0
    assert len(ort["onnx_sha256"]) == 1 and len(ort["onnx_sha256"][0]) == 64
    assert rows[("onnxruntime", "fp16")]["status"] == "skipped"
    assert rows[("torch", "fp16")]["status"] == "skipped" and rows[("torch", "fp16")]["reason"]
    trt = rows[("tensorrt", "fp32")]
    assert trt["status"] == "skipped" and trt["reason"]
    assert data["provenance"]["random_weights"] is True and data["provenance"]["torch"]
    assert data["meta"]["matchers"]["toy"]["tflop_per_pair"] > 0
    assert cv2.imread(str(out_png)) is not None
    md = (tmp_path / "b.md").read_text()
    assert "| toy (random weights) | onnxruntime | fp32 |" in md and "Random weights" in md


def test_a_bench_that_dies_half_way_keeps_the_rows_it_finished(toy, tmp_path, image_pair, monkeypatch):
    """The JSON is rewritten after each row: a run killed in its second row (as a native abort in
    a loaded artifact kills it) leaves a readable file holding the first."""
    from matchrt.bench import Bench

    real, calls = Bench._run_combination, []

    def dies_second(self, row, *args):
        calls.append(row.backend)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not an Exception: nothing inside the bench catches it
        return real(self, row, *args)

    monkeypatch.setattr(Bench, "_run_combination", dies_second)
    out_json = tmp_path / "bench.json"
    r = CliRunner().invoke(app, [
        "bench", "--matcher", "toy", "--backend", "torch,onnxruntime", "--precision", "fp32",
        "--synthetic", "1", "--images", str(image_pair[0]), "--images", str(image_pair[1]),
        "--runs", "1", "--warmup", "0", "--device", "cpu", "--random-weights", "--size", "64",
        "--json", str(out_json), "--workdir", str(tmp_path / "work")])
    assert r.exit_code != 0 and calls == ["torch", "onnxruntime"]
    rows = json.loads(out_json.read_text())["rows"]
    assert [(x["backend"], x["status"]) for x in rows] == [("torch", "ok")]
    assert not list(tmp_path.glob(".bench.json.tmp-*"))


def test_sparse_outputs_without_matches_claim_no_fidelity(toy, tmp_path, image_pair):
    """No match on either side (random weights, high threshold): '-', not a perfect 0 error."""
    out_json = tmp_path / "bench.json"
    r = CliRunner().invoke(app, [
        "bench", "--matcher", "toy", "--backend", "torch", "--precision", "fp32", "--synthetic", "1",
        "--images", str(image_pair[0]), "--images", str(image_pair[1]), "--runs", "1", "--warmup", "0",
        "--device", "cpu", "--random-weights", "--json", str(out_json), "--size", "64",
        "-O", "threshold=1e9", "--workdir", str(tmp_path / "work")])
    assert r.exit_code == 0, r.output
    row = json.loads(out_json.read_text())["rows"][0]
    assert row["status"] == "ok"
    assert row["rel_err"] is None and row["max_abs_err"] is None and row["match_agreement"] is None


def test_match_set_agreement_and_output_errors():
    import torch

    from matchrt.compare import compare_outputs, match_set_agreement

    k = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    ref = {"keypoints0": k, "keypoints1": k + 1, "valid": torch.tensor([[True, True, False]])}
    same_reordered = {"keypoints0": k.flip(1), "keypoints1": (k + 1).flip(1),
                      "valid": torch.tensor([[False, True, True]])}
    assert match_set_agreement(ref, same_reordered) == 1.0
    one_changed = dict(same_reordered, valid=torch.tensor([[False, True, False]]))
    assert match_set_agreement(ref, one_changed) == 0.5
    none = {"keypoints0": k, "keypoints1": k, "valid": torch.zeros(1, 3, dtype=torch.bool)}
    assert match_set_agreement(none, none) is None
    rows = compare_outputs({"x": torch.ones(4), "m": torch.tensor([True, False])},
                           {"x": torch.ones(4) * 1.001, "m": torch.tensor([True, True])}, 1e-2)
    x, m = rows
    assert x.ok and abs(x.rel - 1e-3) < 1e-6 and not m.ok and m.mismatched == 0.5


# -- sizes, sweeps and batches (how cost grows) ----------------------------------------------------

class OnePairToy(ToyPlugin):
    """The toy matcher with a graph that takes one pair only, as some plugins do."""

    @matchrt.hookimpl
    def export_plan(self, matcher, model, options):
        if matcher == "toy" and options.batch > 1:
            raise matchrt.MatchrtError("toy: this graph takes one pair (batch 1)")
        return ToyPlugin.export_plan(self, matcher, model, options)


def test_bench_sizes_sweeps_and_batches(toy, tmp_path, image_pair):
    out_json, md = tmp_path / "bench.json", tmp_path / "b.md"
    r = CliRunner().invoke(app, [
        "bench", "--matcher", "toy", "--backend", "torch,onnxruntime", "--precision", "fp32",
        "--synthetic", "3", "--images", str(image_pair[0]), "--runs", "2", "--warmup", "1",
        "--device", "cpu", "--random-weights", "--json", str(out_json), "--markdown", str(md),
        "--workdir", str(tmp_path / "work"), "--size", "toy=64,48x96", "--batch", "1,2",
        "--sweep", "toy.max_matches=8,16"])
    assert r.exit_code == 0, r.output
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # sizes x sweep values x batches x backends
    assert {tuple(x["input_size"]) for x in rows} == {(64, 64), (48, 96)}
    assert {x["sweep"]["max_matches"] for x in rows} == {8, 16} and {x["batch"] for x in rows} == {1, 2}
    for x in rows:
        assert x["status"] == "ok", x
        h, w = x["input_size"]
        assert x["megapixels"] == pytest.approx(2 * h * w / 1e6)  # both images of the pair
        assert x["ms_per_pair"]["median"] == pytest.approx(x["model_ms"]["median"] / x["batch"])
        assert x["ms_per_mpix"] == pytest.approx(x["ms_per_pair"]["median"] / x["megapixels"])
        # batched outputs, split per pair, equal the batch-1 reference of the same pair
        assert x["match_agreement"] == 1.0
    # each size, sweep value and batch exported its own graph
    assert len(list((tmp_path / "work").glob("*.onnx"))) == 8
    assert (tmp_path / "work" / "toy-48x96-b2-max_matches16.onnx").exists()
    text = md.read_text()
    assert "| toy (random weights) | onnxruntime | fp32 | 48x96 max_matches=16 | 2 |" in text
    assert "ms per MP" in text


def test_batch_unsupported_is_a_skipped_row(tmp_path, image_pair):
    with get_host().plugin(OnePairToy(), "toy"):
        r = CliRunner().invoke(app, [
            "bench", "--matcher", "toy", "--backend", "torch", "--precision", "fp32",
            "--synthetic", "1", "--images", str(image_pair[0]), "--runs", "1", "--warmup", "0",
            "--device", "cpu", "--random-weights", "--json", str(tmp_path / "b.json"),
            "--size", "64", "--batch", "1,2"])
    assert r.exit_code == 0, r.output
    one, two = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert one["status"] == "ok" and one["batch"] == 1
    assert two["status"] == "skipped" and two["reason"].startswith("batch>1 unsupported by toy")


@pytest.mark.parametrize("value", ["--size=0", "--size=eloftr=64", "--size=6x", "--batch=0",
                                   "--sweep=max_matches"])
def test_bad_size_batch_and_sweep_are_refused(toy, value):
    r = CliRunner().invoke(app, ["bench", "--matcher", "toy", "--random-weights", value])
    assert r.exit_code == 2 and ("--size" in r.output or "--batch" in r.output
                                 or "--sweep" in r.output), r.output


def test_builtin_and_example_matchers_run_batches(tmp_path, image_pair, one_thread):
    """eloftr and xfeat graphs take B pairs and postprocess each (roma_plus: see the README)."""
    pytest.importorskip("matchrt_xfeat")
    import warnings

    from matchrt.bench import Bench, BenchConfig, BenchInput
    from matchrt.host import create_host

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("MATCHRT_PLUGINS", "xfeat")
        host = create_host()
    from matchrt.images import read_image

    a, b = (read_image(p) for p in image_pair)
    inputs = [BenchInput("ab", a, b), BenchInput("ba", b, a)]  # one batch of two different pairs
    config = BenchConfig(["eloftr", "xfeat"], ["torch"], ["fp32"], inputs, runs=1, warmup=0,
                         random_weights=True, sizes={"eloftr": [(64, 96)], "xfeat": [(128, 160)]},
                         batches=[1, 2],
                         options={"eloftr.max_matches": 16, "xfeat.top_k": 256})
    rows = Bench(config, host).run()
    assert [(r.matcher, r.batch, r.status) for r in rows] == [
        ("eloftr", 1, "ok"), ("eloftr", 2, "ok"), ("xfeat", 1, "ok"), ("xfeat", 2, "ok")], \
        [r.reason for r in rows]
    assert all(r.ms_per_pair["median"] > 0 for r in rows)
    # xfeat's real weights match the real pair: each pair of a batch of two equals its batch-1 run
    assert rows[3].match_agreement == 1.0


def test_graphs_compiled_counts_recompiles():
    """The count the bench reads: a first compile and a recompile (a new input layout) are two graphs."""
    import torch

    from matchrt.bench import graphs_compiled

    fn = torch.compile(lambda t: t * 2 + 1, backend="eager")
    x = torch.randn(4, 6)
    before = graphs_compiled()
    fn(x)
    fn(x + 1)  # same layout: no new graph
    assert graphs_compiled() - before == 1
    fn(x.t())  # other strides: Dynamo's guards fail, it compiles again
    assert graphs_compiled() - before == 2


def test_bench_reports_graphs_compiled_after_the_first_call(toy, tmp_path, image_pair, monkeypatch):
    """A matcher whose compiled code recompiles after its first call (the fidelity calls, the warm-up)
    gets the count in its row and a note under the table: that time is in no column."""
    from matchrt import bench

    compiled = iter([5, 7])  # Dynamo's count after the first call, then at the end of the row
    monkeypatch.setattr(bench, "graphs_compiled", lambda: next(compiled))
    out_json = tmp_path / "bench.json"
    r = CliRunner().invoke(app, [
        "bench", "--matcher", "toy", "--backend", "torch", "--precision", "fp32", "--synthetic", "2",
        "--images", str(image_pair[0]), "--images", str(image_pair[1]), "--runs", "1", "--warmup", "0",
        "--device", "cpu", "--random-weights", "--json", str(out_json), "--size", "64",
        "--workdir", str(tmp_path / "work")])
    assert r.exit_code == 0, r.output
    assert json.loads(out_json.read_text())["rows"][0]["late_compiles"] == 2
    assert "torch.compile compiled 2 more graph(s) after the first call" in " ".join(r.output.split())


def test_bench_says_where_outputs_held_no_match_to_compare(toy, tmp_path, image_pair, monkeypatch):
    """Sparse outputs without any match (random weights below a matcher's threshold: eloftr) cannot be
    compared: the row counts those pairs and a note says its fidelity is unchecked there, instead of a
    bare '-' that reads like a pass."""
    from matchrt import bench

    monkeypatch.setattr(bench, "match_set_agreement", lambda reference, test: None)
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    r = CliRunner().invoke(app, [
        "bench", "--matcher", "toy", "--backend", "torch", "--precision", "fp32", "--synthetic", "2",
        "--runs", "1", "--warmup", "0", "--device", "cpu", "--random-weights", "--json", str(out_json),
        "--markdown", str(out_md), "--size", "64", "--workdir", str(tmp_path / "work")])
    assert r.exit_code == 0, r.output
    row = json.loads(out_json.read_text())["rows"][0]
    assert row["unchecked_pairs"] == 2 and row["match_agreement"] is None
    assert "outputs unchecked on 2 input pair(s)" in " ".join(r.output.split())
    assert "outputs unchecked on 2 input pair(s)" in out_md.read_text()
