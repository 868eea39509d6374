"""Static check of an ONNX graph against what TensorRT's ONNX parser accepts, before any build.

API (what `matchrt lint` and `matchrt export` call):

    lint_onnx(path: str | Path | onnx.ModelProto) -> list[LintProblem]
        Every node (subgraphs and model-local functions included) checked; errors first.
    LintProblem(severity: "error" | "warning", node: str, op_type: str, reason: str)
        `str(problem)` -> "error: <node> (<op_type>): <reason>"; `.is_error`.
    format_problems(problems, title="") -> str      a printable block, one problem a line
    count_errors(problems) -> int

Sources of the rules (facts, not guesses; each rule below names where it comes from):
- "matrix": the ONNX-TensorRT operator support matrix, onnx/onnx-tensorrt docs/operators.md,
  revision "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"
  (the 10.0 revision of the same file states opsets 9 to 20).
- "importer": onnx-tensorrt's importers at the "ONNX-TensorRT 10.1 GA release" commit
  (onnxOpImporters.cpp / importerUtils.cpp): explicit type and attribute rejections found there.
- "layer": TensorRT's operator reference (TopK: k <= 3840; GridSample: 4-D, nearest/linear/cubic).
Type rules from the importer are errors (the parser refuses the node); a type the matrix does
not list is a warning only, because the matrix is known to be incomplete (e.g. NonZero on BOOL
is listed as FP32/FP16 only, yet the 10.1 importer accepts BOOL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Union

Severity = Literal["error", "warning"]

# --- the support matrix (10.15 revision), encoded as type letters --------------------------------
# F fp32, H fp16, B bf16, I int32, L int64, O bool, U uint8, Q int8, 8 fp8, 4 int4/fp4.
# "-" marks an operator the matrix lists as not supported.
_MATRIX = """
Abs FHBIL|Acos FHB|Acosh FHB|Add FHBIL|AffineGrid -|And O|ArgMax FHBIL|ArgMin FHBIL|Asin FHB
Asinh FHB|Atan FHB|Atanh FHB|Attention FHBQ8|AveragePool FHB|BatchNormalization FHB|Bernoulli -
BitShift -|BitwiseAnd -|BitwiseNot -|BitwiseOr -|BitwiseXor -|BlackmanWindow FH|Cast FHBILUO
CastLike FHBILUO|Ceil FHB|Col2Im -|Celu FHB|CenterCropPad -|Clip FHB|Compress -|Concat FHBILO
ConcatFromSequence -|Constant FHB84ILO|ConstantOfShape FHB84ILO|Conv FHB|ConvInteger -
ConvTranspose FHB|Cos FHB|Cosh FHB|CumSum FHB|DFT -|DeformConv FH|DepthToSpace FHBIL
DequantizeLinear Q84|Det -|Div FHBIL|Dropout FHB|DynamicQuantizeLinear -|Einsum FHB|Elu FHB
Equal FHBIL|Erf FHB|Exp FHB|Expand FHBILO|EyeLike FHBILO|Flatten FHBILO|Floor FHB|Gather FHBILO
GatherElements FHBILO|GatherND FHBILO|Gelu FHBQIL|Gemm FHB|GlobalAveragePool FHB|GlobalLpPool FHB
GlobalMaxPool FHB|Greater FHBIL|GreaterOrEqual FHBIL|GridSample FH|GroupNormalization FHB|GRU FHB
HammingWindow FH|HannWindow FH|HardSigmoid FHB|HardSwish FHB|Hardmax FHB|Identity FHBILO
If FHBILO|ImageScaler FHB|ImageDecoder -|InstanceNormalization FHB|IsInf FHB|IsNaN FHBIL
LayerNormalization FHB|LeakyRelu FHB|Less FHBIL|LessOrEqual FHBIL|Log FHB|LogSoftmax FHB
Loop FHBILO|LRN FHB|LSTM FHB|LpNormalization FHB|LpPool FHB|MatMul FHB|MatMulInteger -|Max FHBIL
MaxPool FHB|MaxRoiPool -|MaxUnpool -|Mean FHB8IL|MeanVarianceNormalization FHB|MelWeightMatrix -
Min FHBIL|Mish FH|Mod FHBIL|Mul FHBIL|Multinomial -|Neg FHBIL|NegativeLogLikelihoodLoss -
NonMaxSuppression FH|NonZero FH|Not O|OneHot FHBILO|Optional -|OptionalGetElement -
OptionalHasElement -|Or O|Pad FHBIL|ParametricSoftplus FHB|Pow FHBIL|PRelu FHB|QLinearConv -
QLinearMatMul -|QuantizeLinear FHB|RandomNormal FHB|RandomNormalLike FHB|RandomUniform FHB
RandomUniformLike FHB|Range FHBIL|Reciprocal FHB|ReduceL1 FHBIL|ReduceL2 FHBIL|ReduceLogSum FHBIL
ReduceLogSumExp FHBIL|ReduceMax FHBIL|ReduceMean FHBIL|ReduceMin FHBIL|ReduceProd FHBIL
ReduceSum FHBIL|ReduceSumSquare FHBIL|RegexFullMatch -|Relu FHBIL|Reshape FHBILO|Resize FHB
ReverseSequence FHBILO|RMSNormalization FHB|RNN FHB|RoiAlign FH|RotaryEmbedding FHB|Round FHB
STFT F|ScaledTanh FHB|Scan FHB|Scatter FHBIL|ScatterElements FHBIL|ScatterND FHBIL|Selu FHB
SequenceAt -|SequenceConstruct -|SequenceEmpty -|SequenceErase -|SequenceInsert -|SequenceLength -
SequenceMap -|Shape FHBILO|Shrink FHBIL|Sigmoid FHB|Sign FHBIL|Sin FHB|Sinh FHB|Size FHBILO
Slice FHBILO|Softmax FHB|SoftmaxCrossEntropyLoss -|Softplus FHB|Softsign FHB|SpaceToDepth FHBIL
Split FHBILO|SplitToSequence -|Sqrt FHB|Squeeze FHBILO|StringConcat -|StringNormalizer -
StringSplit -|Sub FHBIL|Sum FHBIL|Tan FHB|Tanh FHB|TensorScatter FHBI|TfIdfVectorizer -
ThresholdedRelu FHB|Tile FHBILO|TopK FHBIL|Transpose FHBILO|Trilu FHBILO|Unique -
Unsqueeze FHBILO|Upsample FHB|Where FHBILO|Xor O
"""

MATRIX_VERSION = "10.15"
OPSET_MIN, OPSET_MAX = 9, 24  # matrix 10.15; the 10.0 revision stops at 20
OPSET_MAX_10_0 = 20
TOPK_MAX_K = 3840  # TensorRT TopK layer: k <= 3840

_LETTERS = {"F": "FLOAT", "H": "FLOAT16", "B": "BFLOAT16", "I": "INT32", "L": "INT64", "O": "BOOL",
            "U": "UINT8", "Q": "INT8", "8": "FLOAT8", "4": "INT4"}


def _parse_matrix(text: str) -> dict[str, Optional[frozenset[str]]]:
    table: dict[str, Optional[frozenset[str]]] = {}
    for entry in text.replace("\n", "|").split("|"):
        entry = entry.strip()
        if not entry:
            continue
        op, letters = entry.split()
        table[op] = None if letters == "-" else frozenset(_LETTERS[c] for c in letters)
    return table


OPERATORS: dict[str, Optional[frozenset[str]]] = _parse_matrix(_MATRIX)
"""op type -> the data types the matrix lists (None: the matrix marks it unsupported)."""

# --- importer rejections (onnx-tensorrt 10.1) ------------------------------------------------------
# unaryHelper refuses BOOL, INT32, INT64 and UINT8 for every unary op but Abs/Sign/Neg/Not: index
# arithmetic kept in integers must not pass through these (e.g. Floor or Sqrt of an INT64 tensor).
_FLOAT_ONLY_UNARY = {"Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Cos", "Cosh", "Erf",
                     "Exp", "Floor", "Log", "Reciprocal", "Round", "Sin", "Sinh", "Sqrt", "Tan"}
# input index -> refused types, as the importers check them (notInvalidType and explicit asserts)
_REFUSED: dict[str, dict[int, frozenset[str]]] = {
    "MatMul": {0: frozenset({"INT32", "INT64"})},
    "Gemm": {0: frozenset({"INT32", "INT64"})},
    "PRelu": {0: frozenset({"INT32", "INT64"}), 1: frozenset({"INT32", "INT64"})},
    "Hardmax": {0: frozenset({"INT64", "INT32", "INT8", "UINT8", "BOOL"})},
    "Resize": {0: frozenset({"BOOL", "UINT8"})},
    "Upsample": {0: frozenset({"BOOL", "UINT8"})},
    "GridSample": {0: frozenset({"BOOL", "UINT8"}), 1: frozenset({"BOOL", "UINT8"})},
    "DepthToSpace": {0: frozenset({"BOOL", "UINT8"})},
    "SpaceToDepth": {0: frozenset({"BOOL", "UINT8"})},
    "Abs": {0: frozenset({"BOOL", "UINT8"})},
    "Sign": {0: frozenset({"BOOL", "UINT8"})},
    "Neg": {0: frozenset({"BOOL", "UINT8"})},
}
_FLOAT_ONLY = {"Mish": frozenset({"FLOAT", "FLOAT16"}),
               "HardSwish": frozenset({"FLOAT", "FLOAT16", "INT8"}),
               "LpNormalization": frozenset({"FLOAT", "FLOAT16", "BFLOAT16"}),
               "LpPool": frozenset({"FLOAT", "FLOAT16", "BFLOAT16"}),
               "GlobalLpPool": frozenset({"FLOAT", "FLOAT16"}),
               "MeanVarianceNormalization": frozenset({"FLOAT", "FLOAT16", "BFLOAT16"}),
               "Not": frozenset({"BOOL"})}
for _op in _FLOAT_ONLY_UNARY:
    _REFUSED[_op] = {0: frozenset({"BOOL", "INT32", "INT64", "UINT8"})}

_CONTROL_FLOW = {"Loop", "If", "Scan"}
_DATA_DEPENDENT = {"NonZero": "its output length depends on the data",
                   "NonMaxSuppression": "its output length depends on the data"}
_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"}
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class LintProblem:
    """One finding: where (node name, op type), why, and whether it stops a TensorRT build."""

    severity: Severity
    node: str
    op_type: str
    reason: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.node} ({self.op_type}): {self.reason}"


def count_errors(problems: Iterable[LintProblem]) -> int:
    return sum(p.is_error for p in problems)


def format_problems(problems: list[LintProblem], title: str = "") -> str:
    """A printable block: a summary line, then one problem a line."""
    errors = count_errors(problems)
    head = f"{title}: " if title else ""
    if not problems:
        return f"{head}TensorRT op check passed"
    lines = [f"{head}{errors} error(s), {len(problems) - errors} warning(s) for TensorRT"]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


def lint_onnx(path: Union[str, Path, Any]) -> list[LintProblem]:
    """Check every node of an ONNX graph (a file or a loaded ModelProto); errors come first."""
    import onnx

    if isinstance(path, (str, Path)):
        # weights stay on disk: every rule reads only the graph and small constants
        model = onnx.load(str(path), load_external_data=False)
    else:
        model = path
    problems = _Linter(model).run()
    return sorted(problems, key=lambda p: 0 if p.is_error else 1)


# --- the checker ------------------------------------------------------------------------------------
class _Linter:
    def __init__(self, model: Any):
        self.model = model
        self.problems: list[LintProblem] = []
        self.types: dict[str, str] = {}
        self.consts: dict[str, Any] = {}
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
        self._unnamed = 0

    def add(self, severity: Severity, node: str, op: str, reason: str) -> None:
        self.problems.append(LintProblem(severity, node, op, reason))

    def run(self) -> list[LintProblem]:
        self._check_opset()
        self._infer_types()
        self._graph_io(self.model.graph)
        self._graph(self.model.graph, outer_consts={})
        for fn in self.model.functions:
            self._nodes(fn.node, prefix=f"{fn.name}/")
        return self.problems

    # -- model level
    def _check_opset(self) -> None:
        v = self.opset
        if v == 0:
            self.add("error", "<model>", "opset", "the model imports no default-domain opset")
        elif v < OPSET_MIN:
            self.add("error", "<model>", "opset",
                     f"opset {v} is below {OPSET_MIN}, the oldest TensorRT's ONNX parser accepts; "
                     "export with opset 17")
        elif v > OPSET_MAX:
            self.add("error", "<model>", "opset",
                     f"opset {v} is above {OPSET_MAX}, the newest the support matrix "
                     f"(TensorRT {MATRIX_VERSION}) lists; export with opset 17")
        elif v > OPSET_MAX_10_0:
            self.add("warning", "<model>", "opset",
                     f"opset {v}: TensorRT 10.0 parses opsets up to {OPSET_MAX_10_0}, "
                     f"{MATRIX_VERSION} up to {OPSET_MAX}; older TensorRT releases will refuse it")

    def _infer_types(self) -> None:
        import onnx

        model = self.model
        try:
            model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception:  # noqa: BLE001 - inference is a help for the type rules, not required
            pass
        self.shapes: dict[str, list[Any]] = {}

        def record(values: Iterable[Any]) -> None:
            for vi in values:
                t = vi.type.tensor_type
                if vi.type.HasField("tensor_type") and t.elem_type:
                    self.types[vi.name] = onnx.TensorProto.DataType.Name(t.elem_type)
                    if t.HasField("shape"):
                        self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                                for d in t.shape.dim]

        g = model.graph
        record(g.input)
        record(g.output)
        record(g.value_info)
        for init in g.initializer:
            self.types[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
            self.shapes[init.name] = list(init.dims)

    def _graph_io(self, graph: Any) -> None:
        for vi in list(graph.input) + list(graph.output):
            t = self.types.get(vi.name)
            if t in ("STRING", "COMPLEX64", "COMPLEX128"):
                self.add("error", vi.name, "graph I/O", f"tensors of type {t} do not exist in TensorRT")
            elif t == "DOUBLE":
                self.add("warning", vi.name, "graph I/O",
                         "DOUBLE is cast down to FLOAT by TensorRT (values clamped to +-FLT_MAX)")

    # -- graphs and nodes
    def _graph(self, graph: Any, outer_consts: dict[str, Any]) -> None:
        consts = dict(outer_consts)
        consts.update(_initializer_values(graph))
        consts.update(_constant_node_values(graph.node))
        saved = self.consts
        self.consts = consts
        self._nodes(graph.node)
        self.consts = saved

    def _name(self, node: Any) -> str:
        if node.name:
            return str(node.name)
        self._unnamed += 1
        out = node.output[0] if len(node.output) else "?"
        return f"<unnamed {node.op_type} -> {out}>"

    def _nodes(self, nodes: Iterable[Any], prefix: str = "") -> None:
        for node in nodes:
            name = prefix + self._name(node)
            self._node(node, name)
            for attr in node.attribute:  # Loop / If / Scan bodies
                if attr.HasField("g"):
                    self._graph(attr.g, self.consts)
                for sub in attr.graphs:
                    self._graph(sub, self.consts)

    def _node(self, node: Any, name: str) -> None:
        op, domain = node.op_type, node.domain
        if domain not in _DEFAULT_DOMAINS:
            if (domain, op) in self.functions:
                return  # a model-local function: the parser inlines it; its body is checked on its own
            self.add("error", name, op,
                     f"operator of domain {domain!r} (not standard ONNX): TensorRT's ONNX parser has no "
                     f"importer for it and would need a TensorRT plugin named {op!r}; export with "
                     "standard ONNX operators only")
            return
        if op not in OPERATORS:
            if ("", op) in self.functions or ("ai.onnx", op) in self.functions:
                return
            self.add("error", name, op,
                     f"not in TensorRT's ONNX operator table ({MATRIX_VERSION}); the parser would try "
                     "to load a plugin of that name")
            return
        if OPERATORS[op] is None:
            self.add("error", name, op, f"not supported by TensorRT's ONNX parser (support matrix "
                                        f"{MATRIX_VERSION})")
            return
        self._types(node, name)
        check = getattr(self, f"_op_{op}", None)
        if check is not None:
            check(node, name)
        if op in _REDUCE_OPS:
            self._reduce(node, name)
        if op in _CONTROL_FLOW:
            self.add("warning", name, op,
                     "control flow: TensorRT builds it with restrictions (same-rank branch outputs; loop-"
                     "carried shapes fixed; no dynamic scan length) and it blocks most layer fusion; "
                     "prefer a graph without it")
        if op in _DATA_DEPENDENT:
            self.add("warning", name, op,
                     f"data-dependent output shape ({_DATA_DEPENDENT[op]}): TensorRT needs an output "
                     "allocator and cannot capture it in a CUDA graph; use a fixed-size output plus "
                     "a validity mask")

    # -- type rules
    def _types(self, node: Any, name: str) -> None:
        op = node.op_type
        for idx, refused in _REFUSED.get(op, {}).items():
            t = self._in_type(node, idx)
            if t in refused:
                self.add("error", name, op,
                         f"input {idx} is {t}: TensorRT's {op} importer refuses {', '.join(sorted(refused))}"
                         + (" (keep index arithmetic out of float-only unary ops or cast first)"
                            if op in _FLOAT_ONLY_UNARY else ""))
                return
        if op in _FLOAT_ONLY:
            t = self._in_type(node, 0)
            if t is not None and t not in _FLOAT_ONLY[op]:
                self.add("error", name, op, f"input is {t}: TensorRT's {op} importer accepts only "
                                            f"{', '.join(sorted(_FLOAT_ONLY[op]))}")
                return
        listed = OPERATORS[op]
        assert listed is not None
        if op in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike",
                  "RandomNormalLike", "RandomUniformLike"):
            t = self.types.get(node.output[0]) if node.output else None
        elif op in ("Where",):
            t = self._in_type(node, 1)
        elif op in ("Shape", "Size", "Cast", "CastLike", "Identity", "If", "Loop", "Scan"):
            t = None  # any tensor type TensorRT has
        else:
            t = self._in_type(node, 0)
        if op in ("Cast", "CastLike"):
            self._cast(node, name)
        if t is None or t in listed:
            return
        if t == "DOUBLE":
            self.add("warning", name, op, "DOUBLE data is cast down to FLOAT by TensorRT (values "
                                          "clamped to +-FLT_MAX)")
        elif t == "UINT8":
            self.add("error", name, op, "UINT8 tensors are only allowed as network inputs/outputs "
                                        "(cast them right after the input)")
        else:
            self.add("warning", name, op, f"{t} input: the support matrix lists {op} for "
                                          f"{', '.join(sorted(listed))} only")

    def _cast(self, node: Any, name: str) -> None:
        import onnx

        to = _attr(node, "to")
        if to is None:
            return
        t = onnx.TensorProto.DataType.Name(int(to))
        if t in ("STRING", "COMPLEX64", "COMPLEX128"):
            self.add("error", name, node.op_type, f"cast to {t}: no such TensorRT type")
        elif t == "DOUBLE":
            self.add("warning", name, node.op_type, "cast to DOUBLE: TensorRT computes it in FLOAT")

    def _in_type(self, node: Any, idx: int) -> Optional[str]:
        if idx >= len(node.input) or not node.input[idx]:
            return None
        return self.types.get(node.input[idx])

    def _const(self, node: Any, idx: int) -> Any:
        if idx >= len(node.input) or not node.input[idx]:
            return None
        return self.consts.get(node.input[idx])

    def _rank(self, node: Any, idx: int) -> Optional[int]:
        if idx >= len(node.input):
            return None
        shape = self.shapes.get(node.input[idx])
        return None if shape is None else len(shape)

    # -- operator rules (matrix restrictions and importer checks)
    def _op_TopK(self, node: Any, name: str) -> None:
        if _attr(node, "sorted", 1) == 0:
            self.add("error", name, "TopK", "sorted=0: TensorRT requires sorted=1 (support matrix)")
        if self.opset < 10:
            k = _attr(node, "k")
        else:
            value = self._const(node, 1)
            k = None if value is None else int(value.reshape(-1)[0])
            if value is None:
                self.add("warning", name, "TopK",
                         f"K is computed at run time: TensorRT's TopK needs K <= {TOPK_MAX_K}; make K a "
                         "constant so this can be checked")
                return
        if k is not None and k > TOPK_MAX_K:
            self.add("error", name, "TopK",
                     f"K = {k} exceeds TensorRT's TopK limit of {TOPK_MAX_K}: select in blocks "
                     f"(TopK per tile, then TopK of the winners) or lower the match count")

    def _op_GridSample(self, node: Any, name: str) -> None:
        mode = _attr(node, "mode", "bilinear")
        rank = self._rank(node, 0)
        if rank is not None and rank != 4:
            self.add("error", name, "GridSample", f"{rank}-D input: TensorRT's GridSample takes 4-D only")
        if mode in ("linear", "cubic"):
            self.add("error", name, "GridSample",
                     f"mode {mode!r} (opset 20 spelling): the onnx-tensorrt 10.1 importer knows only "
                     "'nearest', 'bilinear' and 'bicubic' and silently falls back to nearest for other "
                     "names; export with opset 17")
        elif mode == "bicubic":
            self.add("warning", name, "GridSample",
                     "bicubic: TensorRT implements cubic grid sampling, but matchrt graphs keep to "
                     "bilinear/nearest (what the reference models use); check the numerics if intended")
        elif mode not in ("bilinear", "nearest"):
            self.add("error", name, "GridSample", f"unknown mode {mode!r}")
        pad = _attr(node, "padding_mode", "zeros")
        if pad not in ("zeros", "border", "reflection"):
            self.add("error", name, "GridSample", f"unknown padding_mode {pad!r}")

    def _op_Resize(self, node: Any, name: str) -> None:
        mode = _attr(node, "mode", "nearest")
        if mode not in ("nearest", "linear"):
            self.add("error", name, "Resize", f"mode {mode!r}: TensorRT resizes with nearest or linear only")
        coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if coord not in _RESIZE_COORD:
            self.add("error", name, "Resize", f"coordinate_transformation_mode {coord!r} is not supported "
                                              f"(supported: {', '.join(sorted(_RESIZE_COORD))})")
        if mode == "nearest":
            nearest = _attr(node, "nearest_mode", "round_prefer_floor")
            if nearest not in _RESIZE_NEAREST:
                self.add("error", name, "Resize", f"nearest_mode {nearest!r} is not supported")
        if _attr(node, "antialias", 0):
            self.add("error", name, "Resize", "antialias=1 is not supported by TensorRT")
        policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            self.add("error", name, "Resize", f"keep_aspect_ratio_policy {policy!r}: only 'stretch'")

    def _op_MaxPool(self, node: Any, name: str) -> None:
        if len(node.output) > 1 and node.output[1]:
            self.add("error", name, "MaxPool", "the Indices output is not supported by TensorRT")
        self._pool(node, name)

    def _op_AveragePool(self, node: Any, name: str) -> None:
        self._pool(node, name)

    def _op_LpPool(self, node: Any, name: str) -> None:
        self._pool(node, name)

    def _pool(self, node: Any, name: str) -> None:
        dil = _attr(node, "dilations")
        if dil and any(int(d) != 1 for d in dil):
            self.add("error", name, node.op_type, "dilations other than 1 are not supported")
        kernel = _attr(node, "kernel_shape")
        if kernel is not None and not 1 <= len(kernel) <= 3:
            self.add("error", name, node.op_type, f"{len(kernel)}-D pooling: TensorRT pools 1-D to 3-D only")

    def _op_LayerNormalization(self, node: Any, name: str) -> None:
        if any(o for o in list(node.output)[1:]):
            self.add("error", name, "LayerNormalization", "only the first output (Y) is supported")

    def _op_ScatterND(self, node: Any, name: str) -> None:
        red = _attr(node, "reduction", "none")
        if red != "none":
            self.add("error", name, "ScatterND", f"reduction {red!r} is not supported")

    def _op_Constant(self, node: Any, name: str) -> None:
        for a in node.attribute:
            if a.name in ("sparse_value", "value_string", "value_strings"):
                self.add("error", name, "Constant", f"attribute {a.name} is not supported")

    def _op_Dropout(self, node: Any, name: str) -> None:
        if len(node.input) > 2 and node.input[2]:
            value = self._const(node, 2)
            if value is None or bool(value.reshape(-1)[0]):
                self.add("error", name, "Dropout", "training_mode must be a constant False")

    def _op_CumSum(self, node: Any, name: str) -> None:
        if self._const(node, 1) is None:
            self.add("error", name, "CumSum", "axis must be a build-time constant")

    def _op_OneHot(self, node: Any, name: str) -> None:
        if self._const(node, 1) is None:
            self.add("error", name, "OneHot", "depth must be a build-time constant")

    def _op_Squeeze(self, node: Any, name: str) -> None:
        if self.opset >= 13 and len(node.input) > 1 and node.input[1] and self._const(node, 1) is None:
            self.add("error", name, node.op_type, "axes must resolve to a constant")

    _op_Unsqueeze = _op_Squeeze

    def _reduce(self, node: Any, name: str) -> None:
        if len(node.input) > 1 and node.input[1] and self._const(node, 1) is None:
            self.add("error", name, node.op_type, "axes must be an initializer (a constant)")

    def _op_LSTM(self, node: Any, name: str) -> None:
        if _attr(node, "input_forget", 0):
            self.add("error", name, "LSTM", "input_forget must be 0")
        if _attr(node, "layout", 0):
            self.add("error", name, "LSTM", "layout must be 0")

    def _op_EyeLike(self, node: Any, name: str) -> None:
        rank = self._rank(node, 0)
        if rank is not None and rank != 2:
            self.add("error", name, "EyeLike", "input must be 2-D")


# --- helpers --------------------------------------------------------------------------------------------
def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _small_array(tensor: Any) -> Any:
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    size = 1
    for d in tensor.dims:
        size *= int(d)
    if size > 4096:  # the rules read scalars and short vectors only
        return None
    return numpy_helper.to_array(tensor)


def _initializer_values(graph: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in graph.initializer:
        arr = _small_array(t)
        if arr is not None:
            out[t.name] = arr
    return out


def _constant_node_values(nodes: Iterable[Any]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    for node in _iter_constants(nodes):
        for a in node.attribute:
            if a.name == "value" and a.HasField("t"):
                arr = _small_array(a.t)
                if arr is not None:
                    out[node.output[0]] = arr
            elif a.name in ("value_int", "value_float"):
                out[node.output[0]] = np.asarray(a.i if a.name == "value_int" else a.f)
            elif a.name in ("value_ints", "value_floats"):
                out[node.output[0]] = np.asarray(list(a.ints if a.name == "value_ints" else a.floats))
    return out


def _iter_constants(nodes: Iterable[Any]) -> Iterator[Any]:
    for node in nodes:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            yield node
