"""In-graph per-channel norms: the scanner's measuring instrument.

Per image and channel of a layer's read tensor: l-inf = max |a|, l1 = sum |a|, l2 = sqrt(sum a^2) over spatial
positions (tokens for rank-3 reads). Only (N, C) arrays leave the runtime, one output per norm.

Two formulations of the conv-map norms, one per execution provider (``kernels``), because the fast kernels
differ (../shared/NOTES.md, benchmarks/RESULTS.md)::

    "reduce" (CPU): linf = ReduceMax(a) or Max(ReduceMax(a), -ReduceMin(a))   l1 = ReduceSum(a) or ReduceL1(a)
                    l2 = ReduceL2(a)                       (no full-size intermediate map)
    "pool" (CUDA):  linf = GlobalMaxPool(|a|)   l1 = GlobalAveragePool(|a|) * H*W   l2 = sqrt(GlobalAveragePool(a*a) * H*W)

``|a|`` is ``a`` itself for provably non-negative maps (after Relu, ...), which take the first forms. Rank-2
reads give ``|a|`` for all three norms; channel-last token reads (N, T, C) reduce over the tokens (the "reduce"
forms; with "pool", ReduceMax / ReduceSum of ``|a|`` and ReduceSumSquare).
"""

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from scanner.errors import ScannerError
from scanner.graph.layers import GraphIndex, _all_nodes, batch_dim, copy_model, opset_version

NORMS = ("linf", "l1", "l2")
PREFIX = "scanner"


@dataclass
class Instrumented:
    """An instrumented copy of a model and where to find what was added."""

    model: onnx.ModelProto
    layers: list
    norm_outputs: dict = field(default_factory=dict)
    slices: dict = field(default_factory=dict)
    mask_inputs: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)

    @property
    def columns(self):
        """Total number of columns in each norm output."""
        return max((stop for _, stop in self.slices.values()), default=0)


class Names:
    """Fresh tensor / node names that collide with nothing in the model."""

    def __init__(self, model):
        g = model.graph
        self.used = {t.name for t in g.initializer} | {
            v.name for v in list(g.input) + list(g.output) + list(g.value_info)
        }
        for node in _all_nodes(g):
            self.used.add(node.name)
            self.used.update(node.input)
            self.used.update(node.output)

    def __call__(self, base):
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


class _Builder:
    """Collects the nodes and initializers that instrumentation adds."""

    def __init__(self, model):
        self.names = Names(model)
        self.opset = opset_version(model)
        self.nodes = []
        self.inits = []

    def op(self, op_type, inputs, tag, **attrs):
        out = self.names(f"{PREFIX}/{tag}/{op_type}")
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=self.names(f"{PREFIX}/{tag}/{op_type}_node"), **attrs)
        )
        return out

    def const(self, value, tag):
        name = self.names(f"{PREFIX}/{tag}/const")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def reduce(self, op_type, x, axes, tag):
        """Reduce* over ``axes`` without keepdims, in the form the opset allows (axes input from 18; 13 for ReduceSum)."""
        since = 13 if op_type == "ReduceSum" else 18  # ReduceMax/Min/L1/L2/SumSquare: axes input from opset 18
        if self.opset >= since:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64), tag)], tag, keepdims=0)
        return self.op(op_type, [x], tag, axes=list(axes), keepdims=0)


KERNELS = ("reduce", "pool")


def _reduced_parts(b, layer, x, wanted):
    """{norm: (N, C)} of a map (channel-first) or token read (channel-last) by Reduce* over its spatial / token
    axes, without a full-size intermediate."""
    tag = f"L{layer.index}"
    axes = list(range(2, layer.rank)) if layer.channel_axis == 1 else list(range(1, layer.rank - 1))
    parts = {}
    if "linf" in wanted:
        top = b.reduce("ReduceMax", x, axes, tag)
        parts["linf"] = top if layer.nonnegative else b.op("Max", [top, b.op("Neg", [b.reduce("ReduceMin", x, axes, tag)], tag)], tag)
    if "l1" in wanted:
        parts["l1"] = b.reduce("ReduceSum" if layer.nonnegative else "ReduceL1", x, axes, tag)
    if "l2" in wanted:
        parts["l2"] = b.reduce("ReduceL2", x, axes, tag)
    return parts


