"""roma_plus's local correlation at the refiner shapes of a 560/864 pair (batch 2, fp16 features), compiled
with torch.compile: the whole-pixel form (refiner.window_correlation) with its products from Inductor's fused
gather (torch) and from correlation_kernel, then the kernel alone at a few block sizes. With --gridsample, also
GridSample's window (LocalCorrelation, slow to compile). Prints ms per call and the largest difference from
GridSample's window (relative to its largest value). Needs a CUDA GPU."""
import sys

import torch

from matchrt.plugins.roma_plus import correlation_kernel
from matchrt.plugins.roma_plus.refiner import LocalCorrelation, pixel_grid, window_correlation

SHAPES = [(16, 512, 35, 7), (8, 512, 70, 3), (4, 256, 140, 2), (8, 512, 108, 3), (4, 256, 216, 2)]


def timed(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    sums: dict[str, float] = {}
    usable = correlation_kernel.usable
    for scale, c, s, r in SHAPES:
        torch.manual_seed(0)
        a = torch.randn(2, c, s, s, device="cuda").half()
        b = torch.randn(2, c, s, s, device="cuda").half()
        flow = pixel_grid(2, s, s, torch.device("cuda")) + torch.randn(2, 2, s, s, device="cuda") * (3.0 / s)
        want = LocalCorrelation(r)(a, b, flow)  # eager GridSample window: the reference
        t: dict[str, float] = {}
        errs = []
        if "--gridsample" in sys.argv:
            old = torch.compile(LocalCorrelation(r))
            t["gridsample"] = timed(lambda: old(a, b, flow))
        for name, kernel in (("torch", False), ("kernel", True)):
            correlation_kernel.usable = usable if kernel else (lambda feat: False)
            f = torch.compile(lambda x, y, fl, r=r: window_correlation(x, y, fl, r), dynamic=False)
            got = f(a, b, flow)
            errs.append(float((got - want).abs().max() / want.abs().max()))
            t[name] = timed(lambda: f(a, b, flow))
        correlation_kernel.usable = usable
        rows_a = a.permute(0, 2, 3, 1).reshape(2, s * s, c).contiguous()
        rows_b = b.permute(0, 2, 3, 1).reshape(2, s * s, c).contiguous()
        x0 = torch.randint(-2, s + 2, (2, s * s), device="cuda", dtype=torch.int32)
        y0 = torch.randint(-2, s + 2, (2, s * s), device="cuda", dtype=torch.int32)
        for block in (4, 8, 16, 32):
            for warps in (2, 4, 8):
                t[f"k{block}/w{warps}"] = timed(lambda: correlation_kernel._launch(
                    rows_a, rows_b, x0, y0, s, s, r, lambda k: k, block=block, warps=warps))
        for k, v in t.items():
            sums[k] = sums.get(k, 0.0) + v
        m = (2 * r + 2) ** 2
        gb = 2 * s * s * m * c * 2 / 1e9
        print(f"scale {scale:2d} {c} x {s}^2 r={r}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items())
              + f" ms; B rows read {gb:.2f} GB; max rel diff torch {errs[0]:.1e} kernel {errs[1]:.1e}")
    print("sum over the five shapes (ms a pair): " + ", ".join(f"{k} {v:.3f}" for k, v in sums.items()))


if __name__ == "__main__":
    main()
