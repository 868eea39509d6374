"""Shared helpers of the eloftr tests: reference data, the deterministic-weight model, export."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from matchrt.plugins.eloftr import hooks
from matchrt.plugins.eloftr.model import ELoFTR
from matchrt.plugins.eloftr.weights import LAYOUT
from matchrt.weights import enforce, load_checkpoint, write_random_checkpoint

if TYPE_CHECKING:
    from matchrt.runner import Pipeline

DATA = Path(__file__).parent / "data" / "eloftr"
MEGADEPTH_IMAGES = ("02928139_3448003521.jpg", "17295357_9106075285.jpg")
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
    """The deterministic checkpoint in the real file's layout (Lightning, `matcher.` keys), in a temporary
    directory removed at exit (62 MB that each test session left behind)."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="eloftr-test-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_random_checkpoint(LAYOUT, folder / "matchanything_eloftr_det.ckpt", lightning=True)


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


def robust_threshold(image0: torch.Tensor, image1: torch.Tensor, lo: int, hi: int,
                     masks=None) -> tuple[float, int]:
    """A threshold in the widest relative gap between the lo-th and hi-th matchable confidences.

    Parity tests need a match set that ~1e-4 relative noise cannot change: no confidence near
    the threshold, and fewer matches than K (or the K-th place could swap). `masks`: content
    masks of padded inputs (the border then follows the content).
    """
    from matchrt.plugins.eloftr.model import COARSE_STRIDE, content_extents, keep_masks

    model = loaded_model()
    size = (int(image0.shape[-2]), int(image0.shape[-1]))
    padding = content_extents(masks)
    with torch.no_grad():
        feats, _, _ = model.extract(image0, image1)
        conf = model.confidence(*model.transform(feats, size, padding=padding), padding)[0]
    keep0, keep1 = keep_masks(size[0] // COARSE_STRIDE, size[1] // COARSE_STRIDE, padding)
    ranked = torch.sort((conf * keep0[0][:, None] * keep1[0][None, :]).reshape(-1), descending=True).values
    return gap_threshold(ranked[: hi + 2].numpy(), lo, hi)


def gap_threshold(ranked: np.ndarray, lo: int, hi: int) -> tuple[float, int]:
    """The middle of the widest relative gap between places lo and hi of descending confidences,
    and how many confidences lie above it."""
    cut = lo + int(np.argmax(ranked[lo:hi] / ranked[lo + 1:hi + 1]))
    return float((ranked[cut] + ranked[cut + 1]) / 2), cut + 1


def assert_same_matches(ours: dict[str, np.ndarray], runtime: dict[str, np.ndarray]) -> None:
    """Identical valid sets, keypoints within 1e-3 px, log-confidences within 1e-4 relative.

    Near-equal confidences may swap places, so matches are paired by (kp0, kp1), which is
    unique per coarse pair (two pairs differ by a cell, i.e. pixels, in one image at least).
    A confidence is the exponential of a dual-softmax score (about -10.7 here, confidences near
    2e-5): its relative error is the score's absolute error, which fp32 arithmetic only bounds
    relative to the score. So the fp32 rule (1e-4 relative) applies to the log-confidence. (On an
    AVX-512 Xeon, session 18, torch and onnxruntime 1.22-1.32 differed by 1.7e-4 in confidence,
    1.6e-5 in log-confidence.)
    """
    assert np.array_equal(ours["valid"], runtime["valid"])
    stats = agreement(match_set(ours), match_set(runtime), pixels=1e-3)
    assert stats["paired"] == stats["reference"] > 0 and stats["one_to_one"], f"not one to one: {stats}"
    assert stats["log_conf_rel"] <= 1e-4, stats


def match_set(out: dict) -> dict[str, np.ndarray]:
    """The first pair's valid matches of a graph's outputs (numpy arrays or torch tensors on any
    device): keypoints ``kp0``, ``kp1`` and confidences ``conf``, in slot order."""
    def array(x) -> np.ndarray:
        return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    valid = array(out["valid"])[0].astype(bool)
    return {"kp0": array(out["keypoints0"])[0][valid], "kp1": array(out["keypoints1"])[0][valid],
            "conf": array(out["confidence"])[0][valid]}


def pipeline_at(size: int, threshold: float, options: dict) -> "Pipeline":
    """eloftr with the deterministic weights at size x size, ``threshold``, 2048 slots, on the torch
    backend with ``options`` (device, precision, compile, cuda_graph)."""
    from matchrt.runner import open_pipeline

    return open_pipeline("eloftr", "torch", {"checkpoint": checkpoint_path()}, height=size, width=size,
                         extra={"threshold": threshold, "max_matches": 2048}, backend_options=options)


@functools.lru_cache(maxsize=None)
def megadepth_pair(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MegaDepth pair as 1 x 1 x size x size grayscale in [0, 1] (INTER_AREA, as the reference)."""
    import cv2

    folder = Path(__file__).parent / "data" / "images"
    out = []
    for name in MEGADEPTH_IMAGES:
        gray = cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE)
        resized = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(resized.astype(np.float32) / 255.0)[None, None])
    return out[0], out[1]


def noisy(image: torch.Tensor, seed: int) -> torch.Tensor:
    """``image`` plus uniform noise of +-0.5/255 (its 8-bit quantisation), clipped to [0, 1]."""
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed)) - 0.5
    return (image + noise / 255.0).clamp(0.0, 1.0)


def valid_matches(pipe: "Pipeline", image0: torch.Tensor, image1: torch.Tensor, calls: int = 1) -> dict[str, np.ndarray]:
    """Valid matches of the last of ``calls`` calls (a CUDA-graph session replays from its later calls)."""
    for _ in range(calls):
        out = pipe.run({"image0": image0.clone(), "image1": image1.clone()})
    return match_set(out)


def agreement(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], pixels: float = 0.5) -> dict[str, float]:
    """How ``test`` matches ``ref``: each reference match paired with its nearest test match (largest
    coordinate difference over both keypoints) when that lies within ``pixels``."""
    a = np.concatenate([ref["kp0"], ref["kp1"]], 1).astype(np.float64)
    b = np.concatenate([test["kp0"], test["kp1"]], 1).astype(np.float64)
    if not len(a) or not len(b):
        return {"reference": len(a), "test": len(b), "paired": 0, "one_to_one": True, "max_px": 0.0,
                "log_conf_rel": 0.0}
    dist = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
    nearest, gap = dist.argmin(1), dist.min(1)
    paired = gap <= pixels
    log_ref = np.log(ref["conf"][paired].astype(np.float64))
    log_test = np.log(test["conf"][nearest[paired]].astype(np.float64))
    return {
        "reference": len(a), "test": len(b), "paired": int(paired.sum()),
        "one_to_one": len(set(nearest[paired].tolist())) == int(paired.sum()),
        "max_px": float(gap[paired].max()) if paired.any() else 0.0,
        "log_conf_rel": float((np.abs(log_test - log_ref) / np.abs(log_ref)).max()) if paired.any() else 0.0,
    }
