"""GPU and CPU time per region of a torch.profiler chrome trace, for runs without stage markers.

A compiled run (torch.compile, AOTInductor) carries no stage markers, but its trace still says who
launched each kernel: the CUDA runtime or driver call that launched it (same correlation id) sits
inside CPU ranges such as ``## Call CompiledFxGraph <hash> ##`` (an Inductor graph), ``Torch-Compiled
Region: i/j`` (a dynamo frame, whose eager parts run between its graphs) or a ``matchrt:`` stage.
Each kernel is charged to the innermost such range around its launch:

- ``compiled graph <hash>``: an Inductor graph;
- ``package <file>``: a call of an AOTInductor package (``## Call AOTInductor package <file> ##``,
  the range matchrt's inductor backend opens around it, CUDA-graph replays included);
- ``eager in compiled frame i/j``: eager code inside a compiled call (compiler-disabled regions);
- ``stage <name>``: a matchrt stage (postprocess, or stages of eager plugins);
- ``eager``: none of these (e.g. copying the inputs to the GPU).

Per region the table gives the GPU time of its kernels, the CPU time of the ranges that launched
them and the number of launches. A region whose CPU time exceeds its GPU time is launch-bound:
the GPU waits for Python, and fewer launches or a CUDA graph pay there, not faster kernels.
It also gives the GPU span of the region's calls: from the first kernel's start to the last one's
end in each launching range, summed. Span minus kernel time is the GPU idling inside the region,
between its kernels: in a CUDA graph, each node's launch latency (memset nodes cost the most), so
there fewer kernels pay, even when none of them gets faster (eloftr, session 25: 4.04 ms of kernels
in a 4.44 ms span).
"""

from __future__ import annotations

import bisect
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from .profiling import PREFIX

GRAPH_CALL = "## Call CompiledFxGraph"
PACKAGE_CALL = "## Call AOTInductor package"
COMPILED_FRAME = "Torch-Compiled Region"
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")


@dataclass
class RegionRow:
    """One region, per profiled pair."""

    name: str
    gpu_ms: float  # kernel time of the kernels it launched
    cpu_ms: float  # wall time of its innermost ranges around those launches
    launches: float
    share: float  # of all kernel time
    # first kernel start to last kernel end of each of its launching ranges, summed (None: the "eager"
    # region, whose launches have no range)
    span_ms: Optional[float] = None


def _label(name: str) -> Optional[str]:
    if name.startswith(GRAPH_CALL):
        return "compiled graph " + name[len(GRAPH_CALL):].strip(" #")[:12]
    if name.startswith(PACKAGE_CALL):
        return "package " + name[len(PACKAGE_CALL):].strip(" #")
    if name.startswith(COMPILED_FRAME):
        return "eager in compiled frame " + name.split(":", 1)[-1].strip()
    if name.startswith(PREFIX):
        return "stage " + name[len(PREFIX):]
    return None


def innermost(ranges: list[tuple[float, float, Any]], starts: list[float], at: float) -> Any:
    """The payload of the latest-starting range that holds time ``at`` (of nested ranges sorted by
    start, ``starts`` their starts): the innermost one; ``()`` if none does."""
    for k in range(bisect.bisect_right(starts, at) - 1, -1, -1):
        if ranges[k][0] <= at < ranges[k][1]:
            return ranges[k][2]
    return ()


def load_events(path: Path) -> list[dict[str, Any]]:
    """The ``traceEvents`` of a chrome trace (``.json`` or ``.json.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        return json.load(f)["traceEvents"]


def regions(events: Iterable[dict[str, Any]], runs: int = 1) -> list[RegionRow]:
    """The region table of a trace's events (see the module docstring), largest GPU time first."""
    events = list(events)
    runs = max(1, runs)
    ranges: dict[Any, list[tuple[float, float, tuple[str, int, float]]]] = {}  # thread -> (start, end, payload)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            label = _label(str(e.get("name", "")))
            if label is not None:
                start, dur = float(e["ts"]), float(e["dur"])
                ranges.setdefault((e.get("pid"), e.get("tid")), []).append(
                    (start, start + dur, (label, id(e), dur)))
    starts = {}
    for key, items in ranges.items():
        items.sort(key=lambda r: (r[0], -r[1]))  # a range before the ranges it holds
        starts[key] = [r[0] for r in items]
    launch_of = {e["args"]["correlation"]: e for e in events
                 if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})}
    gpu: dict[str, float] = {}
    cpu_ranges: dict[str, dict[int, float]] = {}
    extents: dict[str, dict[int, tuple[float, float]]] = {}  # region -> range id -> (first start, last end)
    launches: dict[str, int] = {}
    total = 0.0
    for k in events:
        if k.get("cat") not in DEVICE_WORK or "dur" not in k:
            continue
        us = float(k["dur"])
        total += us
        launch = launch_of.get(k.get("args", {}).get("correlation"))
        label, owner = "eager", None
        if launch is not None:
            key = (launch.get("pid"), launch.get("tid"))
            found = innermost(ranges.get(key, []), starts.get(key, []), float(launch["ts"]))
            if found:
                label, owner = found[0], found[1:]
        gpu[label] = gpu.get(label, 0.0) + us
        launches[label] = launches.get(label, 0) + 1
        if owner is not None:
            cpu_ranges.setdefault(label, {})[owner[0]] = owner[1]
            begin, end = float(k["ts"]), float(k["ts"]) + us
            seen = extents.setdefault(label, {}).get(owner[0], (begin, end))
            extents[label][owner[0]] = (min(seen[0], begin), max(seen[1], end))
    rows = [RegionRow(name, us / 1000.0 / runs, sum(cpu_ranges.get(name, {}).values()) / 1000.0 / runs,
                      launches[name] / runs, us / total if total else 0.0,
                      sum(e - b for b, e in extents[name].values()) / 1000.0 / runs if name in extents else None)
            for name, us in gpu.items()]
    return sorted(rows, key=lambda r: -r.gpu_ms)


__all__ = ["RegionRow", "innermost", "load_events", "regions"]
