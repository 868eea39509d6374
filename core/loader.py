"""Streaming image pairs to a matcher: decode and resize in DataLoader workers, batch, pin memory.

Workers read each pair's images (`images.read_image`) and bring them to the graph's input
(`images.prepare_pair`), so the model never waits for JPEG decoding; a small per-worker cache keeps
the images of consecutive pairs (exhaustive and sequential lists repeat image 0) decoded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .images import prepare_pair, read_image
from .pairs import Pair
from .types import InputContract, PairContext


@dataclass
class PreparedPair:
    """One pair ready for the graph: input arrays (C x H x W, no batch axis) and its context."""

    index: int
    inputs: dict[str, np.ndarray]
    context: PairContext


class PairDataset:
    """Map-style dataset over a pair list (a torch Dataset by protocol: __len__ and __getitem__)."""

    def __init__(self, image_dir: Path, pairs: Sequence[Pair], indices: Sequence[int],
                 contract: InputContract, sizes: dict[str, tuple[int, int]], cache: int = 8):
        self.image_dir = Path(image_dir)
        self.pairs = list(pairs)
        self.indices = list(indices)  # positions in `pairs` still to match
        self.contract = contract
        self.sizes = dict(sizes)
        self.cache_size = cache
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, name: str) -> np.ndarray:
        with self._lock:  # Ray actors prepare a batch's pairs on several threads
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        image = read_image(self.image_dir / name)
        with self._lock:
            self._cache[name] = image
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a copy without cache or lock
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, item: int) -> PreparedPair:
        index = self.indices[item]
        return self.prepare(index, *self.pairs[index])

    def prepare(self, index: int, name0: str, name1: str) -> PreparedPair:
        """Read and resize one pair (what a loader worker does per item)."""
        return self.prepare_images(index, name0, name1, self.image(name0), self.image(name1))

    def prepare_images(self, index: int, name0: str, name1: str, image0: np.ndarray,
                       image1: np.ndarray) -> PreparedPair:
        """Resize one pair whose images were read elsewhere (`read_image`; Ray's reading stage)."""
        arrays, ctx = prepare_pair(image0, image1, self.contract, self.sizes)
        # the originals stay in the worker: postprocessing needs sizes and scales, not pixels
        ctx.image0 = ctx.image1 = None
        ctx.path0, ctx.path1 = name0, name1
        return PreparedPair(index, {k: v[0] for k, v in arrays.items()}, ctx)


def collate_pairs(items: list[PreparedPair]) -> dict[str, Any]:
    """Stack a batch: {"indices": [...], "contexts": [...], "inputs": {name: B x C x H x W tensor}}."""
    import torch

    names = list(items[0].inputs)
    return {
        "indices": [it.index for it in items],
        "contexts": [it.context for it in items],
        "inputs": {n: torch.from_numpy(np.stack([it.inputs[n] for it in items])) for n in names},
    }


def pair_loader(dataset: PairDataset, batch_size: int, num_workers: int, pin_memory: bool,
                prefetch: Optional[int] = None):
    """A torch DataLoader over the dataset, in order (results are committed in batches)."""
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=prefetch or 2)
    return DataLoader(dataset,  # type: ignore[arg-type]  # a Dataset by protocol
                      batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_pairs, pin_memory=pin_memory, **kwargs)
