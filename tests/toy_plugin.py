"""A tiny matcher plugin defined inside the tests, exercising every hook of the core.

It matches 8x8 patches by normalised descriptor similarity. With option `stages=2` it exports
two graphs (encode, match) bridged by a Python step, like RoMa's exact GP solve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import matchrt
from matchrt.profiling import mark_stages
from matchrt.weights import map_state_dict

NAME = "toy"
LAYOUT = Path(__file__).parent / "data" / "toy_layout.tsv"
STRIDE = 8


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, STRIDE, stride=STRIDE)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image - 0.5).flatten(2).transpose(1, 2)  # B x N x 16


def _centers(index: torch.Tensor, width_cells: int) -> torch.Tensor:
    idx = index.to(torch.float32)  # small grids only: exact in fp32
    x = torch.remainder(idx, width_cells)
    y = torch.div(idx - x, width_cells)
    return torch.stack([x, y], -1) * STRIDE + (STRIDE - 1) / 2


class ToyMatch(nn.Module):
    def __init__(self, k: int, threshold: float, width_cells: int) -> None:
        super().__init__()
        self.k, self.threshold, self.width_cells = k, threshold, width_cells

    def forward(self, desc0: torch.Tensor, desc1: torch.Tensor):
        sim = torch.einsum("bnc,bmc->bnm", desc0, desc1)
        best, j = sim.max(dim=2)
        conf, i = best.topk(self.k, dim=1)
        j = torch.gather(j, 1, i)
        return _centers(i, self.width_cells), _centers(j, self.width_cells), conf, conf > self.threshold


class ToyEncode(nn.Module):
    def __init__(self, net: ToyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image0: torch.Tensor, image1: torch.Tensor):
        return self.net(image0), self.net(image1)


def _normalise(d: torch.Tensor) -> torch.Tensor:
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class ToySingle(nn.Module):
    def __init__(self, net: ToyNet, match: ToyMatch) -> None:
        super().__init__()
        self.encode, self.match = ToyEncode(net), match

    def forward(self, image0: torch.Tensor, image1: torch.Tensor):
        d0, d1 = self.encode(image0, image1)
        return self.match(_normalise(d0), _normalise(d1))


OUTPUTS = ["keypoints0", "keypoints1", "confidence", "valid"]


class ToyPlugin:
    """Hook implementations; `calls` records which hooks ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @matchrt.hookimpl
    def register_matchers(self, register):
        self.calls.append("register_matchers")
        register(matchrt.MatcherInfo(
            name=NAME,
            description="toy patch matcher for tests",
            contract=matchrt.InputContract(channels=1, side_multiple=STRIDE, default_height=64,
                                           default_width=96),
            weight_sources=(matchrt.WeightSource("checkpoint", "toy weights", layout=LAYOUT),),
            options={"max_matches": 16, "threshold": 0.0, "stages": 1},
        ))

    @matchrt.hookimpl
    def map_weights(self, matcher, sources, paths, options):
        if matcher != NAME:
            return None
        self.calls.append("map_weights")
        target = ToyNet().state_dict()
        return map_state_dict(NAME, target, sources,
                              lambda src, key: key.removeprefix("matcher."), paths)

    @matchrt.hookimpl
    def create_model(self, matcher, options):
        if matcher != NAME:
            return None
        self.calls.append("create_model")
        return ToyNet()

    @matchrt.hookimpl
    def export_plan(self, matcher, model, options):
        if matcher != NAME:
            return None
        self.calls.append("export_plan")
        h, w = options.height, options.width
        k = int(options.extra.get("max_matches", 16))
        thr = float(options.extra.get("threshold", 0.0))
        match = ToyMatch(k, thr, w // STRIDE)
        images = (torch.rand(options.batch, 1, h, w), torch.rand(options.batch, 1, h, w))
        resolved = {"max_matches": k, "threshold": thr, "stages": int(options.extra.get("stages", 1))}
        if resolved["stages"] == 1:
            single = mark_stages(ToySingle(model, match),
                                 {"encode": "encode", "conv": "encode.net.conv", "match": "match"})
            graphs = [matchrt.GraphSpec("main", single, images, ["image0", "image1"], OUTPUTS)]
        else:
            n = (h // STRIDE) * (w // STRIDE)
            descs = (torch.rand(options.batch, n, 16), torch.rand(options.batch, n, 16))
            graphs = [
                matchrt.GraphSpec("encode", mark_stages(ToyEncode(model), {"encode": ""}), images,
                                  ["image0", "image1"], ["raw0", "raw1"]),
                matchrt.GraphSpec("match", mark_stages(match, {"match": ""}), descs,
                                  ["desc0", "desc1"], OUTPUTS),
            ]
        return matchrt.ExportPlan(NAME, graphs, resolved, (h, w))

    @matchrt.hookimpl
    def bridge_stages(self, matcher, stage, tensors, options):
        if matcher != NAME:
            return None
        self.calls.append("bridge_stages")
        return {"desc0": _normalise(torch.as_tensor(tensors["raw0"])),
                "desc1": _normalise(torch.as_tensor(tensors["raw1"]))}

    @matchrt.hookimpl
    def postprocess(self, matcher, outputs, pair, options):
        if matcher != NAME:
            return None
        self.calls.append("postprocess")
        valid = outputs["valid"][0].cpu().numpy().astype(bool)
        k0 = outputs["keypoints0"][0].cpu().numpy()[valid] / np.asarray(pair.scale0, np.float32)
        k1 = outputs["keypoints1"][0].cpu().numpy()[valid] / np.asarray(pair.scale1, np.float32)
        conf = outputs["confidence"][0].cpu().numpy()[valid]
        return matchrt.Matches(k0, k1, conf, {"num_valid": int(valid.sum())})


class MissingBackendPlugin:
    """Registers a backend whose library is absent, to test the install hint."""

    @matchrt.hookimpl
    def register_backends(self, register):
        register(matchrt.BackendInfo("ghostrt", "a backend that is not installed",
                                     lambda: "ghostrt is not installed: pip install ghostrt",
                                     artifact="engine"))
