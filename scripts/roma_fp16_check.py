#!/usr/bin/env python3
"""fp16 safety check of roma_plus: reduced-precision runs vs a strict fp32 run, stage by stage.

Runs the complete model (coarse pass, refiners, optional upsampling pass) once in strict fp32
(TF32 off: the reference) and then in several variants on the same inputs, and reports for each
variant how far every stage strays from the reference:

    dinov2, vgg1..vgg8   relative L2 of the encoder outputs
    gm_cls               relative L2 of the 4096 anchor logits, share of coarse cells whose
                         arg-max anchor differs ("flips"), and the reference's top-1/top-2
                         logit margin at the flipped cells vs everywhere
    s16..s1 (and up8..up1 for the upsampling pass)  max / mean |flow - flow_ref|
    warp, certainty      max / mean / p99 |x - x_ref| (normalised units; 1e-2 = 0.5% of the
                         side, ~4 px at 864), on all pixels, on certain pixels (reference
                         certainty > 0.05) and on the pixels whose coarse cell kept its arg-max

Variants (the model's own precision policy, ``coarse_precision``):
    fp16, bf16               autocast with the default policy: DINOv2, proj.16, GP, decoder in
                             IEEE fp32, the VGG encoder and the refiners in half precision
    fp16-reduced, bf16-reduced   coarse_precision=reduced: the coarse stage in half precision
                             too, as upstream's AMP
    fp16-dinov2, fp16-dinov2-proj16, fp16-dinov2-decoder   coarse_precision=reduced:<regions>:
                             only those coarse regions in fp16, the rest of it IEEE fp32
    fp16-tf32x3              coarse_precision=tf32x3: the linear layers of DINOv2 and the decoder
                             as 3xTF32 products, the rest of the coarse stage IEEE fp32
    fp16-bf16x3, fp16-bf16x3-flash   coarse_precision=bf16x3: those layers as split bf16
                             products; -flash: and their attention as split fp16 flash attention
    fp16-bf16x2, fp16-bf16x2-flash   the same with bf16x2: the weights rounded to bf16, two pieces of
                             the activations
    fp16-tf32                coarse_precision=tf32: the coarse stage in fp32 with TF32 matrix
                             products, the encoder and refiners in fp16
    tf32-reduced             fp32 with TF32 in the coarse stage (TensorRT's fp32 default)
    fp32-noise               strict fp32 with +-0.5/255 noise on the images (8-bit quantisation):
                             how much the weights themselves move under a negligible input change
    fp16-forced              fp16 refiners fed the reference's coarse prediction: their own error
    sim-w16, sim-wbf16, sim-x16  simulations: the default run with strict fp32 coarse regions, but the
                             weights (w16, wbf16) or the inputs (x16) of the linear layers of DINOv2
                             and the decoder rounded to fp16 / bf16: which operand's rounding moves the
                             coarse arg-max, i.e. which one a two-piece split product must keep exact

Exit status 1 when the default fp16 warp strays more than --tolerance from fp32 anywhere.

Usage (GPU):
    python scripts/roma_fp16_check.py                        # deterministic weights, 560/864
    python scripts/roma_fp16_check.py --size 224 --upsample 0 --variants fp16,fp16-reduced
    python scripts/roma_fp16_check.py --checkpoint matchanything_roma.ckpt --dinov2 dinov2_vitl14_pretrain.pth
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
PAIR = ("02928139_3448003521.jpg", "17295357_9106075285.jpg")
# variant -> (autocast dtype, the model's coarse_precision, TF32 allowed)
VARIANTS: dict[str, tuple[Optional[torch.dtype], str, bool]] = {
    "fp16": (torch.float16, "fp32", False),
    "bf16": (torch.bfloat16, "fp32", False),
    "fp16-tf32": (torch.float16, "tf32", False),
    "fp16-tf32x3": (torch.float16, "tf32x3", False),
    "fp16-bf16x3": (torch.float16, "bf16x3", False),
    "fp16-bf16x3-flash": (torch.float16, "bf16x3-flash", False),
    "fp16-bf16x2": (torch.float16, "bf16x2", False),
    "fp16-bf16x2-flash": (torch.float16, "bf16x2-flash", False),
    "fp16-reduced": (torch.float16, "reduced", False),
    "fp16-dinov2": (torch.float16, "reduced:dinov2", False),
    "fp16-dinov2-proj16": (torch.float16, "reduced:dinov2+proj16", False),
    "fp16-dinov2-decoder": (torch.float16, "reduced:dinov2+decoder", False),
    "bf16-reduced": (torch.bfloat16, "reduced", False),
    "tf32-reduced": (None, "reduced", True),
    "fp32-noise": (None, "fp32", False),
    "fp16-forced": (torch.float16, "reduced", False),
    "sim-w16": (torch.float16, "fp32", False),
    "sim-wbf16": (torch.float16, "fp32", False),
    "sim-x16": (torch.float16, "fp32", False),
}
# simulated operand roundings of the linear layers of DINOv2 and the decoder, the rest strict fp32:
# which operand's rounding moves the coarse arg-max (before building a two-piece split product)
SIMULATED = {"sim-w16": ("weight", torch.float16), "sim-wbf16": ("weight", torch.bfloat16),
             "sim-x16": ("input", torch.float16)}
FLIP_MARGINS = (0, 1, 2, 4)  # coarse cells around a flipped cell left out of "kept"


def load_model(checkpoint: Optional[str], dinov2: Optional[str], gp_solve: str, device: str) -> nn.Module:
    from matchrt.plugins.roma_plus import hooks
    from matchrt.plugins.roma_plus.weights import LAYOUT_DINOV2, LAYOUT_ROMA
    from matchrt.weights import deterministic_state_dict, enforce, load_checkpoint, read_layout

    sources = {
        "checkpoint": load_checkpoint(checkpoint) if checkpoint else deterministic_state_dict(read_layout(LAYOUT_ROMA)),
        "dinov2": load_checkpoint(dinov2) if dinov2 else deterministic_state_dict(read_layout(LAYOUT_DINOV2)),
    }
    mapped = hooks.map_weights("roma_plus", sources, {}, {})
    enforce(mapped.report)
    model = hooks.create_model("roma_plus", {"gp_solve": gp_solve})
    model.load_state_dict(mapped.state_dict, strict=True)
    return model.eval().to(device)


def images(side: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from matchrt.images import read_image
    from matchrt.plugins.roma_plus.preprocess import image_tensor, resize_images

    out = [resize_images(image_tensor(read_image(IMAGES / name)), side) for name in PAIR]
    return out[0].to(device), out[1].to(device)


@contextlib.contextmanager
def simulated_rounding(model: nn.Module, variant: str) -> Iterator[None]:
    """Round one operand of the linear layers of DINOv2 and the decoder (``SIMULATED``) for a run."""
    if variant not in SIMULATED:
        yield
        return
    operand, dtype = SIMULATED[variant]
    linears = [m for part in (model.coarse.encoder, model.coarse.embedding_decoder)
               for m in part.modules() if isinstance(m, nn.Linear)]
    saved, handles = [], []
    try:
        for m in linears:
            if operand == "weight":
                saved.append(m.weight.data.clone())
                m.weight.data.copy_(m.weight.data.to(dtype).float())
            else:
                handles.append(m.register_forward_pre_hook(
                    lambda _m, args: (args[0].to(dtype).to(args[0].dtype),) + tuple(args[1:])))
        yield
    finally:
        for m, w in zip(linears, saved):
            m.weight.data.copy_(w)
        for h in handles:
            h.remove()


def trace(model: nn.Module, inputs: list[torch.Tensor], variant: str,
          forced: Optional[dict[str, torch.Tensor]] = None) -> tuple[dict[str, torch.Tensor], float]:
    """Every stage's output of one run of ``variant`` ("fp32" = the reference)."""
    from matchrt.plugins.roma_full.encoder import COARSE_SCALE
    from matchrt.tf32 import tf32_switches

    device = inputs[0].device.type
    dtype, coarse_precision, allow_tf32 = VARIANTS.get(variant, (None, "fp32", False))
    amp = (torch.autocast(device_type=device, dtype=dtype) if dtype
           else torch.autocast(device_type=device, enabled=False))
    model.coarse_precision = coarse_precision
    if variant == "fp32-noise":  # the quantisation of an 8-bit image: +-0.5/255, fixed seed
        g = torch.Generator(device=inputs[0].device).manual_seed(0)
        inputs = [x + (torch.rand(x.shape, generator=g, device=x.device) - 0.5) / 255 for x in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), tf32_switches(allow_tf32), amp, simulated_rounding(model, variant):
        pyr_q, pyr_s = model.pyramids(inputs[0], inputs[1])
        coarse = model.coarse_prediction(pyr_q[COARSE_SCALE], pyr_s[COARSE_SCALE])
        if variant == "fp16-forced" and forced is not None:
            coarse = dict(coarse, flow=forced["gm_flow"], certainty=forced["gm_certainty"],
                          feat_q16=forced["feat_q16"], feat_s16=forced["feat_s16"])
            coarse["gm_cls"] = forced["gm_cls"]  # no arg-max of its own: the flow is the reference's
        first, second = model.passes(coarse, pyr_q, pyr_s, *inputs[2:])
        warp, cert = model.finish(first, second)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"dinov2": pyr_q[COARSE_SCALE], "gm_cls": coarse["gm_cls"], "gm_flow": coarse["flow"],
           "gm_certainty": coarse["certainty"], "feat_q16": coarse["feat_q16"], "feat_s16": coarse["feat_s16"],
           "warp": warp, "certainty": cert}
    out.update({f"vgg{s}": pyr_q[s] for s in (1, 2, 4, 8)})
    out.update({f"s{s}": first[s][0] for s in first})
    if second is not None:
        out.update({f"up{s}": second[s][0] for s in second})
    return {k: v.float() for k, v in out.items()}, seconds


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def dev_stats(d: torch.Tensor) -> dict[str, float]:
    d = d.flatten()
    if d.numel() == 0:
        return {"n": 0}
    q = torch.quantile(d[torch.randperm(d.numel(), device=d.device)[: 1 << 24]], 0.99)
    return {"n": int(d.numel()), "max": float(d.max()), "mean": float(d.mean()), "p99": float(q)}


