"""`matchrt match-pairs` pieces with the toy plugin: pair lists, the journal, the keypoint merge, the
h5 layout hloc reads, batching, resuming. Fast (seconds); the real-photo run is test_match_pairs_sfm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from matchrt.cli import app
from matchrt.errors import MatchrtError
from matchrt.host import get_host
from matchrt.journal import MatchJournal, PairRecord
from matchrt.pairs import (exhaustive_pairs, list_images, pair_key, read_pairs, sequential_pairs,
                           unique_pairs)
from matchrt.weights import write_random_checkpoint

from pairs_helpers import h5_datasets
from toy_plugin import LAYOUT, ToyPlugin

h5py = pytest.importorskip("h5py", reason="match-pairs needs the sfm extra: pip install '.[sfm]'")

runner = CliRunner()


@pytest.fixture()
def toy():
    with get_host().plugin(ToyPlugin(), "toy"):
        yield


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(LAYOUT, tmp_path_factory.mktemp("w") / "toy.ckpt", lightning=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory, image_pair) -> Path:
    """Five small images (crops of the bundled pair, one in a subfolder) so pairs overlap."""
    import cv2

    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    a, b = (cv2.imread(str(p)) for p in image_pair)
    crops = [a[:300, :400], a[40:340, 30:430], b[:300, :400], b[50:350, 20:420], a[100:400, 60:460]]
    names = ["a.jpg", "b.jpg", "c.png", "sub/d.jpg", "e.jpg"]
    for name, crop in zip(names, crops):
        cv2.imwrite(str(folder / name), crop)
    return folder


def test_pair_lists_follow_hloc(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("# retrieval\na.jpg b.jpg\n\nsub/d.jpg a.jpg\n")
    assert read_pairs(f) == [("a.jpg", "b.jpg"), ("sub/d.jpg", "a.jpg")]
    f.write_text("a.jpg b.jpg\nc.jpg\n")
    with pytest.raises(MatchrtError, match=r"pairs.txt:2"):
        read_pairs(f)
    names = [f"{i}.jpg" for i in range(10)]
    assert len(exhaustive_pairs(names)) == 45
    assert sequential_pairs(names[:4], 2) == [("0.jpg", "1.jpg"), ("0.jpg", "2.jpg"), ("1.jpg", "2.jpg"),
                                              ("1.jpg", "3.jpg"), ("2.jpg", "3.jpg")]
    assert unique_pairs([("a", "b"), ("b", "a"), ("a", "a"), ("a", "c")]) == [("a", "b"), ("a", "c")]
    # hloc's group name: '/' inside a name becomes '-'
    assert pair_key("sub/d.jpg", "a.jpg") == "sub-d.jpg/a.jpg"


def _record(a: str, b: str, n: int, seed: int) -> PairRecord:
    rng = np.random.default_rng(seed)
    return PairRecord(a, b, rng.random((n, 2), np.float32) * 100, rng.random((n, 2), np.float32) * 100,
                      rng.random(n, np.float32), (100, 120), (90, 110))


def test_journal_commits_atomically_resumes_and_compacts(tmp_path):
    root = tmp_path / "j"
    with MatchJournal(root, compact_every=3).open({"matcher": "x"}) as j:
        for k in range(4):
            j.commit([_record(f"i{k}", f"i{k + 1}", 5 + k, k), _record(f"i{k}", f"i{k + 2}", 0, k)])
        # 3 shards were compacted into a segment; the 4th is a shard
        assert len(list((root / "segments").glob("*.npz"))) == 1
        assert len(list((root / "shards").glob("*.npz"))) == 1
    (root / "shards" / ".b-000000009.npz.tmp-1").write_bytes(b"half a batch")  # a killed write
    with pytest.raises(MatchrtError, match="another configuration.*matcher"):
        MatchJournal(root).open({"matcher": "y"})
    with MatchJournal(root).open({"matcher": "x"}) as j:
        with pytest.raises(MatchrtError, match="another matchrt job"):
            MatchJournal(root).open({"matcher": "x"})
        assert not list(root.rglob(".*.tmp-*"))
        recs = list(j.records())
        assert [r.pair for r in recs] == [(f"i{k}", f"i{k + d}") for k in range(4) for d in (1, 2)]
        assert j.done() == {r.pair for r in recs}
        np.testing.assert_array_equal(recs[2].keypoints0, _record("i1", "i2", 6, 1).keypoints0)
        assert recs[2].size0 == (100, 120) and len(recs[3].scores) == 0


def test_keypoints_merge_per_image_into_tracks(tmp_path):
    from matchrt.features_h5 import read_matches, write_hloc

    kp_a = np.array([[10.0, 10.0], [50.0, 20.0], [80.2, 40.0]], np.float32)
    kp_b = np.array([[12.0, 11.0], [52.0, 21.0], [82.0, 41.0]], np.float32)
    kp_c = np.array([[14.0, 12.0], [54.0, 22.0], [84.0, 42.0]], np.float32)
    recs = [
        PairRecord("a.jpg", "b.jpg", kp_a, kp_b, np.array([0.9, 0.8, 0.7], np.float32), (60, 100), (60, 100)),
        # the same points of a seen again (one 0.6 px away: same 2 px cell), and a second match
        # into one cell of c that must not survive twice
        PairRecord("a.jpg", "sub/c.jpg",
                   np.array([[10.0, 10.0], [50.0, 20.0], [80.6, 40.0], [50.4, 20.3]], np.float32),
                   np.array([[14.0, 12.0], [54.0, 22.0], [84.0, 42.0], [54.3, 22.2]], np.float32),
                   np.array([0.9, 0.8, 0.7, 0.5], np.float32), (60, 100), (50, 90)),
        PairRecord("b.jpg", "sub/c.jpg", kp_b, kp_c, np.array([0.6, 0.6, 0.6], np.float32),
                   (60, 100), (50, 90)),
    ]
    stats = write_hloc(lambda: iter(recs), tmp_path, cell=2.0)
    assert stats["keypoints"] == 9 and stats["matches"] == 9
    with h5py.File(tmp_path / "features.h5") as f:
        assert set(f) == {"a.jpg", "b.jpg", "sub"} and "c.jpg" in f["sub"]
        assert f["a.jpg"]["keypoints"].shape == (3, 2)
        assert list(f["sub/c.jpg"]["image_size"][()]) == [90, 50]  # width, height as hloc
        kp = f["a.jpg"]["keypoints"][()]
    # the two sightings of the third point of a merged to their score-weighted mean
    assert kp[2, 0] == pytest.approx((80.2 * 0.7 + 80.6 * 0.7) / 1.4, abs=1e-4)
    with h5py.File(tmp_path / "matches.h5") as f:
        assert set(f["a.jpg"]) == {"b.jpg", "sub-c.jpg"}
        assert f["a.jpg/sub-c.jpg/matches0"].dtype == np.int32
    rows, scores = read_matches(tmp_path / "matches.h5", "sub/c.jpg", "a.jpg")  # stored the other way
    assert rows.tolist() == [[0, 0], [1, 1], [2, 2]] and scores[1] == pytest.approx(0.8)
    # a track: a0 - b0 - c0 are the same keypoint ids in all three pairs
    assert read_matches(tmp_path / "matches.h5", "b.jpg", "sub/c.jpg")[0].tolist() == [[0, 0], [1, 1], [2, 2]]


def _run(*args: object):
    return runner.invoke(app, ["match-pairs", *map(str, args)])


def _h5_equal(a: Path, b: Path) -> None:
    items_a, items_b = h5_datasets(a), h5_datasets(b)
    assert len(items_a) > 1 and set(items_a) == set(items_b)
    for k in items_a:
        np.testing.assert_array_equal(items_a[k], items_b[k], err_msg=k)


def test_toy_job_batches_resumes_and_extends(toy, toy_ckpt, images, tmp_path):
    one = tmp_path / "one"
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--exhaustive", "-o", one, "-b", 1, "-j", 0)
    assert r.exit_code == 0, r.output
    summary = json.loads((one / "summary.json").read_text())
    assert summary["pairs_matched"] == 10 and summary["pairs_skipped"] == 0
    assert 0 < summary["model_share"] <= 1 and summary["pairs_per_s"] > 0
    assert len(read_pairs(one / "pairs.txt")) == 10
    # a batch of 4 (the last one short) through a worker process gives the same files
    four = tmp_path / "four"
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--exhaustive", "-o", four, "-b", 4, "-j", 1)
    assert r.exit_code == 0, r.output
    assert json.loads((four / "summary.json").read_text())["batches"] == 3
    for name in ("features.h5", "matches.h5"):
        _h5_equal(one / name, four / name)
    # a re-run matches nothing (and clears what a run killed while writing its outputs left)
    (one / ".matches.h5.tmp-999").write_bytes(b"half an h5 file")
    (one / ".sfm.tmp-abc").mkdir()
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--exhaustive", "-o", one, "-j", 0)
    assert json.loads((one / "summary.json").read_text())["pairs_matched"] == 0
    assert not list(one.glob(".*.tmp-*"))
    _h5_equal(one / "matches.h5", four / "matches.h5")
    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg\nsub/d.jpg a.jpg\n")
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--pairs", tmp_path / "pairs.txt", "-o", four, "-j", 0)
    assert json.loads((four / "summary.json").read_text())["pairs_matched"] == 0  # d-a is a-d reversed
    # another configuration into the same folder is refused, naming what differs
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--exhaustive", "-o", one, "-O", "max_matches=8")
    assert r.exit_code == 2 and "another configuration" in r.output and "options" in r.output


def test_toy_job_on_a_fixed_batch_graph_pads_the_last_batch(toy, toy_ckpt, images, tmp_path):
    onnx = tmp_path / "toy_b2.onnx"
    r = runner.invoke(app, ["export", "-m", "toy", "-c", str(toy_ckpt), "--batch", "2", "-o", str(onnx),
                            "--no-lint"])
    assert r.exit_code == 0, r.output
    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg\na.jpg c.png\nb.jpg e.jpg\n")
    ref, ort = tmp_path / "torch", tmp_path / "ort"
    assert _run(images, "-m", "toy", "-c", toy_ckpt, "--pairs", tmp_path / "pairs.txt", "-o", ref,
                "-j", 0).exit_code == 0
    r = _run(images, "--onnx", onnx, "--pairs", tmp_path / "pairs.txt", "-o", ort, "-j", 0, "-b", 3)
    assert r.exit_code == 0, r.output
    assert json.loads((ort / "summary.json").read_text())["batches"] == 2  # the graph's batch of 2
    with h5py.File(ref / "features.h5") as a, h5py.File(ort / "features.h5") as b:
        np.testing.assert_allclose(a["a.jpg/keypoints"][()], b["a.jpg/keypoints"][()], atol=1e-4)


def test_bad_requests_are_one_line_errors(toy, toy_ckpt, images, tmp_path):
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--exhaustive", "--sequential", 2, "-o", tmp_path)
    assert r.exit_code == 2 and "exactly one of" in r.output
    (tmp_path / "pairs.txt").write_text("a.jpg missing.jpg\n")
    r = _run(images, "-m", "toy", "-c", toy_ckpt, "--pairs", tmp_path / "pairs.txt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "missing.jpg" in r.output and "relative to IMAGE_DIR" in r.output
    assert sorted(list_images(images)) == ["a.jpg", "b.jpg", "c.png", "e.jpg", "sub/d.jpg"]
    # an unreadable image, met in a loader worker: one line naming it; what was matched is kept
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    try:
        (tmp_path / "pairs.txt").write_text("a.jpg b.jpg\na.jpg broken.jpg\n")
        out = tmp_path / "broken"
        r = _run(images, "-m", "toy", "-c", toy_ckpt, "--pairs", tmp_path / "pairs.txt", "-o", out, "-j", 1)
        assert r.exit_code == 2 and "broken.jpg" in r.output and "Traceback" not in r.output, r.output
        with MatchJournal(out / ".matchrt-journal") as journal:
            assert journal.done() == {("a.jpg", "b.jpg")}
    finally:
        (images / "broken.jpg").unlink()


def test_built_in_torch_graphs_take_a_batch_of_pairs(image_pair):
    """What --batch-size relies on: B pairs in one call give each pair's own outputs (eloftr here;
    roma_full, roma_plus and xfeat were checked the same way)."""
    import torch

    from matchrt.images import read_image
    from matchrt.pairjob import split_outputs
    from matchrt.runner import open_pipeline

    pipe = open_pipeline("eloftr", random_weights=True, height=128, width=128,
                         extra={"threshold": 0.0, "max_matches": 64})
    a, b = (read_image(p) for p in image_pair)
    prepared = [pipe.prepare(a, b)[0], pipe.prepare(b, a[::-1].copy())[0]]
    single = [pipe.run(x) for x in prepared]
    batch = pipe.run({k: torch.cat([x[k] for x in prepared]) for k in prepared[0]})
    for one, part in zip(single, split_outputs(batch, 2)):
        for name, value in one.items():
            torch.testing.assert_close(part[name], value.cpu(), rtol=1e-5, atol=1e-5)
