"""The README's plugin example is real code: it registers, exports, and matches."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import torch

from matchrt.export import export_plan as write_onnx
from matchrt.host import get_host
from matchrt.images import read_image
from matchrt.runner import open_pipeline

README = Path(__file__).parent.parent / "README.md"


def _example_module() -> types.ModuleType:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    module = types.ModuleType("matchrt_patches")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    return module


def test_readme_plugin_registers_exports_and_matches(tmp_path, image_pair):
    module = _example_module()
    host = get_host()
    with host.plugin(module, "patches"):
        assert "patches" in host.matchers()
        ckpt = tmp_path / "patches.pt"
        torch.save(module.Net().state_dict(), ckpt)
        im0, im1 = read_image(image_pair[0]), read_image(image_pair[1])
        ref = open_pipeline("patches", "torch", {"checkpoint": ckpt}, height=96, width=128)
        model = ref.stages[0].session.module
        from matchrt.types import ExportOptions

        plan = host.pm.hook.export_plan(matcher="patches", model=model,
                                        options=ExportOptions(96, 128))
        write_onnx(plan, tmp_path / "patches.onnx")
        ort = open_pipeline(None, "onnxruntime", artifact=tmp_path / "patches.onnx")
        a, b = ref.match(im0, im1), ort.match(im0, im1)
        assert len(a) == 64
        np.testing.assert_allclose(a.keypoints0, b.keypoints0, atol=1e-3)
        assert a.keypoints0[:, 0].max() > 128  # back in original pixels
