"""Load an AOTInductor package in a fresh process and run it: `python package_child.py PKG IN.pt OUT.pt`.

The toy plugin is registered for the matcher's name only; no torch model is built here. IN.pt
holds {input name: tensor}; OUT.pt gets the outputs, the load time and the median run time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from matchrt.host import get_host  # noqa: E402
from matchrt.runner import artifact_pipeline  # noqa: E402

from toy_plugin import ToyPlugin  # noqa: E402


def main(package: str, inputs_file: str, outputs_file: str) -> None:
    inputs = torch.load(inputs_file, weights_only=True)
    with get_host().plugin(ToyPlugin(), "toy"):
        start = time.perf_counter()
        pipe = artifact_pipeline(get_host(), Path(package), "inductor", {"device": "cpu"})
        loaded = time.perf_counter() - start
        outputs = pipe.run(inputs)
        times = []
        for _ in range(23):
            start = time.perf_counter()
            pipe.run(inputs)
            times.append((time.perf_counter() - start) * 1000)
        run_ms = sorted(times[3:])[10]  # the median after three warm-up runs
    torch.save({"outputs": outputs, "load_s": loaded, "run_ms": run_ms,
                "dtypes": {k: str(v.dtype) for k, v in outputs.items()}}, outputs_file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
