"""Small hand-built ONNX models for the tests (seeded random weights, onnx.helper only).

Each builder returns a checked ModelProto whose single input is ``x`` and first output ``logits``.
"""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSETS = (13, 17, 20)


class Net:
    """A tiny graph builder: ``net.conv(x, 8)`` adds a node with random weights and returns its output."""

    def __init__(self, shape, opset=17, seed=0, batch="N", name="net"):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.name = name
        self.nodes, self.inits = [], []
        self.count = 0
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch] + list(shape))

    def fresh(self, base):
        self.count += 1
        return f"{base}_{self.count}"

    def weight(self, value, base="w"):
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def randn(self, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return (self.rng.standard_normal(shape) * (scale or 1.0 / np.sqrt(max(fan_in, 1)))).astype(np.float32)

    def node(self, op, inputs, name=None, outputs=1, **attrs):
        name = name if name is not None else self.fresh(f"/{op.lower()}/{op}")
        outs = [self.fresh(f"t_{op.lower()}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x, cin, cout, k=3, group=1, bias=True, stride=1, weight=None, name=None):
        w = weight or self.weight(self.randn(cout, cin // group, k, k), "conv.weight")
        inputs = [x, w] + ([self.weight(self.randn(cout, scale=0.1), "conv.bias")] if bias else [])
        return self.node("Conv", inputs, name, group=group, pads=[k // 2] * 4, strides=[stride, stride])

    def conv_transpose(self, x, cin, cout, group=1, name=None):
        w = self.weight(self.randn(cin, cout // group, 2, 2), "deconv.weight")
        return self.node(
            "ConvTranspose", [x, w, self.weight(self.randn(cout, scale=0.1))], name, group=group, strides=[2, 2]
        )

    def bn(self, x, c):
        scale = self.weight(self.rng.uniform(0.5, 1.5, c), "bn.weight")
        bias = self.weight(self.rng.uniform(-0.5, 0.5, c), "bn.bias")
        mean = self.weight(self.rng.uniform(-0.3, 0.3, c), "bn.mean")
        var = self.weight(self.rng.uniform(0.5, 2.0, c), "bn.var")
        return self.node("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)

    def relu(self, x):
        return self.node("Relu", [x])

    def gemm(self, x, cin, cout, trans_b=1, bias=True, name=None, alpha=None):
        w = self.randn(cout, cin) if trans_b else self.randn(cin, cout)
        inputs = [x, self.weight(w, "fc.weight")] + (
            [self.weight(self.randn(cout, scale=0.1), "fc.bias")] if bias else []
        )
        attrs = {"transB": trans_b} if trans_b else {}
        if alpha is not None:
            attrs["alpha"] = alpha
        return self.node("Gemm", inputs, name, **attrs)

    def matmul(self, x, cin, cout, bias=True, name=None):
        y = self.node("MatMul", [x, self.weight(self.randn(cin, cout), "mm.weight")], name)
        return self.node("Add", [y, self.weight(self.randn(cout, scale=0.1), "mm.bias")]) if bias else y

    def head(self, x, cin, classes=10, trans_b=1, bias=True):
        """GlobalAveragePool (for maps), Flatten and a Gemm to ``classes`` logits."""
        return self.gemm(self.node("Flatten", [x], axis=1), cin, classes, trans_b=trans_b, bias=bias, name="/fc/Gemm")

    def build(self, logits, extra_outputs=()):
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits/Identity"))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs]
        graph = helper.make_graph(self.nodes, self.name, [self.input], outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="tests.graphs"
        )
        model.ir_version = IR_VERSION
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model, full_check=True)
        return model


def _gap(net, x):
    return net.node("GlobalAveragePool", [x])


def conv_bn_relu(opset=17, batch="N", seed=0, size=16):
    """Conv-BN(unfused)-Relu twice, then a Gemm head."""
    net = Net([3, size, size], opset, seed, batch, "conv_bn_relu")
    x = net.relu(net.bn(net.conv("x", 3, 8, name="/conv1/Conv"), 8))
    x = net.relu(net.bn(net.conv(x, 8, 16, stride=2, bias=False, name="/conv2/Conv"), 16))
    return net.build(net.head(_gap(net, x), 16))


def conv_relu(opset=17, batch="N", seed=1, size=16, dynamic_spatial=False):
    """Folded Conv-Relu layers with a MaxPool between (the common exported form)."""
    net = Net([3, "H" if dynamic_spatial else size, "W" if dynamic_spatial else size], opset, seed, batch, "conv_relu")
    x = net.relu(net.conv("x", 3, 8, name="/conv1/Conv"))
    x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.relu(net.conv(x, 8, 12, name="/conv2/Conv"))
    return net.build(net.head(_gap(net, x), 12))


def grouped(opset=17, seed=2):
    """Grouped conv, depthwise conv and grouped ConvTranspose."""
    net = Net([4, 8, 8], opset, seed, "N", "grouped")
    x = net.relu(net.conv("x", 4, 8, group=2, name="/grouped/Conv"))
    x = net.relu(net.conv(x, 8, 8, group=8, name="/depthwise/Conv"))
    x = net.relu(net.conv_transpose(x, 8, 6, group=2, name="/up/ConvTranspose"))
    x = net.conv_transpose(x, 6, 4, name="/up2/ConvTranspose")  # signed, no activation
    return net.build(net.head(_gap(net, x), 4))


def residual(opset=17, seed=3):
    """A residual block: Conv-BN-Relu, Conv-BN, Add(skip), Relu."""
    net = Net([3, 8, 8], opset, seed, "N", "residual")
    stem = net.relu(net.conv("x", 3, 8, name="/stem/Conv"))
    x = net.relu(net.bn(net.conv(stem, 8, 8, bias=False, name="/block/conv1/Conv"), 8))
    x = net.bn(net.conv(x, 8, 8, bias=False, name="/block/conv2/Conv"), 8)
    x = net.relu(net.node("Add", [x, stem], name="/block/Add"))
    return net.build(net.head(_gap(net, x), 8))


def mlp(opset=17, seed=4):
    """Gemm transB=0 with C + Relu, Gemm transB=1 without C + LeakyRelu, Gemm head with alpha/beta defaults."""
    net = Net([2, 4, 4], opset, seed, "N", "mlp")
    x = net.node("Flatten", ["x"], axis=1)
    x = net.relu(net.gemm(x, 32, 24, trans_b=0, name="/fc1/Gemm"))
    x = net.node("LeakyRelu", [net.gemm(x, 24, 16, trans_b=1, bias=False, name="/fc2/Gemm")], alpha=0.1)
    return net.build(net.gemm(x, 16, 10, trans_b=0, bias=False, name="/fc/Gemm"))


def matmul_add(opset=17, seed=5):
    """MatMul+Add+Relu hidden layer and a MatMul+Add head, then Softmax as the only output."""
    net = Net([20], opset, seed, "N", "matmul_add")
    x = net.relu(net.matmul("x", 20, 16, name="/fc1/MatMul"))
    x = net.matmul(x, 16, 10, name="/fc/MatMul")
    return net.build(net.node("Softmax", [x], axis=1))


def tokens(opset=17, seed=6, t=5):
    """Token maps (N, T, C): MatMul+Add+Relu, MatMul+Add (signed), Flatten, Gemm head."""
    net = Net([t, 8], opset, seed, "N", "tokens")
    x = net.relu(net.matmul("x", 8, 16, name="/tok1/MatMul"))
    x = net.matmul(x, 16, 12, name="/tok2/MatMul")
    return net.build(net.gemm(net.node("Flatten", [x], axis=1), t * 12, 10, name="/fc/Gemm"))


def sigmoid_conv(opset=17, seed=7):
    """A Sigmoid-activated conv (f(0) != 0: pruning is refused)."""
    net = Net([3, 8, 8], opset, seed, "N", "sigmoid_conv")
    x = net.node("Sigmoid", [net.conv("x", 3, 6, name="/conv1/Conv")])
    return net.build(net.head(_gap(net, x), 6))


def activations(opset=17, seed=8):
    """Clip(0,6), SiLU (x*Sigmoid(x)), HardSwish (opset 14+), Gelu (20+), Tanh, Elu and a HardSigmoid conv."""
    net = Net([3, 8, 8], opset, seed, "N", "activations")
    x = net.conv("x", 3, 6, name="/c_clip/Conv")
    if opset >= 11:
        x = net.node("Clip", [x, net.weight(np.array(0.0)), net.weight(np.array(6.0))])
    else:
        x = net.node("Clip", [x], min=0.0, max=6.0)
    x = net.conv(x, 6, 6, name="/c_silu/Conv")
    x = net.node("Mul", [x, net.node("Sigmoid", [x])])
    x = net.node("HardSwish" if opset >= 14 else "Relu", [net.conv(x, 6, 6, name="/c_hswish/Conv")])
    if opset >= 20:
        x = net.node("Gelu", [net.conv(x, 6, 6, name="/c_gelu/Conv")])
    x = net.node("Tanh", [net.conv(x, 6, 6, name="/c_tanh/Conv")])
    x = net.node("Elu", [net.conv(x, 6, 6, name="/c_elu/Conv")])
    x = net.node("HardSigmoid", [net.conv(x, 6, 6, name="/c_hsig/Conv")])
    return net.build(net.head(_gap(net, x), 6))


def shared_weight(opset=17, seed=9):
    """Two Convs that read the same weight initializer."""
    net = Net([3, 8, 8], opset, seed, "N", "shared_weight")
    x = net.relu(net.conv("x", 3, 8, name="/stem/Conv"))
    w = net.weight(net.randn(8, 8, 3, 3), "shared.weight")
    x = net.relu(net.conv(x, 8, 8, weight=w, name="/a/Conv"))
    x = net.relu(net.conv(x, 8, 8, weight=w, name="/b/Conv"))
    return net.build(net.head(_gap(net, x), 8))


def identity_weight(opset=17, seed=13):
    """A Conv weight read through Identity of an initializer (how torch's legacy exporter shares weights)."""
    net = Net([3, 8, 8], opset, seed, "N", "identity_weight")
    w = net.node("Identity", [net.weight(net.randn(6, 3, 3, 3), "conv.weight")], name="/conv1/weight/Identity")
    x = net.relu(net.conv("x", 3, 6, weight=w, name="/conv1/Conv"))
    return net.build(net.head(_gap(net, x), 6))


def constant_weight(opset=17, seed=10):
    """Conv weight and bias from Constant nodes (and a Gemm head with a Constant weight through Identity)."""
    net = Net([3, 8, 8], opset, seed, "N", "constant_weight")
    w = net.node("Constant", [], name="/conv1/weight", value=numpy_helper.from_array(net.randn(6, 3, 3, 3), "w"))
    b = net.node("Constant", [], name="/conv1/bias", value=numpy_helper.from_array(net.randn(6, scale=0.1), "b"))
    x = net.relu(net.node("Conv", ["x", w, b], name="/conv1/Conv", pads=[1, 1, 1, 1]))
    fw = net.node("Constant", [], name="/fc/weight", value=numpy_helper.from_array(net.randn(10, 6), "fw"))
    fw = net.node("Identity", [fw], name="/fc/weight/Identity")
    x = net.node("Flatten", [_gap(net, x)], axis=1)
    return net.build(net.node("Gemm", [x, fw, net.weight(net.randn(10, scale=0.1))], name="/fc/Gemm", transB=1))


def unnamed(opset=17, seed=11):
    """Nodes without names (ids are synthesized from op type and position)."""
    model = conv_relu(opset, seed=seed)
    for node in model.graph.node:
        node.name = ""
    return model


def conv1d(opset=17, seed=12):
    """A 1-D conv (N, C, L) map."""
    net = Net([3, 12], opset, seed, "N", "conv1d")
    w = net.weight(net.randn(5, 3, 3))
    x = net.relu(net.node("Conv", ["x", w], name="/conv1d/Conv", pads=[1, 1]))
    return net.build(net.head(_gap(net, x), 5))


def no_layers(opset=17):
    """No neuron layer at all."""
    net = Net([3, 4, 4], opset, 0, "N", "no_layers")
    return net.build(net.node("Flatten", [net.relu("x")], axis=1))


def with_metadata(model):
    """``model`` with model/node metadata, doc strings and a version (to check they survive)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    onnx.helper.set_model_props(model, {"author": "tests", "scanner.zoo": '{"k": 1}'})
    model.doc_string = "a test model"
    model.model_version = 7
    model.producer_version = "1.2.3"
    model.graph.doc_string = "graph doc"
    for node in model.graph.node:
        entry = node.metadata_props.add()
        entry.key, entry.value = "origin", node.name
        node.doc_string = f"doc {node.name}"
    return model


ALL = {
    "conv_bn_relu": conv_bn_relu,
    "conv_relu": conv_relu,
    "grouped": grouped,
    "residual": residual,
    "mlp": mlp,
    "matmul_add": matmul_add,
    "tokens": tokens,
    "sigmoid_conv": sigmoid_conv,
    "activations": activations,
    "shared_weight": shared_weight,
    "constant_weight": constant_weight,
    "identity_weight": identity_weight,
    "unnamed": unnamed,
    "conv1d": conv1d,
}
"""Builders that take an ``opset`` argument and have at least one layer."""


def inputs(model, n=4, seed=0, spatial=None):
    """Random float32 inputs for ``model`` (dynamic dims: batch ``n``, others ``spatial`` or 8)."""
    dims = []
    for i, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        else:
            dims.append(n if i == 0 else (spatial or 8))
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def session(model):
    """A CPU onnxruntime session for an in-memory model."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model, x, **feeds):
    """{output name: array} for input ``x`` (the first graph input) and extra ``feeds``."""
    sess = session(model)
    feeds = {sess.get_inputs()[0].name: x, **feeds}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
