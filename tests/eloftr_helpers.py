"""Shared helpers of the eloftr tests: reference data, the deterministic-weight model, export."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from matchrt.plugins.eloftr import hooks
from matchrt.plugins.eloftr.model import ELoFTR
from matchrt.plugins.eloftr.weights import LAYOUT
from matchrt.weights import enforce, load_checkpoint, write_random_checkpoint

DATA = Path(__file__).parent / "data" / "eloftr"
REFERENCE = DATA / "megadepth_320x320_ref.npz"
NON_SQUARE_REFERENCE = DATA / "megadepth_320x448_ref.npz"


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def reference() -> dict[str, np.ndarray]:
    """Upstream outputs on the MegaDepth pair at 320 x 320, threshold 2e-5 (see README.md)."""
    return _load(REFERENCE)


def non_square_reference() -> dict[str, np.ndarray]:
    """Upstream outputs on the same pair at 320 x 448 (H x W), threshold 1e-5 (see README.md)."""
    return _load(NON_SQUARE_REFERENCE)


def _images(ref: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    image0, image1 = (torch.from_numpy(ref[k].astype(np.float32)) / 255.0 for k in ("image0_u8", "image1_u8"))
    return image0, image1


def reference_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The two 1 x 1 x 320 x 320 inputs upstream saw (grayscale / 255, float32)."""
    return _images(reference())


def non_square_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The two 1 x 1 x 320 x 448 inputs of the non-square reference (bit-exact, float32)."""
    return _images(non_square_reference())


@functools.lru_cache(maxsize=None)
def checkpoint_path() -> Path:
    """The deterministic checkpoint in the real file's layout (Lightning, `matcher.` keys)."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="eloftr-test-")) / "matchanything_eloftr_det.ckpt"
    return write_random_checkpoint(LAYOUT, out, lightning=True)


@functools.lru_cache(maxsize=None)
def loaded_model() -> ELoFTR:
    """The un-fused model with the deterministic weights, loaded through the plugin's hooks."""
    path = checkpoint_path()
    mapped = hooks.map_weights("eloftr", {"checkpoint": load_checkpoint(path)}, {"checkpoint": str(path)}, {})
    enforce(mapped.report)
    model = hooks.create_model("eloftr", {})
    model.load_state_dict(mapped.state_dict, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def reference_run() -> dict[str, torch.Tensor]:
    """Our torch model's reference forward on the reference pair (threshold 2e-5)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    image0, image1 = reference_images()
    with torch.no_grad():
        return loaded_model()(image0, image1, threshold=float(reference()["threshold"]))


def pair_set(i_ids, j_ids) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in zip(np.asarray(i_ids), np.asarray(j_ids))}


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def max_rel(a, b) -> float:
    """Largest error relative to the largest magnitude of the reference."""
    b = np.asarray(b, dtype=np.float64)
    return max_abs(a, b) / float(np.abs(b).max())


def export_plan_at(h: int, w: int, batch: int = 1, **extra):
    """The plugin's export plan for the deterministic model at h x w (extra: export options)."""
    from matchrt.types import ExportOptions

    return hooks.export_plan("eloftr", loaded_model(), ExportOptions(h, w, batch=batch, extra=extra))


def run_wrapper(plan, *inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """The export wrapper itself (torch) on the inputs, outputs by name."""
    with torch.no_grad():
        out = plan.graphs[0].module(*inputs)
    return {n: t.numpy() for n, t in zip(plan.graphs[0].output_names, out)}


def run_onnxruntime(path, *inputs: torch.Tensor, names=("image0", "image1")) -> dict[str, np.ndarray]:
    """An exported graph on onnxruntime's CPU provider (2 threads), outputs by name."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    feed = {n: t.numpy() for n, t in zip(names, inputs)}
    return dict(zip(outputs, session.run(outputs, feed)))
