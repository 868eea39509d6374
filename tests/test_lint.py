"""The static TensorRT op check: each rule fires on a small graph made for it, clean graphs pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from matchrt.lint import TOPK_MAX_K, LintProblem, count_errors, format_problems, lint_onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

F = T.FLOAT


def model(nodes, inputs, outputs, inits=(), opset=17, functions=(), extra_opsets=(), check=True):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [h.make_opsetid("", opset), *[h.make_opsetid(d, v) for d, v in extra_opsets]]
    m = h.make_model(graph, opset_imports=opsets, functions=list(functions))
    m.ir_version = 8 if opset <= 17 else 10
    if check:  # every graph here is valid ONNX: the findings are about TensorRT, not ONNX
        onnx.checker.check_model(m)
    return m


def vi(name, elem=F, shape=None):
    return h.make_tensor_value_info(name, elem, shape)


def i64(name, values):
    return nh.from_array(np.asarray(values, dtype=np.int64), name)


def problems_of(m, node=None):
    found = lint_onnx(m)
    return [p for p in found if node is None or p.node == node]


def only(m, node):
    found = problems_of(m, node)
    assert len(found) == 1, found
    return found[0]


def clean_model():
    """A small matcher-like graph: conv, softmax with max subtracted, TopK with constant K,
    bilinear GridSample, linear Resize, int32 index arithmetic through Div/Mod."""
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("ReduceMax", ["r"], ["mx"], name="max", axes=[1], keepdims=1),
        h.make_node("Sub", ["r", "mx"], ["s"], name="sub"),
        h.make_node("Softmax", ["s"], ["p"], name="softmax", axis=1),
        h.make_node("GridSample", ["p", "grid"], ["gs"], name="sample", mode="bilinear", align_corners=0),
        h.make_node("Resize", ["gs", "", "scales"], ["up"], name="up", mode="linear"),
        h.make_node("Flatten", ["up"], ["flat"], name="flat", axis=1),
        h.make_node("TopK", ["flat", "k"], ["vals", "idx"], name="topk"),
        h.make_node("Cast", ["idx"], ["idx32"], name="to_int32", to=T.INT32),
        h.make_node("Div", ["idx32", "width"], ["row"], name="row"),
        h.make_node("Mod", ["idx32", "width"], ["col"], name="col", fmod=0),
    ]
    inits = [
        nh.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
        nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        i64("k", [64]),
        nh.from_array(np.array([16], np.int32), "width"),
    ]
    return model(nodes, [vi("x", F, [1, 3, 8, 8]), vi("grid", F, [1, 4, 4, 2])],
                 [vi("vals", F, [1, 64]), vi("row", T.INT32, [1, 64]), vi("col", T.INT32, [1, 64])], inits)


def test_clean_graph_passes(tmp_path):
    m = clean_model()
    assert lint_onnx(m) == []
    path = tmp_path / "clean.onnx"
    onnx.save(m, str(path))
    assert lint_onnx(path) == []
    assert "passed" in format_problems([], "clean.onnx")


def test_problem_is_printable_with_node_op_and_reason():
    m = model([h.make_node("Unique", ["x"], ["y"], name="uniq")], [vi("x", F, [4])], [vi("y", F, ["n"])])
    p = only(m, "uniq")
    assert p == LintProblem("error", "uniq", "Unique", p.reason) and p.is_error
    text = str(p)
    assert text.startswith("error: uniq (Unique): ") and "not supported" in text
    block = format_problems([p], "m.onnx")
    assert "1 error(s), 0 warning(s)" in block and "uniq (Unique)" in block


def test_unknown_operator_is_an_error():
    # valid ONNX needs a registered schema, so the checker is off for this made-up op
    m = model([h.make_node("FancyOp", ["x"], ["y"], name="fancy")], [vi("x", F, [4])], [vi("y", F)],
              check=False)
    assert "operator table" in only(m, "fancy").reason


def test_custom_domain_node_is_an_error():
    node = h.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], name="mha", domain="com.microsoft",
                       num_heads=2)
    m = model([node], [vi(n, F, [1, 4, 8]) for n in "qkv"], [vi("o", F)],
              extra_opsets=[("com.microsoft", 1)], check=False)
    p = only(m, "mha")
    assert p.is_error and "com.microsoft" in p.reason and "plugin" in p.reason


def test_model_local_function_is_checked_inside():
    body = [h.make_node("Relu", ["a"], ["b"]), h.make_node("Unique", ["b"], ["c"], name="inner_unique")]
    fn = h.make_function("my.domain", "ReluUnique", ["a"], ["c"], body, [h.make_opsetid("", 17)])
    node = h.make_node("ReluUnique", ["x"], ["y"], name="call", domain="my.domain")
    m = model([node], [vi("x", F, [4])], [vi("y", F, ["n"])], functions=[fn], extra_opsets=[("my.domain", 1)])
    found = lint_onnx(m)
    assert [p.node for p in found] == ["ReluUnique/inner_unique"]  # the call itself is fine


def test_gridsample_modes():
    def gs(mode, opset=17, shape=(1, 3, 8, 8), grid=(1, 4, 4, 2)):
        node = h.make_node("GridSample", ["x", "g"], ["y"], name="gs", mode=mode)
        out = list(shape[:2]) + list(grid[1:-1])
        return model([node], [vi("x", F, list(shape)), vi("g", F, list(grid))], [vi("y", F, out)], opset=opset)

    assert problems_of(gs("bilinear")) == [] and problems_of(gs("nearest")) == []
    bicubic = only(gs("bicubic"), "gs")
    assert bicubic.severity == "warning" and "bilinear/nearest" in bicubic.reason
    linear20 = only(gs("linear", opset=20), "gs")
    assert linear20.is_error and "opset 20" in linear20.reason
    five_d = [p for p in problems_of(gs("bilinear", 20, (1, 3, 4, 8, 8), (1, 2, 4, 4, 3)), "gs") if p.is_error]
    assert len(five_d) == 1 and "4-D" in five_d[0].reason


def _topk(k_init=None, k_node=None, k_input=False, sorted_=1):
    nodes, inits, inputs = [], [], [vi("x", F, [1, 10000])]
    if k_init is not None:
        inits.append(i64("k", [k_init]))
    if k_node is not None:
        nodes.append(h.make_node("Constant", [], ["k"], value=nh.from_array(np.array([k_node], np.int64))))
    if k_input:
        inputs.append(vi("k", T.INT64, [1]))
    nodes.append(h.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=sorted_))
    return model(nodes, inputs, [vi("v", F, [1, "k"]), vi("i", T.INT64, [1, "k"])], inits)


def test_topk_limit():
    assert problems_of(_topk(k_init=TOPK_MAX_K)) == []
    over = only(_topk(k_init=TOPK_MAX_K + 1), "topk")
    assert over.is_error and str(TOPK_MAX_K + 1) in over.reason and str(TOPK_MAX_K) in over.reason
    assert only(_topk(k_node=5000), "topk").is_error  # K from a Constant node is read too
    runtime_k = only(_topk(k_input=True), "topk")
    assert runtime_k.severity == "warning" and "run time" in runtime_k.reason
    assert only(_topk(k_init=16, sorted_=0), "topk").is_error


def test_nonzero_is_a_data_dependent_warning():
    m = model([h.make_node("NonZero", ["x"], ["y"], name="nz")], [vi("x", F, [4, 4])], [vi("y", T.INT64, [2, "n"])])
    p = only(m, "nz")
    assert p.severity == "warning" and "data-dependent" in p.reason


def test_integer_paths_the_importer_rejects():
    floor = model([h.make_node("Floor", ["x"], ["y"], name="floor")], [vi("x", T.INT64, [4])],
                  [vi("y", T.INT64, [4])], check=False)  # ONNX itself types Floor for floats only
    p = only(floor, "floor")
    assert p.is_error and "INT64" in p.reason
    # an inferred (not declared) INT64 tensor is caught as well
    nodes = [h.make_node("Cast", ["x"], ["xi"], name="cast", to=T.INT64),
             h.make_node("MatMul", ["xi", "xi"], ["y"], name="matmul")]
    mm = model(nodes, [vi("x", F, [4, 4])], [vi("y", T.INT64, [4, 4])], check=False)
    p = only(mm, "matmul")
    assert p.is_error and "INT64" in p.reason
    # the same ops on floats are fine
    ok = model([h.make_node("Floor", ["x"], ["f"], name="floor"),
                h.make_node("MatMul", ["f", "f"], ["y"], name="matmul")], [vi("x", F, [4, 4])], [vi("y", F, [4, 4])])
    assert problems_of(ok) == []


def test_control_flow_is_reported_and_its_body_checked():
    then_g = h.make_graph([h.make_node("Unique", ["x"], ["t"], name="then_unique")], "then", [],
                          [vi("t", F, [4])])
    else_g = h.make_graph([h.make_node("Identity", ["x"], ["e"], name="else_id")], "else", [],
                          [vi("e", F, [4])])
    node = h.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    m = model([node], [vi("c", T.BOOL, []), vi("x", F, [4])], [vi("y", F, [4])])
    found = lint_onnx(m)
    assert {(p.node, p.severity) for p in found} == {("branch", "warning"), ("then_unique", "error")}
    assert count_errors(found) == 1 and found[0].is_error  # errors sort first


@pytest.mark.parametrize("opset,severity", [(8, "error"), (21, "warning"), (25, "error")])
def test_opset_range(opset, severity):
    m = model([h.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", F, [4])], [vi("y", F)],
              opset=opset, check=False)
    p = only(m, "<model>")
    assert p.severity == severity and str(opset) in p.reason


def test_resize_and_pool_restrictions():
    cubic = model([h.make_node("Resize", ["x", "", "s"], ["y"], name="rs", mode="cubic")],
                  [vi("x", F, [1, 1, 4, 4])], [vi("y", F, [1, 1, 8, 8])],
                  [nh.from_array(np.array([1, 1, 2, 2], np.float32), "s")])
    assert only(cubic, "rs").is_error
    aa = model([h.make_node("Resize", ["x", "", "s"], ["y"], name="rs", mode="linear", antialias=1)],
               [vi("x", F, [1, 1, 4, 4])], [vi("y", F, [1, 1, 2, 2])],
               [nh.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "s")], opset=18)
    assert "antialias" in only(aa, "rs").reason
    pool = model([h.make_node("MaxPool", ["x"], ["y", "ind"], name="pool", kernel_shape=[2, 2])],
                 [vi("x", F, [1, 1, 4, 4])], [vi("y", F, [1, 1, 3, 3]), vi("ind", T.INT64, [1, 1, 3, 3])])
    assert "Indices" in only(pool, "pool").reason


def test_reduce_axes_must_be_constant():
    node = h.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")
    m = model([node], [vi("x", F, [2, 3]), vi("axes", T.INT64, [1])], [vi("y", F, [2, 1])], opset=18)
    assert "axes" in only(m, "sum").reason
    const = model([node], [vi("x", F, [2, 3])], [vi("y", F, [2, 1])], [i64("axes", [1])], opset=18)
    assert problems_of(const) == []


def test_file_with_external_data_is_checked_without_loading_weights(tmp_path):
    w = nh.from_array(np.ones((256, 256), np.float32), "w")
    m = model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
               h.make_node("NonZero", ["y"], ["nz"], name="nz")],
              [vi("x", F, [1, 256])], [vi("nz", T.INT64, [2, "n"])], [w])
    path = tmp_path / "big.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    (tmp_path / "big.onnx.data").unlink()  # the check never reads the weights
    assert [(p.node, p.severity) for p in lint_onnx(path)] == [("nz", "warning")]


# --- the built-in plugins' exported graphs --------------------------------------------------------------
# policy findings a matchrt graph must not have even as warnings (fixed-size outputs, no control flow,
# bilinear/nearest sampling, constant TopK K)
POLICY = ("data-dependent", "control flow", "GridSample", "TopK")


@pytest.mark.filterwarnings("ignore:matchrt plugin")
@pytest.mark.parametrize("matcher", [
    "eloftr",
    pytest.param("roma_full", marks=pytest.mark.slow),  # DINOv2-L random weights and export: minutes
    pytest.param("roma_plus", marks=pytest.mark.slow),
])
def test_builtin_plugin_graphs_pass(matcher, tmp_path):
    import json

    import torch
    from matchrt.errors import MatchrtError
    from matchrt.export import export_plan
    from matchrt.host import create_host
    from matchrt.runner import load_model, resolve_weights
    from matchrt.types import ExportOptions

    torch.set_num_threads(min(2, torch.get_num_threads()))
    host = create_host()
    if matcher not in host.matchers():
        record = host.records.get(matcher)
        pytest.skip(f"{matcher} is not available yet: {record.error if record else 'not registered'}")
    info = host.matcher(matcher)
    try:
        paths = resolve_weights(info, {}, random_weights=True, cache=tmp_path)
        model, _ = load_model(host, matcher, paths)
    except MatchrtError as exc:
        if "not implemented" in str(exc) or "no installed plugin" in str(exc):
            pytest.skip(f"{matcher}: {exc}")
        raise
    c = info.contract
    plan = host.pm.hook.export_plan(matcher=matcher, model=model,
                                    options=ExportOptions(c.default_height, c.default_width))
    if plan is None:
        pytest.skip(f"{matcher} has no export yet")
    manifest = export_plan(plan, tmp_path / f"{matcher}.onnx", version=info.version)
    stages = json.loads(manifest.read_text())["stages"]
    assert stages
    for stage in stages:
        found = lint_onnx(manifest.parent / stage["file"])
        bad = [p for p in found if p.is_error or any(k in str(p) for k in POLICY)]
        assert not bad, format_problems(found, stage["file"])
