"""Build the small third-party-style ONNX files in tests/data/thirdparty/ (dev only: needs torch + torchvision).

    /work/tvvenv/bin/python tests/data/thirdparty/make.py [NAME ...]   # all files, or only these

Graphs shaped the way third parties ship them, not the way scanner's own recipes export: the dynamo exporter
with ``optimize=False`` (BatchNormalization kept, bias-free Conv biases built in the graph from Shape / Expand /
CastLike), float16 weights behind Cast nodes, weights stored flat behind Reshape nodes, a TF-style head
(pool, 1x1 Conv, Flatten / Squeeze), a bias-free MatMul head, an int64 ArgMax label as the first output and a
one-logit binary classifier. Seeded random weights (BatchNorm statistics randomized too, so no BN is an
identity). Every file is checked in onnxruntime (CPU) against torch on two random inputs (batch 1 and 3), and
``manifest.json`` records per file: what it is, exporter and options, opset, input and outputs, op types, which
ops a folded export would not have, and for every Conv / Gemm / MatMul where its weight and bias come from (an
initializer directly, or an expression of nodes).
"""

import hashlib
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer

HERE = Path(__file__).resolve().parent
warnings.filterwarnings("ignore")
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SHAPE_ONLY = {"Shape": (0,), "Size": (0,), "CastLike": (1,)}
"""Inputs of these ops that give only a shape or a dtype, never values."""


# ---------------------------------------------------------------------------------------------- models


class PlainCNN(nn.Module):
    """Three Conv-BN-ReLU blocks (the first two convs bias-free, as before a BN), Flatten, one Linear."""

    def __init__(self, in_ch=1, size=28, classes=10, head_bias=True):
        super().__init__()

        def block(i, o, bias):
            return [nn.Conv2d(i, o, 3, padding=1, bias=bias), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_ch, 8, False), *block(8, 16, False), *block(16, 32, True))
        self.fc = nn.Linear(32 * (size // 8) ** 2, classes, bias=head_bias)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class SmallResNet(ResNet):
    """torchvision ResNet with BasicBlock, [1, 1, 1, 1], widths 8-16-32-64 (ResNet.__init__ fixes 64-512)."""

    def __init__(self, widths=(8, 16, 32, 64), layers=(1, 1, 1, 1), num_classes=10):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)


class TFHead(nn.Module):
    """A backbone, then pool, a 1x1 Conv to the classes and Flatten / Squeeze (+ Softmax): TF-converted heads."""

    def __init__(self, features, channels, pool, reshape, softmax=False, classes=10):
        super().__init__()
        self.features, self.pool, self.reshape, self.softmax = features, pool, reshape, softmax
        self.logits = nn.Conv2d(channels, classes, 1)

    def forward(self, x):
        y = self.logits(self.pool(self.features(x)))
        y = torch.flatten(y, 1) if self.reshape == "flatten" else y.squeeze(3).squeeze(2)
        return torch.softmax(y, 1) if self.softmax else y


class LabelAndLogits(nn.Module):
    """Outputs (int64 label = ArgMax of the logits, float logits)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits.argmax(1), logits


def plain_cnn():
    return PlainCNN(), (1, 28, 28)


def plain_cnn_rgb():
    return PlainCNN(in_ch=3, size=32), (3, 32, 32)


def plain_cnn_nobias_head():
    return PlainCNN(head_bias=False), (1, 28, 28)


def plain_cnn_binary():
    return PlainCNN(classes=1), (1, 28, 28)


def plain_cnn_label_logits():
    return LabelAndLogits(PlainCNN()), (1, 28, 28)


def mobilenet_v3_small():
    settings, last = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return MobileNetV3(settings, last, num_classes=10), (3, 64, 64)


def resnet_tiny():
    return SmallResNet(), (3, 32, 32)


def vit_tiny():
    net = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
    return net, (3, 32, 32)


def tfhead_cnn_flatten():
    features = PlainCNN(in_ch=3, size=32).features
    return TFHead(features, 32, nn.AdaptiveAvgPool2d(1), "flatten"), (3, 32, 32)


def tfhead_mobilenet_squeeze():
    settings, last = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    features = MobileNetV3(settings, last).features  # 64x64 -> (N, 144, 2, 2)
    return TFHead(features, features[-1].out_channels, nn.AvgPool2d(2), "squeeze", softmax=True), (3, 64, 64)


def randomize(net):
    """torch's default init for every Conv2d / Linear (torchvision zeroes ViT's head and sets MobileNet's
    classifier to N(0, 0.01), which gives near-zero logits), N(0, 0.02) for any other all-zero parameter, random
    affine and running statistics for every BatchNorm (fresh BNs are near-identities)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)


