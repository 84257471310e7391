"""Fuzzing helpers shared by tests/test_fuzz.py (short seeded runs) and fuzz/fuzz_loader.py (long runs).

- :func:`mutate_bytes` / :func:`proto_edit`: hostile variants of a real model file (bit flips, truncation,
  spliced bytes, protobuf field edits).
- :func:`random_graph`: a structurally random small image classifier built with ``graphs.Net``.
- :func:`check_loader`: the loader property: a file either loads (and then inspects and runs) or is refused
  with a ScannerError; any other exception is a bug.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphs
from scanner.errors import ScannerError

BYTE_OPS = ("flip", "truncate", "set", "insert", "delete", "splice")
PROTO_EDITS = (
    "ir_version", "opset", "input_dim", "input_rank", "input_dtype", "op_type", "domain", "drop_node",
    "init_dims", "init_dtype", "raw_data", "external", "attribute", "node_input", "dup_output", "metadata",
    "second_input", "no_output", "sparse",
)  # fmt: skip


def mutate_bytes(data, ops):
    """Apply ``ops`` (tuples ``(kind, position fraction, value)``) to ``data``; returns new bytes."""
    buf = bytearray(data)
    for kind, frac, value in ops:
        if not buf:
            break
        pos = min(int(frac * len(buf)), len(buf) - 1)
        if kind == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "set":
            buf[pos] = value % 256
        elif kind == "insert":
            buf[pos:pos] = bytes([value % 256]) * (1 + value % 7)
        elif kind == "delete":
            del buf[pos : pos + 1 + value % 16]
        elif kind == "splice":  # copy a chunk from elsewhere (keeps protobuf-looking structure)
            src = (pos * 7 + value) % len(buf)
            buf[pos : pos + 8] = buf[src : src + 8]
    return bytes(buf)


def proto_edit(model, edit, value, rng):
    """A copy of ``model`` with one protobuf field edit (``value`` an int, ``rng`` a numpy Generator)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    node = g.node[value % len(g.node)] if g.node else None
    init = g.initializer[value % len(g.initializer)] if g.initializer else None
    big = int(rng.choice([-1, 0, 1, 2, 3, 255, 2**31 - 1, 2**40, -(2**62)]))
    if edit == "ir_version":
        m.ir_version = big
    elif edit == "opset":
        m.opset_import[0].version = big
    elif edit == "input_dim":
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            dims[value % len(dims)].dim_value = big
    elif edit == "input_rank":
        dims = g.input[0].type.tensor_type.shape.dim
        del dims[value % (len(dims) + 1) :]
    elif edit == "input_dtype":
        g.input[0].type.tensor_type.elem_type = value % 26
    elif edit == "op_type" and node is not None:
        node.op_type = str(rng.choice(["Relu", "Conv", "Gemm", "Loop", "If", "Unknown", "", "MatMul", "Concat"]))
    elif edit == "domain" and node is not None:
        node.domain = str(rng.choice(["com.evil", "ai.onnx.ml", "com.microsoft", "x" * 300]))
        m.opset_import.append(helper.make_opsetid(node.domain, 1))
    elif edit == "drop_node" and node is not None:
        g.node.remove(node)
    elif edit == "init_dims" and init is not None:
        if init.dims:
            init.dims[value % len(init.dims)] = big
        else:
            init.dims.append(big)
    elif edit == "init_dtype" and init is not None:
        init.data_type = value % 26
    elif edit == "raw_data" and init is not None:
        raw = init.raw_data
        cut = int(rng.integers(0, len(raw) + 1)) if raw else 0
        init.raw_data = raw[:cut] + (b"\xff\xff\xc0\x7f" if value % 2 else b"")
    elif edit == "external" and init is not None:
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        loc = str(rng.choice(["w.bin", "../w.bin", "/etc/hostname", "", ".", "a/../../b", "\x00x"]))
        for key, v in (("location", loc), ("offset", str(big)), ("length", str(value))):
            init.external_data.add(key=key, value=v)
    elif edit == "attribute" and node is not None:
        if node.attribute:
            a = node.attribute[value % len(node.attribute)]
            if a.ints:
                a.ints[0] = big
            else:
                a.i = big
        else:
            node.attribute.append(helper.make_attribute("group", big))
    elif edit == "node_input" and node is not None and node.input:
        node.input[value % len(node.input)] = str(rng.choice(["", "missing", g.input[0].name, node.output[0]]))
    elif edit == "dup_output" and node is not None and len(g.node) > 1:
        g.node[(value + 1) % len(g.node)].output[0] = node.output[0]
    elif edit == "metadata":
        m.metadata_props.add(key="scanner.preprocess", value=str(rng.choice(['{"size": [1, 1]}', "{", '{"color": 5}', "[]", '{"size": [28, 28], "mean": [1e999]}'])))
    elif edit == "second_input":
        g.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 1, 1, 1]))
    elif edit == "no_output":
        del g.output[:]
    elif edit == "sparse" and init is not None:
        sp = m.graph.sparse_initializer.add()
        sp.values.CopyFrom(helper.make_tensor("sv", TensorProto.FLOAT, [2], [float("nan"), 1.0]))
        sp.indices.CopyFrom(helper.make_tensor("si", TensorProto.INT64, [2], [0, big % 5]))
        sp.dims.extend([5])
    return m


