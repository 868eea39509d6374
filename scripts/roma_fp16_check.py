#!/usr/bin/env python3
"""fp16 safety check of roma_plus: torch autocast fp16 vs fp32 on the MegaDepth test pair.

Runs the complete model (coarse pass, refiners, optional upsampling pass) twice on the same
inputs, once in fp32 and once under ``torch.autocast(dtype=float16)``, and prints how far the
fp16 warp strays from the fp32 warp in normalised units ([-1, 1] spans the image; 1e-2 is 0.5%
of the side, ~4 px at 864), plus the certainty deviation. The model pins its precision-critical
parts to fp32 itself (GP kernel and solve, 4096-way softmax, correlation sums, coordinates), so
this measures what survives autocast. Target: warp max deviation <= 1e-2 where both runs are
certain (certainty > 0.05 in fp32), and a small mean everywhere.

Usage (GPU):
    python scripts/roma_fp16_check.py --device cuda                      # deterministic weights, 560/864
    python scripts/roma_fp16_check.py --device cuda --size 224 --upsample 0
    python scripts/roma_fp16_check.py --checkpoint matchanything_roma.ckpt --dinov2 dinov2_vitl14_pretrain.pth
Exit status 1 when the warp's max deviation over certain pixels exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
PAIR = ("02928139_3448003521.jpg", "17295357_9106075285.jpg")


def load_model(checkpoint: str | None, dinov2: str | None, gp_solve: str, device: str):
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


def run(model, inputs, dtype: torch.dtype | None, device: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=dtype) if dtype else torch.autocast(
        device_type=device.split(":")[0], enabled=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), ctx:
        warp, cert = model(*inputs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return warp.float(), cert.float(), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=560, help="coarse side (multiple of 14)")
    p.add_argument("--upsample", type=int, default=864, help="upsampling side (0 = no second pass)")
    p.add_argument("--gp-solve", default="exact", help="exact | iterative | cg | newton_schulz")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--checkpoint", help="matchanything_roma.ckpt (default: deterministic weights)")
    p.add_argument("--dinov2", help="dinov2_vitl14_pretrain.pth (default: deterministic weights)")
    p.add_argument("--tolerance", type=float, default=1e-2)
    args = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 run is the reference: no TF32
    torch.backends.cudnn.allow_tf32 = False
    # the fp32 reference must be real fp32: no TF32 in cuDNN convolutions or cuBLAS products
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(args.checkpoint, args.dinov2, args.gp_solve, args.device)
    inputs = list(images(args.size, args.device))
    if args.upsample:
        inputs += list(images(args.upsample, args.device))
    warp32, cert32, t32 = run(model, inputs, None, args.device)
    warp16, cert16, t16 = run(model, inputs, getattr(torch, args.dtype), args.device)
    dev = (warp16 - warp32).abs().amax(dim=-1)  # per pixel, max over the 4 coordinates
    certain = cert32 > 0.05
    d_all = dev.flatten()
    d_cert = dev[certain]
    c_dev = (cert16 - cert32).abs()
    rows = [
        ("setting", f"coarse {args.size}, upsample {args.upsample or 'off'}, gp {args.gp_solve}, "
                    f"{args.dtype} autocast on {args.device}, weights "
                    f"{'real' if args.checkpoint else 'deterministic'}"),
        ("time fp32 / autocast", f"{t32:.2f} s / {t16:.2f} s"),
        ("warp |fp16 - fp32| all", f"max {d_all.max().item():.3e}  mean {d_all.mean().item():.3e}  "
                                   f"p99 {torch.quantile(d_all[:1 << 24], 0.99).item():.3e}"),
        ("warp |fp16 - fp32| certain", (f"max {d_cert.max().item():.3e}  mean {d_cert.mean().item():.3e}  "
                                        f"({certain.float().mean().item():.1%} of pixels)") if d_cert.numel()
         else "no pixel above 0.05"),
        ("certainty |fp16 - fp32|", f"max {c_dev.max().item():.3e}  mean {c_dev.mean().item():.3e}"),
    ]
    for name, value in rows:
        print(f"{name:>28}: {value}")
    worst = d_cert.max().item() if d_cert.numel() else d_all.max().item()
    ok = bool(np.isfinite(worst)) and worst <= args.tolerance
    print(f"{'verdict':>28}: {'ok' if ok else 'FAIL'} (tolerance {args.tolerance:g} on the certain pixels)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
