"""eloftr 832 compiled + CUDA graphs fp16 (GPU): variants of one pipeline, each compiled once in one
process and then timed in alternating rounds (`pipe.run` as `matchrt bench` times it), so that the
machine's drift falls on all of them alike; then a profiler trace of three calls of each: GPU events,
memsets, the graph's span and its busy time, and which attention kernel ran.

Variants: base (the code as it is); unbatched (the coarse transformer one image at a time,
`CoarseTransformer.batched = False`); blocking_h2d (each input copy blocking
the host, as before `matchrt.transfer.to_device`).

    python scripts/eloftr_ab.py OUT.json base unbatched   (session 25: 4.51 against 4.72 ms a pair, H200)
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from matchrt.bench import open_backend
from matchrt.host import get_host
from matchrt.images import read_image
from matchrt.runner import load_model, resolve_weights
from matchrt.types import ExportOptions

out = Path(sys.argv[1])
names = sys.argv[2:]
host = get_host()
model, _ = load_model(host, "eloftr", resolve_weights(host.matcher("eloftr"), {}, True))
export = ExportOptions(832, 832, extra={})
imgs = sorted(Path("tests/data").rglob("*.jpg"))[:2]
im0, im1 = (read_image(p) for p in imgs)
res = {"gpu": torch.cuda.get_device_name(), "variants": names}


def timed(fn, n):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return ts


def blocking_run(sess):
    """TorchSession.run as it was before `transfer.to_device`: each input copy blocks the host."""

    def run(inputs):
        args = [torch.as_tensor(inputs[n]).to(sess.device) for n in sess.input_names]
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16), sess._freezing():
            out = sess.module(*args)
        named = dict(zip(sess.output_names, out))
        return {n: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for n, v in named.items()}
    return run


def configure(name, graph, sess):
    if name == "blocking_h2d":
        sess.run = blocking_run(sess)
    coarse = graph.model.loftr_coarse
    if name == "unbatched":
        coarse.batched = False


def trace(pipe, inputs):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            pipe.run(inputs)
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        ev = json.load(open(f.name))["traceEvents"]
    ev = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                key=lambda e: e["ts"])
    calls, cur = [], []
    for e in ev:
        if cur and e["ts"] - (cur[-1]["ts"] + cur[-1]["dur"]) > 300:
            calls.append(cur)
            cur = []
        cur.append(e)
    calls.append(cur)
    graphs = [c for c in calls if len(c) > 20]
    stats = []
    for c in graphs:
        stats.append({"events": len(c), "memsets": sum(e["cat"] == "gpu_memset" for e in c),
                      "span_ms": (c[-1]["ts"] + c[-1]["dur"] - c[0]["ts"]) / 1e3,
                      "busy_ms": sum(e["dur"] for e in c) / 1e3,
                      "attention": sorted({e["name"][:60] for e in c if "sdpa" in e["name"] or "flash" in e["name"]
                                           or "fmha" in e["name"] or "attention" in e["name"].lower()})})
    return stats


with tempfile.TemporaryDirectory() as tmp:
    pipes = {}
    for name in names:
        t0 = time.perf_counter()
        pipe = open_backend(host, "eloftr", "torch-compile-cudagraph", "fp16", model, export, "cuda", Path(tmp))
        sess = pipe.stages[0].session
        configure(name, sess.module._orig_mod, sess)
        inputs, ctx = pipe.prepare(im0, im1)
        torch.backends.cudnn.benchmark = name == "cudnn_benchmark"
        for _ in range(10):
            pipe.run(inputs)
        torch.cuda.synchronize()
        torch.backends.cudnn.benchmark = False
        pipes[name] = (pipe, inputs)
        print(f"{name}: compiled and warm in {time.perf_counter() - t0:.1f} s", flush=True)
    samples = {n: [] for n in names}
    for r in range(16):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            pipe, inputs = pipes[name]
            samples[name] += timed(lambda: pipe.run(inputs), 30)
    for name in names:
        ts = sorted(samples[name])
        res[name] = {"run_ms": {"median": 1e3 * statistics.median(ts), "p10": 1e3 * ts[len(ts) // 10],
                                "p90": 1e3 * ts[9 * len(ts) // 10], "n": len(ts)}}
        res[name]["trace"] = trace(*pipes[name])
        print(name, json.dumps(res[name]), flush=True)
out.write_text(json.dumps(res, indent=1))