def counts(net):
    attention = {id(m.out_proj) for m in net.modules() if isinstance(m, nn.MultiheadAttention)}
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    linears = sum(isinstance(m, nn.Linear) and id(m) not in attention for m in net.modules())
    return convs, linears


# ---------------------------------------------------------------------------------------------- export


def export_dynamo(net, x, path, outputs, optimize):
    """dynamo export; the node metadata keys ``pkg.torch.onnx.*`` (stack traces with this machine's paths, fx
    nodes, class hierarchies: 40% of a MobileNet file) are dropped, ``namespace`` is kept."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=outputs, dynamo=True, optimize=optimize,
                      external_data=False, dynamic_shapes=({0: batch},), verbose=False)  # fmt: skip
    model = onnx.load(str(path))
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if not p.key.startswith("pkg.torch.onnx.")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(model, str(path))


def export_legacy(net, x, path, outputs, **kw):
    axes = {name: {0: "N"} for name in ["x", *outputs]}
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=outputs, dynamo=False, dynamic_axes=axes,
                      opset_version=17, **kw)  # fmt: skip


def weights_to_fp16(model):
    """Every float initializer W becomes a float16 initializer W_fp16 and a Cast(to=FLOAT) node named W."""
    g = model.graph
    casts, keep = [], []
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT:
            keep.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], name=f"Cast_fp16_{len(casts)}", to=TensorProto.FLOAT))
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


def weights_flat_reshape(model):
    """Every Conv / Gemm / MatMul weight initializer W is stored flat (W_flat) and reshaped in the graph."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses = Counter(name for n in g.node for name in n.input)
    reshapes, keep, done = [], [], set()
    for node in g.node:
        if node.op_type in LAYER_OPS and node.input[1] in inits and uses[node.input[1]] == 1:
            done.add(node.input[1])
    for init in g.initializer:
        if init.name not in done:
            keep.append(init)
            continue
        w = numpy_helper.to_array(init)
        flat = numpy_helper.from_array(w.reshape(-1), init.name + "_flat")
        shape = numpy_helper.from_array(np.array(w.shape, dtype=np.int64), init.name + "_shape")
        keep += [flat, shape]
        reshapes.append(helper.make_node("Reshape", [flat.name, shape.name], [init.name], name=f"Reshape_weight_{len(reshapes)}"))
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = reshapes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


# ---------------------------------------------------------------------------------------------- facts


def op_counts(model):
    return Counter(n.op_type for n in model.graph.node)


class Graph:
    """Producers of a graph's tensors and how a layer input is made."""

    def __init__(self, model):
        g = model.graph
        self.inits = {i.name for i in g.initializer}
        self.inputs = {i.name for i in g.input} - self.inits
        self.producer = {o: n for n in g.node for o in n.output}
        self._static = {}

    def static(self, name):
        """True when the tensor's values do not depend on the image's values (shape / dtype reads allowed)."""
        if name in self._static:
            return self._static[name]
        if name in self.inits:
            ok = True
        elif name in self.inputs or name not in self.producer:
            ok = False
        else:
            node = self.producer[name]
            skip = SHAPE_ONLY.get(node.op_type, ())
            ok = all(self.static(i) for k, i in enumerate(node.input) if i and k not in skip)
        self._static[name] = ok
        return ok

    def describe(self, name, depth=0):
        """'init', 'const', 'input', 'act', or OP(args...) for a tensor computed from constants."""
        if not name:
            return "none"
        if name in self.inits:
            return "init"
        if name in self.inputs:
            return "input"
        node = self.producer.get(name)
        if node is None:
            return "?"
        if node.op_type == "Constant":
            return "const"
        if not self.static(name) and node.op_type not in SHAPE_ONLY:
            return "act"
        if depth >= 8:
            return f"{node.op_type}(...)"
        return f"{node.op_type}({', '.join(self.describe(i, depth + 1) for i in node.input if i)})"


