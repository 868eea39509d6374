"""Per-pair matches -> hloc's `features.h5` and `matches.h5`, keypoints merged per image.

Matchers give keypoints per pair: a sparse matcher detects the same points in every pair, a dense or
semi-dense one finds new ones each time. For tracks to form across pairs, each image gets one
keypoint table: keypoints are quantised to a grid of `cell` pixels, every cell holds one keypoint
(the score-weighted mean of what fell into it), and a pair's matches become indices into the two
tables, one-to-one (where two matches land in one cell, the higher score wins), as hloc does for its
dense matchers.

Layout (hloc's): features.h5 has a group per image name with `keypoints` (N x 2 float32, pixel
centres at integer coordinates), `scores` (N, the best match score seen at the keypoint) and
`image_size` (width, height); matches.h5 has a group `name0/name1` (`/` inside names replaced by
`-`) per pair with `matches0` (N0 int32: index into image 1's keypoints, -1 unmatched) and
`matching_scores0` (N0 float32). Both files are written under temporary names and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import MatchrtError
from .journal import PairRecord
from .pairs import Pair, pair_key


def require_h5py():  # -> module
    try:
        import h5py
    except ImportError:
        raise MatchrtError("writing hloc's h5 files needs h5py: pip install 'matchrt[sfm]'") from None
    return h5py


class ImageKeypoints:
    """One image's keypoint table: grid cell -> id, and the weighted position sums per id."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.sums = np.zeros((64, 4), np.float64)  # sum w*x, sum w*y, sum w, max score

    def __len__(self) -> int:
        return len(self.ids)

    def assign(self, cells: np.ndarray, create: bool) -> np.ndarray:
        """Ids of the given cell keys; unknown cells get new ids (create) or -1."""
        uniq, inverse = np.unique(cells, return_inverse=True)
        ids = np.empty(len(uniq), np.int64)
        for k, cell in enumerate(uniq.tolist()):
            found = self.ids.get(cell)
            if found is None and create:
                found = self.ids[cell] = len(self.ids)
            ids[k] = -1 if found is None else found
        if create and len(self.ids) > len(self.sums):
            grown = np.zeros((max(len(self.ids), 2 * len(self.sums)), 4), np.float64)
            grown[: len(self.sums)] = self.sums
            self.sums = grown
        return ids[inverse.reshape(-1)]

    def accumulate(self, ids: np.ndarray, keypoints: np.ndarray, scores: np.ndarray) -> None:
        w = np.maximum(scores.astype(np.float64), 1e-6)
        np.add.at(self.sums[:, 0], ids, w * keypoints[:, 0])
        np.add.at(self.sums[:, 1], ids, w * keypoints[:, 1])
        np.add.at(self.sums[:, 2], ids, w)
        np.maximum.at(self.sums[:, 3], ids, scores.astype(np.float64))

    def keypoints(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.sums[: len(self.ids)]
        return (s[:, :2] / s[:, 2:3]).astype(np.float32), s[:, 3].astype(np.float32)


class KeypointMerger:
    """Keypoint tables of every image, built from per-pair matches with a grid of `cell` px."""

    BIG = 1 << 31

    def __init__(self, cell: float):
        if cell <= 0:
            raise MatchrtError(f"--merge-grid must be positive pixels, got {cell}")
        self.cell = float(cell)
        self.images: dict[str, ImageKeypoints] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def cells(self, keypoints: np.ndarray) -> np.ndarray:
        # pixel centres at integer coordinates: cell k covers [k * cell - 0.5, (k + 1) * cell - 0.5)
        q = np.floor((keypoints.astype(np.float64) + 0.5) / self.cell).astype(np.int64)
        return q[:, 1] * self.BIG + q[:, 0]

    def add(self, rec: PairRecord) -> None:
        """Pass 1: grow the two images' tables with a pair's keypoints."""
        for name, kp, size in ((rec.name0, rec.keypoints0, rec.size0),
                               (rec.name1, rec.keypoints1, rec.size1)):
            table = self.images.setdefault(name, ImageKeypoints())
            self.sizes[name] = (int(size[0]), int(size[1]))
            if len(kp):
                table.accumulate(table.assign(self.cells(kp), create=True), kp, rec.scores)

    def matches(self, rec: PairRecord) -> np.ndarray:
        """Pass 2: the pair's matches as (id0, id1, score) rows, one-to-one by best score."""
        if not len(rec.scores):
            return np.zeros((0, 3), np.float64)
        i0 = self.images[rec.name0].assign(self.cells(rec.keypoints0), create=False)
        i1 = self.images[rec.name1].assign(self.cells(rec.keypoints1), create=False)
        order = np.argsort(-rec.scores, kind="stable")
        i0, i1, sc = i0[order], i1[order], rec.scores[order].astype(np.float64)
        _, first0 = np.unique(i0, return_index=True)
        _, first1 = np.unique(i1, return_index=True)
        keep = np.intersect1d(first0, first1)
        return np.stack([i0[keep], i1[keep], sc[keep]], 1)


def write_hloc(records: Callable[[], Iterable[PairRecord]], out_dir: Path, cell: float,
               features_name: str = "features.h5", matches_name: str = "matches.h5",
               progress: Optional[Callable[[int], None]] = None) -> dict[str, object]:
    """Two passes over the records (a callable giving a fresh iterator): tables, then matches."""
    h5py = require_h5py()
    out_dir = Path(out_dir)
    merger = KeypointMerger(cell)
    pairs: list[Pair] = []
    for rec in records():
        merger.add(rec)
        pairs.append(rec.pair)
    tmp_f = out_dir / f".{features_name}.tmp-{os.getpid()}"
    tmp_m = out_dir / f".{matches_name}.tmp-{os.getpid()}"
    num_matches = 0
    with h5py.File(tmp_f, "w") as f:
        for name in sorted(merger.images):
            kp, scores = merger.images[name].keypoints()
            grp = f.create_group(name)
            grp.create_dataset("keypoints", data=kp)
            grp.create_dataset("scores", data=scores)
            h, w = merger.sizes[name]
            grp.create_dataset("image_size", data=np.array([w, h], np.int64))
    with h5py.File(tmp_m, "w") as f:
        for k, rec in enumerate(records()):
            rows = merger.matches(rec)
            n0 = len(merger.images[rec.name0])
            matches0 = np.full(n0, -1, np.int32)
            scores0 = np.zeros(n0, np.float32)
            matches0[rows[:, 0].astype(np.int64)] = rows[:, 1].astype(np.int32)
            scores0[rows[:, 0].astype(np.int64)] = rows[:, 2]
            grp = f.create_group(pair_key(rec.name0, rec.name1))
            grp.create_dataset("matches0", data=matches0)
            grp.create_dataset("matching_scores0", data=scores0)
            num_matches += len(rows)
            if progress:
                progress(k + 1)
    for tmp in (tmp_f, tmp_m):
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp_f, out_dir / features_name)
    os.replace(tmp_m, out_dir / matches_name)
    counts = [len(t) for t in merger.images.values()]
    return {"pairs": pairs, "images": len(merger.images), "keypoints": int(sum(counts)),
            "keypoints_per_image": float(np.mean(counts)) if counts else 0.0,
            "matches": num_matches}


def read_keypoints(features: Path, name: str) -> np.ndarray:
    """An image's keypoints from a features.h5."""
    with require_h5py().File(features, "r") as f:
        return f[name]["keypoints"][()]


def read_matches(matches: Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """A pair's matches as (M x 2 index rows, M scores), whichever order the file stores it in."""
    with require_h5py().File(matches, "r") as f:
        for a, b, flip in ((name0, name1, False), (name1, name0, True)):
            key = pair_key(a, b)
            if key in f:
                m0 = f[key]["matches0"][()]
                sc = f[key]["matching_scores0"][()]
                idx = np.nonzero(m0 >= 0)[0]
                rows = np.stack([idx, m0[idx]], 1)
                return (rows[:, ::-1] if flip else rows), sc[idx]
    raise MatchrtError(f"{matches} holds no matches for {name0} {name1}")
