"""Files that another process may read while they are written (caches, artifacts, outputs, journals) are
written under a temporary name beside their final one, flushed to disk and renamed into place: a reader
sees the whole old file, the whole new one, or none, never half of one. The temporary name carries the
process and thread, so parallel writers of one file do not share it, and a failed write leaves nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_path(path: Union[str, Path], write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` with a temporary path beside `path` (for writers that take a path: torch.save,
    h5py, a profiler's trace), then flush it and rename it into place. The parent is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(file)` on a binary file opened under a temporary name, then rename it into place."""

    def through_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_path(path, through_file)


def atomic_text(path: Union[str, Path], text: str) -> Path:
    """`text` (UTF-8) written atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))
