"""Helpers for the match-pairs tests: reading back what the job wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an h5 file by its path."""
    import h5py

    found: dict[str, np.ndarray] = {}

    def visit(name: str, obj) -> None:  # returns None: visititems stops at any other value
        if isinstance(obj, h5py.Dataset):
            found[name] = obj[()]

    with h5py.File(path) as f:
        f.visititems(visit)
    return found
