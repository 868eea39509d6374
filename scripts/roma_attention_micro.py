#!/usr/bin/env python3
"""roma_plus's coordinate-decoder attention (2 x 8 heads x 1600 tokens x 128, bf16x3-flash policy), CUDA:
torch's fused call over threefold fp16 pieces (what split_attention ran before) against attention_kernel,
each with the writing of its pieces; errors against float64; the kernel's chosen block shape.

Usage (a CUDA GPU): python scripts/roma_attention_micro.py
"""
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from matchrt.plugins.roma_plus import attention_kernel
from matchrt.plugins.roma_plus.split_products import laid_out

print(torch.cuda.get_device_name(), torch.__version__)
torch.manual_seed(0)
b, h, n, d = 2, 8, 1600, 128
q, k, v = (torch.randn(b, h, n, d, device="cuda") * 1.5 for _ in range(3))
scale = d ** -0.5
half = torch.float16


def fused_call():
    out = F.scaled_dot_product_attention(laid_out(q, half, "hht"), laid_out(k, half, "hth"),
                                         laid_out(v, half, "ht"), scale=scale).float()
    return out[..., :d] + out[..., d:]


def kernel_call():
    return attention_kernel.split_attention(laid_out(q, half, "ht"), laid_out(k, half, "ht"),
                                            laid_out(v, half, "ht"), scale)


exact = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()
plain = F.scaled_dot_product_attention(q.half(), k.half(), v.half(), scale=scale)
for name, fn in (("plain fp16", lambda: plain), ("fused threefold", fused_call), ("kernel", kernel_call)):
    y = fn().double()
    print(f"{name}: max error / max |exact| {((y - exact).abs().max() / exact.abs().max()).item():.2e}")


def kernels_ms(fn, runs=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / runs / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return sum(t for _, t in rows), sorted(rows, key=lambda r: -r[1])[:4]


for name, fn in (("fused threefold", fused_call), ("kernel", kernel_call)):
    total, top = kernels_ms(fn)
    print(f"{name}: {total:.3f} ms of kernels per call; " + "; ".join(f"{t:.3f} {k[:60]}" for k, t in top))
best = getattr(attention_kernel._tuned_kernel, "best_config", None)
print("kernel block shape chosen:", best)
