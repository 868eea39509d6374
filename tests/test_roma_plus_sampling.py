"""roma_plus sampling and postprocess: seeded balanced sampling, deterministic top-k, original pixels."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from matchrt.plugins.roma_plus import hooks
from matchrt.plugins.roma_plus.sampling import draw_without_replacement, kde, sample_matches, to_pixels
from roma_plus_helpers import dense_outputs, pair_context, reference, reference_warp

SIZE0, SIZE1 = (1063, 780), (673, 1013)  # the MegaDepth pair's original (height, width)


def _reference_dense() -> tuple[np.ndarray, np.ndarray]:
    ref = reference()
    return reference_warp(ref["s1_flow"], ref["warp_grid"]).astype(np.float32), ref["certainty"]


def _synthetic(h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth identity-like symmetric warp with three certainty bands: 0.5 | 0.01 | 0."""
    ys, xs = torch.meshgrid(torch.linspace(-1 + 1 / h, 1 - 1 / h, h), torch.linspace(-1 + 1 / w, 1 - 1 / w, w),
                            indexing="ij")
    grid = torch.stack((xs, ys), dim=-1)
    warp = torch.cat((torch.cat((grid, grid * 0.9), -1), torch.cat((grid * 0.9, grid), -1)), dim=1)
    cert = torch.zeros(h, 2 * w)
    cert[:, : w // 2] = 0.5
    cert[:, w // 2: w] = 0.01
    return warp, cert


def test_balanced_sampling_is_reproducible_with_a_seed() -> None:
    warp, cert = (torch.from_numpy(x) for x in _reference_dense())
    m1, c1 = sample_matches(warp, cert, num=2000, seed=7)
    m2, c2 = sample_matches(warp, cert, num=2000, seed=7)
    m3, _ = sample_matches(warp, cert, num=2000, seed=8)
    assert m1.shape == (2000, 4) and torch.equal(m1, m2) and torch.equal(c1, c2)
    assert not torch.equal(m1, m3)


def test_balanced_sampling_respects_the_threshold() -> None:
    warp, cert = _synthetic()
    m, c = sample_matches(warp, cert, num=200, threshold=0.05, seed=0)
    assert len(m) == 200
    assert bool((c > 0).all())  # zero certainty is never drawn
    # weights: 1 above the threshold, the certainty itself (0.01) below: ~1% from the low band
    assert float((c < 0.05).float().mean()) < 0.05
    # with the threshold below both bands they weigh the same: about half from each
    _, c_low = sample_matches(warp, cert, num=200, threshold=0.005, seed=0)
    assert 0.3 < float((c_low < 0.05).float().mean()) < 0.7


def test_balanced_sampling_prefers_sparse_regions_and_drops_isolated_matches() -> None:
    """The KDE step: weight 1 / (1 + density), and ~0 for matches with fewer than 10 neighbours."""
    h = w = 96
    warp, cert = _synthetic(h, w)
    warp, cert = warp.clone(), torch.zeros_like(cert)
    cert[:, :w] = 1.0
    warp[:, : w // 2, 2:] = 0.0  # left block: every pixel matches the same point (dense in 4-d)
    warp[:, w // 2: w, 2:] = warp[:, w // 2: w, :2]  # right block: identity (twice as sparse)
    lonely = [(5, w + 3), (40, w + 50), (60, 2 * w - 2)]  # a few certain matches far from all others
    for y, x in lonely:
        cert[y, x] = 1.0
        warp[y, x] = torch.tensor([0.9, -0.9, 0.9, -0.9]) * (1 - 0.3 * (y / h))
    flat = {y * 2 * w + x for y, x in lonely}
    picks = []
    for seed in range(2):
        m, _ = sample_matches(warp, cert, num=2000, seed=seed)
        left = (m[:, 0] < 0) & (m[:, 2] == 0)
        picks.append(float(left.float().mean()))
        idx = {int(i) for i in ((m[:, 1] + 1) / 2 * h - 0.5).round() * 2 * w + ((m[:, 0] + 1) / 2 * w - 0.5).round()}
        assert not idx & flat
    # densities ~2:1 (left:right) -> about a third from the left block; 0.5 without balancing
    assert float(np.mean(picks)) < 0.42


def test_topk_is_deterministic_and_ordered() -> None:
    warp, cert = (torch.from_numpy(x) for x in _reference_dense())
    m1, c1 = sample_matches(warp, cert, num=1000, mode="topk")
    m2, c2 = sample_matches(warp, cert, num=1000, mode="topk")
    assert torch.equal(m1, m2) and torch.equal(c1, c2)
    assert bool((c1[:-1] >= c1[1:]).all())
    assert float(c1.min()) >= float(torch.topk(cert.flatten(), 1000).values.min())


def test_kde_chunking_matches_the_full_matrix() -> None:
    """The density of every row, in blocks or at once, within 1e-4 of the float64 sum (cdist's
    own fp32 expansion is 3e-5 away), tight clusters included."""
    torch.manual_seed(0)
    x = torch.rand(700, 4) * 2 - 1
    x[:100] = x[:100] * 0.01 + 0.5  # near-duplicates: exponents close to 0 out of large |x|^2
    exact = torch.exp(-torch.cdist(x.double(), x.double()) ** 2 / (2 * 0.1 ** 2)).sum(1)
    blocks = kde(x, chunk_bytes=4 * 700 * 37)
    assert blocks.dtype == torch.float32 and torch.equal(blocks, kde(x))
    assert torch.allclose(blocks.double(), exact, rtol=1e-4, atol=0)


def test_draws_are_without_replacement_and_skip_zero_weights() -> None:
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0])
    idx = draw_without_replacement(w, 10, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == [1, 2, 4]


def test_pixel_conversion_follows_upstream() -> None:
    m = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    kp0, kp1 = to_pixels(m, (100, 200), (50, 80))
    assert kp0.tolist() == [[0.0, 0.0], [100.0, 50.0]]
    assert kp1.tolist() == [[80.0, 50.0], [40.0, 25.0]]


def test_postprocess_returns_original_pixels_with_dense_maps() -> None:
    warp, cert = _reference_dense()
    ctx = pair_context(SIZE0, SIZE1)
    matches = hooks.postprocess("roma_plus", dense_outputs(warp, cert), ctx, {"num_samples": 800, "seed": 5})
    assert 0 < len(matches) <= 800
    assert matches.keypoints0[:, 0].max() <= SIZE0[1] - 1 and matches.keypoints0[:, 1].max() <= SIZE0[0] - 1
    assert matches.keypoints1[:, 0].max() <= SIZE1[1] - 1 and matches.keypoints1[:, 1].max() <= SIZE1[0] - 1
    assert matches.keypoints0.min() >= 0 and matches.keypoints1.min() >= 0
    assert matches.warp is not None and matches.warp.shape == warp.shape
    assert matches.certainty is not None and matches.certainty.shape == cert.shape
    again = hooks.postprocess("roma_plus", dense_outputs(warp, cert), ctx, {"num_samples": 800, "seed": 5})
    assert np.array_equal(matches.keypoints0, again.keypoints0)
    assert matches.metadata["num_matches"] == len(matches) and matches.metadata["seed"] == 5


def test_border_matches_are_masked() -> None:
    warp, cert = _synthetic(32, 32)
    warp = warp.clone()
    warp[..., 2] = 1.0  # every match lands on the right edge of image B: x = W, beyond W - 1
    out = hooks.postprocess("roma_plus", {"warp": warp[None], "certainty": cert[None]},
                            pair_context((100, 100), (100, 100)), {"num_samples": 100})
    assert len(out) == 0 and out.metadata["num_drawn"] > 0


def test_match_threshold_filters_by_certainty() -> None:
    warp, cert = _reference_dense()
    ctx = pair_context(SIZE0, SIZE1)
    thr = float(np.quantile(cert, 0.5))
    out = hooks.postprocess("roma_plus", dense_outputs(warp, cert), ctx,
                            {"num_samples": 500, "match_threshold": thr, "sample_mode": "topk"})
    assert len(out) > 0 and float(out.confidence.min()) > thr


def test_unknown_sample_mode_is_refused() -> None:
    warp, cert = _synthetic(8, 8)
    with pytest.raises(ValueError, match="sample_mode"):
        sample_matches(warp, cert, mode="random")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_runs_on_the_gpu() -> None:
    warp, cert = (torch.from_numpy(x).cuda() for x in _reference_dense())
    m, c = sample_matches(warp, cert, num=1000, seed=2)
    assert m.is_cuda and len(m) == 1000
    m2, _ = sample_matches(warp, cert, num=1000, seed=2)
    assert torch.equal(m, m2)


def test_host_array_copies_any_tensor_to_numpy() -> None:
    """Dense maps leave the device through host_array: values, shape and fp32 kept (bf16 and fp16
    maps come back as fp32, numpy input passes through); on a GPU through pinned memory."""
    from matchrt.transfer import host_array

    x = torch.randn(3, 5, 4)
    assert np.array_equal(host_array(x), x.numpy()) and host_array(x).dtype == np.float32
    assert host_array(x.bfloat16()).dtype == np.float32
    arr = np.zeros(3)
    assert host_array(arr) is arr and host_array([1.0, 2.0]).tolist() == [1.0, 2.0]
    if torch.cuda.is_available():
        view = torch.randn(6, 8, 4, device="cuda")[::2]  # a strided tensor on the GPU
        assert np.array_equal(host_array(view), view.cpu().numpy())


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("n, dim", [(700, 4), (97, 3)])
def test_kde_kernel_matches_the_float64_density(n: int, dim: int) -> None:
    """The one-pass KDE kernel (CUDA's path) gives every row's density within 2e-5 of the float64
    sum, tight clusters and a size that is no multiple of its blocks included, and agrees with the
    torch path to that torch path's own error (1e-4)."""
    from matchrt.plugins.roma_plus import kde_kernel

    if kde_kernel.triton is None:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    x = torch.rand(n, dim) * 2 - 1
    x[:50] = x[:50] * 0.01 + 0.5  # near-duplicates
    exact = torch.exp(-torch.cdist(x.double(), x.double()) ** 2 / (2 * 0.1 ** 2)).sum(1)
    fused = kde_kernel.kde(x.to(device), 0.1).cpu()
    assert fused.dtype == torch.float32 and fused.shape == (n,)
    assert torch.allclose(fused.double(), exact, rtol=2e-5, atol=0)
    assert torch.allclose(fused, kde(x), rtol=1e-4, atol=0)  # x on the CPU: the torch path
