"""Named stages inside a model, for `matchrt profile`; free and invisible when not profiling.

A plugin names its stages once, where it builds its graph (hooks.py, `export_plan`):

    mark_stages(graph, {"encoder": "model.encoder", "gp": ["model.gp", "model.gp_kernels"]})
    mark_methods(MyModel, {"upsample pass": "upsampling_pass"})

or wraps a block in `with stage("gp"):`. Outside `recording()` nothing happens: `mark_stages`
only stores the name on the module (an attribute; no hook is registered, so eager calls, ONNX
export, torch.export and torch.compile see the model unchanged), and `stage` and the wrapped
methods run the plain code. Inside `recording()` each marked module's calls are enclosed in a
torch profiler range `matchrt:<name>`, so kernels and ops can be charged to stages. Stages may
nest (the profile reports the path, e.g. `coarse transformer/self-attention`).

Under torch.compile the ranges are not recorded (compiled graphs have no stage boundaries), so
`matchrt profile` turns markers on for eager runs only.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence, TypeVar, Union

from .errors import MatchrtError

PREFIX = "matchrt:"  # profiler range names of stages
ATTRIBUTE = "_matchrt_stage"  # where mark_stages stores a module's stage name
_recording = 0  # > 0 while `recording()` is active

Target = Union[str, Any]  # a dotted submodule path ("" = the root) or an nn.Module
F = TypeVar("F", bound=Callable[..., Any])


def is_recording() -> bool:
    """Whether stage markers are being recorded (inside `recording()`)."""
    return _recording > 0


def range_name(name: str) -> str:
    """The profiler range name of stage `name`."""
    return PREFIX + name


def stage(name: str) -> ContextManager[Any]:
    """`with stage("gp"):` a profiler range while recording, else a no-op context."""
    if not _recording:
        return nullcontext()
    import torch

    return torch.profiler.record_function(range_name(name))


def staged(name: str) -> Callable[[F], F]:
    """Decorator: the function's calls form stage `name` while recording (plain call otherwise)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _recording:
                return fn(*args, **kwargs)
            with stage(name):
                return fn(*args, **kwargs)

        wrapper.__matchrt_stage__ = name  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return wrap


def mark_methods(cls: type, stages: Mapping[str, str], strict: bool = True) -> type:
    """Make methods of `cls` stages: `{"upsample pass": "upsampling_pass"}` (idempotent).

    Class-level, so copies of a model (deepcopy, shallow views) keep their markers; static and
    class methods are handled. A method `cls` lacks is an error, or with `strict=False` a warning
    (a stale marker must not stop a plugin from loading).
    """
    for name, attr in stages.items():
        raw = cls.__dict__.get(attr)
        if raw is None:
            message = f"mark_methods: {cls.__name__} defines no method {attr!r} (stage {name!r})"
            if strict:
                raise MatchrtError(message)
            warnings.warn(message, stacklevel=2)
            continue
        kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
        fn = raw.__func__ if kind else raw
        if getattr(fn, "__matchrt_stage__", None) == name:
            continue  # already marked (a plugin module imported twice)
        wrapped = staged(name)(fn)
        setattr(cls, attr, kind(wrapped) if kind else wrapped)
    return cls


def _resolve(root: Any, target: Target) -> Any:
    if not isinstance(target, str):
        return target
    try:
        return root.get_submodule(target)
    except AttributeError:
        children = ", ".join(n for n, _ in root.named_children()) or "none"
        raise MatchrtError(f"mark_stages: {type(root).__name__} has no submodule {target!r} "
                           f"(its children: {children})") from None


def mark_stages(root: Any, stages: Mapping[str, Union[Target, Sequence[Target]]],
                strict: bool = True) -> Any:
    """Name submodules of `root` as stages; several modules may share one name. Returns `root`.

    Targets are dotted paths from `root` (`"model.backbone"`, `""` for `root` itself) or modules.
    A path `root` lacks is an error, unless `strict` is False: then it is skipped (one mapping
    for several graph shapes; a stale path never breaks an export, the plugin's tests catch it).
    """
    present = None if strict else dict(root.named_modules())
    for name, targets in stages.items():
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            targets = [targets]
        for target in targets:
            if present is not None and isinstance(target, str) and target not in present:
                continue
            module = _resolve(root, target)
            setattr(module, ATTRIBUTE, name)
    return root


def marked(root: Any) -> dict[str, list[Any]]:
    """The stage names under `root` and their modules (each module once)."""
    found: dict[str, list[Any]] = {}
    for module in root.modules():
        name = getattr(module, ATTRIBUTE, None)
        if name:
            found.setdefault(name, []).append(module)
    return found


def _range_hooks(module: Any, name: str) -> list[Any]:
    """Pre/post forward hooks opening and closing the profiler range (closed on exceptions too)."""
    import torch

    open_ranges: list[Any] = []  # a stack: a module may run inside itself

    def enter(_module: Any, _args: Any) -> None:
        rf = torch.profiler.record_function(range_name(name))
        rf.__enter__()
        open_ranges.append(rf)

    def leave(_module: Any, _args: Any, _output: Any) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True)]


@contextmanager
def recording(*roots: Any) -> Iterator[list[str]]:
    """Turn stage markers on: hooks on the marked modules under `roots`, removed on exit.

    Yields the stage names found on the modules (method and `stage()` markers come on too).
    """
    global _recording
    handles: list[Any] = []
    names: list[str] = []
    seen: set[int] = set()
    for root in roots:
        for name, modules in marked(root).items():
            for module in modules:
                if id(module) in seen:
                    continue
                seen.add(id(module))
                handles += _range_hooks(module, name)
            if name not in names:
                names.append(name)
    _recording += 1
    try:
        yield names
    finally:
        _recording -= 1
        for handle in handles:
            handle.remove()


__all__ = ["PREFIX", "is_recording", "mark_methods", "mark_stages", "marked", "recording", "stage",
           "staged"]
