"""The speed rewrites of the graphs compute what the plain formulation computes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from matchrt.fold import fold_batchnorm, folded_copy, shallow_module_copy
from matchrt.plugins.eloftr.export import topk_flat
from matchrt.plugins.eloftr.model import ELoFTR, sample_up2, stable_softmax


def _random_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn.eval()


def test_fold_batchnorm_keeps_outputs_of_plain_and_depthwise_convs() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(6, 6, 5, padding=2, groups=6), _random_bn(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 1, bias=False), _random_bn(4)).eval()
    pyramid = nn.ModuleList([nn.Conv2d(4, 8, 3, padding=1), _random_bn(8), nn.ReLU()]).eval()
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        ref = seq(x)
        ref_list = pyramid[2](pyramid[1](pyramid[0](ref)))
        folded, folded_list = folded_copy(seq), folded_copy(pyramid)
        out = folded(x)
        out_list = folded_list[2](folded_list[1](folded_list[0](out)))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
    assert isinstance(folded_list[1], nn.Identity) and len(folded_list) == 3  # indices stay
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_list, ref_list, rtol=1e-5, atol=1e-5)
    # the originals keep their BatchNorms (and state-dict keys); a training-mode BN is left alone
    assert isinstance(seq[1], nn.BatchNorm2d) and isinstance(pyramid[1], nn.BatchNorm2d)
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2).train())) == 0


def test_shallow_module_copy_replaces_children_without_touching_the_original() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    view = shallow_module_copy(model)
    view[1] = nn.Identity()
    assert isinstance(model[1], nn.ReLU) and view[0] is model[0]


def test_sample_up2_equals_the_full_resolution_upsampling() -> None:
    torch.manual_seed(0)
    maps = torch.randn(2, 5, 8, 6)
    up = nn.functional.interpolate(maps, scale_factor=2.0, mode="bilinear", align_corners=False)
    ys = torch.randint(-1, 17, (7, 9), dtype=torch.int32)
    xs = torch.randint(-1, 13, (7, 9), dtype=torch.int32)
    b = torch.randint(0, 2, (7,), dtype=torch.int32)
    out = sample_up2(maps, b, ys, xs, (16, 12))
    inside = (ys >= 0) & (ys < 16) & (xs >= 0) & (xs < 12)
    ref = up[b.long()[:, None], :, ys.clamp(0, 15).long(), xs.clamp(0, 11).long()] * inside[..., None]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_two_stage_topk_selects_what_one_topk_selects() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 64 * 16 * 40)
    value, index = topk_flat(x, 40, groups=64)
    ref_value, ref_index = x.topk(40, dim=1)
    assert index.dtype == torch.int32
    torch.testing.assert_close(value, ref_value)
    assert torch.equal(index.long(), ref_index)  # distinct random values: one order


def test_dual_softmax_exponent_equals_the_product_of_softmaxes() -> None:
    torch.manual_seed(0)
    f0, f1 = torch.randn(1, 8, 4, 6) * 3, torch.randn(1, 8, 4, 6) * 3
    c = 8
    sim = (f0.reshape(1, c, -1).transpose(1, 2) @ f1.reshape(1, c, -1)) / c / 0.1
    ref = stable_softmax(sim, 1) * stable_softmax(sim, 2)
    torch.testing.assert_close(ELoFTR.confidence(f0, f1), ref, rtol=1e-5, atol=1e-7)
    keep = torch.ones(24)
    keep[:3] = 0
    masked = ELoFTR.confidence(f0, f1, None, (keep[None], keep[None]))
    assert masked[0, :3].abs().max() == 0 and masked[0, :, :3].abs().max() == 0
    torch.testing.assert_close(masked[0, 3:, 3:], ref[0, 3:, 3:], rtol=1e-5, atol=1e-7)



def test_roma_plus_plan_folds_its_batchnorms_and_leaves_the_model_alone() -> None:
    from roma_plus_helpers import loaded_model

    from matchrt.plugins.roma_plus import hooks
    from matchrt.types import ExportOptions

    model = loaded_model()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra={"upsample_res": 64}))
    kept = hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra={"upsample_res": 64, "fuse": False}))
    count = lambda plan: sum(isinstance(m, nn.BatchNorm2d) for m in plan.graphs[0].module.modules())
    assert n_bn > 50 and count(kept) == n_bn
    assert count(folded) <= 1  # proj.16's BatchNorm belongs to the coarse stage and stays unfolded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # model untouched
    # each refiner's last 1 x 1 convolution folded into its head (fold_head), only with fuse
    last = lambda plan: [r.hidden_blocks[-1][3] for r in plan.graphs[0].module.model.conv_refiner.values()]  # noqa: E731
    assert all(isinstance(m, nn.Identity) for m in last(folded))
    assert all(isinstance(m, nn.Conv2d) for m in last(kept) + [r.hidden_blocks[-1][3] for r in model.conv_refiner.values()])
    _assert_same_warp(folded, kept)


def _assert_same_warp(plan_a, plan_b) -> None:
    """Two roma_plus plans (56 coarse, 64 upsampled) give one warp and certainty, within fp32's tolerance."""
    torch.manual_seed(0)
    images = [torch.rand(1, 3, 56, 56), torch.rand(1, 3, 56, 56), torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)]
    with torch.no_grad():
        warp_a, cert_a = plan_a.graphs[0].module(*images)
        warp_b, cert_b = plan_b.graphs[0].module(*images)
    torch.testing.assert_close(warp_a, warp_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cert_a, cert_b, rtol=1e-3, atol=1e-5)


def test_split_tf32_linear_keeps_fp32_precision_where_tf32_loses_it() -> None:
    """3xTF32: with every GEMM input rounded to TF32 (what tensor cores do), the split product
    stays within ~1e-6 of the float64 result; plain TF32 strays ~1e-3."""
    from matchrt.plugins.roma_plus.split_products import SplitLinear, split_operand, tf32_head

    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 50, 256)
    exact = (x.double() @ linear.weight.double().T + linear.bias.double())
    split = SplitLinear(linear)
    err = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    assert err(split(x)) < 1e-6  # the layer itself (fp32 GEMM here)
    # the same product with its operands rounded to TF32 as a tensor core takes them
    tc = tf32_head(split_operand(x, False)) @ tf32_head(split.weight_split).T + linear.bias
    plain_tf32 = tf32_head(x) @ tf32_head(linear.weight).T + linear.bias
    assert err(tc) < 2e-6 and err(plain_tf32) > 1e-4
    assert not split.state_dict().keys() - {"linear.weight", "linear.bias"}  # no new checkpoint keys


