"""eloftr's GPU coarse selection (candidate_kernel): the same matches as the confidence + TopK graph."""

from __future__ import annotations

import os

import pytest
import torch

from matchrt.plugins.eloftr import candidate_kernel, lse_kernel
from matchrt.plugins.eloftr.export import CoarseSelect
from matchrt.plugins.eloftr.model import COARSE_STRIDE, ELoFTR, content_extents

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_RUNS = candidate_kernel.triton is not None and (torch.cuda.is_available() or INTERPRETER)


def matching_features(n_side: int = 12, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse features whose cells mostly have one clear partner (a shifted, noisy copy)."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.randn(batch, 256, n_side, n_side, generator=g)
    f1 = torch.roll(f0, shifts=(1, 2), dims=(2, 3)) + 0.6 * torch.randn(f0.shape, generator=g)
    return f0, f1


def test_a_row_holds_no_more_pairs_above_the_threshold_than_the_limit() -> None:
    for seed in range(3):
        f0, f1 = matching_features(seed=seed)
        f1 = f1 * 0.2  # flatter softmaxes: many middling confidences
        conf = ELoFTR.confidence(f0, f1)[0]
        for thr in (0.05, 0.1, 0.2):
            limit = candidate_kernel.per_row_limit(thr)
            assert int((conf > thr).sum(1).max()) <= limit
            assert int((conf > thr).sum(0).max()) <= limit


def test_capacity_holds_k_and_refuses_dense_thresholds() -> None:
    assert candidate_kernel.capacity(10816, 10816, 0.1, 2048) == 10816 * 10
    assert candidate_kernel.capacity(100, 100, 0.1, 2048) == 2048  # at least K slots for TopK
    assert candidate_kernel.capacity(100, 100, 0.0, 16) is None  # threshold 0: every pair may pass
    assert candidate_kernel.capacity(16, 16, 0.1, 16) is None  # 160 of 256: the matrix is no longer


def test_keys_decode_to_confidence_and_index_with_ties_to_the_lower_index() -> None:
    conf = torch.tensor([0.5, 0.25, 0.5, 0.75], dtype=torch.float32)
    flat = torch.tensor([7, 3, 2, 11], dtype=torch.int64)
    bits = conf.view(torch.int32).to(torch.int64)
    keys = torch.cat([(bits << 32) | ((2**31 - 1) - flat), torch.tensor([-1, -1])])[None]
    value, index, valid = candidate_kernel.decode(keys.topk(5, dim=1).values, torch.float16)
    assert value.dtype == torch.float16 and index.dtype == torch.int32
    assert value[0].tolist() == [0.75, 0.5, 0.5, 0.25, 0.0]
    assert index[0].tolist() == [11, 2, 7, 3, 0]  # equal confidences: index 2 before 7
    assert valid[0].tolist() == [True, True, True, True, False]


def _selections(monkeypatch, f0: torch.Tensor, f1: torch.Tensor, k: int, threshold: float,
                device: str, dtype: torch.dtype | None = None, masks=None):
    select = CoarseSelect(k, threshold)
    f0, f1 = f0.to(device), f1.to(device)
    padding = None if masks is None else content_extents(tuple(m.to(device) for m in masks))
    autocast = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with monkeypatch.context() as m, torch.inference_mode(), autocast:
        m.setattr(candidate_kernel, "usable", lambda t: False)
        reference = select(f0, f1, padding)
    with monkeypatch.context() as m, torch.inference_mode(), autocast:
        if device == "cpu":  # Triton's interpreter: the kernel launched directly on CPU tensors
            m.setattr(candidate_kernel, "usable", lambda t: True)
            m.setattr(candidate_kernel, "candidates", candidate_kernel.interpreted)
        assert candidate_kernel.usable(f0)
        listed = select(f0, f1, padding)
    return reference, listed


def _assert_same_matches(reference, listed, everything: bool) -> None:
    value, i_ids, j_ids, valid = reference
    l_value, l_i, l_j, l_valid = listed
    assert l_value.dtype == value.dtype
    assert torch.equal(l_valid, valid)
    # the kernel's exp may differ from torch's by an ulp of the confidence's dtype, and on a GPU
    # the log-sum-exps are summed in another order (lse_kernel): a few fp32 ulps of the exponent
    rtol = 1e-5 if value.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(l_value[valid], value[valid], rtol=rtol, atol=0)
    assert l_i.dtype == i_ids.dtype == torch.int32
    if everything:  # every pair above the threshold fits in K: the same set of pairs
        for b in range(valid.shape[0]):
            ours = set(zip(l_i[b][l_valid[b]].tolist(), l_j[b][l_valid[b]].tolist()))
            theirs = set(zip(i_ids[b][valid[b]].tolist(), j_ids[b][valid[b]].tolist()))
            assert ours == theirs
    assert int(valid.sum()) > 8  # the features do make matches
    assert (l_value[~l_valid] == 0).all() and (l_i[~l_valid] == 0).all()


@pytest.mark.skipif(not KERNEL_RUNS, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("k", [256, 24])
def test_listed_selection_equals_the_topk_graph(monkeypatch, k: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f0, f1 = matching_features(batch=2)
    reference, listed = _selections(monkeypatch, f0, f1, k, 0.1, device)
    _assert_same_matches(reference, listed, everything=k == 256)


@pytest.mark.skipif(not KERNEL_RUNS, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
def test_listed_selection_with_padded_inputs(monkeypatch) -> None:
    """resize=pad: pairs with padded cells stay out of both softmaxes on the listed path too."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f0, f1 = matching_features(n_side=16, seed=3, batch=2)
    side = 16 * COARSE_STRIDE
    masks = torch.zeros(2, 1, side, side), torch.zeros(2, 1, side, side)
    masks[0][0, :, :13 * COARSE_STRIDE, :] = 1  # content 13 x 16 cells, then 16 x 11 cells
    masks[0][1, :, :, :11 * COARSE_STRIDE] = 1
    masks[1][0, :, :, :] = 1
    masks[1][1, :, :12 * COARSE_STRIDE, :12 * COARSE_STRIDE] = 1
    reference, listed = _selections(monkeypatch, f0, f1, 512, 0.1, device, masks=masks)
    _assert_same_matches(reference, listed, everything=True)


@pytest.mark.skipif(not torch.cuda.is_available() or candidate_kernel.triton is None, reason="needs a CUDA GPU")
def test_listed_selection_under_fp16_autocast_and_torch_compile(monkeypatch) -> None:
    f0, f1 = matching_features(n_side=24, seed=1)
    reference, listed = _selections(monkeypatch, f0, f1, 512, 0.1, "cuda", torch.float16)
    _assert_same_matches(reference, listed, everything=True)
    compiled = torch.compile(CoarseSelect(512, 0.1), dynamic=False)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        again = compiled(f0.cuda(), f1.cuda())
    value, _, _, valid = reference
    assert torch.equal(again[3], valid)
    # Inductor keeps the scaled fp16 similarity in fp32 registers (eager rounds it): fp16's tolerance
    torch.testing.assert_close(again[0][valid], value[valid], rtol=1e-2, atol=0)


def test_merged_partial_sums_give_the_log_sum_exp_of_the_whole() -> None:
    g = torch.Generator().manual_seed(4)
    x = 30.0 * torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    parts = x.split(8, dim=2)  # column chunks, as the kernel's programs see them
    maxima = torch.cat([p.amax(dim=2, keepdim=True) for p in parts], dim=2)
    sums = torch.cat([torch.exp(p - p.amax(dim=2, keepdim=True)).sum(dim=2, keepdim=True) for p in parts], dim=2)
    torch.testing.assert_close(lse_kernel.merge(maxima, sums, 2), torch.logsumexp(x, 2, keepdim=True),
                               rtol=1e-12, atol=0)
    assert lse_kernel.torch_lse(x, 1).dtype == torch.float32  # the normalizers are fp32


def test_row_chunks_fill_the_gpu_without_empty_chunks() -> None:
    assert lse_kernel.row_chunks(1, 10816, 10816, 132) == 10  # 85 column blocks x 10 >= 6 per SM
    assert lse_kernel.row_chunks(4, 10816, 10816, 132) == 3
    assert lse_kernel.row_chunks(1, 40, 200, 132) == 2  # never more chunks than row tiles
    assert lse_kernel.row_chunks(8, 100, 100000, 132) == 1


@pytest.mark.skipif(not KERNEL_RUNS, reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype, scale, n_chunks", [(torch.float32, 1.0, 1), (torch.float32, 1.0, 3),
                                                     (torch.float16, 10.0, 2), (torch.float16, 10.0, 50)])
def test_lse_kernel_equals_torch_reductions(dtype: torch.dtype, scale: float, n_chunks: int) -> None:
    """Rows and columns that are not multiples of the tiles, a batch of two, the eager rounding of
    the scaled fp16 similarity, and more chunks asked for than there are row tiles."""
    g = torch.Generator().manual_seed(5)
    sim = (3.0 * torch.randn(2, 150, 300, generator=g)).to(dtype)
    sim[1, 7, 11] = 60.0 / scale  # one dominant pair: its row and column are far from the others
    scaled = sim * scale if scale != 1.0 else sim  # rounded to fp16, as eager torch does
    want = lse_kernel.torch_lse(scaled, 2), lse_kernel.torch_lse(scaled, 1)
    if torch.cuda.is_available():
        sim = sim.cuda()
        with torch.inference_mode():
            got = lse_kernel.log_sum_exps(sim, scale)
            chunked = lse_kernel._merged(torch.ops.matchrt_eloftr.lse_partials(sim, scale, scale != 1.0, n_chunks))
        torch.testing.assert_close(chunked[0].cpu(), got[0].cpu(), rtol=1e-6, atol=1e-5)
    else:
        got = lse_kernel.interpreted(sim, scale, n_chunks)
    for ours, theirs, shape in zip(got, want, [(2, 150, 1), (2, 1, 300)]):
        assert tuple(ours.shape) == shape and ours.dtype == torch.float32
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-5)
