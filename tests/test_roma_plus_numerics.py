"""roma_plus numerics against upstream's self_inference_time_match (fp32, CPU, deterministic weights).

Tolerances (max |a - b| / max |b|): 1e-4 for flows and warp, 1e-3 for certainties. Certainty
carries the GP solve's sensitivity (fixtures README: ~1e-4 between float32 and float64 inverses).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matchrt.plugins.roma_plus.refiner import LocalCorrelation
from roma_plus_helpers import CERT_RTOL, FLOW_RTOL, inputs, loaded_model, reference, reference_warp, rel, run_224

SCALES = (16, 8, 4, 2, 1)


@pytest.mark.parametrize("scale", SCALES)
def test_per_scale_flow_and_certainty_match_upstream(scale: int) -> None:
    ref = reference()
    flow, cert = run_224()["first"][scale]
    assert tuple(flow.shape) == ref[f"s{scale}_flow"].shape
    assert rel(flow, ref[f"s{scale}_flow"]) <= FLOW_RTOL
    assert rel(cert, ref[f"s{scale}_certainty"]) <= CERT_RTOL


def test_fine_scales_from_the_reference_coarse_flow_are_tight() -> None:
    """Scales 8..1 fed upstream's s16 output: the refiners alone, free of the GP's solve noise."""
    ref = reference()
    model = loaded_model()
    a, b = run_224()["image0"], run_224()["image1"]
    with torch.no_grad():
        pyr_q, pyr_s = model.pyramids(a, b, with_coarse=False)
        out = model.fine_scales(pyr_q, pyr_s, torch.from_numpy(ref["s16_flow"]),
                                torch.from_numpy(ref["s16_certainty"]))
    for s in (8, 4, 2, 1):
        assert rel(out[s][0], ref[f"s{s}_flow"]) <= 1e-5
        assert rel(out[s][1], ref[f"s{s}_certainty"]) <= 1e-5


def test_final_warp_and_certainty_match_upstream() -> None:
    ref = reference()
    warp, cert = run_224()["warp"], run_224()["certainty"]
    assert tuple(warp.shape) == (1, 224, 448, 4) and tuple(cert.shape) == (1, 224, 448)
    assert rel(warp[0], reference_warp(ref["s1_flow"], ref["warp_grid"])) <= FLOW_RTOL
    assert rel(cert[0], ref["certainty"]) <= CERT_RTOL
    # the layout itself: left half is A's grid then its match in B, right half the reverse
    w = warp[0].numpy()
    assert np.array_equal(w[:, :224, :2], w[:, 224:, 2:])
    assert float(cert.min()) >= 0.0 and float(cert.max()) <= 1.0


def test_attenuation_subtracts_half_the_negative_coarse_logit() -> None:
    """Upstream: logits_1 - 0.5 * c16 * (c16 < 0), c16 resized bilinearly to the output size."""
    model = loaded_model()
    first = run_224()["first"]
    c16 = torch.nn.functional.interpolate(first[16][1], size=(224, 224), mode="bilinear", align_corners=False)
    logits = first[1][1] - 0.5 * c16 * (c16 < 0)
    with torch.no_grad():
        warp, cert = model.layout(first[1][0], first[1][1], first[16][1], True)
    expected = torch.sigmoid(logits)[:, 0]
    outside = (first[1][0].abs() > 1).any(dim=1)
    expected = torch.where(outside, torch.zeros_like(expected), expected)
    assert torch.allclose(cert, torch.cat((expected[:1], expected[1:]), dim=2), atol=1e-6)
    assert bool((c16 < 0).any())  # the pair exercises the attenuation


def test_non_symmetric_mode_is_the_a_to_b_half() -> None:
    import copy

    model = copy.copy(loaded_model())
    model.symmetric = False
    a, b = inputs(224)
    with torch.no_grad():
        warp, cert = model(a, b)
    sym_warp, sym_cert = run_224()["warp"], run_224()["certainty"]
    assert tuple(warp.shape) == (1, 224, 224, 4)
    assert rel(warp, sym_warp[:, :, :224]) <= FLOW_RTOL
    assert rel(cert, sym_cert[:, :, :224]) <= CERT_RTOL


def test_batched_pairs_are_independent() -> None:
    """Batch of two pairs, (A, B) and (B, A): the second is the first with its halves swapped."""
    a, b = inputs(224)
    with torch.no_grad():
        warp, cert = loaded_model()(torch.cat((a, b)), torch.cat((b, a)))
    w1, c1 = run_224()["warp"][0], run_224()["certainty"][0]
    assert tuple(warp.shape) == (2, 224, 448, 4)
    assert rel(warp[0], w1) <= FLOW_RTOL and rel(cert[0], c1) <= CERT_RTOL
    swapped = torch.cat((w1[:, 224:, [2, 3, 0, 1]], w1[:, :224, [2, 3, 0, 1]]), dim=1)
    assert rel(warp[1], swapped) <= FLOW_RTOL
    assert rel(cert[1], torch.cat((c1[:, 224:], c1[:, :224]), dim=1)) <= CERT_RTOL


@pytest.mark.parametrize("chunk_bytes", [None, 3 * 2 * 8 * 6 * 7 * 4])
def test_local_correlation_is_the_windowed_dot_product(chunk_bytes, monkeypatch) -> None:
    """Against a direct per-offset computation (upstream's definition: window step 2 px), sampled
    all at once and in chunks of 3 offsets (what bounds the window's memory at large sizes)."""
    from matchrt.plugins.roma_plus import refiner

    if chunk_bytes is not None:
        monkeypatch.setattr(refiner, "WINDOW_CHUNK_BYTES", chunk_bytes)
    assert len(refiner.offset_chunks(25, 2 * 8 * 6 * 7 * 4)) == (1 if chunk_bytes is None else 9)
    torch.manual_seed(0)
    b, c, h, w, r = 2, 8, 6, 7, 2
    fa, fb = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    flow = torch.rand(b, 2, h, w) * 1.6 - 0.8
    got = LocalCorrelation(r)(fa, fb, flow)
    k = 0
    for dy in torch.linspace(-2 * r / h, 2 * r / h, 2 * r + 1):
        for dx in torch.linspace(-2 * r / w, 2 * r / w, 2 * r + 1):
            grid = (flow + torch.stack((dx, dy)).view(1, 2, 1, 1)).permute(0, 2, 3, 1)
            sampled = torch.nn.functional.grid_sample(fb, grid, align_corners=False)
            want = (fa * sampled).sum(1) / c ** 0.5
            assert torch.allclose(got[:, k], want, atol=1e-5)
            k += 1


def _coarse_stage(model, a, b):
    """DINOv2 tokens, proj.16 features and decoder logits of the symmetric batch."""
    pyr_q, pyr_s = model.pyramids(a, b)
    coarse = model.coarse_prediction(pyr_q[16], pyr_s[16])
    return pyr_q[16], coarse["feat_q16"], coarse["gm_cls"], coarse["flow"]


def test_coarse_stage_stays_ieee_fp32_under_reduced_precision() -> None:
    """The default policy (bf16x2-flash, whose split products run only on Ampere+ GPUs: IEEE fp32 on the CPU):
    under bf16 autocast DINOv2, proj.16, the GP and the decoder compute what fp32 computes, so no
    coarse arg-max can flip; "reduced" runs them in bf16."""
    import copy

    model = loaded_model()
    assert model.coarse_precision == "bf16x2-flash"
    reduced = copy.copy(model)
    reduced.coarse_precision = "reduced"
    a, b = inputs(112)
    with torch.no_grad():
        want = _coarse_stage(model, a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            strict = _coarse_stage(model, a, b)
            loose = _coarse_stage(reduced, a, b)
    for got, ref in zip(strict, want):
        assert got.dtype == torch.float32
        assert rel(got, ref) <= 1e-6
    assert strict[3].equal(want[3])  # the coarse flow: same arg-max anchors
    assert loose[1].dtype == torch.bfloat16  # proj.16 ran in bf16
    assert rel(loose[0].float(), want[0]) > 1e-3 and rel(loose[2].float(), want[2]) > 1e-3


def test_region_policy_relaxes_only_dinov2() -> None:
    """coarse_precision=reduced:dinov2: DINOv2 runs in the autocast precision, proj.16 and the
    decoder stay IEEE fp32 (fed DINOv2's bf16 tokens)."""
    import copy

    model = loaded_model()
    mixed = copy.copy(model)
    mixed.coarse_precision = "reduced:dinov2"
    a, b = inputs(112)
    with torch.no_grad():
        fp32_tokens = _coarse_stage(model, a, b)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, feat, logits, _ = _coarse_stage(mixed, a, b)
        want_feat = model.coarse.proj16(tokens.float())
    assert rel(tokens.float(), fp32_tokens) > 1e-3  # DINOv2 ran in bf16
    assert feat.dtype == torch.float32 and logits.dtype == torch.float32
    assert rel(feat, want_feat) <= 1e-6  # proj.16 in fp32 on those tokens


@pytest.mark.parametrize("kind,tolerance", [("tf32x3", 1e-4), ("bf16x3", 1e-4), ("bf16x3-flash", 1e-2),
                                            ("bf16x2-flash", 1e-2)])
def test_split_policies_run_split_products_with_fp32_results(monkeypatch, kind: str, tolerance: float) -> None:
    """coarse_precision=tf32x3 / bf16x3 / bf16x3-flash / bf16x2-flash: DINOv2's and the decoder's linear
    layers (and for -flash their attention) run as split products (copies kept outside the state dict)
    in half-precision runs; forced on the CPU, they compute fp32's coarse stage within fp32's
    tolerance (-flash: the fp16 one, its attention weights are rounded to fp16; bf16x2 rounds the
    weights to bf16). fp32 runs keep the coarse stage IEEE fp32 under any policy."""
    import copy

    from matchrt.plugins.roma_plus import split_products
    from matchrt.plugins.roma_plus.split_products import SplitAttention, SplitLinear, split_copy

    model = copy.copy(loaded_model())  # the reference: IEEE fp32
    model.coarse_precision = "fp32"
    assert not split_products.split_pays(torch.device("cpu"))  # a CPU run of the default: plain fp32 layers
    monkeypatch.setattr(split_products, "split_pays", lambda device: True)
    split = copy.copy(model)
    split.coarse_precision = kind
    a, b = inputs(112)
    regions = (model.coarse.encoder.dinov2, model.coarse.embedding_decoder)
    try:
        with torch.no_grad():
            want = _coarse_stage(model, a, b)
            fp32_run = _coarse_stage(split, a, b)  # no autocast: an fp32 run, IEEE fp32 whatever the policy
            assert not any(split_products._COPY_ATTR in m.__dict__ for m in regions)
            assert all(torch.equal(g, w) for g, w in zip(fp32_run, want))
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the policy governs half-precision runs
                got = _coarse_stage(split, a, b)
            # both regions ran through their split copies: the decoder too, although it runs inside
            # the strict fp32 region around the GP, where autocast is off (it ran IEEE fp32 there
            # when the region re-read the run's precision inside)
            assert all(split_products._COPY_ATTR in m.__dict__ for m in regions)
        for g, w in zip(got[:3], want[:3]):  # tokens, proj.16, logits
            assert g.dtype == torch.float32 and rel(g, w) <= tolerance
        # one copy per module, kept on the module shared by every view of the model (not per view)
        copies = [split_copy(m, kind) for m in regions]
        assert all(any(isinstance(m, SplitLinear) for m in c.modules()) for c in copies)
        assert all(any(isinstance(m, SplitAttention) for m in c.modules()) == kind.endswith("flash") for c in copies)
        again = copy.copy(model)
        again.coarse_precision = kind
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _coarse_stage(again, a, b)
        assert [split_copy(m, kind) for m in regions] == copies
        assert split.state_dict().keys() == model.state_dict().keys()
    finally:  # the shared test model keeps no 4 GB of split weights for the tests after this one
        for m in regions:
            m.__dict__.pop(split_products._COPY_ATTR, None)


def test_unknown_coarse_precision_is_refused() -> None:
    from matchrt.errors import MatchrtError
    from matchrt.plugins.roma_plus import hooks

    with pytest.raises(MatchrtError, match="coarse_precision"):
        hooks.create_model("roma_plus", {"coarse_precision": "fp8"})


@pytest.mark.slow
def test_default_560_with_upsampling_to_864_matches_upstream() -> None:
    """Upstream's default setting (about 5 minutes and 9 GB on 2 CPU cores)."""
    ref = reference("c560_u864_sub")
    st = int(ref["stride"])
    model = loaded_model()
    a, b = inputs(560)
    au, bu = inputs(864)
    with torch.no_grad():
        _, first, second = model.correspondences(a, b, au, bu)
        warp, cert = model.finish(first, second)
    assert second is not None and tuple(warp.shape) == (1, 864, 1728, 4)
    assert rel(second[8][0], ref["s8_flow"]) <= FLOW_RTOL
    assert rel(second[8][1], ref["s8_certainty"]) <= CERT_RTOL
    assert rel(second[1][0][:, :, ::st, ::st], ref["s1_flow_sub"]) <= FLOW_RTOL
    assert rel(second[1][1][:, :, ::st, ::st], ref["s1_certainty_sub"]) <= CERT_RTOL
    assert rel(warp[0, ::st, ::st], reference_warp(ref["s1_flow_sub"], ref["warp_grid_sub"])) <= FLOW_RTOL
    assert rel(cert[0, ::st, ::st], ref["certainty_sub"]) <= CERT_RTOL
