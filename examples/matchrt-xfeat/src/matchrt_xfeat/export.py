"""The export wrapper: both images in, fixed-size matches out (the contract of sparse matchers)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from matchrt.errors import MatchrtError
from matchrt.types import ExportOptions, ExportPlan, GraphSpec

from .model import XFeatNet
from .sparse import MutualNearest, SparseDetector

NAME = "xfeat"
INPUTS = ["image0", "image1"]
OUTPUTS = ["keypoints0", "keypoints1", "confidence", "valid"]
# XFeat's own defaults: 4096 keypoints, detection threshold 0.05; 0.82 is the cosine similarity
# floor of its mutual-nearest-neighbour matcher
DEFAULTS: dict[str, Any] = {"top_k": 4096, "threshold": 0.82, "detection_threshold": 0.05}


class XFeatMatcher(nn.Module):
    """image0, image1 (B x C x H x W in [0, 1]) -> keypoints0, keypoints1 (B x K x 2, input pixels),
    confidence (B x K cosine similarity), valid (B x K bool). K = top_k keypoints of image 0."""

    def __init__(self, net: XFeatNet, height: int, width: int, top_k: int,
                 threshold: float, detection_threshold: float) -> None:
        super().__init__()
        self.net = net
        self.detector = SparseDetector(height, width, top_k, detection_threshold)
        self.matcher = MutualNearest(top_k, threshold)

    def forward(self, image0: torch.Tensor, image1: torch.Tensor):
        batch = image0.shape[0]
        # one backbone pass over both images (batch norm is in eval mode: images stay independent)
        feats, logits, reliability = self.net(torch.cat([image0, image1], 0))
        kpts, scores, desc = self.detector(feats, logits, reliability)
        valid = scores > 0
        return self.matcher(kpts[:batch], desc[:batch], valid[:batch],
                            kpts[batch:], desc[batch:], valid[batch:])


def resolve_options(extra: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """The matcher's options from `--option`/`--max-matches`/`--threshold`, checked."""
    opts = dict(DEFAULTS)
    unknown = set(extra) - set(DEFAULTS) - {"max_matches"}
    if unknown:
        # not an error: a benchmark passes one option set to several matchers
        warnings.warn(f"xfeat ignores option(s) {', '.join(sorted(unknown))}; it takes "
                      f"{', '.join(DEFAULTS)} (max_matches is an alias of top_k)", stacklevel=2)
    opts.update({k: v for k, v in extra.items() if k in DEFAULTS})
    if extra.get("max_matches") is not None:
        if "top_k" in extra and int(extra["top_k"]) != int(extra["max_matches"]):
            raise MatchrtError("xfeat: --max-matches and --option top_k disagree; give one")
        opts["top_k"] = extra["max_matches"]  # the output size K is the keypoint count
    opts["top_k"] = int(opts["top_k"])
    opts["threshold"] = float(opts["threshold"])
    opts["detection_threshold"] = float(opts["detection_threshold"])
    if not 1 <= opts["top_k"] <= height * width:
        raise MatchrtError(f"xfeat: top_k must be between 1 and the {height * width} pixels of a "
                           f"{height}x{width} input, got {opts['top_k']}")
    return opts


def build_plan(model: XFeatNet, options: ExportOptions) -> ExportPlan:
    """One graph at a fixed size (the sampling tables depend on H and W)."""
    if options.dynamic:
        raise MatchrtError("xfeat graphs have fixed image sizes (their sampling tables are built "
                           "for one H x W); export once per size instead of --dynamic")
    h, w = options.height, options.width
    opts = resolve_options(options.extra, h, w)
    wrapper = XFeatMatcher(model, h, w, opts["top_k"], opts["threshold"],
                           opts["detection_threshold"]).eval()
    images = tuple(torch.rand(options.batch, 3, h, w) for _ in INPUTS)
    graph = GraphSpec("main", wrapper, images, list(INPUTS), list(OUTPUTS))
    return ExportPlan(NAME, [graph], opts, (h, w))