def test_split_linears_copies_share_weights_and_export_plain(monkeypatch) -> None:
    from matchrt.plugins.roma_plus.split_products import SplitLinear, split_linears

    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    copy = split_linears(block)
    assert isinstance(copy[0], SplitLinear) and isinstance(block[0], nn.Linear)  # the original stays
    assert copy[0].linear.weight is block[0].weight
    x = torch.randn(3, 8)
    torch.testing.assert_close(copy(x), block(x), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(copy[0](x), block[0](x))  # under ONNX export: the plain layer
    monkeypatch.undo()
    program = torch.export.export(copy, (x,))  # traced for AOTInductor: plain layers too
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("bitwise" in op or "cat" in op for op in ops), ops


def _bf16_values(program) -> bool:
    """Does an exported program compute bf16 values anywhere (a split product's pieces)?"""
    return any(getattr(n.meta.get("val"), "dtype", None) == torch.bfloat16 for n in program.graph.nodes)


@pytest.mark.parametrize("kind", ["bf16x2-flash", "tf32x3"])
def test_packages_trace_the_split_copy_their_eager_call_built(monkeypatch, kind: str) -> None:
    """An AOTInductor package of a bf16 split policy computes the split products torch runs compute
    (roma_plus's package ran IEEE fp32 DINOv2 and decoder layers before): the package builder calls
    the graph eagerly first, which builds the split copy from the real weights, and torch.export
    traces that copy. tf32x3 keeps the plain layers (a package has one TF32 setting, off here), and
    so does an export without the eager call (no copy to trace; its parameters are fake tensors)."""
    from matchrt.package import export_program
    from matchrt.plugins.roma_full.dinov2 import Block
    from matchrt.plugins.roma_plus import split_products
    from matchrt.plugins.roma_plus.model import split_eager
    from matchrt.types import GraphSpec

    monkeypatch.setattr(split_products, "split_pays", lambda device: True)  # this CPU stands in for a GPU
    torch.manual_seed(5)

    class Region(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(Block(64, 4), Block(64, 4)).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return split_eager(self.blocks, kind, x)

    region = Region().eval()
    x = torch.randn(1, 40, 64) * 2
    untraced = torch.export.export(Region().eval(), (x,), strict=False)  # no eager call before it
    assert not _bf16_values(untraced)
    program = export_program(GraphSpec("main", region, (x,), ["x"], ["y"]), "fp32", torch.device("cpu"))
    assert _bf16_values(program) == (kind == "bf16x2-flash")
    with torch.no_grad():
        packaged = program.module()(x)[0]
        split = split_products.split_copy(region.blocks, kind)(x)
        plain = region.blocks(x)
    if kind == "bf16x2-flash":
        apart = float((split - plain).abs().max())
        assert apart > 1e-3  # the weights' bf16 rounding: the two paths are told apart
        torch.testing.assert_close(packaged, split, rtol=0, atol=apart / 100)
    else:
        torch.testing.assert_close(packaged, plain, rtol=1e-6, atol=1e-6)


def test_bf16x3_linear_stays_near_fp32_where_bf16_loses_it() -> None:
    """bf16x3: two bf16 pieces per operand, fp32 accumulation: ~1e-5 of the float64 result,
    where a plain bf16 product strays ~1e-2 (the weights are shared, no checkpoint key is added)."""
    from matchrt.plugins.roma_plus.split_products import SplitLinear

    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 50, 256) * 30
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    err = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    split = SplitLinear(linear, "bf16x3")
    # 3 x 256 pieces, then the bias's three pieces and zeros up to a multiple of 8 columns
    assert split.weight_split.dtype == torch.bfloat16 and split.weight_split.shape == (96, 776)
    out = split(x)
    assert out.dtype == torch.float32 and out.shape == (4, 50, 96)
    plain_bf16 = (x.bfloat16() @ linear.weight.bfloat16().T).float() + linear.bias
    assert err(out) < 3e-5 and err(plain_bf16) > 1e-3
    assert split.state_dict().keys() == {"linear.weight", "linear.bias"}


def test_bf16x2_linear_keeps_the_activations_exact_and_rounds_only_the_weights() -> None:
    """bf16x2: the activations as two bf16 pieces against the weights rounded to bf16 once, at
    two thirds of bf16x3's depth: within ~1e-5 of the float64 product with bf16 weights (the
    activations keep 16 bits), where rounding the activations to bf16 too strays above 1e-3."""
    from matchrt.plugins.roma_plus.split_products import SplitLinear

    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 50, 256) * 30
    w_bf16 = linear.weight.bfloat16().double()
    with_bf16_weights = x.double() @ w_bf16.T + linear.bias.double()
    err = lambda y: float((y.double() - with_bf16_weights).norm() / with_bf16_weights.norm())  # noqa: E731
    split = SplitLinear(linear, "bf16x2")
    # 2 x 256 pieces, then the bias's three pieces and zeros up to a multiple of 8 columns
    assert split.weight_split.dtype == torch.bfloat16 and split.weight_split.shape == (96, 520)
    assert torch.equal(split.weight_split[:, :256], split.weight_split[:, 256:512])
    out = split(x)
    assert out.dtype == torch.float32 and out.shape == (4, 50, 96)
    plain_bf16 = (x.bfloat16().double() @ w_bf16.T) + linear.bias.double()
    assert err(out) < 3e-5 and err(plain_bf16) > 1e-3
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    assert 1e-4 < float((out.double() - exact).norm() / exact.norm()) < 1e-2  # the weights' rounding


def test_bf16x3_linear_pads_an_odd_output_width_and_returns_the_layer_s_outputs() -> None:
    """An output width that is not a multiple of 8 (the decoder's head: 4097) gets zero rows up
    to one, for aligned fp32 result rows; the product keeps the layer's width and values."""
    from matchrt.plugins.roma_plus.split_products import SplitLinear

    torch.manual_seed(1)
    linear = nn.Linear(64, 13)
    x = torch.randn(2, 30, 64) * 10
    split = SplitLinear(linear, "bf16x3")
    assert split.weight_split.shape[0] == 16 and (split.weight_split[13:] == 0).all()
    out = split(x)
    assert out.shape == (2, 30, 13)
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    assert float((out.double() - exact).norm() / exact.norm()) < 3e-5


