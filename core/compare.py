"""Comparing two backends' raw outputs: per-output errors and sparse match-set agreement.

API: `compare_outputs(reference, test, rtol) -> list[OutputDiff]` (printable rows with `.ok`),
`format_rows(rows, reference="", test="") -> str` (a header and one row per output),
`match_set_agreement(reference, test) -> float | None`.

`rel` is the largest absolute error divided by the largest magnitude of the reference output, so
one tolerance fits outputs of any scale; boolean and integer outputs report the fraction of entries
that differ instead and must match exactly. A missing output, a shape change or a NaN/inf where the
reference is finite fails the row whatever the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np


def _np(x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
            return x.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(x)


@dataclass
class OutputDiff:
    """How far one output strays from the reference."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float  # max |a - b| / max |b|
    rtol: float
    mismatched: Optional[float] = None  # boolean/integer outputs: fraction of differing entries
    note: str = ""  # what makes the row fail outright: "missing", "shape ...", "non-finite"

    @property
    def ok(self) -> bool:
        if self.note:
            return False
        if self.mismatched is not None:
            return self.mismatched == 0.0
        return self.rel <= self.rtol

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        if self.note:
            return f"{self.name:>16} {str(self.shape):>18}  {self.note}  {verdict}"
        if self.mismatched is not None:
            return f"{self.name:>16} {str(self.shape):>18}  differing {self.mismatched:.2%}  {verdict}"
        return (f"{self.name:>16} {str(self.shape):>18}  max abs {self.max_abs:.3e}  rel {self.rel:.3e}"
                f" (tol {self.rtol:g})  {verdict}")


def compare_outputs(reference: Mapping[str, Any], test: Mapping[str, Any], rtol: float) -> list[OutputDiff]:
    """Errors of every output of `test` against `reference` (same names and shapes)."""
    rows = []
    for name, ref in reference.items():
        b = _np(ref)
        if name not in test:
            rows.append(OutputDiff(name, tuple(b.shape), float("inf"), float("inf"), rtol, note="missing"))
            continue
        a = _np(test[name])
        if a.shape != b.shape:
            rows.append(OutputDiff(name, tuple(b.shape), float("inf"), float("inf"), rtol,
                                   note=f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"))
            continue
        if b.dtype == np.bool_ or np.issubdtype(b.dtype, np.integer):
            diff = float(np.mean(a != b)) if b.size else 0.0
            rows.append(OutputDiff(name, tuple(b.shape), diff, diff, rtol, mismatched=diff))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(b64)
        if not np.isfinite(a64[finite]).all():
            rows.append(OutputDiff(name, tuple(b.shape), float("inf"), float("inf"), rtol,
                                   note="non-finite values where the reference is finite"))
            continue
        max_abs = float(np.max(np.abs(a64[finite] - b64[finite]))) if finite.any() else 0.0
        scale = float(np.max(np.abs(b64[finite]))) if finite.any() else 0.0
        rows.append(OutputDiff(name, tuple(b.shape), max_abs, max_abs / scale if scale > 0 else max_abs,
                               rtol))
    return rows


def format_rows(rows: list[OutputDiff], reference: str = "", test: str = "") -> str:
    """A printable table: which backends, then one line per output."""
    head = f"{test or 'test'} vs {reference or 'reference'}:" if (reference or test) else "outputs:"
    failed = sum(not r.ok for r in rows)
    tail = f"{len(rows) - failed}/{len(rows)} outputs within tolerance"
    return "\n".join([head, *(str(r) for r in rows), tail])


def is_sparse(outputs: Mapping[str, Any]) -> bool:
    """Whether outputs are a sparse match set (keypoints0, keypoints1, valid)."""
    return {"keypoints0", "keypoints1", "valid"} <= set(outputs)


def match_set_agreement(reference: Mapping[str, Any], test: Mapping[str, Any], pixel: float = 0.5) -> Optional[float]:
    """Sparse outputs: intersection over union of the valid (keypoint0, keypoint1) pairs.

    None when the outputs are not sparse or neither side has a valid match.
    """
    if not is_sparse(reference):
        return None

    def pairs(out: Mapping[str, Any]) -> set:
        valid = _np(out["valid"]).astype(bool).reshape(-1)
        k0 = _np(out["keypoints0"]).reshape(-1, 2)[valid]
        k1 = _np(out["keypoints1"]).reshape(-1, 2)[valid]
        q = np.round(np.concatenate([k0, k1], 1) / pixel).astype(np.int64)
        return {tuple(r) for r in q}

    a, b = pairs(reference), pairs(test)
    union = a | b
    return None if not union else len(a & b) / len(union)  # no matches on either side: nothing to say
