"""Third-party model files made at test time: ONNX Model Zoo classics with real weights, a QDQ model, head variants.

The onnx package ships the classic ONNX Model Zoo graphs (caffe2-converted, IR 3, opset 9, static batch 1, every
initializer also a graph input) with their weights as ConstantOfShape nodes; :func:`classic` gives them seeded
random weights as real initializers, shaped like the real zoo files (whose weights are far too large to commit).
"""

import glob
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def classic_names():
    return sorted(os.path.basename(p)[len("light_"):-len(".onnx")] for p in glob.glob(os.path.join(LIGHT, "light_*.onnx")))


def classic(name, seed=0):
    """light_<name>.onnx with every ConstantOfShape weight replaced by a seeded random initializer (He-scaled; BN
    variances positive), listed as a graph input too (IR 3)."""
    m = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    g = m.graph
    rng = np.random.RandomState(seed)
    inits = {t.name: t for t in g.initializer}
    bn_var = {n.input[4] for n in g.node if n.op_type == "BatchNormalization" and len(n.input) > 4}
    bn_scale = {n.input[1] for n in g.node if n.op_type == "BatchNormalization"}
    keep = []
    for node in g.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]])]
        out = node.output[0]
        if out in bn_var or out in bn_scale:
            value = rng.uniform(0.5, 1.5, size=shape)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.randn(*shape) * np.sqrt(2.0 / fan_in)
        else:
            value = rng.randn(*shape) * 0.05
        g.initializer.append(numpy_helper.from_array(value.astype(np.float32), out))
        g.input.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, shape))
    del g.node[:]
    g.node.extend(keep)
    used = {x for n in g.node for x in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
        for vi in [vi for vi in g.input if vi.name == t.name]:
            g.input.remove(vi)
    onnx.checker.check_model(m)
    return m


def share_weight(model, keep, drop):
    """A copy of ``model`` where the node reading initializer ``drop`` reads ``keep`` instead (one weight, two users)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        node.input[:] = [keep if x == drop else x for x in node.input]
    for t in [t for t in m.graph.initializer if t.name == drop]:
        m.graph.initializer.remove(t)
    for vi in [vi for vi in m.graph.input if vi.name == drop]:
        m.graph.input.remove(vi)
    onnx.checker.check_model(m)
    return m


def _head(model):
    """(index, node) of the model's final Gemm (transB=1, as both torch exporters write it)."""
    return next((i, n) for i, n in reversed(list(enumerate(model.graph.node))) if n.op_type == "Gemm")


def matmul_head(model):
    """A copy whose final Gemm(x, W, C, transB=1) is a bias-free MatMul(x, W^T): a head without bias."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    i, gemm = _head(m)
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits[gemm.input[1]])
    m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "head_w_t"))
    m.graph.node.remove(gemm)
    m.graph.node.insert(i, helper.make_node("MatMul", [gemm.input[0], "head_w_t"], list(gemm.output), name="head/MatMul"))
    used = {x for n in m.graph.node for x in n.input}
    for t in [t for t in m.graph.initializer if t.name not in used]:
        m.graph.initializer.remove(t)
    onnx.checker.check_model(m)
    return m


def conv_head(model):
    """A copy whose final Gemm is a 1x1 Conv on the (N, F, 1, 1) features, then Flatten: a TF-style head that
    computes the same scores."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    i, gemm = _head(m)
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits[gemm.input[1]])
    b = numpy_helper.to_array(inits[gemm.input[2]])
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(w.reshape(*w.shape, 1, 1), "head_conv_w"),
                          numpy_helper.from_array(b, "head_conv_b"),
                          numpy_helper.from_array(np.array([0, -1, 1, 1], np.int64), "head_shape")])
    g.node.remove(gemm)
    g.node.insert(i, helper.make_node("Flatten", ["head_map"], list(gemm.output), name="head/Flatten", axis=1))
    g.node.insert(i, helper.make_node("Conv", ["head_in", "head_conv_w", "head_conv_b"], ["head_map"], name="head/Conv",
                                      kernel_shape=[1, 1]))
    g.node.insert(i, helper.make_node("Reshape", [gemm.input[0], "head_shape"], ["head_in"], name="head/Reshape"))
    used = {x for n in g.node for x in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    onnx.checker.check_model(m)
    return m


def qdq(model_path, out, images, preprocess, count=32):
    """A statically QDQ-quantized copy of ``model_path`` (onnxruntime.quantization), calibrated on ``images``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    name = onnx.load(str(model_path)).graph.input[0].name
    pixels = images[:count]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: preprocess.to_tensor(pixels[i : i + 8])} for i in range(0, len(pixels), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ)
    return out
