"""matchrt: turn image matchers into fast inference engines."""

from .errors import MatchrtError
from .hookspecs import hookimpl
from .types import (
    BackendInfo,
    ExportOptions,
    ExportPlan,
    GraphSpec,
    InputContract,
    MappedWeights,
    MatcherInfo,
    Matches,
    PairContext,
    WeightReport,
    WeightSource,
)

__version__ = "0.1.0"

__all__ = [
    "BackendInfo", "ExportOptions", "ExportPlan", "GraphSpec", "InputContract", "MappedWeights",
    "MatcherInfo", "Matches", "MatchrtError", "PairContext", "WeightReport", "WeightSource",
    "hookimpl", "__version__",
]
