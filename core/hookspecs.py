"""The hooks a matcher or backend plugin implements.

Every per-matcher hook receives the matcher's name first and is `firstresult`: a plugin answers
for the matchers it registered and returns None for the others, so one runner drives them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pluggy

hookspec = pluggy.HookspecMarker("matchrt")
hookimpl = pluggy.HookimplMarker("matchrt")


@hookspec
def register_matchers(register: Callable[..., None]) -> None:
    """Register matchers: call `register(MatcherInfo(...))` once per matcher."""


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register runtime backends: call `register(BackendInfo(...))` once per backend."""


@hookspec(firstresult=True)
def map_weights(
    matcher: str, sources: dict[str, dict[str, Any]], paths: dict[str, str], options: dict[str, Any]
) -> Optional[Any]:
    """Map loaded weight files (source name -> tensors) onto the matcher's model.

    Returns a `MappedWeights` (state dict for the torch model + `WeightReport`). The core turns a
    report that is not `ok` into an error unless the user asked for `--allow-partial`.
    """


@hookspec(firstresult=True)
def create_model(matcher: str, options: dict[str, Any]) -> Optional[Any]:
    """Build the matcher's torch reference model (eval mode, weights not yet loaded)."""


@hookspec(firstresult=True)
def export_plan(matcher: str, model: Any, options: Any) -> Optional[Any]:
    """Wrap a loaded model for ONNX export: return an `ExportPlan` of one or more `GraphSpec`s.

    `options` is an `ExportOptions`. Several graphs form a sequence the runner executes in order,
    calling `bridge_stages` after each one but the last.
    """


@hookspec(firstresult=True)
def bridge_stages(
    matcher: str, stage: str, tensors: dict[str, Any], options: dict[str, Any]
) -> Optional[dict[str, Any]]:
    """Compute the next stage's inputs from all tensors so far (e.g. an exact linear solve)."""


@hookspec(firstresult=True)
def open_session(backend: str, graph: Any, options: dict[str, Any]) -> Optional[Any]:
    """Open a runnable session on `graph` (a `GraphSpec` for torch, a path for ONNX or engines).

    The session has `run(inputs: dict[str, Tensor]) -> dict[str, Tensor]`.
    """


@hookspec(firstresult=True)
def build_engine(
    backend: str, onnx_path: Path, output: Path, options: dict[str, Any]
) -> Optional[Path]:
    """Turn an ONNX graph into the backend's deployable artifact (an engine file); return its path."""


@hookspec(firstresult=True)
def build_package(backend: str, graph: Any, output: Path, options: dict[str, Any]) -> Optional[Path]:
    """Compile one graph of an export plan (a `GraphSpec`, the torch model itself) into the
    backend's deployable artifact, for backends that build from torch rather than from ONNX
    (AOTInductor `.pt2`); return its path. `options["context"]` is a `matchrt.package.PackageContext`.
    """


@hookspec(firstresult=True)
def postprocess(
    matcher: str, outputs: dict[str, Any], pair: Any, options: dict[str, Any]
) -> Optional[Any]:
    """Turn the graph's raw outputs for one pair into `Matches` in original-image pixels."""