def test_split_attention_scores_beat_plain_half_precision_attention() -> None:
    """split_attention: scores from split fp16 pieces, values split too; only the softmax weights
    are rounded to fp16. Closer to the float64 attention than plain fp16 attention, and fp32 out."""
    from matchrt.plugins.roma_plus.split_products import split_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 96, 32) * 2 for _ in range(3))
    scale = 32 ** -0.5
    exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()
    err = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    out = split_attention(q, k, v, scale)
    plain = nn.functional.scaled_dot_product_attention(q.half(), k.half(), v.half(), scale=scale)
    assert out.dtype == torch.float32 and out.shape == v.shape
    assert err(out) < 1e-3 and err(out) < err(plain) / 2


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("n", [70, 128])
def test_split_attention_kernel_computes_the_fused_call_s_attention(n: int) -> None:
    """The decoder's 128-wide heads (a 384-wide threefold product, too wide for the fused
    kernels) run attention_kernel: scores from two fp16 pieces per operand, fp16 softmax weights,
    fp32 out. As close to float64 as torch's fused call over the threefold pieces, within 2e-4 of
    it, and well ahead of plain fp16 attention; a length that is no multiple of its blocks too."""
    from matchrt.plugins.roma_plus import attention_kernel
    from matchrt.plugins.roma_plus.split_products import laid_out

    if attention_kernel.triton is None:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, 128, device=device) * 1.5 for _ in range(3))
    scale = 128 ** -0.5
    exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()
    err = lambda y: float((y.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
    half = torch.float16
    got = attention_kernel.split_attention(laid_out(q, half, "ht"), laid_out(k, half, "ht"),
                                           laid_out(v, half, "ht"), scale)
    fused = nn.functional.scaled_dot_product_attention(  # the threefold call split_attention made before
        laid_out(q, half, "hht").float(), laid_out(k, half, "hth").float(), laid_out(v, half, "ht").float(),
        scale=scale)
    fused = fused[..., :128] + fused[..., 128:]
    plain = nn.functional.scaled_dot_product_attention(q.half(), k.half(), v.half(), scale=scale)
    assert got.dtype == torch.float32 and got.shape == v.shape
    assert err(got) < 5e-4 and err(got) < err(plain) / 3
    assert float((got - fused).abs().max() / fused.abs().max()) < 2e-4
    assert attention_kernel.usable(q) == (device == "cuda")  # the decoder's width, on CUDA
    assert not attention_kernel.usable(q[..., :64])  # DINOv2's 64: the fused kernels take 192


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packages_keep_the_split_attention_kernel_for_wide_heads() -> None:
    """The decoder's 128-wide heads: a package of the default policy runs attention_kernel (a
    registered Triton op, which torch.export keeps) rather than torch's memory-efficient kernel over
    the threefold operands, and computes what the eager split copy computes."""
    from matchrt.package import export_program
    from matchrt.plugins.roma_full.dinov2 import Block
    from matchrt.plugins.roma_plus import attention_kernel, split_products
    from matchrt.plugins.roma_plus.model import split_eager
    from matchrt.types import GraphSpec

    if attention_kernel.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(6)

    class Region(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block(256, 2).eval()  # heads of 128, as the decoder's

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return split_eager(self.block, "bf16x2-flash", x)

    region = Region().cuda().eval()
    x = torch.randn(2, 300, 256, device="cuda")
    program = export_program(GraphSpec("main", region, (x,), ["x"], ["y"]), "fp32", torch.device("cuda"))
    targets = " ".join(str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
                       for n in gm.graph.nodes if n.op == "call_function")  # autocast regions are submodules
    assert "split_attention" in targets and "scaled_dot_product" not in targets, targets
    assert "matchrt_roma.pieces" in targets, targets  # the pieces too: one pass each, not Inductor's copies
    with torch.no_grad():
        packaged = program.module()(x)[0]
        split = split_products.split_copy(region.block, "bf16x2-flash")(x)
    torch.testing.assert_close(packaged, split, rtol=1e-5, atol=1e-5 * float(split.abs().max()))


def test_split_linears_kinds_replace_what_each_kind_splits() -> None:
    from matchrt.plugins.roma_full.dinov2 import Attention
    from matchrt.plugins.roma_plus.split_products import SplitAttention, SplitLinear, split_linears

    block = nn.Sequential(Attention(64, 4), nn.Linear(64, 64))
    for kind, attention_type in (("tf32x3", Attention), ("bf16x3", Attention), ("bf16x3-flash", SplitAttention),
                                 ("bf16x2", Attention), ("bf16x2-flash", SplitAttention)):
        copy = split_linears(block, kind)
        assert isinstance(copy[0], attention_type) and isinstance(copy[1], SplitLinear)
        assert isinstance(copy[0].qkv, SplitLinear) and copy[0].qkv.linear.weight is block[0].qkv.weight
        assert copy[1].kind == kind.removesuffix("-flash")
        x = torch.randn(2, 10, 64)
        tolerance = 1e-2 if kind.startswith("bf16x2") else 2e-3  # bf16x2 rounds the weights to bf16
        with torch.no_grad():
            torch.testing.assert_close(copy(x), block(x), rtol=tolerance, atol=tolerance)
    assert isinstance(block[0].qkv, nn.Linear)  # the original keeps its layers


def _random_refiner(feat_dim: int, emb_dim: int, radius: int):
    from matchrt.plugins.roma_plus.refiner import ConvRefiner

    torch.manual_seed(0)
    refiner = ConvRefiner(feat_dim, emb_dim, radius).eval()
    with torch.no_grad():
        for module in refiner.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
            elif isinstance(module, nn.Conv2d):
                module.weight.mul_(3.0)
    return refiner


def test_padded_refiner_widths_give_the_unpadded_outputs() -> None:
    """pad_channels: an odd block width (2 x 5 + 3 + 9 = 22) padded to 24 and to 32, folded or
    not, computes the same flow and certainty deltas; a width already aligned is left alone."""
    import copy

    from matchrt.plugins.roma_plus.refiner import pad_channels

    refiner = _random_refiner(5, 3, 1)
    assert refiner.block1[0].in_channels == 22
    feat_a, feat_b = torch.randn(2, 5, 12, 10), torch.randn(2, 5, 12, 10)
    flow = torch.rand(2, 2, 12, 10) * 1.6 - 0.8
    with torch.no_grad():
        want = refiner(feat_a, feat_b, flow, 1.5)
        for multiple, fold in ((8, False), (8, True), (32, True)):
            padded = folded_copy(refiner) if fold else copy.deepcopy(refiner)
            assert pad_channels(padded, multiple) == -22 % multiple
            widths = {m.in_channels for m in padded.modules() if isinstance(m, nn.Conv2d)} - {2}
            assert widths == {-(-22 // multiple) * multiple}
            for got, ref in zip(padded(feat_a, feat_b, flow, 1.5), want):  # fp32 tolerance (folding rounds)
                assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert refiner.block1[0].in_channels == 22  # the original keeps its shapes
    assert pad_channels(_random_refiner(8, 8, 0), 8) == 0  # 2 x 8 + 8 = 24: aligned already


def test_folded_refiner_head_gives_the_unfolded_outputs() -> None:
    """fold_head: the last block's 1 x 1 convolution and the 3-channel head become one convolution,
    after the padding; the flow and certainty deltas stay the unfolded refiner's to fp32 rounding,
    eagerly and compiled (where the head is head_conv's reduction, not a matrix product)."""
    from matchrt.plugins.roma_plus.refiner import fold_head, head_conv, pad_channels

    refiner = _random_refiner(5, 3, 1)
    feat_a, feat_b = torch.randn(2, 5, 12, 10), torch.randn(2, 5, 12, 10)
    flow = torch.rand(2, 2, 12, 10) * 1.6 - 0.8
    folded = folded_copy(refiner)
    pad_channels(folded, 8)
    assert fold_head(folded)
    assert isinstance(folded.hidden_blocks[-1][3], nn.Identity) and folded.out_conv.in_channels == 24
    assert isinstance(refiner.hidden_blocks[-1][3], nn.Conv2d)  # the original keeps its layers
    with torch.no_grad():
        want = refiner(feat_a, feat_b, flow, 1.5)
        for got, ref in zip(folded(feat_a, feat_b, flow, 1.5), want):
            assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
        # the compiled head: the same fp32 arithmetic as the convolution, on half-precision activations
        x = torch.rand(2, 24, 9, 7).half().to(memory_format=torch.channels_last)
        torch._dynamo.reset()
        got = torch.compile(head_conv, dynamic=False)(folded.out_conv, x)
        ref = folded.out_conv(x.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    head = folded.out_conv
    assert not fold_head(folded) and folded.out_conv is head  # folded already: left as it is


def test_roma_plus_plan_pads_its_refiners_without_changing_the_warp() -> None:
    from roma_plus_helpers import loaded_model

    from matchrt.errors import MatchrtError
    from matchrt.plugins.roma_plus import hooks
    from matchrt.types import ExportOptions

    import pytest

    model = loaded_model()
    extra = {"upsample_res": 64}
    padded = hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra=extra))
    plain = hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra={**extra, "pad_channels": 0}))
    width = lambda plan, s: plan.graphs[0].module.model.conv_refiner[s].block1[0].in_channels  # noqa: E731
    assert [width(plain, s) for s in ("16", "8", "4")] == [1377, 1137, 569]  # the checkpoint's widths
    assert [width(padded, s) for s in ("16", "8", "4")] == [1384, 1144, 576]  # the default: multiples of 8
    assert model.conv_refiner["16"].block1[0].in_channels == 1377  # the model keeps its shapes
    _assert_same_warp(padded, plain)
    with pytest.raises(MatchrtError, match="pad_channels"):
        hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra={**extra, "pad_channels": "eight"}))


def test_laid_out_pieces_are_bit_for_bit_the_concatenated_pieces() -> None:
    """laid_out writes the pieces in place (fewer passes); the bits are those of cat(pieces)."""
    from matchrt.plugins.roma_plus.split_products import laid_out

    torch.manual_seed(0)
    x = torch.randn(3, 7, 40) * 100
    view = x.transpose(0, 1)  # a strided input, as attention's q / k / v are
    head = view.bfloat16()
    tail = (view - head.float()).bfloat16()
    assert torch.equal(laid_out(view, torch.bfloat16, "hth"), torch.cat((head, tail, head), -1))
    assert torch.equal(laid_out(view, torch.bfloat16, "hht"), torch.cat((head, head, tail), -1))
    h16 = view.half()
    t16 = (view - h16.float()).half()
    assert torch.equal(laid_out(view, torch.float16, "ht"), torch.cat((h16, t16), -1))
    assert float((head.float() + tail.float() - view).abs().max() / view.abs().max()) < 2 ** -16


