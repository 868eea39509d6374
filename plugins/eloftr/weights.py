"""Weight map of `matchanything_eloftr.ckpt` onto `ELoFTR`: the keys lose their `matcher.` prefix.

The checkpoint is Lightning's `state_dict` of the un-fused model (RepVGG branches, BatchNorm
running statistics and `num_batches_tracked` included), so every tensor has exactly one home.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from matchrt.types import MappedWeights
from matchrt.weights import Reserved, map_state_dict

PREFIX = "matcher."
LAYOUT = Path(__file__).parent / "layout.tsv"  # key layout of the real checkpoint (447 tensors)


def rename(source: str, key: str) -> Union[str, Reserved, None]:
    """Checkpoint key -> model key; None for anything outside the `matcher.` tree."""
    if source != "checkpoint" or not key.startswith(PREFIX):
        return None
    return key[len(PREFIX):]


def map_weights(
    target: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]],
    paths: Optional[Mapping[str, str]] = None,
) -> MappedWeights:
    """Map the loaded checkpoint onto `target` (the model's state dict) with a full report."""
    return map_state_dict("eloftr", target, sources, rename, paths)
