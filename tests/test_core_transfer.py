"""Prepared inputs in page-locked memory when the graph runs on a GPU, and the same values either way."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from matchrt.bench import _batch
from matchrt.images import prepare_pair
from matchrt.runner import Pipeline, Stage
from matchrt.transfer import batch_inputs, host_buffer
from matchrt.types import InputContract

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA GPU")
SIZES = {"image0": (32, 48), "image1": (32, 48), "image1_upsampled": (64, 96)}


def _images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((50, 70, 3), dtype=np.float32), rng.random((40, 30), dtype=np.float32)


def _reference(image: np.ndarray, contract: InputContract, size: tuple[int, int]) -> np.ndarray:
    """What the inputs were before the buffers: channels first, float32, a leading axis of 1."""
    from matchrt.images import resize, to_channels

    resized, _ = resize(to_channels(image, contract.channels), *size, contract.resize, contract.interpolation)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))[None].astype(np.float32)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pinned", [False, True])
def test_prepared_inputs_hold_the_resized_images_whatever_the_memory(channels, pinned):
    contract = InputContract(channels=channels, side_multiple=8, default_height=32, default_width=32)
    a, b = _images()
    inputs, _ = prepare_pair(a, b, contract, SIZES, pinned=pinned)
    for name, size in SIZES.items():
        expected = _reference(a if name == "image0" else b, contract, size)
        got = inputs[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)


def _pipeline(device: str) -> Pipeline:
    session = SimpleNamespace(device=torch.device(device))
    info = SimpleNamespace(contract=InputContract(channels=1, side_multiple=8, default_height=32, default_width=32))
    return Pipeline(host=None, info=info, backend="torch", stages=[Stage("s", session, [], [])],  # type: ignore[arg-type]
                    input_sizes={"image0": (32, 32), "image1": (32, 32)})


def test_only_a_graph_on_a_gpu_asks_for_page_locked_inputs():
    assert not _pipeline("cpu").feeds_gpu
    assert _pipeline("cuda").feeds_gpu
    engine = Pipeline(host=None, info=None, backend="tensorrt",  # type: ignore[arg-type]
                      stages=[Stage("s", SimpleNamespace(device_index=0), [], [])], input_sizes={})
    assert engine.feeds_gpu


def test_batching_concatenates_the_pairs_in_order():
    items = [{"image0": torch.full((1, 1, 4, 4), float(k))} for k in range(3)]
    batch = _batch(items)["image0"]
    assert batch.shape == (3, 1, 4, 4) and [float(batch[k, 0, 0, 0]) for k in range(3)] == [0.0, 1.0, 2.0]
    assert not batch.is_pinned()


@gpu
def test_inputs_for_a_gpu_graph_are_page_locked_and_outlive_their_tensor():
    a, b = _images()
    inputs, _ = _pipeline("cuda").prepare(a, b)
    assert all(t.is_pinned() for t in inputs.values())
    before = {k: v.clone() for k, v in inputs.items()}
    # the only reference left is the array's: torch must not hand its block to anyone else
    held = host_buffer((4, 1, 32, 32), np.float32, pinned=True)
    torch.cuda.synchronize()
    filler = [torch.full((1, 1, 32, 32), 7.0, pin_memory=True) for _ in range(8)]
    assert all(torch.equal(inputs[k], before[k]) for k in inputs)
    assert torch.from_numpy(held).is_pinned() and len(filler) == 8
    cpu_inputs, _ = _pipeline("cpu").prepare(a, b)
    assert not any(t.is_pinned() for t in cpu_inputs.values())
    for k in inputs:
        assert torch.equal(inputs[k], cpu_inputs[k])
    batch = batch_inputs([inputs["image0"], inputs["image0"]])
    assert batch.is_pinned() and torch.equal(batch[1:], inputs["image0"])


class _Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def _session(device: str):
    from matchrt.backends.torch_backend import TorchSession
    from matchrt.types import GraphSpec

    graph = GraphSpec(name="double", module=_Doubler(), example_inputs=(torch.zeros(1, 4),), input_names=["x"],
                      output_names=["y"])
    return TorchSession(graph, {"device": device})


def test_inputs_reach_the_device_and_the_wait_is_a_no_op_off_the_gpu():
    from matchrt.transfer import to_device

    moved, wait = to_device([np.ones((2, 3), np.float32), torch.arange(4)], "cpu")
    wait()
    assert moved[0].dtype == torch.float32 and torch.equal(moved[1], torch.arange(4))
    out = _session("cpu").run({"x": np.full((1, 4), 3.0, np.float32)})
    assert torch.equal(out["y"], torch.full((1, 4), 6.0))


@gpu
def test_a_page_locked_input_may_be_overwritten_once_the_session_returns():
    """The copy to the GPU is queued without blocking the host, but the session returns only once it is
    done: here the stream is held busy first, so the copy runs late, and the caller then overwrites its
    buffer at once."""
    session = _session("cuda")
    host = torch.full((1, 4), 3.0, pin_memory=True)
    session.run({"x": host})  # warm
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copy
    out = session.run({"x": host})
    host.fill_(-1.0)
    torch.cuda.synchronize()
    assert torch.equal(out["y"].cpu(), torch.full((1, 4), 6.0))
