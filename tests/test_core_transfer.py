"""Inputs reach the device unchanged through the kept pinned buffers (matchrt.transfer.Uploader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matchrt.transfer import Uploader


def test_cpu_uploads_pass_arrays_through_with_the_asked_dtype() -> None:
    upload = Uploader("cpu")
    a = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    out = upload({"image0": a, "small": np.arange(3)}, {"small": torch.int32})
    assert np.array_equal(out["image0"].numpy(), a) and out["small"].dtype == torch.int32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned uploads need a CUDA GPU")
def test_back_to_back_uploads_never_mix_inputs() -> None:
    """Each call's inputs arrive whole, although every call reuses the same pinned buffers."""
    upload = Uploader("cuda")
    rng = np.random.default_rng(1)
    sent = [rng.random((1, 3, 864, 864), dtype=np.float32) for _ in range(6)]
    got = []
    for a in sent:  # no synchronisation between calls: the buffers' event must order them
        got.append(upload({"image0": a, "image1": a[:, :1]}))
    for a, out in zip(sent, got):
        assert out["image0"].is_cuda and np.array_equal(out["image0"].cpu().numpy(), a)
        assert np.array_equal(out["image1"].cpu().numpy(), a[:, :1])
    assert len(upload._buffers) == 2
    half = upload({"image0": sent[0]}, {"image0": torch.float16})["image0"]
    assert half.dtype == torch.float16 and torch.equal(half.float().cpu(), torch.from_numpy(sent[0]).half().float())
