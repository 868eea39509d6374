"""`matchrt bench-report` puts rows of several bench runs in one table, and takes each row's speed-up only
against an eager fp32 row measured on the same GPU."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from matchrt.bench_report import collect
from matchrt.cli import app
from matchrt.host import get_host

from toy_plugin import ToyPlugin


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_pair):
    """Two real bench runs of the toy matcher on the CPU: eager fp32 in one file, ONNX Runtime in another."""
    folder = tmp_path_factory.mktemp("bench-report")
    files = {}
    with get_host().plugin(ToyPlugin(), "toy"):
        for name, backend in (("eager", "torch"), ("ort", "onnxruntime")):
            files[name] = folder / f"{name}.json"
            r = CliRunner().invoke(app, [
                "bench", "--matcher", "toy", "--backend", backend, "--precision", "fp32", "--synthetic", "2",
                "--images", str(image_pair[0]), "--images", str(image_pair[1]), "--runs", "3",
                "--warmup", "1", "--device", "cpu", "--random-weights", "--size", "64",
                "--workdir", str(folder / "work"), "--json", str(files[name])])
            assert r.exit_code == 0, r.output
    return files


def _with_provenance(path: Path, out: Path, **fields) -> Path:
    data = json.loads(path.read_text())
    data["provenance"].update(fields)
    out.write_text(json.dumps(data))
    return out


def _ms(path: Path) -> float:
    return json.loads(path.read_text())["rows"][0]["ms_per_pair"]["median"]


def test_rows_pair_with_the_eager_row_of_their_gpu_only(runs, tmp_path) -> None:
    eager, ort = runs["eager"], runs["ort"]
    # no GPU UUID recorded (older files, CPUs): only the file's own rows, unless the user vouches for one machine
    plain = collect([eager, ort])
    assert plain[0].speedup == pytest.approx(1.0) and plain[1].speedup is None
    vouched = collect([eager, ort], one_machine=True)
    assert vouched[1].speedup == pytest.approx(_ms(eager) / _ms(ort)) and vouched[1].reference == eager
    # the same recorded GPU pairs by itself; two recorded GPUs never do, vouched or not
    a = _with_provenance(eager, tmp_path / "a.json", gpu="NVIDIA H200", gpu_uuid="GPU-1")
    b = _with_provenance(ort, tmp_path / "b.json", gpu="NVIDIA H200", gpu_uuid="GPU-1")
    other = _with_provenance(ort, tmp_path / "c.json", gpu="NVIDIA H200", gpu_uuid="GPU-2")
    assert collect([a, b])[1].speedup == pytest.approx(_ms(eager) / _ms(ort))
    assert collect([a, other], one_machine=True)[1].speedup is None
    # another kind of GPU is never one machine
    h100 = _with_provenance(ort, tmp_path / "d.json", gpu="NVIDIA H100")
    assert collect([a, h100], one_machine=True)[1].speedup is None
    # nor is another input size or batch: the reference must be the same work
    data = json.loads(ort.read_text())
    data["rows"][0]["batch"] = 4
    data["rows"][0]["future_field"] = "ignored"  # fields a newer bench writes do not break the report
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert collect([eager, tmp_path / "e.json"], one_machine=True)[1].speedup is None


def test_cli_writes_the_table_and_the_chart(runs, tmp_path) -> None:
    md, png = tmp_path / "out" / "report.md", tmp_path / "out" / "report.png"
    r = CliRunner().invoke(app, ["bench-report", str(runs["eager"]), str(runs["ort"]), "--one-machine",
                                 "--markdown", str(md), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    ratio = f"{_ms(runs['eager']) / _ms(runs['ort']):.2f}"
    row = next(line for line in md.read_text().splitlines() if "| onnxruntime |" in line)
    assert f"| {ratio} |" in row and "ort.json" in row
    assert cv2.imread(str(png)) is not None
    assert not [p for p in md.parent.iterdir() if ".tmp-" in p.name]  # written under a temporary name, renamed
    # without --one-machine the table says why the ONNX Runtime row has no speed-up
    r = CliRunner().invoke(app, ["bench-report", str(runs["eager"]), str(runs["ort"])])
    assert r.exit_code == 0 and "--one-machine" in r.output


def test_files_that_are_not_bench_results_are_named(tmp_path) -> None:
    text = tmp_path / "notes.json"
    text.write_text("not json")
    r = CliRunner().invoke(app, ["bench-report", str(text)])
    assert r.exit_code == 2 and "notes.json" in r.output and "matchrt bench --json" in r.output
    empty = tmp_path / "profile.json"
    empty.write_text(json.dumps({"stages": []}))
    r = CliRunner().invoke(app, ["bench-report", str(empty)])
    assert r.exit_code == 2 and "no \"rows\"" in r.output
