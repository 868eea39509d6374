"""Weight map of MatchAnything RoMa's two files onto ``RomaPlus``: every tensor has a home.

- source "checkpoint" (``matchanything_roma.ckpt``, 603 tensors): the coarse half's tensors go
  through roma_full's ``coarse_rename`` under ``coarse.``; ``matcher.model.decoder.conv_refiner.*``
  -> ``conv_refiner.*`` and ``matcher.model.decoder.proj.{8,4,2,1}.*`` -> ``proj.{8,4,2,1}.*``.
- source "dinov2" (``dinov2_vitl14_pretrain.pth``, 343 tensors): ``coarse.encoder.dinov2.*``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from matchrt.plugins.roma_full.weights import (
    CKPT_PREFIX, LAYOUT_DINOV2, LAYOUT_ROMA, coarse_rename, is_refiner_key,
)
from matchrt.types import MappedWeights
from matchrt.weights import Reserved, map_state_dict

NAME = "roma_plus"
DECODER_PREFIX = CKPT_PREFIX + "decoder."

__all__ = ["LAYOUT_ROMA", "LAYOUT_DINOV2", "rename", "map_weights"]


def rename(source: str, key: str) -> Union[str, Reserved, None]:
    """RomaPlus key of a checkpoint or DINOv2 tensor; None for a tensor no part of RoMa uses."""
    if is_refiner_key(source, key):
        # conv_refiner.<s>.* and proj.<s>.* keep their names below matcher.model.decoder.
        return key[len(DECODER_PREFIX):]
    inner = coarse_rename(source, key)
    return None if inner is None else "coarse." + inner


def map_weights(target: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]],
                paths: Optional[Mapping[str, str]] = None) -> MappedWeights:
    """Map both files onto ``target`` (a RomaPlus state dict) with the full report."""
    return map_state_dict(NAME, target, sources, rename, paths)
