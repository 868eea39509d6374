"""Atomic writes: a reader sees a whole file or the old one, never half; a failed write loses nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from matchrt.atomic import atomic_path, atomic_text, atomic_write


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_text(target, "old")

    def half_then_fail(f) -> None:
        f.write(b"ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    with pytest.raises(ZeroDivisionError):
        atomic_path(target, lambda tmp: (tmp.write_text("half"), 1 / 0))
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_parallel_writers_of_one_file_each_leave_a_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "cache.bin"  # the parent is created
    payloads = [bytes([k]) * 200_000 for k in range(8)]
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if target.exists():
                seen.append(target.read_bytes())

    def writer(k: int) -> None:
        for _ in range(5):
            atomic_write(target, lambda f: [f.write(payloads[k][i:i + 4096])
                                            for i in range(0, len(payloads[k]), 4096)])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(len(payloads))]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert target.read_bytes() in payloads
    assert seen and all(data in payloads for data in seen)
    assert sorted(p.name for p in target.parent.iterdir()) == ["cache.bin"]


def test_path_writers_get_a_temporary_path_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "trace.json"
    used: list[Path] = []
    atomic_path(target, lambda tmp: (used.append(tmp), tmp.write_text("{}")))
    assert used[0].parent == target.parent and used[0] != target
    assert target.read_text() == "{}" and not used[0].exists()
