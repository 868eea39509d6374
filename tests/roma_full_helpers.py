"""Shared helpers of the roma_full tests: reference data, the deterministic-weight model, exports.

Everything heavy is built once per test session (module-level caches): the DINOv2 ViT-L model
with the deterministic weights (~1.5 GB of fp32 tensors), its run on the reference pair and the
ONNX exports (kept in one temporary directory).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matchrt.images import read_image
from matchrt.plugins.roma_full import hooks
from matchrt.plugins.roma_full.model import RomaCoarse
from matchrt.plugins.roma_full.weights import LAYOUT_DINOV2, LAYOUT_ROMA
from matchrt.weights import deterministic_state_dict, enforce, read_layout

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "roma" / "megadepth_c224_coarse.npz"
IMAGES = (DATA / "images" / "02928139_3448003521.jpg", DATA / "images" / "17295357_9106075285.jpg")
SIZE = 224


def threads() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@functools.lru_cache(maxsize=None)
def reference() -> dict[str, np.ndarray]:
    """Upstream coarse outputs at 224 x 224 (see tests/data/roma/README.md)."""
    with np.load(REFERENCE) as d:
        return {k: d[k] for k in d.files}


def stretch(path: Path, size: int) -> torch.Tensor:
    """The image as upstream feeds it: RGB / 255, stretched by bilinear resize without antialias."""
    x = torch.from_numpy(read_image(path).transpose(2, 0, 1).copy())[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


@functools.lru_cache(maxsize=None)
def reference_images(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    return stretch(IMAGES[0], size), stretch(IMAGES[1], size)


@functools.lru_cache(maxsize=None)
def deterministic_sources() -> dict[str, dict[str, torch.Tensor]]:
    """Both weight files in their real layouts, filled with the fixtures' deterministic weights."""
    return {
        "checkpoint": deterministic_state_dict(read_layout(LAYOUT_ROMA)),
        "dinov2": deterministic_state_dict(read_layout(LAYOUT_DINOV2)),
    }


@functools.lru_cache(maxsize=None)
def loaded_model() -> RomaCoarse:
    """RomaCoarse with the deterministic weights, mapped through the plugin's hook (exact GP solve)."""
    threads()
    mapped = hooks.map_weights("roma_full", deterministic_sources(), {}, {})
    enforce(mapped.report)
    model = hooks.create_model("roma_full", {})
    model.load_state_dict(mapped.state_dict, strict=True)
    deterministic_sources.cache_clear()  # the model holds its own copies now
    return model.eval()


@functools.lru_cache(maxsize=None)
def reference_run() -> dict[str, torch.Tensor]:
    """Our torch model on the reference pair at 224 (exact GP solve)."""
    threads()
    with torch.no_grad():
        return loaded_model()(*reference_images())


@functools.lru_cache(maxsize=None)
def export_dir() -> Path:
    """One temporary directory for the session's exports (~1.5 GB per graph), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="roma-full-test-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def exported(gp_solve: str, size: int = SIZE) -> Path:
    """Export the deterministic model with gp_solve at size x size; returns the manifest path."""
    from matchrt.export import export_plan
    from matchrt.types import ExportOptions

    threads()
    plan = hooks.export_plan("roma_full", loaded_model(), ExportOptions(size, size, extra={"gp_solve": gp_solve}))
    return export_plan(plan, export_dir() / f"{gp_solve}_{size}" / "roma_full.onnx")


def run_onnx_at(manifest: Path, size: int = SIZE) -> dict[str, torch.Tensor]:
    """Run an exported graph (sequence) through the runner (onnxruntime CPU, bridge between
    stages) on the reference pair at size x size."""
    from matchrt.host import create_host
    from matchrt.runner import artifact_pipeline

    threads()
    pipe = artifact_pipeline(create_host(), manifest, "onnxruntime", {"threads": 2})
    image0, image1 = reference_images(size)
    return pipe.run({"image0": image0, "image1": image1})


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def max_rel(a, b) -> float:
    """Largest error relative to the largest magnitude of the reference (as `matchrt check`)."""
    b = np.asarray(b, dtype=np.float64)
    return max_abs(a, b) / float(np.abs(b).max())