def layer_facts(model):
    """Per Conv / Gemm / MatMul node: where its weight and bias come from."""
    g = Graph(model)
    producers = {n.name for n in model.graph.node}
    assert len(producers) == len(model.graph.node), "node names are not unique"
    layers = []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        if node.op_type == "MatMul":
            static = [i for i in node.input if g.static(i)]
            if not static:
                layers.append({"node": node.name, "op": "MatMul", "weight": "activation x activation", "bias": "none"})
                continue
            weight, bias = static[0], None
            (out,) = node.output
            after = [n for n in model.graph.node if out in n.input]
            if len(after) == 1 and after[0].op_type == "Add":
                bias = next((i for i in after[0].input if i != out and g.static(i)), None)
        else:
            weight = node.input[1]
            bias = node.input[2] if len(node.input) > 2 else None
        layers.append({"node": node.name, "op": node.op_type, "weight": g.describe(weight), "bias": g.describe(bias)})
    return layers


def summarize(layers, key):
    rows = [l[key] for l in layers if l["weight"] != "activation x activation"]
    ops = sorted({tok for r in rows for tok in r.replace("(", " ").replace(")", " ").replace(",", " ").split()} - {"init", "const", "input", "act", "none", "..."})
    return {"layers": len(rows), "initializer": sum(r == "init" for r in rows), "none": sum(r == "none" for r in rows),
            "computed": sum(r not in ("init", "none") for r in rows), "producer_ops": ops,
            "forms": dict(sorted(Counter(rows).items()))}  # fmt: skip


def value_info(v):
    t = v.type.tensor_type
    dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name}


