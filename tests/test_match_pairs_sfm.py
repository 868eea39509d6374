"""`matchrt match-pairs` end to end on ten real photographs (hloc's Sacre Coeur mapping set), with the
XFeat example plugin on the CPU: all 45 pairs -> hloc h5 files -> COLMAP database -> a model with every
image registered; a run killed with SIGKILL resumes to the same files; Ray Data gives the same matches.

Every run is the real CLI in a subprocess, as a user runs it. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

try:
    md.distribution("matchrt-xfeat")
except md.PackageNotFoundError:
    pytest.skip("the example plugin is not installed (pip install -e examples/matchrt-xfeat)",
                allow_module_level=True)
h5py = pytest.importorskip("h5py", reason="needs the sfm extra: pip install '.[sfm]'")
pycolmap = pytest.importorskip("pycolmap", reason="needs the sfm extra: pip install '.[sfm]'")

from matchrt.journal import MatchJournal  # noqa: E402
from matchrt.pairjob import JOURNAL  # noqa: E402

from pairs_helpers import h5_datasets  # noqa: E402

IMAGES = Path(__file__).parent / "data" / "sfm" / "sacre_coeur"
BATCH = 2
# the command every run here shares; the reference run adds --reconstruct
COMMAND = ["match-pairs", str(IMAGES), "-m", "xfeat", "--exhaustive", "--device", "cpu",
           "--batch-size", str(BATCH), "--num-workers", "1"]


def matchrt(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, MATCHRT_PLUGINS="xfeat", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "matchrt.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run with the COLMAP database and the reconstruction."""
    out = tmp_path_factory.mktemp("sfm") / "ref"
    finish(matchrt(*COMMAND, "-o", str(out), "--reconstruct"))
    return out


def test_all_45_pairs_reconstruct_all_ten_images(reference):
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["pairs_matched"] == 45 and summary["pairs_total"] == 45
    assert 0 < summary["model_share"] <= 1
    names = sorted(p.name for p in IMAGES.glob("*.jpg"))
    with h5py.File(reference / "features.h5") as f:
        assert sorted(f) == names
        for name in names:
            h, w = cv2.imread(str(IMAGES / name)).shape[:2]
            assert list(f[name]["image_size"][()]) == [w, h]
            kp = f[name]["keypoints"][()]
            assert len(kp) > 500 and (kp >= -0.5).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all()
    with h5py.File(reference / "matches.h5") as f:
        assert sum(len(f[a]) for a in f) == 45
    with pycolmap.Database.open(reference / "database.db") as db:
        assert db.num_images() == 10 and db.num_matched_image_pairs() == 45
        assert db.num_verified_image_pairs() >= 40
    stats = json.loads((reference / "sfm" / "stats.json").read_text())
    assert stats == {k: v for k, v in summary["reconstruction"].items() if k != "path"}
    assert stats["registered_images"] == 10, stats
    assert stats["points"] > 500 and stats["mean_track_length"] > 2.5
    assert stats["mean_reprojection_error_px"] < 2.0
    rec = pycolmap.Reconstruction(reference / "sfm")
    assert rec.num_reg_images() == 10
    assert (reference / "sfm" / "reconstruction.png").stat().st_size > 10_000
    assert not list(reference.rglob(".*.tmp-*"))


def test_the_seeded_verification_repeats(reference, tmp_path):
    """COLMAP's verification RANSAC is seeded: the same matches give the same database (unseeded,
    three builds from one run's matches kept 16051, 16092 and 16184 inlier matches)."""
    from matchrt.colmap import write_database

    pairs = [tuple(line.split()) for line in (reference / "pairs.txt").read_text().splitlines() if line]
    counts = [write_database(tmp_path / f"{k}.db", IMAGES, reference / "features.h5", reference / "matches.h5",
                             pairs) for k in range(2)]
    for c in counts:
        c.pop("path")
    assert counts[0] == counts[1] and counts[0]["verified_pairs"] >= 40


