"""The torch backend's compiled sessions: which Inductor settings they compile with."""

from __future__ import annotations

import torch
from torch import nn

from matchrt.backends import torch_backend
from matchrt.types import GraphSpec


def test_compiled_cuda_sessions_freeze_the_weights_unless_told_not_to(monkeypatch) -> None:
    """On CUDA the weights are frozen into the compiled graphs (weight-only work folded at compile
    time); CPUs compile unfrozen; MATCHRT_FREEZE=0 turns freezing off; CUDA graphs as asked."""
    monkeypatch.delenv(torch_backend.FREEZE_ENV, raising=False)
    assert torch_backend.compile_options("cuda", True) == {"triton.cudagraphs": True, "freezing": True}
    assert torch_backend.compile_options("cuda", False) == {"triton.cudagraphs": False, "freezing": True}
    assert torch_backend.compile_options("cpu", True)["freezing"] is False
    monkeypatch.setenv(torch_backend.FREEZE_ENV, "0")
    assert torch_backend.compile_options("cuda", True)["freezing"] is False


def test_a_compiled_session_passes_its_settings_to_torch_compile(monkeypatch) -> None:
    """The session compiles its graph's module with compile_options for its device (no mode: the
    options carry the CUDA-graph setting), static shapes, and runs what torch.compile returned."""
    seen = {}

    def fake_compile(module, **kwargs):
        seen.update(kwargs)
        return lambda x: module(x) * 2

    monkeypatch.setattr(torch, "compile", fake_compile)
    graph = GraphSpec(name="g", module=nn.Identity(), example_inputs=(torch.ones(2),), input_names=["x"],
                      output_names=["y"])
    session = torch_backend.TorchSession(graph, {"device": "cpu", "compile": True, "cuda_graph": True})
    assert seen == {"dynamic": False, "options": torch_backend.compile_options("cpu", True)}
    out = session.run({"x": torch.ones(2)})
    assert torch.equal(out["y"], torch.full((2,), 2.0))