def check(path, net, shape, atol):
    """onnxruntime (CPU) against torch on two random inputs (batch 1 and 3); returns the largest difference."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(123)
    worst, used, scale = 0.0, [], 0.0
    for n in (1, 3):
        x = torch.randn(n, *shape, generator=gen)
        with torch.no_grad():
            want = net(x)
        want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
        got = sess.run(None, {"x": x.numpy()})
        assert len(got) == len(want), path
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, (path, g.shape, w.shape, g.dtype, w.dtype)
            if g.dtype.kind == "i":
                assert (g == w).all(), path
                continue
            diff = float(np.abs(g - w).max())
            assert diff <= atol, (path, diff)
            worst, scale = max(worst, diff), max(scale, float(np.abs(w).max()))
        used.append([n, *shape])
    return {"inputs": used, "atol": atol, "max_abs_diff": float(f"{worst:.3g}"), "max_abs_output": float(f"{scale:.3g}")}


# ---------------------------------------------------------------------------------------------- files

DYN_NOOPT = "torch.onnx.export(dynamo=True, optimize=False, external_data=False, dynamic_shapes batch)"
DYN = "torch.onnx.export(dynamo=True, optimize=True (default), external_data=False, dynamic_shapes batch)"
LEGACY = "torch.onnx.export(dynamo=False, opset_version=17, do_constant_folding=True (default), dynamic_axes batch)"

FILES = [
    # name, builder, kind, outputs, what
    ("cnn_bn_dynamo_noopt", plain_cnn, "dynamo-noopt", ["logits"],
     "plain 3-conv CNN with BatchNorm (convs 1-2 bias-free), 1x28x28, 10 classes"),
    ("cnn_bn_rgb_dynamo_noopt", plain_cnn_rgb, "dynamo-noopt", ["logits"],
     "plain 3-conv CNN with BatchNorm (convs 1-2 bias-free), 3x32x32, 10 classes"),
    ("mobilenet_v3_small_dynamo_noopt", mobilenet_v3_small, "dynamo-noopt", ["logits"],
     "torchvision MobileNetV3-small, width 0.25, 3x64x64, 10 classes"),
    ("resnet_tiny_dynamo_noopt", resnet_tiny, "dynamo-noopt", ["logits"],
     "torchvision ResNet, BasicBlock [1,1,1,1], widths 8-16-32-64, 3x32x32, 10 classes"),
    ("vit_tiny_dynamo_noopt", vit_tiny, "dynamo-noopt", ["logits"],
     "torchvision ViT (image 32, patch 16, 2 layers, 2 heads, hidden 64, mlp 128), 10 classes"),
    ("resnet_tiny_fp16_weights", resnet_tiny, "legacy+fp16", ["logits"],
     "small ResNet (as resnet_tiny_dynamo_noopt), legacy export, then every float initializer stored as float16 "
     "and Cast to float32 in the graph"),
    ("cnn_reshape_weights", plain_cnn, "legacy+reshape", ["logits"],
     "plain CNN, legacy export (BN folded), then every Conv/Gemm weight stored flat (1-D) and Reshaped in the graph"),
    ("tfhead_cnn_flatten", tfhead_cnn_flatten, "legacy", ["logits"],
     "TF-style head: plain CNN features (3x32x32), GlobalAveragePool, 1x1 Conv to 10 channels, Flatten to (N, 10)"),
    ("tfhead_mobilenet_squeeze", tfhead_mobilenet_squeeze, "legacy", ["probs"],
     "TF-style head: MobileNetV3-small (0.25) features (3x64x64), AveragePool 2x2, 1x1 Conv to 10 channels, "
     "Squeeze to (N, 10), Softmax"),
    ("cnn_matmul_head_legacy", plain_cnn_nobias_head, "legacy", ["logits"],
     "plain CNN whose final Linear has bias=False, legacy export"),
    ("cnn_matmul_head_dynamo", plain_cnn_nobias_head, "dynamo", ["logits"],
     "plain CNN whose final Linear has bias=False, dynamo export (default optimize)"),
    ("cnn_label_logits", plain_cnn_label_logits, "legacy", ["label", "logits"],
     "plain CNN with two outputs: first the int64 label (ArgMax of the logits), second the float logits (N, 10)"),
    ("cnn_binary_one_logit", plain_cnn_binary, "legacy", ["logit"],
     "plain CNN binary classifier with one logit, output (N, 1)"),
]  # fmt: skip

OPTIONS = {
    "dynamo-noopt": DYN_NOOPT,
    "dynamo": DYN,
    "legacy": LEGACY,
    "legacy+fp16": LEGACY + "; then onnx: float initializers -> float16 initializer + Cast(to=FLOAT)",
    "legacy+reshape": LEGACY + "; then onnx: Conv/Gemm weight -> flat 1-D initializer + int64 shape + Reshape",
}


def build_file(i, name, build, kind, outputs, what, tmp):
    torch.manual_seed(i)
    net, shape = build()
    randomize(net)
    net.eval()
    path = HERE / f"{name}.onnx"
    path.unlink(missing_ok=True)
    x = torch.randn(2, *shape)
    folded = None  # the same model exported the ordinary way, to tell which ops are the third party's
    if kind == "dynamo-noopt":
        export_dynamo(net, x, path, outputs, optimize=False)
        folded = tmp / f"{name}.folded.onnx"
        export_dynamo(net, x, folded, outputs, optimize=True)
        folded_as = "the same model, dynamo with optimize=True"
    elif kind == "dynamo":
        export_dynamo(net, x, path, outputs, optimize=True)
    elif kind == "legacy":
        export_legacy(net, x, path, outputs)
    else:
        folded = tmp / f"{name}.legacy.onnx"
        export_legacy(net, x, folded, outputs)
        post = weights_to_fp16 if kind == "legacy+fp16" else weights_flat_reshape
        model = post(onnx.load(str(folded)))
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        folded_as = "the legacy export before post-processing"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = op_counts(model)
    layers = layer_facts(model)
    conv, linear = counts(net)
    entry = {
        "what": what,
        "exporter": kind,
        "options": OPTIONS[kind],
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "input": value_info(model.graph.input[0]),
        "outputs": [value_info(o) for o in model.graph.output],
        "op_types": dict(sorted(ops.items())),
        "conv2d": conv,
        "linear": linear,
        "weights": summarize(layers, "weight"),
        "biases": summarize(layers, "bias"),
        "layer_weights": layers,
    }
    if folded is not None:
        base = op_counts(onnx.load(str(folded)))
        entry["compared_with"] = folded_as
        entry["ops_not_in_folded"] = sorted(set(ops) - set(base))
        entry["op_count_delta"] = {k: ops[k] - base[k] for k in sorted(set(ops) | set(base)) if ops[k] != base[k]}
    entry["check"] = check(path, net, shape, 1e-2 if kind == "legacy+fp16" else 1e-4)
    entry["size_bytes"] = path.stat().st_size
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["size_bytes"] < 1_000_000, (name, entry["size_bytes"])
    return path, entry


def main(only=()):
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, build, kind, outputs, what) in enumerate(FILES):
            if only and name not in only:
                continue
            path, entry = build_file(i, name, build, kind, outputs, what, Path(tmp))
            manifest[path.name] = entry
            w = entry["weights"]
            print(f"{name:34s} {kind:15s} opset {entry['opset']} {entry['size_bytes'] / 1e3:7.1f} kB  weights: "
                  f"{w['initializer']} init / {w['computed']} computed {w['producer_ops']}  diff {entry['check']['max_abs_diff']} of {entry['check']['max_abs_output']}",
                  flush=True)  # fmt: skip
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


if __name__ == "__main__":
    print("torch", torch.__version__, "torchvision", torchvision.__version__, "onnx", onnx.__version__, "onnxruntime", ort.__version__)
    main(sys.argv[1:])