def _norm_parts(b, layer, x, wanted, kernels="reduce"):
    """{norm: (N, C) tensor} for one layer's read tensor ``x`` (float32)."""
    tag = f"L{layer.index}"
    if layer.rank > 2 and kernels == "reduce":
        return _reduced_parts(b, layer, x, wanted)
    a = x if layer.nonnegative else b.op("Abs", [x], tag)
    if layer.rank == 2:
        return {k: a for k in wanted}
    parts = {}
    if layer.channel_axis != 1:  # channel-last token maps
        axes = list(range(1, layer.rank - 1))
        if "linf" in wanted:
            parts["linf"] = b.reduce("ReduceMax", a, axes, tag)
        if "l1" in wanted:
            parts["l1"] = b.reduce("ReduceSum", a, axes, tag)
        if "l2" in wanted:
            parts["l2"] = b.op("Sqrt", [b.reduce("ReduceSumSquare", x, axes, tag)], tag)
        return parts
    if "linf" in wanted:
        parts["linf"] = b.op("Flatten", [b.op("GlobalMaxPool", [a], tag)], tag, axis=1)
    if "l1" not in wanted and "l2" not in wanted:
        return parts
    mean_abs = b.op("GlobalAveragePool", [a], tag) if "l1" in wanted else None
    mean_sq = b.op("GlobalAveragePool", [b.op("Mul", [x, x], tag)], tag) if "l2" in wanted else None
    if layer.spatial:
        size = b.const(np.array(float(np.prod(layer.spatial)), np.float32), tag)
    else:  # positions per channel = Size(map) / Size(pooled), computed at run time
        pooled = mean_abs or mean_sq
        ratio = b.op("Div", [b.op("Size", [x], tag), b.op("Size", [pooled], tag)], tag)
        size = b.op("Cast", [ratio], tag, to=TensorProto.FLOAT)
    if mean_abs:
        parts["l1"] = b.op("Flatten", [b.op("Mul", [mean_abs, size], tag)], tag, axis=1)
    if mean_sq:
        parts["l2"] = b.op("Flatten", [b.op("Sqrt", [b.op("Mul", [mean_sq, size], tag)], tag)], tag, axis=1)
    return parts


def _output_info(gi, name):
    """A ValueInfo for exposing tensor ``name`` as a graph output."""
    vi = gi.value_info.get(name)
    if vi is not None and vi.type.tensor_type.elem_type:
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        return out
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _wanted_norms(norms):
    if norms is True:
        return NORMS
    if not norms:
        return ()
    wanted = tuple(norms)
    bad = [k for k in wanted if k not in NORMS]
    if bad:
        raise ScannerError(f"unknown norm {bad[0]!r}; choose from {', '.join(NORMS)}")
    return tuple(k for k in NORMS if k in wanted)


