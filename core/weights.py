"""Reading weight files and mapping their tensors onto a model, with a report that hides nothing."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np

from .atomic import atomic_path
from .errors import MatchrtError
from .types import MappedWeights, MappingReport, WeightReport

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")


class WeightMappingError(MatchrtError):
    """A checkpoint does not map 100% onto the model."""

    def __init__(self, report: WeightReport):
        self.report = report
        super().__init__(
            report.summary()
            + "\nThe checkpoint does not match this matcher's model. Check that --matcher and the"
            " file agree (and --dinov2 for RoMa); pass --allow-partial to load it anyway."
        )


class Reserved:
    """Marks a source tensor that another matcher (e.g. roma_plus) uses: counted, not an error."""

    def __init__(self, owner: str):
        self.owner = owner


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load a flat {key: tensor} dict from .ckpt/.pth/.pt (weights_only) or .safetensors.

    Lightning's {"state_dict": ...} and {"model": ...} wrappers are unwrapped.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MatchrtError(f"weight file not found: {path}. Pass the path of an existing file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MatchrtError(
            f"cannot read weight file {path}: {first[:300]}. The file is corrupt, truncated or not a"
            " PyTorch/safetensors checkpoint; download it again. Only tensor checkpoints load"
            " (torch.load weights_only=True): pickled code is refused."
        ) from None
    except Exception as exc:  # noqa: BLE001 - pickle errors carry many types
        raise MatchrtError(
            f"cannot read weight file {path}: {type(exc).__name__}: {str(exc)[:300]}. Only tensor"
            " checkpoints load (torch.load weights_only=True); re-save it as a plain state dict."
        ) from None
    for wrapper in ("state_dict", "model", "params"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
            break
    if not isinstance(data, Mapping):
        raise MatchrtError(f"{path} holds a {type(data).__name__}, not a dict of tensors.")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise MatchrtError(
            f"{path} holds non-tensor entries ({', '.join(map(str, others[:5]))}); expected a state"
            " dict of tensors."
        )
    if not tensors:
        raise MatchrtError(f"{path} holds no tensors.")
    return tensors


def map_state_dict(
    matcher: str,
    target: Mapping[str, Any],
    sources: Mapping[str, Mapping[str, Any]],
    rename: Callable[[str, str], Union[str, Reserved, None]],
    paths: Optional[Mapping[str, str]] = None,
    transform: Optional[Callable[[str, Any], Any]] = None,
) -> MappedWeights:
    """Map every source tensor onto `target` (a model's state dict) through `rename`.

    `rename(source_name, key)` returns the target key, a `Reserved(owner)` for a tensor another
    matcher uses, or None for a tensor the matcher does not know (reported as unused).
    `transform(target_key, tensor)` may reshape a tensor (e.g. fused layouts) before the shape check.
    """
    paths = paths or {}
    state: dict[str, Any] = {}
    filled_from: dict[str, str] = {}
    mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    reports = []
    for name, tensors in sources.items():
        rep = MappingReport(source=name, path=str(paths.get(name, "")), total=len(tensors), mapped=0)
        for key, value in tensors.items():
            dest = rename(name, key)
            if isinstance(dest, Reserved):
                rep.reserved.setdefault(dest.owner, []).append(key)
                continue
            if dest is None or dest not in target:
                rep.unused.append(key)
                continue
            if transform is not None:
                value = transform(dest, value)
            want = tuple(target[dest].shape)
            if tuple(value.shape) != want:
                mismatches.append((key, tuple(value.shape), want))
                continue
            if dest in filled_from:
                raise MatchrtError(
                    f"weight map of {matcher} sends both {filled_from[dest]} and {name}:{key} to {dest}"
                )
            state[dest] = value.to(target[dest].dtype)
            filled_from[dest] = f"{name}:{key}"
            rep.mapped += 1
        reports.append(rep)
    missing = [k for k in target if k not in state]
    report = WeightReport(
        matcher=matcher, sources=reports, target_total=len(target), missing=missing,
        shape_mismatches=mismatches,
    )
    return MappedWeights(state_dict=state, report=report)


def enforce(report: WeightReport, allow_partial: bool = False) -> None:
    """Raise on an incomplete mapping; with allow_partial, warn loudly instead."""
    if report.ok:
        return
    if not allow_partial:
        raise WeightMappingError(report)
    import warnings

    warnings.warn("loading partial weights (--allow-partial):\n" + report.summary(), stacklevel=2)


def read_layout(path: Union[str, Path]) -> list[tuple[str, tuple[int, ...], str]]:
    """Read a key layout TSV (`key<TAB>shape<TAB>dtype`, header line first)."""
    rows = []
    for line in Path(path).read_text().splitlines()[1:]:
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(s) for s in shape.split(",") if s)
        rows.append((key, dims, dtype))
    return rows


def deterministic_tensor(key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The fixtures' deterministic initialisation of one tensor (see tests/data/README.md)."""
    if "int" in dtype:
        return np.zeros(shape, dtype=np.dtype(dtype))
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    z = np.random.RandomState(seed).standard_normal(shape)
    if key.endswith("running_var"):
        v = 1 + 0.1 * np.abs(z)
    elif key.endswith("running_mean"):
        v = 0.1 * z
    elif len(shape) == 0:
        v = 1 + 0.1 * z
    elif len(shape) == 1 and key.endswith(".bias"):
        v = 0.02 * z
    elif len(shape) == 1:
        v = 1 + 0.1 * z
    else:
        v = z / np.sqrt(np.prod(shape[1:]))
        if ".backbone." in key:
            v = v * 0.5
    return np.asarray(v, dtype=np.float32)


def deterministic_state_dict(layout: Iterable[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """A state dict in a real checkpoint's layout, filled with the deterministic weights."""
    import torch

    return {k: torch.from_numpy(deterministic_tensor(k, s, d)) for k, s, d in layout}


def write_random_checkpoint(layout: Union[str, Path], output: Union[str, Path], lightning: bool) -> Path:
    """Write a checkpoint in the layout's exact key set, with deterministic (not trained) weights."""
    import torch

    sd = deterministic_state_dict(read_layout(layout))
    # other processes (Ray actors, loader workers) may read it: written aside, renamed into place
    return atomic_path(output, lambda tmp: torch.save({"state_dict": sd} if lightning else sd, str(tmp)))


def sha256_file(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
