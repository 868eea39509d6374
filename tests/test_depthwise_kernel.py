"""matchrt.depthwise: the Triton depth-wise convolution computes what the convolution (+ ReLU) computes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matchrt import depthwise
from matchrt.depthwise import DepthwiseConv2d

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_RUNS = depthwise.triton is not None and (torch.cuda.is_available() or INTERPRETER)
needs_kernel = pytest.mark.skipif(not KERNEL_RUNS, reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(depthwise.triton is None or not torch.cuda.is_available(), reason="needs a GPU")

# (channels, kernel, stride, padding, bias, relu): 5x5 blocks with and without ReLU (roma_plus's refiner
# shape), and eloftr's 4x4 stride-4 query pooling
CASES = [(24, 5, 1, 2, True, True), (70, 5, 1, 2, True, False), (40, 4, 4, 0, False, False)]


def _reference(x: torch.Tensor, conv: nn.Conv2d, relu: bool) -> torch.Tensor:
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, groups=conv.groups)
    return F.relu(y) if relu else y


def _conv(channels: int, kernel: int, stride: int, padding: int, bias: bool, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels, bias=bias)
    with torch.no_grad():  # a bias large enough that ReLU zeroes part of the output
        if bias:
            conv.bias.normal_(0.0, 0.3)
    return conv


@needs_kernel
@pytest.mark.parametrize("channels,kernel,stride,padding,bias,relu", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_kernel_equals_the_convolution_in_fp32(channels, kernel, stride, padding, bias, relu,
                                                   channels_last) -> None:
    conv = _conv(channels, kernel, stride, padding, bias)
    x = torch.randn(2, channels, 12, 17)  # odd sizes: partial tiles and edge padding
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, conv = x.to(device), conv.to(device)
    with torch.no_grad():
        got = depthwise.interpreted(x, conv.weight, conv.bias, stride, padding, relu) if INTERPRETER else \
            torch.ops.matchrt.depthwise_conv2d(x, conv.weight, conv.bias, stride, padding, relu, torch.float32)
        want = _reference(x, conv, relu)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if relu:
        assert (want == 0).any() and (want > 0).any()


@needs_kernel
@pytest.mark.parametrize("channels,kernel,stride,padding,bias,relu", CASES)
def test_half_precision_rounds_the_operands_as_autocast_does(channels, kernel, stride, padding, bias, relu) -> None:
    conv = _conv(channels, kernel, stride, padding, bias, seed=1)
    x = torch.randn(1, channels, 9, 16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, conv = x.to(device), conv.to(device)
    with torch.no_grad():  # an fp32 input computed as fp16: rounded in the kernel, output fp16
        got = depthwise.interpreted(x, conv.weight, conv.bias, stride, padding, relu, torch.float16) \
            if INTERPRETER else torch.ops.matchrt.depthwise_conv2d(x, conv.weight, conv.bias, stride, padding,
                                                                   relu, torch.float16)
        rounded = nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels, bias=bias).to(device)
        rounded.weight.copy_(conv.weight.half().float())
        if bias:
            rounded.bias.copy_(conv.bias.half().float())
        want = _reference(x.half().float(), rounded, relu)
    assert got.dtype == torch.float16
    # fp32 sums of the same rounded operands, each rounded once to fp16 on the store
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)


def test_the_module_keeps_the_convolution_s_keys_and_runs_it_on_the_cpu() -> None:
    conv = _conv(24, 5, 1, 2, True)
    fused = DepthwiseConv2d.like(conv, relu=True)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert list(fused.state_dict()) == list(conv.state_dict())
    x = torch.randn(1, 24, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.relu(conv(x)), rtol=0, atol=0)
    plain = DepthwiseConv2d(24, 5, padding=2)
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), conv(x), rtol=0, atol=0)


def test_the_kernel_runs_only_where_no_gradient_is_wanted(monkeypatch) -> None:
    """The kernel has no backward: with gradients enabled and a parameter (or the input) that
    requires them, the module runs the differentiable convolution; under no_grad / inference_mode
    it runs the kernel (here a stand-in, as this may be a CPU)."""
    conv = _conv(8, 5, 1, 2, True)
    module = DepthwiseConv2d.like(conv, relu=True)
    calls: list[torch.dtype] = []

    def stand_in(x, weight, bias, stride, padding, relu, dtype, half_sums=False):
        calls.append(dtype)
        return _reference(x, conv, relu).to(dtype)

    monkeypatch.setattr(depthwise, "usable", lambda x: True)
    monkeypatch.setattr(depthwise, "_kernel", stand_in)
    x = torch.randn(1, 8, 6, 6)
    module(x).sum().backward()  # training: the convolution, with a gradient
    assert not calls and conv.weight.grad is not None
    with torch.no_grad():
        module(x)
    with torch.inference_mode():
        module(x)
    assert calls == [torch.float32, torch.float32]


def test_only_square_zero_padded_depthwise_convolutions_are_taken() -> None:
    with pytest.raises(ValueError, match="not a depth-wise"):
        DepthwiseConv2d.like(nn.Conv2d(8, 8, 5, padding=2))
    with pytest.raises(ValueError, match="square"):
        DepthwiseConv2d.like(nn.Conv2d(8, 8, (5, 3), padding=(2, 1), groups=8))
    with pytest.raises(ValueError, match="square"):
        DepthwiseConv2d.like(nn.Conv2d(8, 8, 5, padding=2, groups=8, padding_mode="reflect"))


def test_onnx_export_holds_the_ordinary_convolution(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    module = nn.Sequential(DepthwiseConv2d.like(_conv(8, 5, 1, 2, True), relu=True)).eval()
    path = tmp_path / "dw.onnx"
    torch.onnx.export(module, (torch.randn(1, 8, 10, 10),), str(path), dynamo=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops == ["Conv", "Relu"]


@needs_gpu
@pytest.mark.parametrize("channels,kernel,stride,padding,bias,relu", CASES)
def test_the_module_under_autocast_and_compile_matches_the_convolution(channels, kernel, stride, padding, bias,
                                                                       relu) -> None:
    conv = _conv(channels, kernel, stride, padding, bias, seed=2).cuda()
    fused = DepthwiseConv2d.like(conv, relu=relu)
    x = torch.randn(2, channels, 40, 52, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        want = _reference(x, conv, relu)
        eager = fused(x)
        compiled = torch.compile(fused, fullgraph=True)(x)
    for got in (eager, compiled):
        assert got.dtype == want.dtype == torch.float16
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("channels,block", [(40, (16, 16, 4)), (32, (16, 16, 8)), (72, None), (48, None)])
def test_the_row_kernel_covers_bands_column_tiles_and_channel_blocks(channels, block) -> None:
    """The 5 x 5 row kernel (four input rows a step) over several bands (the last one partial), several
    column tiles and channel blocks, with and without a channel remainder: every output row and column
    as the convolution's."""
    conv = _conv(channels, 5, 1, 2, True, seed=3)
    x = torch.randn(2, channels, 37, 21)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, conv = x.to(device), conv.to(device)
    launcher = (lambda kernel: kernel) if INTERPRETER else torch.library.wrap_triton
    with torch.no_grad():
        got = depthwise._launch_rows(x, conv.weight, conv.bias, True, torch.float32, launcher, block)
        want = _reference(x, conv, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("channels", [24, 48, 70])
def test_half_sums_stay_within_fp16_tolerance_of_the_fp32_sums(channels) -> None:
    """``half_sums`` (refiner_depthwise=rows-half): products and sums in fp16 give the fp32-sum kernel's
    outputs to 1e-2 of the largest, but not its bits (the packed path runs: a no-op flag would match
    exactly); fp32 and bf16 runs ignore the flag (bf16 sums would lose too much)."""
    conv = _conv(channels, 5, 1, 2, True, seed=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, channels, 37, 21, device=device).half().contiguous(memory_format=torch.channels_last)
    conv = conv.to(device)
    launcher = (lambda kernel: kernel) if INTERPRETER else torch.library.wrap_triton
    with torch.no_grad():
        full = depthwise._launch_rows(x, conv.weight, conv.bias, True, torch.float16, launcher)
        half = depthwise._launch_rows(x, conv.weight, conv.bias, True, torch.float16, launcher, half_sums=True)
        assert half.dtype == torch.float16
        scale = float(full.float().abs().max())
        deviation = float((half.float() - full.float()).abs().max())
        assert 0 < deviation <= 1e-2 * scale
        for dtype in (torch.float32, torch.bfloat16):
            y = x.to(dtype)
            assert torch.equal(depthwise._launch_rows(y, conv.weight, conv.bias, True, dtype, launcher, half_sums=True),
                               depthwise._launch_rows(y, conv.weight, conv.bias, True, dtype, launcher))


def test_row_tiles_fill_the_accumulators_with_whole_steps() -> None:
    for channels in (24, 70, 144, 576, 1144, 1384, 8, 1, 16, 48):
        for side in (35, 140, 864):
            block_c, block_w, band, warps = depthwise.row_tiles(channels, side)
            assert block_c & (block_c - 1) == 0 and block_w & (block_w - 1) == 0  # powers of two
            assert block_c * block_w <= max(depthwise.ROW_ELEMENTS, 16 * block_c)
            assert band % depthwise.ROW_STEP == 0  # whole steps of input rows
            assert warps in (2, 4)
            if channels % 32 and channels % 16 == 0:  # 16-channel blocks where they divide the channels
                assert block_c == 16
            else:  # the smallest power of two that covers them, up to 32
                assert block_c // 2 < min(channels, 32) <= block_c
    # the blocks measured at the refiner shapes
    assert depthwise.row_tiles(576, 216) == (32, 16, 32, 4)
    assert depthwise.row_tiles(144, 432) == (16, 32, 32, 2)
    # packed fp16 sums: the same blocks, 4 warps but for narrow inputs (session 28's sweep)
    assert depthwise.row_tiles(144, 432, half_sums=True) == (16, 32, 32, 4)
    assert depthwise.row_tiles(24, 864, half_sums=True) == (32, 16, 32, 2)
    assert depthwise.row_tiles(1144, 108, half_sums=True) == (32, 16, 32, 4)
    assert depthwise.takes_rows(5, 1, 2) and not depthwise.takes_rows(4, 4, 0) and not depthwise.takes_rows(5, 2, 2)
    if depthwise.triton is not None:  # a band is a whole number of four-row steps
        with pytest.raises(ValueError, match="multiple of its 4 rows"):
            depthwise._launch_rows(torch.zeros(1, 8, 6, 6), torch.zeros(8, 1, 5, 5), None, False, torch.float32,
                                   lambda kernel: kernel, (8, 16, 6))