def instrument(model, layers, norms=True, masks=False, expose=False, features=(), kernels="reduce"):
    """A copy of ``model`` with per-channel norms of ``layers`` as extra outputs (the input is not modified).

    ``norms``: True, False or a subset of NORMS. ``kernels``: "reduce" (fast on CPU) or "pool" (fast on CUDA).
    ``masks``: add a float32 (C,) input per layer that multiplies the read tensor (all ones = unchanged; feed 0/1
    values). ``expose``: the raw read tensors as outputs.
    ``features``: extra tensor names to expose as outputs.
    """
    if kernels not in KERNELS:
        raise ScannerError(f"unknown norm kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    m = copy_model(model)
    g = m.graph
    gi = GraphIndex(m)
    b = _Builder(m)
    wanted = _wanted_norms(norms)
    layers = list({l.id: l for l in layers}.values())
    result = Instrumented(model=m, layers=layers)
    after = defaultdict(list)  # producer node index -> mask nodes to insert after it
    groups = []  # per layer: (its norm nodes, {norm: (N, C) tensor})
    start = 0
    for layer in layers:
        if layer.read not in gi.producer:
            raise ScannerError(
                f"layer {layer.id}: tensor {layer.read!r} is not produced by this model; rediscover layers"
            )
        tag = f"L{layer.index}"
        elem = gi.elem_type(layer.read)
        if masks:
            result.mask_inputs[layer.id] = _add_mask(b, g, gi, layer, elem, after)
        if wanted:
            saved, b.nodes = b.nodes, []
            x = layer.read if elem == TensorProto.FLOAT else b.op("Cast", [layer.read], tag, to=TensorProto.FLOAT)
            parts = _norm_parts(b, layer, x, wanted, kernels)
            groups.append((b.nodes, parts))
            b.nodes = saved
        result.slices[layer.id] = (start, start + layer.channels)
        start += layer.channels
        if expose:
            result.taps[layer.id] = layer.read
    tail = _norm_outputs(b, g, gi, layers, groups, wanted, result)
    existing = {o.name for o in g.output}
    for name in list(result.taps.values()) + list(features):
        if name not in gi.producer and name not in gi.inputs and name not in gi.initializers:
            raise ScannerError(f"tensor {name!r} not found in the model")
        if name not in existing:
            g.output.append(_output_info(gi, name))
            existing.add(name)
    result.features = {name: name for name in features}
    nodes = []
    for i, node in enumerate(g.node):
        nodes.append(node)
        nodes.extend(after.get(i, ()))
    del g.node[:]
    g.node.extend(nodes + tail)
    g.initializer.extend(b.inits)
    return result


def _norm_outputs(b, g, gi, layers, groups, wanted, result):
    """The nodes that take every layer's norms and give one (N, channels) output per norm kind.

    Order matters to onnxruntime's default schedule, a depth-first walk back from the graph's last nodes that
    visits a node's highest-numbered input first: with the layers' norm nodes placed last to first, and every
    layer joined into one Concat, the walk reaches the first layer's norms first and computes each layer's norms
    right after its map, which is then freed (hot in cache; memory does not grow with the number of layers).
    """
    if not groups:
        return []
    nodes, joined = [], []
    for layer, (group, parts) in reversed(list(zip(layers, groups))):
        nodes.extend(group)
        if len(wanted) == 1:
            joined.append(parts[wanted[0]])
        else:
            out = b.op("Concat", [parts[k] for k in wanted], f"L{layer.index}", axis=1)
            nodes.extend(b.nodes)
            b.nodes = []
            joined.append(out)
    joined.reverse()
    total = result.columns
    if len(wanted) == 1:
        out = b.names(f"{PREFIX}_{wanted[0]}")
        nodes.append(helper.make_node("Concat", joined, [out], name=b.names(f"{PREFIX}/norms/Concat"), axis=1))
        g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch_dim(gi), total]))
        result.norm_outputs[wanted[0]] = out
        return nodes
    every = b.op("Concat", joined, "norms", axis=1)
    nodes.extend(b.nodes)
    b.nodes = []
    for j, k in enumerate(wanted):  # the j-th kind of a layer whose columns start at lo: len(wanted) * lo + j * C
        columns = np.concatenate([len(wanted) * result.slices[l.id][0] + j * l.channels + np.arange(l.channels)
                                  for l in layers]).astype(np.int64)
        out = b.names(f"{PREFIX}_{k}")
        nodes.append(helper.make_node("Gather", [every, b.const(columns, k)], [out], name=b.names(f"{PREFIX}/{k}/Gather"), axis=1))
        g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch_dim(gi), total]))
        result.norm_outputs[k] = out
    return nodes


def _add_mask(b, g, gi, layer, elem, after):
    """Add input ``scanner_mask_<index>`` and make every consumer of ``read`` see ``read * mask``."""
    tag = f"L{layer.index}"
    name = b.names(f"{PREFIX}_mask_{layer.index}")
    g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [layer.channels]))
    producer_index = gi.producer[layer.read]
    producer = g.node[producer_index]
    pre = b.names(f"{layer.read}_unmasked")  # the producer now writes `pre`; Mul writes `read`
    for slot, out in enumerate(producer.output):
        if out == layer.read:
            producer.output[slot] = pre
    saved = b.nodes
    b.nodes = []
    mask = name
    if elem != TensorProto.FLOAT:
        mask = b.op("Cast", [mask], tag, to=elem)
    if layer.channel_axis == 1 and layer.rank > 2:
        shape = b.const(np.array([1, layer.channels] + [1] * (layer.rank - 2), np.int64), tag)
        mask = b.op("Reshape", [mask, shape], tag)
    b.nodes.append(helper.make_node("Mul", [pre, mask], [layer.read], name=b.names(f"{PREFIX}/{tag}/mask")))
    after[producer_index].extend(b.nodes)
    b.nodes = saved
    return name