def test_a_killed_run_resumes_to_the_same_files(reference, tmp_path):
    """SIGKILL after a few batches, run again: the result equals an uninterrupted run's."""
    from matchrt.features_h5 import write_hloc
    from matchrt.pairs import exhaustive_pairs, list_images

    pairs = exhaustive_pairs(list_images(IMAGES))[:20]
    (tmp_path / "pairs.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    command = [*COMMAND[:4], "--pairs", str(tmp_path / "pairs.txt"), *COMMAND[5:]]
    out = tmp_path / "killed"
    proc = matchrt(*command, "-o", str(out))
    shards = out / JOURNAL / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("b-*.npz"))) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "matches.h5").exists()  # the h5 files come at the end, never half-written
    with MatchJournal(out / JOURNAL) as journal:
        committed = len(journal.done())
    assert 3 * BATCH <= committed < 20

    resumed = finish(matchrt(*command, "-o", str(out)))
    summary = json.loads((out / "summary.json").read_text())
    # nothing committed was matched again; what was lost is at most the batch in flight
    assert summary["pairs_skipped"] == committed, resumed
    assert summary["pairs_matched"] == 20 - committed
    assert not list(out.rglob(".*.tmp-*"))
    # an uninterrupted run of these pairs: the reference run's matches of them, merged in list order
    with MatchJournal(reference / JOURNAL) as ref:
        by_pair = {r.pair: r for r in ref.records()}
    expected = tmp_path / "expected"
    expected.mkdir()
    write_hloc(lambda: (by_pair[p] for p in pairs), expected, cell=2.0)
    for name in ("features.h5", "matches.h5"):
        want, got = h5_datasets(expected / name), h5_datasets(out / name)
        assert len(want) >= 20 and set(want) == set(got), name
        for key, value in want.items():
            np.testing.assert_array_equal(value, got[key], err_msg=key)


def test_ray_data_on_two_cpu_workers_gives_the_same_matches(reference, tmp_path):
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install '.[ray]'")
    pairs = tmp_path / "pairs.txt"
    listed = (reference / "pairs.txt").read_text().splitlines()[:8]
    pairs.write_text("\n".join(listed) + "\n")
    out = tmp_path / "ray"
    log = finish(matchrt("match-pairs", str(IMAGES), "-m", "xfeat", "--pairs", str(pairs), "--device",
                         "cpu", "--batch-size", str(BATCH), "--num-workers", "2", "--ray", "local",
                         "-o", str(out)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ray"] == "local" and summary["num_workers"] == 2, log
    assert summary["pairs_matched"] == 8
    with MatchJournal(reference / JOURNAL) as ref, MatchJournal(out / JOURNAL) as got:
        expected = {r.pair: r for r in ref.records()}
        records = list(got.records())
    assert len(records) == 8
    for rec in records:
        want = expected[rec.pair]
        np.testing.assert_array_equal(rec.keypoints0, want.keypoints0)
        np.testing.assert_array_equal(rec.keypoints1, want.keypoints1)
        np.testing.assert_allclose(rec.scores, want.scores, atol=1e-5)


def test_ray_reading_stage_reports_an_unreadable_image_in_one_line(tmp_path):
    """Ray decodes images in CPU tasks: a file OpenCV cannot read still ends the job with one line
    naming it (not Ray's nested traceback)."""
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install '.[ray]'")
    images = tmp_path / "images"
    images.mkdir()
    first = sorted(IMAGES.glob("*.jpg"))[0]
    (images / "good.jpg").write_bytes(first.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "pairs.txt").write_text("good.jpg broken.jpg\n")
    proc = matchrt("match-pairs", str(images), "-m", "xfeat", "--pairs", str(tmp_path / "pairs.txt"),
                   "--device", "cpu", "--num-workers", "1", "--ray", "local", "-o", str(tmp_path / "out"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out
    assert "cannot read" in out and "broken.jpg" in out and "Traceback" not in out, out
