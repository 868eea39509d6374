"""The crash-safe record of a pair job: every committed batch of matches, in small atomic files.

Each batch's matches go to one `.npz` shard, written under a temporary name, fsynced and renamed into
place, so a file either holds a whole batch or does not exist: `kill -9` loses at most the batch in
flight, and a re-run reads which pairs are done from the files. Many shards are compacted into one
segment now and then (written the same way; the shards are deleted after the segment is in place, and
a pair found twice is read once). A lock file keeps two jobs from writing one journal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from .atomic import atomic_write, fsync_dir
from .errors import MatchrtError
from .pairs import Pair


@dataclass
class PairRecord:
    """One matched pair: keypoints in original pixels (N x 2), scores (N), image sizes (h, w)."""

    name0: str
    name1: str
    keypoints0: np.ndarray
    keypoints1: np.ndarray
    scores: np.ndarray
    size0: tuple[int, int]
    size1: tuple[int, int]

    @property
    def pair(self) -> Pair:
        return (self.name0, self.name1)


def size_hw(value: Any) -> tuple[int, int]:
    """An image size as (height, width) ints."""
    h, w = (int(v) for v in value)
    return (h, w)


def _save(path: Path, packed: dict[str, np.ndarray]) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **packed))  # type: ignore[arg-type]


def _pack(records: list[PairRecord]) -> dict[str, np.ndarray]:
    counts = np.array([len(r.scores) for r in records], np.int64)
    cat = (lambda xs, shape: np.concatenate(xs).astype(np.float32) if xs else np.zeros(shape, np.float32))
    return {
        "name0": np.array([r.name0 for r in records], dtype=str),
        "name1": np.array([r.name1 for r in records], dtype=str),
        "counts": counts,
        "keypoints0": cat([np.asarray(r.keypoints0).reshape(-1, 2) for r in records], (0, 2)),
        "keypoints1": cat([np.asarray(r.keypoints1).reshape(-1, 2) for r in records], (0, 2)),
        "scores": cat([np.asarray(r.scores).reshape(-1) for r in records], (0,)),
        "size0": np.array([r.size0 for r in records], np.int64).reshape(-1, 2),
        "size1": np.array([r.size1 for r in records], np.int64).reshape(-1, 2),
    }


def _unpack(data: Any) -> Iterator[PairRecord]:
    ends = np.cumsum(data["counts"])
    starts = ends - data["counts"]
    k0, k1, sc = data["keypoints0"], data["keypoints1"], data["scores"]
    for i, (a, b) in enumerate(zip(data["name0"], data["name1"])):
        s, e = starts[i], ends[i]
        yield PairRecord(str(a), str(b), k0[s:e], k1[s:e], sc[s:e], size_hw(data["size0"][i]),
                         size_hw(data["size1"][i]))


class MatchJournal:
    """The journal folder of one job (OUT/.matchrt-journal): job.json, shards/, segments/, lock."""

    def __init__(self, root: Path, compact_every: int = 256):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.segments = self.root / "segments"
        self.compact_every = compact_every
        self._lock: Optional[Any] = None
        self._next = 0

    # -- life cycle ---------------------------------------------------------------------------
    def open(self, fingerprint: dict[str, Any]) -> "MatchJournal":
        """Lock the journal, check it belongs to this configuration, clear half-written files."""
        import fcntl

        for d in (self.shards, self.segments):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise MatchrtError(f"another matchrt job is writing {self.root.parent}; wait for it to "
                               "finish or use another --output") from None
        job = self.root / "job.json"
        if job.exists():
            old = json.loads(job.read_text())
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                self.close()
                raise MatchrtError(
                    f"{self.root.parent} holds matches made with another configuration (differs in: "
                    f"{', '.join(diff)}); use another --output, or --overwrite to start afresh")
        else:
            atomic_write(job, lambda f: f.write(json.dumps(fingerprint, indent=1).encode()))
        for d in (self.root, self.shards, self.segments):
            for tmp in d.glob(".*.tmp-*"):  # a write that a crash cut short
                tmp.unlink()
        numbers = [int(p.stem.split("-")[1]) for d in (self.shards, self.segments)
                   for p in d.glob("*.npz")]
        self._next = max(numbers, default=-1) + 1
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "MatchJournal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        files = list(self.segments.glob("*.npz")) + list(self.shards.glob("*.npz"))
        return sorted(files, key=lambda p: int(p.stem.split("-")[1]))

    def _load(self, path: Path) -> Optional[Any]:
        try:
            return np.load(path, allow_pickle=False)
        except Exception:  # noqa: BLE001 - a torn file (power loss) costs its pairs, never the job
            return None

    def done(self) -> set[Pair]:
        """Pairs whose matches are committed."""
        out: set[Pair] = set()
        for path in self._files():
            data = self._load(path)
            if data is not None:
                out.update(zip(map(str, data["name0"]), map(str, data["name1"])))
        return out

    def records(self) -> Iterator[PairRecord]:
        """Every committed pair once, in commit order."""
        seen: set[Pair] = set()
        for path in self._files():
            data = self._load(path)
            if data is None:
                continue
            for rec in _unpack(data):
                if rec.pair not in seen:
                    seen.add(rec.pair)
                    yield rec

    # -- writing -------------------------------------------------------------------------------
    def commit(self, records: Iterable[PairRecord]) -> Path:
        """One batch, atomically; compacts the shards when there are many."""
        packed = _pack(list(records))
        path = _save(self.shards / f"b-{self._next:09d}.npz", packed)
        self._next += 1
        if len(list(self.shards.glob("*.npz"))) >= self.compact_every:
            self.compact()
        return path

    def compact(self) -> Optional[Path]:
        """Merge the shards into one segment (segment first, then the shards go)."""
        shards = sorted(self.shards.glob("*.npz"), key=lambda p: int(p.stem.split("-")[1]))
        if len(shards) < 2:
            return None
        records: list[PairRecord] = []
        for path in shards:
            data = self._load(path)
            if data is not None:
                records.extend(_unpack(data))
        packed = _pack(records)
        number = int(shards[-1].stem.split("-")[1])  # keeps commit order with later shards
        seg = _save(self.segments / f"s-{number:09d}.npz", packed)
        for path in shards:
            path.unlink()
        fsync_dir(self.shards)
        return seg
