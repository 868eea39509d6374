"""ONNX export of an `ExportPlan`: one file per graph, metadata inside, a manifest beside."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import MatchrtError
from .types import ExportPlan, GraphSpec

TWO_GB = 2 * 1024**3
MANIFEST_SUFFIX = ".matchrt.json"


def manifest_path(output: Path) -> Path:
    """The manifest beside an exported graph or engine (`model.onnx` -> `model.onnx.matchrt.json`)."""
    output = Path(output)
    return output.with_name(output.name + MANIFEST_SUFFIX)


def stage_path(output: Path, plan: ExportPlan, graph: GraphSpec) -> Path:
    """Single graphs keep the requested name; a sequence gets `name.<stage>.onnx`."""
    output = Path(output)
    if len(plan.graphs) == 1:
        return output
    return output.with_name(f"{output.stem}.{graph.name}{output.suffix or '.onnx'}")


def export_graph(graph: GraphSpec, path: Path, opset: int, metadata: dict[str, str]) -> Path:
    """Export one graph with the TorchScript-based exporter, then check it and stamp metadata."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    module = graph.module.eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python scalars are expected
        torch.onnx.export(
            module,
            tuple(graph.example_inputs),
            str(path),
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes=graph.dynamic_axes or None,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path), load_external_data=False)
    meta = dict(metadata)
    meta["matchrt.stage"] = graph.name
    meta["matchrt.fp32_layers"] = json.dumps(graph.fp32_layers)
    if graph.tf32 is not None:
        meta["matchrt.tf32"] = json.dumps(bool(graph.tf32))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    # external tensors (graphs over 2 GB) stay where the exporter put them; only the proto is rewritten
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def export_plan(
    plan: ExportPlan,
    output: Path,
    opset: int = 17,
    version: str = "",
    progress: Optional[Callable[[str], None]] = None,
    weights_sha256: Optional[dict[str, str]] = None,
) -> Path:
    """Export every graph of `plan` next to `output`; return the manifest's path.

    `weights_sha256` (source name -> digest) is stamped into the graph for engine provenance.
    """
    output = Path(output)
    if output.suffix != ".onnx":
        raise MatchrtError(f"--output must end in .onnx, got {output}")
    metadata = {
        "matchrt.matcher": plan.matcher,
        "matchrt.version": version,
        "matchrt.options": json.dumps(plan.options, default=str),
        "matchrt.input_size": json.dumps(list(plan.input_size)),
    }
    if weights_sha256:
        metadata["matchrt.weights_sha256"] = json.dumps(weights_sha256)
    stages = []
    for i, graph in enumerate(plan.graphs):
        path = stage_path(output, plan, graph)
        if progress:
            progress(f"exporting {graph.name} ({i + 1}/{len(plan.graphs)}) -> {path.name}")
        start = time.perf_counter()
        export_graph(graph, path, opset, metadata)
        stages.append(
            {
                "name": graph.name,
                "file": path.name,
                "inputs": graph.input_names,
                "input_shapes": input_shapes(graph),
                "outputs": graph.output_names,
                "fp32_layers": graph.fp32_layers,
                "tf32": graph.tf32,
                "seconds": round(time.perf_counter() - start, 2),
                "bytes": graph_size(path),
            }
        )
    manifest = {
        "matcher": plan.matcher,
        "version": version,
        "options": plan.options,
        "input_size": list(plan.input_size),
        "opset": opset,
        "weights_sha256": weights_sha256 or {},
        "stages": stages,
    }
    mpath = manifest_path(output)
    mpath.write_text(json.dumps(manifest, indent=1, default=str))
    return mpath


def input_shapes(graph: GraphSpec) -> dict[str, list[int]]:
    """The example input shapes of a graph, by input name."""
    return {n: list(t.shape) for n, t in zip(graph.input_names, graph.example_inputs)}


def graph_size(path: Path) -> int:
    """Bytes of a graph including its external-data files."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and e.value not in seen:
                    seen.add(e.value)
                    f = path.parent / e.value
                    if f.exists():
                        total += f.stat().st_size
    return total


def load_manifest(path: Path) -> dict[str, Any]:
    """Read the manifest for an exported graph or engine (accepts the .onnx or the manifest)."""
    path = Path(path)
    mpath = path if path.name.endswith(MANIFEST_SUFFIX) else manifest_path(path)
    if not mpath.exists():
        if path.suffix == ".onnx" and path.exists():
            return _manifest_from_onnx(path)
        raise MatchrtError(
            f"{path} is not a matchrt export (no {mpath.name} beside it). "
            "Create one with `matchrt export --matcher M --output model.onnx`."
        )
    data = json.loads(mpath.read_text())
    data["dir"] = str(mpath.parent)
    return data


def _manifest_from_onnx(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "matchrt.matcher" not in meta:
        raise MatchrtError(f"{path} was not exported by matchrt (no matchrt metadata); pass --matcher.")
    return {
        "matcher": meta["matchrt.matcher"],
        "version": meta.get("matchrt.version", ""),
        "options": json.loads(meta.get("matchrt.options", "{}")),
        "input_size": json.loads(meta.get("matchrt.input_size", "[0, 0]")),
        "stages": [
            {
                "name": meta.get("matchrt.stage", "main"),
                "file": path.name,
                "inputs": [i.name for i in model.graph.input],
                "input_shapes": {
                    i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in model.graph.input
                },
                "outputs": [o.name for o in model.graph.output],
                "fp32_layers": json.loads(meta.get("matchrt.fp32_layers", "[]")),
            }
        ],
        "dir": str(path.parent),
    }
