#!/usr/bin/env python3
"""roma_plus's balanced sampling at 560/864's warp (864 x 1728), CUDA: the KDE as torch blocks against the
one-pass Triton kernel; the whole sample_matches and its parts; agreement of the drawn matches (same seed).

Usage (a CUDA GPU): python scripts/roma_kde_micro.py
"""
import time
import torch
from matchrt.plugins.roma_plus import kde_kernel, sampling as S

print(torch.cuda.get_device_name(), torch.__version__)
torch.manual_seed(0)
h, w = 864, 1728
ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
warp = torch.stack((xs, ys, xs * 0.9 + 0.05 * torch.sin(7 * ys), ys * 0.95), dim=-1).cuda()
cert = (torch.rand(h, w) ** 3).cuda()  # about 37% of the pixels above 0.05... a mix of weights


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n, (time.perf_counter() - t0) * 1e3 / n


g = S._generator(torch.device("cuda"), 0)
weights = torch.where(cert > 0.05, torch.ones_like(cert), cert).reshape(-1)
cand = S.draw_without_replacement(weights, 20000, g)
pts = warp.reshape(-1, 4)[cand]
fused = kde_kernel.kde(pts, S.KDE_STD)
exact = torch.exp(-torch.cdist(pts.double(), pts.double()) ** 2 / (2 * S.KDE_STD ** 2)).sum(1)
real_usable = kde_kernel.usable
kde_kernel.usable = lambda x: False
plain = S.kde(pts)
print(f"N = {pts.shape[0]}: max rel err vs float64: kernel {((fused.double() - exact).abs() / exact).max().item():.2e}, "
      f"torch blocks {((plain.double() - exact).abs() / exact).max().item():.2e}")
print("kde torch blocks: GPU %.3f ms, wall %.3f ms" % timed(lambda: S.kde(pts)))
print("draw 20000 of 1.49M: GPU %.3f ms, wall %.3f ms" % timed(lambda: S.draw_without_replacement(weights, 20000, g)))
print("sample_matches (torch KDE): GPU %.3f ms, wall %.3f ms" % timed(lambda: S.sample_matches(warp, cert, 5000)))
m_old, _ = S.sample_matches(warp, cert, 5000, seed=0)
kde_kernel.usable = real_usable
print("kde kernel: GPU %.3f ms, wall %.3f ms" % timed(lambda: S.kde(pts)))
print("sample_matches (kernel KDE): GPU %.3f ms, wall %.3f ms" % timed(lambda: S.sample_matches(warp, cert, 5000)))
m_new, _ = S.sample_matches(warp, cert, 5000, seed=0)
same = (m_old[:, None, :] == m_new[None, :, :]).all(-1).any(1).float().mean().item()
print(f"seeded draw, torch vs kernel KDE: {same * 100:.2f}% of the 5000 matches identical")