def check_loader(path, run=True):
    """The loader property. Returns "refused", "loaded" or "ran"; any exception but ScannerError propagates."""
    from scanner.commands.inspect import inspect_model
    from scanner.graph.model import load_model
    from scanner.runtime.session import Session

    try:
        model = load_model(path)
    except ScannerError:
        return "refused"
    try:
        inspect_model(path)
        if not run:
            return "loaded"
        session = Session(model.proto, device="cpu", threads=1, source=path)
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in model.input.shape]
        if int(np.prod(shape)) <= 1 << 20:
            session.run(np.zeros(shape, model.input_dtype))
    except ScannerError:
        return "refused"
    return "ran"


def random_graph(draw_int, draw_bool, opset=17):
    """A random small image classifier; ``draw_int(lo, hi)`` and ``draw_bool()`` supply the choices."""
    c = draw_int(1, 3)
    size = draw_int(4, 9)
    net = graphs.Net([c, size, size], opset, seed=draw_int(0, 1000), name="random")
    x = "x"
    for i in range(draw_int(1, 5)):
        kind = draw_int(0, 7)
        if kind <= 2:  # conv, grouped/depthwise sometimes, bias or not
            cout = draw_int(1, 8)
            group = c if (draw_bool() and cout % c == 0) else 1
            x = net.conv(x, c, cout, k=draw_int(0, 1) * 2 + 1, group=group, bias=draw_bool(), name=f"/c{i}/Conv")
            c = cout
        elif kind == 3:
            x = net.bn(x, c)
        elif kind == 4:
            x = net.relu(x)
        elif kind == 5:
            x = net.node(["LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid"][draw_int(0, 3)], [x])
        elif kind == 6 and size >= 2:
            x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            size //= 2
        else:  # residual: conv with the same channels, added to its input
            y = net.relu(net.conv(x, c, c, name=f"/r{i}/Conv"))
            x = net.node("Add", [y, x])
    pooled = draw_bool()
    x = net.node("Flatten", [net.node("GlobalAveragePool", [x]) if pooled else x], axis=1)
    width = c if pooled else c * size * size
    if draw_bool():
        hidden = draw_int(2, 8)
        x = net.relu(net.gemm(x, width, hidden, trans_b=draw_int(0, 1), name="/fc1/Gemm"))
        width = hidden
    if draw_bool():
        x = net.matmul(x, width, 10, name="/fc/MatMul")
    else:
        x = net.gemm(x, width, 10, trans_b=draw_int(0, 1), name="/fc/Gemm")
    return net.build(x)
