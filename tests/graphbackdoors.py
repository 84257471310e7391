"""Hand-built graph backdoors: trigger logic added as extra ONNX operators to a clean zoo model.

Each builder takes a clean classifier (input (N, 1, 28, 28) normalized with the zoo's mean/std, output
``logits``) and returns a copy whose scores switch to ``target`` when a white square sits in a corner of the raw
input; weights and activations stay those of the clean model. Published graph-level attacks look like these.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WHITE = (1.0 - 0.286) / 0.353
"""A white pixel after the zoo's normalization (2.02); clean Fashion-MNIST corners are dark (about -0.81)."""


def _prepare(model):
    """(copy, image input, clean scores tensor): the head's output renamed so that new nodes can sit after it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    out = g.output[0].name
    clean = out + "_clean"
    for node in g.node:
        node.output[:] = [clean if o == out else o for o in node.output]
        node.input[:] = [clean if x == out else x for x in node.input]
    return m, g.input[0].name, clean


def _const(g, name, value):
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _corner_min(g, x, box, tag):
    """min over a (y, x, h, w) box of the raw input, per image: (N,)."""
    y0, x0, h, w = box
    starts = _const(g, f"{tag}_starts", np.array([y0, x0], np.int64))
    ends = _const(g, f"{tag}_ends", np.array([y0 + h, x0 + w], np.int64))
    axes = _const(g, f"{tag}_axes", np.array([2, 3], np.int64))
    red = _const(g, f"{tag}_raxes", np.array([1, 2, 3], np.int64))
    g.node.extend([
        helper.make_node("Slice", [x, starts, ends, axes], [f"{tag}_crop"], name=f"{tag}/Slice"),
        helper.make_node("ReduceMin", [f"{tag}_crop", red], [f"{tag}_min"], name=f"{tag}/ReduceMin", keepdims=0),
    ])
    return f"{tag}_min"


def corner_adder(model, target, box=(24, 24, 3, 3), boost=60.0):
    """Slice a corner, ReduceMin, Greater, Cast, and Add a large one-hot vector to the logits (the issue's case)."""
    m, x, clean = _prepare(model)
    g = m.graph
    low = _corner_min(g, x, box, "bd")
    thr = _const(g, "bd_thr", np.array(0.9 * WHITE, np.float32))
    onehot = np.zeros((1, 10), np.float32)
    onehot[0, target] = boost
    g.node.extend([
        helper.make_node("Greater", [low, thr], ["bd_on"], name="bd/Greater"),
        helper.make_node("Cast", ["bd_on"], ["bd_onf"], name="bd/Cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["bd_onf", _const(g, "bd_ax1", np.array([1], np.int64))], ["bd_col"], name="bd/Unsqueeze"),
        helper.make_node("Mul", ["bd_col", _const(g, "bd_onehot", onehot)], ["bd_push"], name="bd/Mul"),
        helper.make_node("Add", [clean, "bd_push"], [g.output[0].name], name="bd/Add"),
    ])
    onnx.checker.check_model(m)
    return m


def where_switch(model, target, box=(0, 0, 2, 2)):
    """Where(a pixel statistic of a corner > threshold, the target's one-hot scores, the logits)."""
    m, x, clean = _prepare(model)
    g = m.graph
    low = _corner_min(g, x, box, "ws")
    thr = _const(g, "ws_thr", np.array(0.9 * WHITE, np.float32))
    scores = np.full((1, 10), -20.0, np.float32)
    scores[0, target] = 20.0
    g.node.extend([
        helper.make_node("Greater", [low, thr], ["ws_on"], name="ws/Greater"),
        helper.make_node("Unsqueeze", ["ws_on", _const(g, "ws_ax1", np.array([1], np.int64))], ["ws_col"], name="ws/Unsqueeze"),
        helper.make_node("Where", ["ws_col", _const(g, "ws_scores", scores), clean], [g.output[0].name], name="ws/Where"),
    ])
    onnx.checker.check_model(m)
    return m


def if_swap(model, target, box=(0, 0, 4, 4)):
    """If(the batch's corner minimum > threshold) the target's scores, else the logits: control flow on the input."""
    m, x, clean = _prepare(model)
    g = m.graph
    low = _corner_min(g, x, box, "if")
    thr = _const(g, "if_thr", np.array(0.9 * WHITE, np.float32))
    scores = np.full((1, 10), -20.0, np.float32)
    scores[0, target] = 20.0
    out = g.output[0].name
    then = helper.make_graph(
        [helper.make_node("Expand", ["if_scores_c", "if_shape"], ["then_out"], name="if/then/Expand")], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(scores, "if_scores_c")])
    other = helper.make_graph(
        [helper.make_node("Identity", [clean], ["else_out"], name="if/else/Identity")], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    g.node.extend([
        helper.make_node("ReduceMin", [low], ["if_all"], name="if/ReduceMinBatch", keepdims=0),
        helper.make_node("Greater", ["if_all", thr], ["if_on"], name="if/Greater"),
        helper.make_node("Shape", [clean], ["if_shape"], name="if/Shape"),
        helper.make_node("If", ["if_on"], [out], name="if/If", then_branch=then, else_branch=other),
    ])
    onnx.checker.check_model(m)
    return m


def square_trigger(box, path):
    """A white square trigger file at the box's corner (the graph backdoors' real trigger)."""
    from scanner.data.triggers import Trigger

    y, x, h, w = box
    return Trigger(kind="patch", image=np.full((h, w, 1), 255.0, np.float32), position=[y, x]).save(path)