def _chain(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("kind", ["bf16x2-flash", "bf16x3", "tf32x3"])
def test_split_blocks_add_their_skip_connections_inside_their_products(kind: str) -> None:
    """DINOv2's and the decoder's blocks become SplitBlocks: each skip connection is added inside
    the product that ends its branch (beta = 1), in place from the second block of a chain on. The
    sums are the separate additions' (to fp32 rounding), the caller's input is left as it was, and
    the blocks still compute the plain blocks' function within the kind's precision."""
    from matchrt.plugins.roma_full.decoder import Block as DecoderBlock
    from matchrt.plugins.roma_full.dinov2 import Block
    from matchrt.plugins.roma_plus.split_products import SplitBlock, split_linears

    torch.manual_seed(3)
    dino = nn.ModuleList([Block(64, 4) for _ in range(3)]).eval()
    decoder = nn.Sequential(*[DecoderBlock(64, 2) for _ in range(2)]).eval()
    with torch.no_grad():
        for module in (*dino.modules(), *decoder.modules()):
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for block in dino:
            block.ls1.gamma.uniform_(0.1, 1.0)
            block.ls2.gamma.uniform_(0.1, 1.0)
    tolerance = 1e-2 if kind.startswith("bf16x2") else 2e-3
    for plain in (dino, decoder):
        split = split_linears(plain, kind)
        assert all(isinstance(b, SplitBlock) for b in split)
        assert [b.in_place for b in split] == [False] + [True] * (len(split) - 1)
        x = torch.randn(2, 30, 64) * 2
        if plain is decoder:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)  # the decoder's blocks get a transposed view
        before = x.clone()
        with torch.no_grad():
            got = _chain(split, x)
            assert torch.equal(x, before)  # the caller's tensor is untouched
            z = x
            for b in split:  # each block against the same split branches with the sums in passes of their own
                mid = z + b.attn(b.norm1(z))
                separate = mid + b.mlp(b.norm2(mid))
                fused = b(z.clone() if b.in_place else z)
                torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
                z = separate
            want = _chain(plain, x)
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", ["bf16x2-flash", "tf32x3"])
def test_split_patch_embedding_is_the_convolution_to_fp32_precision(kind: str) -> None:
    """DINOv2's patch embedding in a split copy is one split product over the patches (bf16x3 for
    every bf16 kind): the convolution's output, layout included, to about fp32's precision, also
    where the image's sides are not multiples of the patch (the convolution drops the rest)."""
    from matchrt.plugins.roma_full.dinov2 import PatchEmbed
    from matchrt.plugins.roma_plus.split_products import SplitPatchEmbed, split_linears

    torch.manual_seed(5)
    embed = PatchEmbed()
    copy = split_linears(nn.ModuleList([embed]), kind)[0]
    assert isinstance(copy, SplitPatchEmbed) and copy.proj is embed.proj
    assert copy.split.kind == ("tf32x3" if kind == "tf32x3" else "bf16x3")
    for h, w in ((56, 42), (61, 45)):
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            got = copy(x)
            exact = embed.proj.double()(x.double())
            embed.proj.float()
        assert got.shape == exact.shape and got.dtype == torch.float32
        assert float((got.double() - exact).norm() / exact.norm()) < 2e-5


