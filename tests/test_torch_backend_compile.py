"""The torch backend's compiled sessions: which Inductor settings they compile with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matchrt.backends import torch_backend
from matchrt.types import GraphSpec


def test_compiled_cuda_sessions_freeze_the_weights_of_graphs_that_ask(monkeypatch) -> None:
    """On CUDA a graph that asks (GraphSpec.freeze_weights) has its weights frozen into the compiled
    graph, others not; CPUs never freeze; MATCHRT_FREEZE=1 / 0 overrides on CUDA; CUDA graphs as asked."""
    monkeypatch.delenv(torch_backend.FREEZE_ENV, raising=False)
    opts = torch_backend.compile_options
    assert opts("cuda", True, True) == {"triton.cudagraphs": True, "freezing": True}
    assert opts("cuda", False, False) == {"triton.cudagraphs": False, "freezing": False}
    assert opts("cpu", True, True)["freezing"] is False
    monkeypatch.setenv(torch_backend.FREEZE_ENV, "0")
    assert opts("cuda", True, True)["freezing"] is False
    monkeypatch.setenv(torch_backend.FREEZE_ENV, "1")
    assert opts("cuda", True, False)["freezing"] is True and opts("cpu", True, False)["freezing"] is False


def test_a_compiled_session_passes_its_graphs_settings_to_torch_compile(monkeypatch) -> None:
    """The session compiles its graph's module with compile_options for its device and the graph's
    choice (no mode: the options carry the CUDA-graph setting), static shapes, and runs what
    torch.compile returned."""
    monkeypatch.delenv(torch_backend.FREEZE_ENV, raising=False)
    seen = {}

    def fake_compile(module, **kwargs):
        seen.update(kwargs)
        return lambda x: module(x) * 2

    monkeypatch.setattr(torch, "compile", fake_compile)
    graph = GraphSpec(name="g", module=nn.Identity(), example_inputs=(torch.ones(2),), input_names=["x"],
                      output_names=["y"], freeze_weights=True)
    session = torch_backend.TorchSession(graph, {"device": "cpu", "compile": True, "cuda_graph": True})
    assert seen == {"dynamic": False, "options": {"triton.cudagraphs": True, "freezing": False}}  # CPU
    out = session.run({"x": torch.ones(2)})
    assert torch.equal(out["y"], torch.full((2,), 2.0))


def test_eloftr_asks_for_frozen_weights_and_roma_plus_does_not() -> None:
    """The measured choices: eloftr's graph is frozen when compiled on CUDA (5.5 -> 4.8 ms on an
    H200), roma_plus's graphs are not (no gain shown)."""
    from roma_plus_helpers import loaded_model

    from matchrt.plugins.eloftr import export as eloftr_export
    from matchrt.plugins.eloftr.model import ELoFTR
    from matchrt.plugins.roma_plus import export as roma_plus_export
    from matchrt.types import ExportOptions

    plan = eloftr_export.build_plan(ELoFTR().eval(), ExportOptions(height=256, width=256))
    assert [g.freeze_weights for g in plan.graphs] == [True]
    plan = roma_plus_export.build_plan(loaded_model(), ExportOptions(height=224, width=224))
    assert plan.graphs and not any(g.freeze_weights for g in plan.graphs)


def test_a_frozen_session_compiles_its_weights_in_as_constants(monkeypatch) -> None:
    """Frozen, the weights are constants of the compiled graph: a later in-place change of a weight
    does not reach it (sessions run under inference mode, so weights do not change under them);
    not frozen, the parameters stay graph inputs and the change does reach it. This needs Dynamo
    to see Inductor's freezing while it traces, not only Inductor's options (session 21: options
    alone left eloftr unfrozen). Forced on a CPU here: the mechanism is the device's."""
    monkeypatch.setattr(torch_backend, "compile_options",
                        lambda device, cuda_graph, freeze=False: {"triton.cudagraphs": False, "freezing": freeze})
    torch._dynamo.reset()
    import torch._inductor.config as inductor_config

    process_setting = inductor_config.freezing
    for freeze in (True, False):
        torch.manual_seed(0)
        layer = nn.Linear(8, 4)
        graph = GraphSpec(name="g", module=layer, example_inputs=(torch.ones(2, 8),), input_names=["x"],
                          output_names=["y"], freeze_weights=freeze)
        session = torch_backend.TorchSession(graph, {"device": "cpu", "compile": True})
        x = torch.randn(2, 8)
        before = session.run({"x": x})["y"]
        torch.testing.assert_close(before, layer(x).detach())
        with torch.no_grad():
            layer.weight.add_(1.0)
        after = session.run({"x": x})["y"]
        assert torch.equal(after, before) == freeze, freeze
        assert inductor_config.freezing == process_setting  # switched on only during the calls
        with pytest.raises(Exception):
            session.run({"x": torch.randn(2, 3)})  # a failing call restores it too
        assert inductor_config.freezing == process_setting
    torch._dynamo.reset()
