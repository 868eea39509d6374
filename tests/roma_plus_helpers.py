"""Shared helpers of the roma_plus tests: reference data, deterministic weights, one model per session.

Reference data (tests/data/roma/), copied from the upstream fixtures (MatchAnything
``RegressionMatcher.self_inference_time_match``, fp32 CPU, deterministic weights, the MegaDepth
pair of tests/data/images read as RGB / 255 and stretched bilinearly without antialiasing):

- ``c224_fine.npz`` (coarse 224, no upsampling): per-scale decoder outputs ``s{16,8,4,2,1}_flow``
  (2 x 2 x h x w, batch A->B then B->A) and ``s*_certainty`` (logits), the final ``certainty``
  (224 x 448) and ``warp_grid`` (224 x 224 x 2), the pixel grid half of each warp half. The warp
  itself is not stored: its other halves equal clamp(s1_flow) exactly (checked when copying), so
  ``reference_warp`` rebuilds it bit for bit.
- ``c560_u864_sub.npz`` (upstream default: coarse 560, upsampling pass at 864): the upsampled
  pass's ``s8_flow``/``s8_certainty`` (108 x 108) in full; ``s1_*``, the final certainty and the
  warp grid subsampled with stride 8 (``*_sub``).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from matchrt.images import read_image
from matchrt.plugins.roma_plus import hooks
from matchrt.plugins.roma_plus.preprocess import image_tensor, resize_images
from matchrt.plugins.roma_plus.weights import LAYOUT_DINOV2, LAYOUT_ROMA
from matchrt.weights import enforce, load_checkpoint, read_layout, write_random_checkpoint

DATA = Path(__file__).parent / "data"
ROMA = DATA / "roma"
PAIR = (DATA / "images" / "02928139_3448003521.jpg", DATA / "images" / "17295357_9106075285.jpg")
FLOW_RTOL = 1e-4
CERT_RTOL = 1e-3


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    """A temporary folder for this session's checkpoints and graphs (removed at exit: ~3 GB)."""
    path = Path(tempfile.mkdtemp(prefix="roma-plus-test-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.lru_cache(maxsize=None)
def reference(name: str = "c224_fine") -> dict[str, np.ndarray]:
    with np.load(ROMA / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


def reference_warp(flow_s1: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Upstream's symmetric warp (H x 2W x 4) from the s1 flows (2 x 2 x H x W) and the pixel grid."""
    a_to_b = np.clip(flow_s1[0].transpose(1, 2, 0), -1, 1)
    b_to_a = np.clip(flow_s1[1].transpose(1, 2, 0), -1, 1)
    return np.concatenate((np.concatenate((grid, a_to_b), -1), np.concatenate((b_to_a, grid), -1)), axis=1)


@functools.lru_cache(maxsize=None)
def originals() -> tuple[np.ndarray, np.ndarray]:
    """The MegaDepth pair as read by matchrt (H x W x 3 RGB in [0, 1]): the fixtures' inputs."""
    return read_image(PAIR[0]), read_image(PAIR[1])


def inputs(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images stretched to side x side as upstream (bilinear, no antialiasing), 1 x 3 x S x S."""
    a, b = originals()
    return resize_images(image_tensor(a), side), resize_images(image_tensor(b), side)


def meta_sources() -> dict[str, dict[str, torch.Tensor]]:
    """Both real layouts as meta tensors (keys, shapes, dtypes; no memory): enough for mapping checks."""
    out = {}
    for name, layout in (("checkpoint", LAYOUT_ROMA), ("dinov2", LAYOUT_DINOV2)):
        out[name] = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, s, d in read_layout(layout)}
    return out


@functools.lru_cache(maxsize=None)
def checkpoint_paths() -> dict[str, Path]:
    """Deterministic files as the real ones are stored: a Lightning RoMa checkpoint, a plain DINOv2 file.

    The content ``matchrt.weights.write_random_checkpoint`` writes (the fixtures' weights).
    """
    out = workdir()
    paths = {"checkpoint": out / "matchanything_roma_det.ckpt", "dinov2": out / "dinov2_vitl14_det.pth"}
    write_random_checkpoint(LAYOUT_ROMA, paths["checkpoint"], lightning=True)
    write_random_checkpoint(LAYOUT_DINOV2, paths["dinov2"], lightning=False)
    return paths


def mapped() -> Any:
    """The plugin's weight map of both files (a MappedWeights with its report; 1.7 GB, not kept)."""
    paths = checkpoint_paths()
    sources = {name: load_checkpoint(p) for name, p in paths.items()}
    return hooks.map_weights("roma_plus", sources, {k: str(v) for k, v in paths.items()}, {})


@functools.lru_cache(maxsize=None)
def _model_and_report() -> tuple[Any, Any]:
    result = mapped()
    enforce(result.report)
    model = hooks.create_model("roma_plus", {"gp_solve": "exact"})
    model.load_state_dict(result.state_dict, strict=True)
    return model.eval(), result.report


def mapping_report() -> Any:
    """The WeightReport of mapping the two deterministic files (kept from loading the model)."""
    return _model_and_report()[1]


def loaded_model() -> Any:
    """RomaPlus with the deterministic weights: exact GP (as upstream), symmetric, upsample 864."""
    return _model_and_report()[0]


@functools.lru_cache(maxsize=None)
def run_224() -> dict[str, Any]:
    """The model at coarse 224 without upsampling: coarse dict, per-scale outputs, warp, certainty."""
    model = loaded_model()
    a, b = inputs(224)
    with torch.no_grad():
        coarse, first, _ = model.correspondences(a, b)
        warp, cert = model.finish(first, None)
    return {"coarse": coarse, "first": first, "warp": warp, "certainty": cert, "image0": a, "image1": b}


def rel(test: Any, ref: Any) -> float:
    """max |test - ref| / max |ref| (the project's relative error)."""
    t = np.asarray(test.detach().cpu() if isinstance(test, torch.Tensor) else test, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    return float(np.abs(t - r).max() / np.abs(r).max())


def dense_outputs(warp: np.ndarray, certainty: np.ndarray) -> dict[str, torch.Tensor]:
    """A graph's raw outputs for one pair (batch of 1)."""
    return {"warp": torch.from_numpy(warp)[None], "certainty": torch.from_numpy(certainty)[None]}


def pair_context(size0: tuple[int, int], size1: tuple[int, int], side: int = 224,
                 image0: Optional[np.ndarray] = None, image1: Optional[np.ndarray] = None) -> Any:
    from matchrt.types import PairContext

    return PairContext(
        original_size0=size0, original_size1=size1, input_size=(side, side),
        scale0=(side / size0[1], side / size0[0]), scale1=(side / size1[1], side / size1[0]),
        image0=image0, image1=image1,
    )