def compare(run: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-stage deviation of one variant from the reference."""
    res: dict[str, Any] = {}
    for k in ("dinov2", "vgg1", "vgg2", "vgg4", "vgg8", "gm_cls"):
        res[k] = {"rel_l2": rel_l2(run[k], ref[k])}
    top_ref = ref["gm_cls"].topk(2, dim=1).values
    margin = top_ref[:, 0] - top_ref[:, 1]  # B x h x w logit margin of the reference
    flips = run["gm_cls"].argmax(dim=1) != ref["gm_cls"].argmax(dim=1)  # B x h x w
    res["gm_cls"].update({
        "flipped_cells": float(flips.float().mean()),
        "ref_margin_median": float(margin.median()),
        "ref_margin_median_at_flips": float(margin[flips].median()) if flips.any() else None,
        "ref_top1_prob_mean": float(torch.softmax(ref["gm_cls"], dim=1).amax(dim=1).mean()),
    })
    for k in ref:
        if k == "gm_flow" or k.startswith(("s", "up")) and k[-1].isdigit():
            res[k] = dev_stats((run[k] - ref[k]).abs().amax(dim=1))
    dwarp = (run["warp"] - ref["warp"]).abs().amax(dim=-1)  # B x H x 2W
    certain = ref["certainty"] > 0.05
    # output pixels whose coarse cell (and the r cells around it) kept the arg-max; the
    # symmetric layout puts the A->B and B->A halves side by side
    h, w2 = dwarp.shape[-2:]
    symmetric = flips.shape[0] == 2 * dwarp.shape[0]
    w = w2 // 2 if symmetric else w2
    res["warp"] = {"all": dev_stats(dwarp), "certain": dev_stats(dwarp[certain]),
                   "certain_share": float(certain.float().mean())}
    for r in FLIP_MARGINS:
        near = torch.nn.functional.max_pool2d(flips[:, None].float(), 2 * r + 1, 1, r)
        kept = torch.nn.functional.interpolate(near, size=(h, w), mode="nearest")[:, 0] < 0.5
        if symmetric:
            n = kept.shape[0] // 2
            kept = torch.cat((kept[:n], kept[n:]), dim=2)
        res["warp"][f"kept_r{r}"] = dict(dev_stats(dwarp[certain & kept]), share=float(kept.float().mean()))
        if r == 0:
            res["warp"]["flipped_pixels"] = dev_stats(dwarp[~kept])
    res["certainty"] = dev_stats((run["certainty"] - ref["certainty"]).abs())
    return res


def fmt(s: dict[str, float]) -> str:
    if not s.get("n"):
        return "-"
    return f"max {s['max']:.2e} mean {s['mean']:.2e} p99 {s['p99']:.2e}"


def report(variant: str, res: dict[str, Any], seconds: float) -> None:
    print(f"\n== {variant}  ({seconds * 1e3:.0f} ms)")
    enc = "  ".join(f"{k} {res[k]['rel_l2']:.1e}" for k in ("dinov2", "vgg1", "vgg2", "vgg4", "vgg8"))
    print(f"  encoder rel L2: {enc}")
    g = res["gm_cls"]
    at = g["ref_margin_median_at_flips"]
    print(f"  gm_cls rel L2 {g['rel_l2']:.2e}; arg-max flipped at {g['flipped_cells']:.2%} of cells; "
          f"reference top-1 prob mean {g['ref_top1_prob_mean']:.3f}; logit margin median "
          f"{g['ref_margin_median']:.3f} (at flips {'-' if at is None else f'{at:.3f}'})")
    for k in [k for k in res if k == "gm_flow" or k.startswith(("s", "up")) and k[-1].isdigit()]:
        print(f"  {k:>8} flow |d|: {fmt(res[k])}")
    wr = res["warp"]
    print(f"  warp all          : {fmt(wr['all'])}")
    print(f"  warp certain      : {fmt(wr['certain'])}  ({wr['certain_share']:.1%} of pixels)")
    for r in FLIP_MARGINS:
        k = wr[f"kept_r{r}"]
        print(f"  warp >= {r} cells from a flip: {fmt(k)}  ({k['share']:.1%} of pixels)")
    print(f"  warp at flips     : {fmt(wr['flipped_pixels'])}")
    print(f"  certainty         : {fmt(res['certainty'])}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=560, help="coarse side (multiple of 14)")
    p.add_argument("--upsample", type=int, default=864, help="upsampling side (0 = no second pass)")
    p.add_argument("--gp-solve", default="exact", help="exact | iterative")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--checkpoint", help="matchanything_roma.ckpt (default: deterministic weights)")
    p.add_argument("--dinov2", help="dinov2_vitl14_pretrain.pth (default: deterministic weights)")
    p.add_argument("--tolerance", type=float, default=1e-2)
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()

    weights = "real" if args.checkpoint else "deterministic (random) weights"
    model = load_model(args.checkpoint, args.dinov2, args.gp_solve, args.device)
    inputs = list(images(args.size, args.device))
    if args.upsample:
        inputs += list(images(args.upsample, args.device))
    print(f"roma_plus coarse {args.size}, upsample {args.upsample or 'off'}, gp {args.gp_solve}, "
          f"{args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), {weights}")
    trace(model, inputs, "fp32")  # warm-up (cuDNN autotuning) outside the timings
    ref, t_ref = trace(model, inputs, "fp32")
    print(f"reference fp32 (TF32 off): {t_ref * 1e3:.0f} ms")
    results: dict[str, Any] = {"setting": {"size": args.size, "upsample": args.upsample, "gp": args.gp_solve,
                                           "weights": weights, "torch": torch.__version__},
                               "fp32_ms": t_ref * 1e3, "variants": {}}
    for variant in args.variants.split(","):
        trace(model, inputs, variant, forced=ref)  # warm-up: first-call autotuning out of the timing
        run, seconds = trace(model, inputs, variant, forced=ref)
        res = compare(run, ref)
        res["ms"] = seconds * 1e3
        results["variants"][variant] = res
        report(variant, res, seconds)
        del run
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    fp16 = results["variants"].get("fp16")
    if fp16 is None:
        return 0
    worst = fp16["warp"]["all"].get("max", float("inf"))
    ok = bool(np.isfinite(worst)) and worst <= args.tolerance
    print(f"\nverdict: {'ok' if ok else 'FAIL'}: fp16 warp max |fp16 - fp32| {worst:.3e} over all pixels "
          f"(tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
