"""Comparing backends' raw outputs (what `matchrt check --backend tensorrt --reference ...` prints)."""

from __future__ import annotations

import numpy as np
import torch
from matchrt.compare import compare_outputs, format_rows


def outputs(scale=1.0, **changes):
    rng = np.random.default_rng(0)
    out = {
        "keypoints0": torch.from_numpy(rng.random((1, 8, 2), dtype=np.float32) * 320 * scale),
        "confidence": torch.from_numpy(rng.random((1, 8), dtype=np.float32)),
        "valid": torch.from_numpy(rng.random((1, 8)) > 0.5),
    }
    out.update(changes)
    return out


def test_identical_outputs_pass():
    ref = outputs()
    rows = compare_outputs(ref, outputs(), rtol=1e-4)
    assert [r.name for r in rows] == ["keypoints0", "confidence", "valid"]
    assert all(r.ok and r.max_abs == 0 for r in rows)


def test_error_is_relative_to_the_reference_scale():
    ref = outputs()
    kp = ref["keypoints0"].clone()
    kp[0, 3, 1] += 0.02  # 0.02 px on a 320 px scale: 6e-5 relative
    row = compare_outputs(ref, dict(ref, keypoints0=kp), rtol=1e-4)[0]
    assert abs(row.max_abs - 0.02) < 1e-5
    assert abs(row.rel - 0.02 / float(ref["keypoints0"].abs().max())) < 1e-9
    assert row.ok
    assert not compare_outputs(ref, dict(ref, keypoints0=kp), rtol=1e-5)[0].ok
    assert "max abs 2.000e-02" in str(row) and "ok" in str(row)


def test_boolean_outputs_must_match_exactly():
    ref = outputs()
    flipped = ref["valid"].clone()
    flipped[0, 0] = ~flipped[0, 0]
    row = compare_outputs(ref, dict(ref, valid=flipped), rtol=1.0)[2]
    assert row.mismatched == 1 / 8 and not row.ok and "differing 12.50%" in str(row)


def test_missing_reshaped_and_nonfinite_outputs_fail():
    ref = outputs()
    test = dict(ref)
    del test["confidence"]
    test["keypoints0"] = ref["keypoints0"].reshape(8, 2)
    rows = {r.name: r for r in compare_outputs(ref, test, rtol=1.0)}
    assert rows["confidence"].note == "missing" and not rows["confidence"].ok
    assert "shape" in rows["keypoints0"].note and not rows["keypoints0"].ok
    nan = ref["confidence"].clone()
    nan[0, 2] = float("nan")
    row = compare_outputs(ref, dict(ref, confidence=nan), rtol=1.0)[1]
    assert not row.ok and "non-finite" in str(row)


def test_half_precision_and_gpu_style_tensors_are_compared_in_float64():
    ref = outputs()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.items()}
    rows = compare_outputs(ref, half, rtol=1e-2)
    assert all(r.ok for r in rows)
    assert 0 < rows[0].rel <= 1e-3  # fp16 rounding, measured, not hidden


def test_table_names_both_backends_and_counts():
    ref = outputs()
    table = format_rows(compare_outputs(ref, outputs(scale=1.5), rtol=1e-2), "onnxruntime", "tensorrt")
    lines = table.splitlines()
    assert lines[0] == "tensorrt vs onnxruntime:"
    assert lines[-1] == "2/3 outputs within tolerance" and "FAIL" in lines[1]