@pytest.mark.parametrize("kind", ["bf16x2-flash", "tf32x3"])
def test_split_pointwise_is_proj16_to_fp32_precision(kind: str) -> None:
    """proj.16 (1 x 1 conv + eval BatchNorm) in a split copy is one split product over the pixels'
    channels with the BatchNorm folded in (bf16x3 for every bf16 kind): the module's output to
    about fp32's precision, as an N x C x H x W view of pixel rows; the split policies run it so."""
    from matchrt.plugins.roma_full.model import make_proj
    from matchrt.plugins.roma_plus.model import coarse_region_modes
    from matchrt.plugins.roma_plus.split_products import SplitPointwise, split_linears

    torch.manual_seed(6)
    proj = make_proj(96, 48).eval()
    with torch.no_grad():
        proj[1].running_mean.uniform_(-1, 1)
        proj[1].running_var.uniform_(0.5, 2)
        proj[1].weight.uniform_(0.5, 1.5)
        proj[1].bias.uniform_(-0.5, 0.5)
    copy = split_linears(proj, kind)
    assert isinstance(copy, SplitPointwise) and copy.split.kind == ("tf32x3" if kind == "tf32x3" else "bf16x3")
    assert not SplitPointwise.splits(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 96, 7, 9)
    with torch.no_grad():
        got = copy(x)
        exact = proj.double()(x.double())
        proj.float()
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert got.stride()[1] == 1  # channels innermost: pixel rows, as the GP reads them
    assert float((got.double() - exact).norm() / exact.norm()) < 2e-5
    assert coarse_region_modes(kind.removesuffix("-flash"))["proj16"] == copy.split.kind


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
def test_piece_kernel_reads_attention_heads_where_they_lie() -> None:
    """The projection after attention splits attention's output B x H x N x (halves * d) without
    a copy of its own: the piece kernel sums the two halves of the fused call's fp16 output (or
    takes attention_kernel's fp32 output as it is), puts the heads side by side, and writes the
    bits torch writes from the summed, transposed, reshaped fp32 tensor (on a GPU; Triton's
    interpreter rounds fp32 to bf16 its own way, so there head + tail is checked to 2^-15 of the
    value and the other columns bit for bit)."""
    from matchrt.plugins.roma_plus import piece_kernel
    from matchrt.plugins.roma_plus.split_products import extra_columns, laid_out, merged_heads

    if piece_kernel.triton is None:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    x = torch.randn(2, 37, 4, 32, device=device) * torch.logspace(-2, 2, 32, device=device)
    cases = ((x.half().transpose(1, 2), 2, "ht", 3),  # B x H x N x 2d, strided like cuDNN's output
             (x.half().permute(0, 2, 1, 3).contiguous(), 2, "ht", 3),
             (x.transpose(1, 2).contiguous(), 1, "hth", 0),  # attention_kernel's fp32 B x H x N x d
             (x.transpose(1, 2), 1, "hht", 3))
    for o, halves, order, ones in cases:
        width = len(order) * 4 * (32 // halves)
        out = torch.empty(2, 37, width + extra_columns(width, ones), dtype=torch.bfloat16, device=device)
        got = piece_kernel.write_pieces(o.transpose(1, 2), out, order, ones, halves=halves, head_columns=True)
        merged = merged_heads(o, halves).cpu()
        want = laid_out(merged, torch.bfloat16, order, ones)
        got = got.cpu()
        if device == "cuda":
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (halves, order, ones)
            continue
        k = merged.shape[-1]
        head, tail = order.index("h"), order.index("t")
        value = got[..., head * k:(head + 1) * k].float() + got[..., tail * k:(tail + 1) * k].float()
        assert float(((value - merged).abs() / merged.abs().clamp_min(1e-30)).max()) < 2 ** -15
        assert torch.equal(got[..., len(order) * k:], want[..., len(order) * k:])  # ones, then zeros
        assert all(torch.equal(got[..., i * k:(i + 1) * k], got[..., head * k:(head + 1) * k])
                   for i, piece in enumerate(order) if piece == "h")


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
def test_piece_op_writes_what_the_direct_launch_writes() -> None:
    """Traced, laid_out runs the piece kernel as a registered op (so packages keep it): the op's
    buffer holds the bits the kernel launched directly writes, for strided inputs, GELU, LayerNorm (its eps a
    Python float, which the kernel reads in fp32) and attention heads read where they lie."""
    from matchrt.plugins.roma_plus import piece_kernel
    from matchrt.plugins.roma_plus.split_products import extra_columns

    if piece_kernel.triton is None:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(7)
    x = torch.randn(2, 40, 3, 4, 32, device=device)
    q = x[:, :, 0].permute(0, 2, 1, 3)  # B x H x N x d, strided
    flat = x.reshape(2, 40, 384)
    norm = (torch.rand(384, device=device) + 0.5, torch.randn(384, device=device), 1e-6)
    cases = (((q, "hht", 0), {}), ((flat, "hth", 3), {"gelu": True}), ((flat, "hth", 3), {"norm": norm}),
             ((q.transpose(1, 2), "ht", 0), {"head_columns": True}))
    for (t, order, ones), extra in cases:
        k = int(t.shape[-1]) * (int(t.shape[2]) if extra.get("head_columns") else 1)
        width = len(order) * k + extra_columns(len(order) * k, ones)
        lead = t.shape[:2] if extra.get("head_columns") else t.shape[:-1]
        w, b, eps = extra.get("norm", (None, None, 0.0))
        got = torch.ops.matchrt_roma.pieces(t, width, torch.bfloat16, order, ones, extra.get("gelu", False), w, b,
                                            eps, 1, extra.get("head_columns", False))
        want = piece_kernel.write_pieces(t, torch.empty(*lead, width, dtype=torch.bfloat16, device=device), order,
                                         ones, **extra)
        assert got.shape == want.shape and torch.equal(got.view(torch.int16), want.view(torch.int16)), (order, extra)


def test_split_bias_rides_in_the_product_to_fp32_precision() -> None:
    """bf16x3 layers add the bias inside the matrix product: its three bf16 pieces sum to the fp32
    bias exactly, and the activations get as many columns of ones, then zeros to 8-aligned rows."""
    from matchrt.plugins.roma_plus.split_products import BIAS_PIECES, bias_pieces, extra_columns, laid_out

    torch.manual_seed(0)
    bias = torch.randn(300) * torch.logspace(-6, 6, 300)
    pieces = bias_pieces(bias)
    assert pieces.dtype == torch.bfloat16 and pieces.shape == (300, BIAS_PIECES)
    assert torch.equal(pieces.double().sum(-1), bias.double())  # exact: 24 bits in three pieces of 8
    x = torch.randn(5, 6, 20)
    out = laid_out(x, torch.bfloat16, "hth", ones=BIAS_PIECES)
    assert out.shape == (5, 6, 64) and extra_columns(60, BIAS_PIECES) == 4 and extra_columns(60, 0) == 0
    assert torch.equal(out[..., :60], laid_out(x, torch.bfloat16, "hth"))
    assert bool((out[..., 60:63] == 1).all()) and bool((out[..., 63:] == 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton piece kernel runs on CUDA tensors only")
def test_piece_kernel_writes_the_bits_torch_writes(monkeypatch) -> None:
    """On a GPU laid_out writes the pieces with one Triton pass; the bits are torch's, for contiguous
    and strided (attention's q / k / v) inputs, bf16 and fp16 pieces, with and without columns of ones."""
    from matchrt.plugins.roma_plus import piece_kernel
    from matchrt.plugins.roma_plus.split_products import laid_out

    torch.manual_seed(0)
    x = torch.randn(2, 3202, 3, 16, 64, device="cuda") * torch.logspace(-3, 3, 64, device="cuda")
    q = x[:, :, 0].permute(0, 2, 1, 3)  # B x heads x N x d, strided
    flat = x.reshape(2, 3202, 3072)
    cases = ((q, torch.float16, "hht", 0), (q, torch.float16, "ht", 0),
             (flat, torch.bfloat16, "hth", 3), (flat[:, :, :1000], torch.bfloat16, "hth", 3))
    assert piece_kernel.usable(q) and piece_kernel.usable(flat)
    got = [laid_out(*case) for case in cases]
    monkeypatch.setattr(piece_kernel, "usable", lambda t: False)  # torch writes them now
    for case, g in zip(cases, got):
        want = laid_out(*case)
        assert torch.equal(g.view(torch.int16), want.view(torch.int16)), (case[2], tuple(case[0].shape))


def test_compiled_grids_are_the_numpy_constants() -> None:
    """Under torch.compile the refiners' pixel grid and window offsets are built on the device in
    float64; they are the numpy constants eager runs and exported graphs hold (to one float32 step)."""
    from matchrt.plugins.roma_plus.refiner import pixel_grid, window_offsets

    def grids(h: int, w: int):
        return pixel_grid(2, h, w, torch.device("cpu")), window_offsets(3, h, w, torch.device("cpu"))

    for h, w in ((864, 864), (37, 111), (1, 7)):
        eager = grids(h, w)
        compiled = torch.compile(grids, backend="eager", fullgraph=True)(h, w)
        for e, c in zip(eager, compiled):
            assert e.shape == c.shape and e.dtype == c.dtype == torch.float32
            torch.testing.assert_close(c, e, rtol=0, atol=2 ** -24)


def test_region_graphs_run_eager_then_capture_once_then_replay(monkeypatch) -> None:
    """replay.replayed: the first call of an input kind runs eagerly, the second captures and
    replays, later ones replay; another shape gets its own; a failed capture stays eager for good;
    CPU inputs never capture."""
    from matchrt.plugins.roma_plus import replay

    calls: list[str] = []

    class FakeCapture:
        def __init__(self, fn, args):
            if args[0].shape[0] == 7:
                raise RuntimeError("operation not permitted when stream is capturing")
            calls.append("capture")
            self.fn = fn

        def __call__(self, args):
            calls.append("replay")
            return self.fn(*args)

    module = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert torch.equal(replay.replayed(module, x), module(x)) and replay._GRAPHS_ATTR not in module.__dict__
    monkeypatch.setattr(replay, "replayable", lambda args: True)
    monkeypatch.setattr(replay, "_Captured", FakeCapture)
    for _ in range(4):
        assert torch.equal(replay.replayed(module, x), module(x))
    assert calls == ["capture", "replay", "replay", "replay"]  # a capture runs nothing: it replays too
    replay.replayed(module, torch.randn(6, 4))
    replay.replayed(module, torch.randn(6, 4))
    assert calls[-2:] == ["capture", "replay"]
    replay.replayed(module, torch.randn(7, 4))
    with pytest.warns(RuntimeWarning, match="capture of Linear failed.*stream is capturing"):
        replay.replayed(module, torch.randn(7, 4))  # the capture fails: eager from then on
    replay.replayed(module, torch.randn(7, 4))
    assert calls.count("capture") == 2
    assert module.state_dict().keys() == {"weight", "bias"}  # graphs live outside the state dict
    replay.drop_graphs(module)
    assert replay._GRAPHS_ATTR not in module.__dict__


def _tokens_view(x: torch.Tensor) -> torch.Tensor:
    """As DINOv2's output: the patch tokens of B x (1 + N) x C without the class token, as B x C x h x w
    (a view that skips elements)."""
    b, n, c = x.shape
    side = int((n - 1) ** 0.5)
    return x[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)


def test_replayed_outputs_keep_the_eager_strides_so_compiled_code_after_them_does_not_recompile() -> None:
    """The first call of a region runs eagerly and may return views that skip elements; the replays
    copy the graph's outputs out with those same strides (not contiguous clones), or torch.compile's
    stride guards recompile everything after the region on the second call (105 s on an H200)."""
    from matchrt.plugins.roma_plus import replay

    x = torch.randn(2, 1 + 16, 8)
    eager = _tokens_view(x)
    copied = replay.copy_like(eager)
    assert copied.shape == eager.shape and copied.stride() == eager.stride() and torch.equal(copied, eager)
    assert eager.clone().stride() != eager.stride()  # what the replays returned before
    x.zero_()
    assert not torch.equal(copied, eager)  # its own memory: the next replay cannot change it
    expanded = torch.randn(3, 1).expand(3, 4)  # overlapping memory: copied as a clone, the values kept
    assert torch.equal(replay.copy_like(expanded), expanded)
    # the replay path itself (a graph whose replay does nothing, CPU tensors standing in for its buffers)
    captured = object.__new__(replay._Captured)
    captured.inputs, captured.outputs = (torch.zeros(2, 17, 8),), (_tokens_view(torch.randn(2, 17, 8)), 3)
    captured.graph = type("NoGraph", (), {"replay": lambda self: None})()
    first = _tokens_view(torch.randn(2, 17, 8))
    replayed_out, three = captured((torch.randn(2, 17, 8),))
    assert three == 3 and replayed_out.stride() == first.stride()
    after = torch.compile(lambda t: t * 2 + 1, backend="eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        after(first)
        after(replayed_out)  # the same layout: no recompile


def test_replayed_copies_are_inference_tensors_exactly_where_the_eager_outputs_are() -> None:
    """Under inference mode a region's output that is a view of a normal input is a normal tensor, the
    others inference tensors; torch.compile guards on that too (dispatch keys: session 24's GPU test
    recompiled on it), so the copies out of a replay keep it."""
    from matchrt.plugins.roma_plus import replay

    normal = torch.randn(2, 9, 8)[:, 1:]
    after = torch.compile(lambda u: u.sum() + 1, backend="eager")
    torch._dynamo.reset()
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        view = normal.transpose(1, 2)  # as the region's eager call returns it
        computed = normal * 2
        assert not view.is_inference() and computed.is_inference()
        copies = replay.copy_like(view), replay.copy_like(computed)
        assert not copies[0].is_inference() and copies[1].is_inference()
        assert copies[0].stride() == view.stride() and torch.equal(copies[0], view)
        after(view)
        after(copies[0])  # no recompile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_region_graph_replays_return_the_eager_layout() -> None:
    """On a GPU: eager, capture + replay, replay of a region returning a view that skips elements, each
    output with the eager call's strides and values, and compiled code after it compiled once."""
    from matchrt.plugins.roma_plus import replay

    class Tokens(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _tokens_view(x * 2), y.transpose(1, 2)  # the second a view of an input that skips elements

    module = Tokens()
    inputs = [(torch.randn(2, 1 + 64, 32, device="cuda"), torch.randn(2, 9, 8, device="cuda")[:, 1:])
              for _ in range(3)]
    after = torch.compile(lambda t, u: t.sum(dim=1) + u.sum(), backend="eager")
    torch._dynamo.reset()
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in inputs:
            got = replay.replayed(module, x, y)
            want = module(x, y)
            for g, w in zip(got, want):
                assert g.stride() == w.stride() and torch.equal(g, w)
            after(*got)
    assert isinstance(list(module.__dict__[replay._GRAPHS_ATTR].values())[0], replay._Captured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_region_graph_replay_gives_the_eager_bits() -> None:
    """A split DINOv2-like block replayed from its CUDA graph returns the eager bits, for new inputs
    too, and the outputs stay valid after the next replay."""
    from matchrt.plugins.roma_full.dinov2 import Attention
    from matchrt.plugins.roma_plus import replay
    from matchrt.plugins.roma_plus.split_products import split_linears

    torch.manual_seed(0)
    block = split_linears(nn.Sequential(Attention(256, 4), nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)),
                          "bf16x3-flash").cuda().eval()
    inputs = [torch.randn(2, 300, 256, device="cuda") for _ in range(4)]
    with torch.inference_mode():
        want = [block(x) for x in inputs]
        got = [replay.replayed(block, x) for x in inputs]  # eager, capture, replay, replay
    entries = list(block.__dict__[replay._GRAPHS_ATTR].values())
    assert len(entries) == 1 and isinstance(entries[0], replay._Captured)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_roma_plus_plan_replays_its_split_regions_unless_asked_not_to() -> None:
    from roma_plus_helpers import loaded_model

    from matchrt.plugins.roma_plus import hooks
    from matchrt.types import ExportOptions

    model = loaded_model()
    default = hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra={"upsample_res": 64}))
    off = hooks.export_plan("roma_plus", model, ExportOptions(56, 56, extra={"upsample_res": 64, "coarse_graphs": "false"}))
    assert default.graphs[0].module.model.coarse_graphs is True
    assert off.graphs[0].module.model.coarse_graphs is False
    assert model.coarse_graphs is False  # the loaded model itself runs every call eagerly


def _region_outputs(model, f_q, f_s):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a half-precision run: the policy applies
        return model.coarse_prediction(f_q, f_s)


def test_roma_plus_captures_proj16_gp_and_decoder_as_one_region(monkeypatch) -> None:
    """Under a split policy with coarse_graphs, proj.16 + GP + decoder go to replay.replayed as one
    region of the view: the same outputs, one capture per input kind, a new region (new capture)
    once the weights change, none for the exact GP solve, with coarse_graphs off, or for
    another view of the model (shallow copies share attributes, not regions)."""
    import copy

    from roma_plus_helpers import loaded_model

    from matchrt.plugins.roma_plus import model as roma_model, replay

    captured: list[object] = []

    class FakeCapture:
        def __init__(self, fn, args):
            captured.append(fn)
            self.fn = fn

        def __call__(self, args):
            return self.fn(*args)

    model = copy.copy(loaded_model())
    model.coarse_precision = "bf16x3-flash"
    model.set_gp("iterative")  # in-graph Cholesky under torch
    g = torch.Generator().manual_seed(0)
    f_q, f_s = torch.randn(2, 1024, 4, 4, generator=g), torch.randn(2, 1024, 4, 4, generator=g)
    want = _region_outputs(model, f_q, f_s)  # coarse_graphs off: no region
    assert roma_model._REGION_ATTR not in model.__dict__
    monkeypatch.setattr(replay, "replayable", lambda args: True)
    monkeypatch.setattr(replay, "_Captured", FakeCapture)
    model.coarse_graphs = True
    for _ in range(3):
        got = _region_outputs(model, f_q, f_s)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    region = model.__dict__[roma_model._REGION_ATTR]
    assert captured == [region] and isinstance(region, roma_model.CoarseRegion)
    view = copy.copy(model)  # shares the attribute, must not run the other view's region
    _region_outputs(view, f_q, f_s)
    assert view.__dict__[roma_model._REGION_ATTR] is not region
    decoder_weight = next(model.coarse.embedding_decoder.parameters())
    try:
        with torch.no_grad():
            decoder_weight.mul_(1.0)  # an in-place update (as load_state_dict does): a new version
        for _ in range(2):
            _region_outputs(model, f_q, f_s)
        assert model.__dict__[roma_model._REGION_ATTR] is not region and len(captured) == 2
        model.set_gp("exact")  # reads the factorisation's status on the host: never captured
        assert not model.replays_coarse_region(model.region_modes("cpu"))
    finally:
        model.__dict__.pop(roma_model._REGION_ATTR, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.set_gp("iterative")
        assert model.replays_coarse_region(model.region_modes("cpu"))
        model.coarse_precision = "fp32"  # nothing split: the region stays eager, as before
        assert not model.replays_coarse_region(model.region_modes("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_roma_plus_coarse_region_replay_gives_the_eager_bits() -> None:
    """On a GPU the replayed proj.16 + GP + decoder return the eager region's bits for new inputs,
    and the decoder inside it keeps no graphs of its own."""
    import copy

    from roma_plus_helpers import loaded_model

    from matchrt.plugins.roma_plus import model as roma_model, replay
    from matchrt.plugins.roma_plus.split_products import split_copy

    model = copy.deepcopy(loaded_model()).cuda()
    model.coarse_precision = "bf16x3-flash"
    model.set_gp("iterative")
    g = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(2, 1024, 8, 8, generator=g).cuda(), torch.randn(2, 1024, 8, 8, generator=g).cuda())
              for _ in range(4)]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        want = [model.coarse_prediction(*x) for x in inputs]
        model.coarse_graphs = True
        got = [model.coarse_prediction(*x) for x in inputs]  # eager, capture, replay, replay
    entries = list(model.__dict__[roma_model._REGION_ATTR].__dict__[replay._GRAPHS_ATTR].values())
    assert len(entries) == 1 and isinstance(entries[0], replay._Captured)
    assert replay._GRAPHS_ATTR not in split_copy(model.coarse.embedding_decoder, "bf16x3-flash").__dict__
    for g_out, w_out in zip(got, want):
        assert all(torch.equal(g_out[k], w_out[k]) for k in w_out)


@pytest.mark.parametrize("kind,tolerance", [("tf32x3", 1e-4), ("bf16x3", 1e-4), ("bf16x2", 1e-2)])
def test_split_mlp_applies_gelu_where_fc2_splits_its_input(kind: str, tolerance: float) -> None:
    """split_linears turns roma_full's Mlp into a SplitMlp: the same function (within the split
    products' precision; bf16x2's weights are rounded to bf16), GELU applied in fc2's splitting
    pass, the weights shared."""
    from matchrt.plugins.roma_full.dinov2 import Mlp
    from matchrt.plugins.roma_plus.split_products import SplitMlp, split_linears

    torch.manual_seed(2)
    mlp = Mlp(64, 256)
    x = torch.randn(2, 40, 64) * 3
    split = split_linears(nn.Sequential(mlp), kind)
    assert isinstance(split[0], SplitMlp) and split[0].fc1.linear is mlp.fc1
    exact = mlp.double()(x.double())
    mlp.float()
    with torch.no_grad():
        got = split(x)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert float((got.double() - exact).norm() / exact.norm()) < tolerance
    assert {id(p) for p in split.parameters()} == {id(p) for p in mlp.parameters()}  # shared, not copied


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
def test_piece_kernel_gelu_writes_the_pieces_of_torch_s_gelu() -> None:
    """The piece kernel's fused GELU: head + tail agree with the pieces of torch's GELU (16 bits of
    mantissa; near -inf, where 1 + erf cancels, absolutely). Not bit for bit: Triton's erf (libdevice
    on a GPU, numpy's in the interpreter) and torch's differ by fp32 ulps, which can round a head
    the other way (measured on an H200: torch.equal failed; the tail then carries the difference)."""
    from matchrt.plugins.roma_plus import piece_kernel

    if piece_kernel.triton is None:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(37, 300) * 4).to(device)
    width = 3 * 300 + 5
    fused = piece_kernel.write_pieces(x, torch.empty(37, width, dtype=torch.bfloat16, device=device), "hth", 3,
                                      gelu=True)
    plain = piece_kernel.write_pieces(torch.nn.functional.gelu(x), torch.empty_like(fused), "hth", 3)

    def value(pieces: torch.Tensor) -> torch.Tensor:  # "hth": head, tail, head
        return pieces[:, :300].float() + pieces[:, 300:600].float()

    torch.testing.assert_close(value(fused), value(plain), rtol=3e-5, atol=1e-6)
    assert torch.equal(fused[:, 600:900], fused[:, :300])  # the third slot repeats the head
    assert torch.equal(fused[:, 900:], plain[:, 900:])  # the ones and zeros after the pieces


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
def test_piece_kernel_layer_norm_writes_the_pieces_of_torch_s_layer_norm() -> None:
    """The piece kernel's fused LayerNorm (a whole row per program, two-pass fp32 statistics):
    head + tail agree with the pieces of torch's LayerNorm to fp32 rounding; rows wider than one
    program holds (NORM_MAX) are refused."""
    from matchrt.plugins.roma_plus import piece_kernel

    if piece_kernel.triton is None:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    norm = nn.LayerNorm(300, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(37, 300) * 5 + 3).to(device)
    width = 3 * 300 + 5
    params = (norm.weight, norm.bias, norm.eps)
    fused = piece_kernel.write_pieces(x, torch.empty(37, width, dtype=torch.bfloat16, device=device), "hth", 3,
                                      norm=params)
    with torch.no_grad():
        plain = piece_kernel.write_pieces(norm(x), torch.empty_like(fused), "hth", 3)

    def value(pieces: torch.Tensor) -> torch.Tensor:  # "hth": head, tail, head
        return pieces[:, :300].float() + pieces[:, 300:600].float()

    # head + tail hold 16 bits: an fp32 ulp between the two LayerNorms can move that rounding by 2^-16
    torch.testing.assert_close(value(fused), value(plain), rtol=6e-5, atol=1e-5)
    assert torch.equal(fused[:, 900:], plain[:, 900:])  # the ones and zeros after the pieces
    wide = torch.zeros(2, piece_kernel.NORM_MAX + 1, device=device)
    with pytest.raises(ValueError, match="at most"):
        piece_kernel.write_pieces(wide, torch.empty(2, 3 * wide.shape[1], dtype=torch.bfloat16, device=device),
                                  "hth", 0, norm=(torch.ones(wide.shape[1], device=device),
                                                  torch.zeros(wide.shape[1], device=device), 1e-6))


@pytest.mark.parametrize("kind", ["tf32x3", "bf16x3-flash"])
def test_split_dinov2_block_folds_its_layer_scales(kind: str, monkeypatch) -> None:
    """DINOv2's block in split form: LayerScale gamma folded into proj and fc2 (the copy's ls1 and
    ls2 are identities), the same function within the split products' precision, the weights
    shared, each product's split weights built once (four per block: the model's load time);
    traced (as for ONNX or torch.export) the plain layers apply gamma themselves."""
    from matchrt.plugins.roma_full.dinov2 import Block
    from matchrt.plugins.roma_plus import split_products
    from matchrt.plugins.roma_plus.split_products import split_linears

    built = []
    original_init = split_products.SplitLinear.__init__

    def counting_init(self, linear, *args, **kwargs):
        built.append(linear)
        original_init(self, linear, *args, **kwargs)

    monkeypatch.setattr(split_products.SplitLinear, "__init__", counting_init)

    torch.manual_seed(3)
    block = Block(64, 4)
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.1, 2.0)
        block.ls2.gamma.uniform_(0.1, 2.0)
    x = torch.randn(2, 30, 64)
    exact = block.double()(x.double())
    block.float()
    split = split_linears(block, kind)
    assert sorted(map(id, built)) == sorted(map(id, (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)))
    assert not hasattr(split, "ls1") and not hasattr(split, "ls2")  # folded into proj and fc2
    # the LayerNorms move into the products after them (applied where those split their input)
    assert isinstance(split.norm1, nn.Identity) and isinstance(split.norm2, nn.Identity)
    assert split.attn.qkv.in_norm is block.norm1 and split.mlp.fc1.in_norm is block.norm2
    assert {id(p) for p in split.parameters()} == {id(p) for p in block.parameters()}
    with torch.no_grad():
        got = split(x)
        traced = torch.compile(split, backend="eager", fullgraph=True)(x)  # the plain layers
    tolerance = 1e-2 if kind.endswith("flash") else 1e-4  # flash: fp16 softmax weights
    for y in (got, traced):
        assert float((y.double() - exact).norm() / exact.norm()) < tolerance
    assert float((traced.double() - exact).norm() / exact.norm()) < 1e-5


def test_embed_displacement_matches_the_1x1_convolution() -> None:
    """roma_plus's displacement embedding written as multiply-adds gives the Conv2d's output (fp32
    inputs, to rounding; half-precision inputs are computed in fp32)."""
    from matchrt.plugins.roma_plus.refiner import embed_displacement

    torch.manual_seed(3)
    conv = nn.Conv2d(2, 16, 1)
    disp = torch.randn(2, 2, 7, 9) * 3
    with torch.no_grad():
        torch.testing.assert_close(embed_displacement(conv, disp), conv(disp), rtol=1e-6, atol=1e-6)
        half = embed_displacement(conv, disp.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, conv(disp.half().float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("radius,size", [(1, (6, 9)), (2, (12, 10)), (3, (9, 13)), (7, (11, 11))])
def test_window_correlation_equals_the_sampled_window(radius, size) -> None:
    """The correlation from whole-pixel products equals GridSample's window of bilinear samples:
    flow targets inside, near and beyond the image border (zeros padding), and targets exactly on
    pixel centres (where a sample's right or lower neighbour has weight 0)."""
    from matchrt.plugins.roma_plus.refiner import LocalCorrelation, window_correlation

    torch.manual_seed(radius)
    (h, w), (hb, wb) = size, size
    feat_a, feat_b = torch.randn(2, 8, h, w), torch.randn(2, 8, hb, wb)
    flow = torch.rand(2, 2, h, w) * 2.6 - 1.3  # about 15% of targets outside B
    flow[1, 0] = (torch.randint(0, wb, (h, w)) * 2 + 1).float() / wb - 1  # pixel centres of B
    flow[1, 1] = (torch.randint(0, hb, (h, w)) * 2 + 1).float() / hb - 1
    want = LocalCorrelation(radius)(feat_a, feat_b, flow)
    got = window_correlation(feat_a, feat_b, flow, radius)
    assert got.shape == want.shape == (2, (2 * radius + 1) ** 2, h, w)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    assert (want[0] == 0).any()  # windows that reach outside B
    with pytest.raises(ValueError, match="one size"):  # steps follow A's grid: B of another size is refused
        window_correlation(feat_a, torch.randn(2, 8, h + 1, w), flow, radius)


def test_compiled_refiner_runs_its_1x1_convolutions_as_matrix_products() -> None:
    """Under torch.compile the refiner's 1 x 1 block convolutions become matrix products over
    channels-last pixels and the 3-channel head a sum of products (head_conv: a reduction, no
    product), with the eager refiner's outputs (fp32 rounding); the depth-wise ones stay
    convolutions, and ONNX export keeps every Conv (checked elsewhere)."""
    from matchrt.plugins.roma_plus.refiner import pointwise_conv

    refiner = _random_refiner(5, 3, 1)
    feat_a, feat_b = torch.randn(2, 5, 12, 10), torch.randn(2, 5, 12, 10)
    flow = torch.rand(2, 2, 12, 10) * 1.6 - 0.8
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        want = refiner(feat_a, feat_b, flow, 1.5)
        got = torch.compile(refiner, backend=backend, fullgraph=True)(feat_a, feat_b, flow, 1.5)
    for g, r in zip(got, want):
        assert float((g - r).abs().max() / r.abs().max()) <= 1e-5
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_module")]
    convs = [c for c in calls if "conv" in c]
    assert sum("linear" in c for c in calls) == 1 + 8  # block1 and the eight hidden blocks
    assert len(convs) == 9  # the depth-wise convolutions only
    methods = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_method"]
    assert methods.count("sum") == 1 + 3  # the window correlation; the head, one per output channel
    assert sum("grid_sample" in c for c in calls) == 1  # B's warped features; the correlation gathers pixels
    conv = nn.Conv2d(6, 4, 1)
    x = torch.randn(1, 6, 3, 5)
    with torch.no_grad():
        assert torch.equal(pointwise_conv(conv, x), conv(x))  # eager: the convolution itself


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Triton's row kernel under torch.compile)")
@pytest.mark.parametrize("rows,half", [(True, False), (False, False), (True, True)])
def test_compiled_folded_refiner_runs_its_depthwise_blocks_through_the_row_kernel(rows: bool, half: bool,
                                                                                 monkeypatch) -> None:
    """Compiled on a GPU with its BatchNorms folded, the refiner's nine 5 x 5 depth-wise convolution +
    ReLU pairs are matchrt's depth-wise op (unless depthwise_rows is off), with the eager refiner's
    outputs: fp32 to 1e-4 relative, fp16 autocast to 1e-2 (also with the kernel's fp16 sums,
    depthwise_half). The eager reference runs its 1 x 1 convolutions without TF32 (cuDNN's default
    allows it: 1.5e-3 relative after nine blocks)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    refiner = folded_copy(_random_refiner(21, 3, 1)).cuda().eval()  # 2 x 21 + 3 + 9 = 54 channels: a masked block
    refiner.depthwise_rows, refiner.depthwise_half = rows, half
    feat_a, feat_b = torch.randn(2, 21, 30, 26, device="cuda"), torch.randn(2, 21, 30, 26, device="cuda")
    flow = torch.rand(2, 2, 30, 26, device="cuda") * 1.6 - 0.8
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        graphs.clear()
        torch._dynamo.reset()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            want = refiner(feat_a, feat_b, flow, 1.5)
            got = torch.compile(refiner, backend=backend, fullgraph=True)(feat_a, feat_b, flow, 1.5)
            inductor = torch.compile(refiner, fullgraph=True)(feat_a, feat_b, flow, 1.5)
        for out in (got, inductor):
            for g, r in zip(out, want):
                assert float((g.float() - r.float()).abs().max() / r.float().abs().max()) <= tolerance
        calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        assert sum("depthwise_conv2d" in c for c in calls) == (9 if rows else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the row kernel inside torch.export)")
def test_packages_keep_the_row_kernel_with_its_fp16_sums() -> None:
    """An fp16 package of a folded refiner with depthwise_half (the default refiner_depthwise=rows-half)
    holds nine depth-wise ops asked for fp16 sums, and computes the eager fp16 refiner's outputs to 1e-2."""
    from matchrt.package import export_program
    from matchrt.types import GraphSpec

    torch.manual_seed(7)
    refiner = folded_copy(_random_refiner(21, 3, 1)).cuda().eval()
    refiner.depthwise_rows, refiner.depthwise_half = True, True

    class Region(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.refiner = refiner

        def forward(self, a: torch.Tensor, b: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.refiner(a, b, flow, 1.5)

    a, b = torch.randn(2, 21, 30, 26, device="cuda"), torch.randn(2, 21, 30, 26, device="cuda")
    flow = torch.rand(2, 2, 30, 26, device="cuda") * 1.6 - 0.8
    program = export_program(GraphSpec("main", Region(), (a, b, flow), ["a", "b", "flow"], ["delta", "certainty"]),
                             "fp16", torch.device("cuda"))
    calls = [n for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
             for n in gm.graph.nodes if n.op == "call_function" and "depthwise_conv2d" in str(n.target)]
    assert len(calls) == 9 and all(n.args[-1] is True or n.kwargs.get("half_sums") is True for n in calls), calls
    with torch.no_grad():
        got = program.module()(a, b, flow)
        with torch.autocast("cuda", dtype=torch.float16):
            want = refiner(a, b, flow, 1.5)
    for g, r in zip(got, want):
        assert float((g.float() - r.float()).abs().max() / r.float().abs().max()) <= 1e-2


def test_refiner_depthwise_option_picks_the_kernel_and_refuses_other_values() -> None:
    """-O refiner_depthwise: 'rows', 'rows-half' (default) and 'cudnn' set the configured refiners' kernel,
    the model's own refiners keep the class default; another value is an error naming the choices."""
    from roma_plus_helpers import loaded_model

    from matchrt.errors import MatchrtError
    from matchrt.plugins.roma_plus import export as export_mod

    model = loaded_model()
    for value, rows, half in (("cudnn", False, False), ("ROWS", True, False), ("rows-half", True, True)):
        view = export_mod.configured(model, export_mod.resolve_options({"refiner_depthwise": value}))
        assert {(r.depthwise_rows, r.depthwise_half) for r in view.conv_refiner.values()} == {(rows, half)}
    assert not any(r.depthwise_rows or r.depthwise_half for r in model.conv_refiner.values())
    assert export_mod.resolve_options({})["refiner_depthwise"] == "rows-half"
    with pytest.raises(MatchrtError, match="rows, rows-half, cudnn"):
        export_mod.resolve_options({"refiner_depthwise": "triton"})


def test_gp_block_option_reaches_the_solve_and_refuses_other_values() -> None:
    """-O gp_block: the configured view's GP solve block (128 by default, 0 for cuBLAS's
    triangular solves); the model keeps its own; not a whole number from 0 to 4096 is an error."""
    from roma_plus_helpers import loaded_model

    from matchrt.errors import MatchrtError
    from matchrt.plugins.roma_full.gp import CHOLESKY_BLOCK
    from matchrt.plugins.roma_plus import export as export_mod

    model = loaded_model()
    assert export_mod.resolve_options({})["gp_block"] == CHOLESKY_BLOCK == model.gp_block
    view = export_mod.configured(model, export_mod.resolve_options({"gp_block": "0"}))
    assert view.gp_block == 0 and model.gp_block == CHOLESKY_BLOCK
    for bad in ("-1", "big", "5000"):
        with pytest.raises(MatchrtError, match="gp_block"):
            export_mod.resolve_options({"gp_block": bad})
