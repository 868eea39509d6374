"""Weight map of MatchAnything RoMa's two files onto ``RomaCoarse``.

- source "checkpoint" (``matchanything_roma.ckpt``, 603 tensors, Lightning ``state_dict``):
  ``matcher.model.encoder.cnn.*`` -> ``encoder.cnn.*``, ``matcher.model.decoder.proj.16.*`` ->
  ``proj16.*``, ``...gps.16.*`` -> ``gp.*``, ``...embedding_decoder.*`` -> ``embedding_decoder.*``.
  The refiners (``conv_refiner.*``) and the finer projections (``proj.{8,4,2,1}``) belong to
  roma_plus and are reported as reserved for it.
- source "dinov2" (``dinov2_vitl14_pretrain.pth``, 343 plain ViT keys): ``K`` -> ``encoder.dinov2.K``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from matchrt.types import MappedWeights
from matchrt.weights import Reserved, map_state_dict

HERE = Path(__file__).parent
LAYOUT_ROMA = HERE / "layout_roma.tsv"  # 603 tensors
LAYOUT_DINOV2 = HERE / "layout_dinov2.tsv"  # 343 tensors

CKPT_PREFIX = "matcher.model."
# checkpoint prefix (after "matcher.model.") -> RomaCoarse prefix
COARSE_PREFIXES: dict[str, str] = {
    "encoder.cnn.": "encoder.cnn.",
    "decoder.proj.16.": "proj16.",
    "decoder.gps.16.": "gp.",
    "decoder.embedding_decoder.": "embedding_decoder.",
}
# checkpoint prefixes (full keys) of the tensors only the refining pipeline uses
REFINER_PREFIXES: tuple[str, ...] = (
    "matcher.model.decoder.conv_refiner.",
    "matcher.model.decoder.proj.8.",
    "matcher.model.decoder.proj.4.",
    "matcher.model.decoder.proj.2.",
    "matcher.model.decoder.proj.1.",
)
REFINER_OWNER = "roma_plus"


def coarse_rename(source: str, key: str) -> Optional[str]:
    """RomaCoarse key of a tensor the coarse half uses; None for any other tensor."""
    if source == "dinov2":
        return "encoder.dinov2." + key
    if source != "checkpoint" or not key.startswith(CKPT_PREFIX):
        return None
    rest = key[len(CKPT_PREFIX):]
    for src, dst in COARSE_PREFIXES.items():
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def is_refiner_key(source: str, key: str) -> bool:
    """Whether a checkpoint tensor belongs to the refiners (scales 16..1) or their projections."""
    return source == "checkpoint" and key.startswith(REFINER_PREFIXES)


def rename(source: str, key: str) -> Union[str, Reserved, None]:
    """roma_full's rename: coarse tensors mapped, refiner tensors reserved for roma_plus."""
    if is_refiner_key(source, key):
        return Reserved(REFINER_OWNER)
    return coarse_rename(source, key)


def map_weights(target: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]],
                paths: Optional[Mapping[str, str]] = None) -> MappedWeights:
    """Map both files onto ``target`` (a RomaCoarse state dict) with the full report."""
    return map_state_dict("roma_full", target, sources, rename, paths)
