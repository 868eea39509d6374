"""roma_plus's local correlation at the refiner shapes of a 560/864 pair (batch 2, fp16 features), compiled
with torch.compile: GridSample's window (LocalCorrelation) against the whole-pixel form (window_correlation).
Prints ms per call, the reads of B per pixel by each form, and the largest difference (relative to the
largest value). Needs a CUDA GPU. Compiled alone, the GridSample form runs far slower than inside the model
(session 16, H200: 3.2-14.3 ms a call here, 3.4 ms for all five calls in the model's profile): compare the
forms' in-model cost with `matchrt profile`."""
import torch

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
    sums = [0.0, 0.0]
    for scale, c, s, r in SHAPES:
        torch.manual_seed(0)
        a = torch.randn(2, c, s, s, device="cuda").half()
        b = torch.randn(2, c, s, s, device="cuda").half()
        flow = pixel_grid(2, s, s, torch.device("cuda")) + torch.randn(2, 2, s, s, device="cuda") * (3.0 / s)
        old = torch.compile(LocalCorrelation(r))
        new = torch.compile(lambda x, y, f, r=r: window_correlation(x, y, f, r))
        want, got = old(a, b, flow), new(a, b, flow)
        err = float((got - want).abs().max() / want.abs().max())
        t_old, t_new = timed(lambda: old(a, b, flow)), timed(lambda: new(a, b, flow))
        sums[0] += t_old
        sums[1] += t_new
        k, m = (2 * r + 1) ** 2, (2 * r + 2) ** 2
        print(f"scale {scale:2d} {c} x {s}^2 r={r}: gridsample {t_old:.3f} ms ({4 * k} reads of C a pixel), "
              f"whole pixels {t_new:.3f} ms ({m} reads); max rel diff {err:.1e}")
    print(f"sum over the five shapes (a pair's calls): gridsample {sums[0]:.3f} ms, whole pixels {sums[1]:.3f} ms")


if __name__ == "__main__":
    main()
