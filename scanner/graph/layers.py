"""Neuron layers of an ONNX classifier and the tensors where their channels are read.

A layer is a Conv, ConvTranspose, Gemm or MatMul (with a constant 2-D weight) node. Its channels are read
after the chain that directly follows it on a single-consumer path: a constant bias Add (Gemm/MatMul), an
unfused BatchNormalization, and one activation. A residual Add mixes other tensors and ends the chain.
"""

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from scanner.errors import NothingToAnalyse, ScannerError

CONV_OPS = ("Conv", "ConvTranspose")
LINEAR_OPS = ("Gemm", "MatMul")
NEURON_OPS = CONV_OPS + LINEAR_OPS
ACTIVATIONS = (
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Gelu",
    "Softplus", "PRelu", "Celu", "Mish", "Softsign",
)  # fmt: skip
NONNEGATIVE = ("Relu", "Sigmoid", "HardSigmoid", "Softplus")
"""Activations whose output is >= 0 for every input (Clip depends on its min)."""
NOT_ZERO_PRESERVING = ("Sigmoid", "Softplus")
"""Activations with f(0) != 0 (HardSigmoid and Clip depend on their parameters)."""
HEAD_PASS = ("Add", "Flatten", "Softmax", "LogSoftmax", "Identity", "Reshape", "Squeeze", "Dropout", "Cast", "Sigmoid",
             "QuantizeLinear", "DequantizeLinear")
"""Ops between the head's output and a graph output."""


@dataclass(frozen=True)
class Layer:
    """One neuron layer and where its channels are read."""

    id: str
    op_type: str
    node: str
    output: str
    read: str
    chain: tuple
    chain_nodes: tuple
    channels: int
    channel_axis: int
    rank: int
    spatial: tuple
    nonnegative: bool
    zero_preserving: bool
    is_last_conv: bool
    is_head: bool
    index: int
    input: str = ""
    """The neuron op's data input (the features a head Gemm/MatMul reads)."""


def node_name(node, index):
    """A node's name, or ``{op_type}_{index}`` when it has none."""
    return node.name or f"{node.op_type}_{index}"


def opset_version(model):
    """The model's default-domain opset."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ScannerError("model imports no default-domain opset")


def copy_model(model):
    """A deep copy of a ModelProto."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _subgraphs(node):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_nodes(graph):
    """Nodes of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


class GraphIndex:
    """Producers, consumers, constants and inferred types of a model's main graph (read-only view)."""

    def __init__(self, model, infer=True):
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.names = [node_name(n, i) for i, n in enumerate(self.nodes)]
        self.by_name = {name: i for i, name in enumerate(self.names)}
        self.producer = {out: i for i, n in enumerate(self.nodes) for out in n.output if out}
        self.consumers = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for slot, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((i, slot))
            for sub in _subgraphs(n):  # outer-scope references count as uses
                for sn in _all_nodes(sub):
                    for name in sn.input:
                        if name:
                            self.consumers[name].append((i, -1))
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}
        self.value_info = _infer(model) if infer else {}

    def const(self, name):
        """The value of a constant tensor (initializer, Constant node, through Identity, Transpose and
        DequantizeLinear), else None.

        A Transpose of a constant is how the legacy exporter without constant folding feeds MatMul weights; a
        DequantizeLinear of a constant is a QDQ model's quantized weight (its float value is returned)."""
        seen, ops = 0, []
        while name and seen < 64:
            if name in self.initializers:
                value = numpy_helper.to_array(self.initializers[name])
                break
            i = self.producer.get(name)
            if i is None:
                return None
            node = self.nodes[i]
            if node.op_type == "Constant":
                value = constant_value(node)
                break
            if node.op_type in ("Transpose", "DequantizeLinear"):
                ops.append(node)
            elif node.op_type != "Identity":
                return None
            name, seen = node.input[0], seen + 1
        else:
            return None
        for node in reversed(ops):  # innermost first
            if value is None:
                return None
            value = np.transpose(value, self.attr(node, "perm")) if node.op_type == "Transpose" else self.dequantize(node, value)
        return value

    def quantized(self, name):
        """The DequantizeLinear node that makes tensor ``name`` (through Identity), else None."""
        for _ in range(64):
            i = self.producer.get(name)
            if i is None:
                return None
            node = self.nodes[i]
            if node.op_type == "DequantizeLinear":
                return node
            if node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def dequantize(self, node, q):
        """``(q - zero_point) * scale`` of a DequantizeLinear node (per tensor or along its axis), as float32."""
        scale = self.const(node.input[1])
        zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            return None
        shape = _axis_shape(q, scale, self.attr(node, "axis", 1))
        x = np.asarray(q, np.float64) - (0.0 if zp is None else np.asarray(zp, np.float64).reshape(shape))
        return (x * np.asarray(scale, np.float64).reshape(shape)).astype(np.float32)

    def shape(self, name):
        """Inferred dims (int, or None where unknown) of a tensor, or None when its rank is unknown."""
        vi = self.value_info.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    def dims(self, name):
        """Inferred dims of a tensor: int, a symbol name, or None where unknown; None when the rank is unknown.

        Symbols onnx invents for unknown dims (``unk__N``) count as unknown."""
        vi = self.value_info.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None)
            for d in vi.type.tensor_type.shape.dim
        ]

    def elem_type(self, name, default=onnx.TensorProto.FLOAT):
        """Inferred element type of a tensor."""
        vi = self.value_info.get(name)
        return vi.type.tensor_type.elem_type if vi is not None and vi.type.tensor_type.elem_type else default

    def attr(self, node, name, default=None):
        """A node attribute's value."""
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


def _axis_shape(q, scale, axis):
    """The broadcast shape of a per-axis scale (or zero point) for a tensor ``q``; () for a scalar."""
    if np.size(scale) == 1:
        return ()
    shape = [1] * np.ndim(q)
    shape[axis if axis >= 0 else axis + np.ndim(q)] = np.size(scale)
    return tuple(shape)


SKELETON_ELEMENTS = 1024
"""Float initializers larger than this go to shape inference as shape and type only (their values never decide a
shape; integer tensors, which can, keep their values)."""


def _skeleton(model):
    """A copy of ``model`` without the values of its large float initializers: what shape inference needs. (The
    inferred model stays referenced by the ValueInfo it gives: a full copy would keep every weight twice.)"""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    return stripped_copy(model, lambda t: t.data_location == onnx.TensorProto.EXTERNAL or (
        t.data_type in floats and int(np.prod(t.dims, dtype=np.int64)) > SKELETON_ELEMENTS))[0]


def stripped_copy(model, strip):
    """(copy, pairs): ``model`` with each initializer ``t`` where ``strip(t)`` reduced to its name, type and dims (all
    else copied as is), and the (original, reduced) tensor pairs. A weightless graph costs a copy of the graph only."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    pairs = []
    for t in model.graph.initializer:
        if strip(t):
            pairs.append((t, out.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)))
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out, pairs


def _copy_fields(src, dst, skip):
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        field = getattr(dst, fd.name)
        if hasattr(value, "CopyFrom"):  # a message
            field.CopyFrom(value)
        elif hasattr(field, "extend"):  # a repeated field
            field.extend(value)
        else:
            setattr(dst, fd.name, value)


def _infer(model):
    """ValueInfo by tensor name after onnx shape inference on a weightless copy (empty when inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - huge or odd models: go on without shapes
        inferred = model
    g = inferred.graph
    return {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}


def constant_value(node):
    """The value of a Constant node as a numpy array."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def find_weight(model, name):
    """The value of weight tensor ``name`` and where it lives: ``"initializer"`` or ``"constant"`` (a Constant
    node, possibly through Identity nodes). Raises ScannerError when it is not a constant."""
    gi = GraphIndex(model, infer=False)
    value = gi.const(name)
    if value is None:
        raise ScannerError(f"tensor {name!r} is not a constant weight (initializer or Constant node)")
    return value, "initializer" if name in gi.initializers else "constant"


def _neuron(gi, node):
    """(channels, rank or None) of a neuron node with a constant weight, else None."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    w = gi.const(node.input[1])
    if w is None:
        return None
    if node.op_type == "Conv" and w.ndim >= 3:
        return w.shape[0], w.ndim
    if node.op_type == "ConvTranspose" and w.ndim >= 3:
        return w.shape[1] * gi.attr(node, "group", 1), w.ndim
    if node.op_type == "Gemm" and w.ndim == 2:
        return (w.shape[0] if gi.attr(node, "transB", 0) else w.shape[1]), 2
    if node.op_type == "MatMul" and w.ndim == 2 and gi.const(node.input[0]) is None:
        shape = gi.shape(node.output[0]) or gi.shape(node.input[0])
        return w.shape[1], (len(shape) if shape else None)
    return None


def _bias_add(gi, node, slot, channels):
    """True if ``node`` is an Add of a constant per-channel (last axis) bias to input ``slot``."""
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    b = gi.const(node.input[1 - slot])
    return b is not None and b.ndim >= 1 and b.shape[-1] == channels and b.size == channels


GATE_OPS = ("Sigmoid", "HardSigmoid", "Erf", "Tanh", "Clip", "Div", "Mul", "Add", "Sub")
"""Elementwise ops of a gate g(x) in a gated activation x * g(x) (SiLU, decomposed HardSwish and GELU)."""


def _gated(gi, cur):
    """Node indices of a gated activation ``x * g(x)`` on ``cur`` (then an optional scalar Mul), else None.

    ``cur`` must feed exactly the gate and the Mul; the gate is a single-consumer chain of GATE_OPS whose other
    inputs are constants: SiLU ``x*Sigmoid(x)``, HardSwish ``x*HardSigmoid(x)``, GELU ``x*0.5*(1+Erf(x/sqrt2))``.
    Such an activation maps 0 to 0 (g(0) is finite)."""
    cons = gi.consumers.get(cur, [])
    if len(cons) != 2 or any(slot < 0 for _, slot in cons):
        return None
    for m, other in (cons, cons[::-1]):
        mul = gi.nodes[m[0]]
        if mul.op_type != "Mul" or len(mul.input) != 2 or cur not in mul.input:
            continue
        gate_out = mul.input[1] if mul.input[0] == cur else mul.input[0]
        chain, t, j = [], cur, other[0]
        for _ in range(6):
            node = gi.nodes[j]
            outs = [o for o in node.output if o]
            if (
                node.op_type not in GATE_OPS
                or node.domain not in ("", "ai.onnx")
                or len(outs) != 1
                or any(x != t and x and gi.const(x) is None for x in node.input)
                or list(node.input).count(t) != 1
            ):
                break
            chain.append(j)
            t = outs[0]
            if t == gate_out:
                if t in gi.outputs or [i for i, _ in gi.consumers.get(t, [])] != [m[0]]:
                    break
                chain.append(m[0])
                out = mul.output[0]
                nxt = gi.consumers.get(out, [])
                if out not in gi.outputs and len(nxt) == 1:
                    scale = gi.nodes[nxt[0][0]]
                    c = gi.const(scale.input[1 - nxt[0][1]]) if scale.op_type == "Mul" and len(scale.input) == 2 else None
                    if c is not None and c.size == 1:
                        chain.append(nxt[0][0])
                return chain
            nxt = gi.consumers.get(t, [])
            if t in gi.outputs or len(nxt) != 1:
                break
            j = nxt[0][0]
    return None


def _chain(gi, index, channels, rank):
    """Node indices from the neuron node to the node whose output is read."""
    op = gi.nodes[index].op_type
    chain, cur, stage = [index], gi.nodes[index].output[0], 0  # stages: 1 bias Add, 2 BN, 3 activation
    while stage < 3 and cur not in gi.outputs:
        gated = _gated(gi, cur)
        if gated:
            chain += gated
            cur = gi.nodes[gated[-1]].output[0]
            break
        cons = gi.consumers.get(cur, [])
        if len(cons) != 1:
            break
        j, slot = cons[0]
        nxt = gi.nodes[j]
        outs = [o for o in nxt.output if o]
        if len(outs) != 1 or nxt.domain not in ("", "ai.onnx"):
            break
        if stage < 1 and op in LINEAR_OPS and _bias_add(gi, nxt, slot, channels):
            stage = 1
        elif (
            stage < 2
            and nxt.op_type == "BatchNormalization"
            and slot == 0
            and (op in CONV_OPS or rank == 2)
            and all(gi.const(n) is not None for n in nxt.input[1:5])
        ):
            stage = 2
        elif nxt.op_type in ACTIVATIONS and slot == 0:
            stage = 3
        else:
            break
        chain.append(j)
        cur = outs[0]
    return chain, cur


def bn_scale(gi, node):
    """The per-channel scale ``gamma / sqrt(var + eps)`` of a BatchNormalization with constant parameters."""
    gamma, var = (np.asarray(gi.const(n), np.float64).reshape(-1) for n in (node.input[1], node.input[4]))
    return gamma / np.sqrt(var + gi.attr(node, "epsilon", 1e-5))


def _clip_range(gi, node):
    """(min, max) of a Clip node; None where not a constant."""
    if opset_version(gi.model) < 11:
        return gi.attr(node, "min", -np.inf), gi.attr(node, "max", np.inf)
    bounds = []
    for slot, default in ((1, -np.inf), (2, np.inf)):
        if len(node.input) > slot and node.input[slot]:
            v = gi.const(node.input[slot])
            bounds.append(None if v is None else float(np.asarray(v).reshape(-1)[0]))
        else:
            bounds.append(default)
    return tuple(bounds)


def activation_facts(gi, node):
    """(nonnegative, zero_preserving) of the output of the activation ``node``."""
    op = node.op_type
    if op == "Clip":
        lo, hi = _clip_range(gi, node)
        return lo is not None and lo >= 0, lo is not None and hi is not None and lo <= 0 <= hi
    if op == "HardSigmoid":
        return True, gi.attr(node, "beta", 0.5) <= 0
    return op in NONNEGATIVE, op not in NOT_ZERO_PRESERVING


def _is_head(gi, tensor):
    """True if ``tensor`` reaches a graph output through pass-through ops only."""
    for _ in range(32):
        if tensor in gi.outputs:
            return True
        cons = gi.consumers.get(tensor, [])
        if len(cons) != 1:
            return False
        node = gi.nodes[cons[0][0]]
        if node.op_type not in HEAD_PASS or not node.output:
            return False
        if node.op_type == "Add" and gi.const(node.input[1 - cons[0][1]]) is None:
            return False
        tensor = node.output[0]
    return False


POOLS = ("GlobalAveragePool", "GlobalMaxPool")


def _pointwise_on_pooled(gi, node):
    """True for a 1x1 Conv (group 1) on a map with a single position (after global pooling): a linear layer in a
    convolution's clothes, as TF-converted classifiers have their head."""
    if node.op_type != "Conv" or gi.attr(node, "group", 1) != 1:
        return False
    w = gi.const(node.input[1])
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1):
        return False
    shape = gi.shape(node.input[0])
    if shape and len(shape) == 4 and shape[2:] == [1, 1]:
        return True
    i = gi.producer.get(node.input[0])
    return i is not None and gi.nodes[i].op_type in POOLS


def _spatial(shape, rank, channel_axis):
    if rank == 2:
        return ()
    if shape is None or len(shape) != rank:
        return None
    dims = shape[2:] if channel_axis == 1 else shape[1:-1]
    return tuple(dims) if all(d for d in dims) else None


def batch_dim(gi):
    """The image input's batch dim (int or symbol), or None when unknown."""
    for vi in gi.model.graph.input:
        if vi.name not in gi.initializers:
            dims = gi.dims(vi.name)
            return dims[0] if dims else None
    return None


PROBE_BATCH = 9973
"""A batch size no real dim equals: shape inference with the input's batch fixed to it shows which tensors keep
the batch on axis 0 (``(N, ...)``) and which do not (``(tokens, N, C)``, ``(tokens*N, C)``)."""


def _probe_dim0(gi):
    """{tensor: dim 0} inferred with the image input's (non-static) batch fixed to PROBE_BATCH; {} when unusable.

    Runs on a copy without float weight data (shapes only), so it is cheap for large models."""
    src = gi.model.graph
    light = onnx.ModelProto(ir_version=gi.model.ir_version)
    light.opset_import.extend(gi.model.opset_import)
    g = light.graph
    g.node.extend(src.node)
    for t in src.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        else:
            g.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
    g.input.extend(src.input)
    for vi in src.output:
        g.output.add(name=vi.name).type.tensor_type.elem_type = vi.type.tensor_type.elem_type
    image = [vi for vi in g.input if vi.name not in gi.initializers]
    if not image or not image[0].type.tensor_type.shape.dim:
        return {}
    dim = image[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = PROBE_BATCH
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - go on with the plain inference
        return {}
    found = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            found[vi.name] = dims[0].dim_value
    return found


def _not_per_image(gi, read, batch, probed):
    """True when axis 0 of ``read`` is known not to be the batch axis (e.g. attention projections on
    (tokens, N, C) or (tokens*N, C) maps): per-image norms cannot be read from it."""
    if read in probed:
        return probed[read] != PROBE_BATCH
    dims = gi.dims(read)
    return batch is not None and bool(dims) and dims[0] is not None and dims[0] != batch


def _image_free(gi):
    """Tensors that do not depend on any graph input that is not an initializer (computed from constants)."""
    inputs = {vi.name for vi in gi.model.graph.input} - set(gi.initializers)
    free = set(gi.initializers)
    for node in gi.nodes:
        ins = [x for slot, x in enumerate(node.input) if x and not (node.op_type == "CastLike" and slot == 1)]
        if node.op_type in ("Shape", "Size") or (all(x in free for x in ins) and not any(x in inputs for x in ins)):
            free.update(o for o in node.output if o)
    return free


def _why_not(gi, node, free):
    """Why a Conv / Gemm / MatMul node is not a layer scanner can measure, or None when it is not meant to be one
    (a MatMul of two activations, as in attention)."""
    w = node.input[1] if len(node.input) > 1 else ""
    if node.op_type == "MatMul" and w not in free:
        return None
    i = gi.producer.get(w)
    made_by = gi.nodes[i].op_type if i is not None else None
    if w in free:
        return f"its weight {w!r} is computed in the graph ({made_by}) and could not be folded to a constant"
    return f"its weight {w!r} is not a constant (it comes from {made_by or 'a graph input'})"


def discover(model, skipped=None):
    """All neuron layers of ``model`` in topological order (the input proto is not modified).

    Layers whose read tensor does not have the batch on axis 0 (known from shape inference) are left out; so are
    Conv / Gemm / MatMul nodes without a constant weight. With a list ``skipped``, each left-out node is appended
    to it as {"node", "op_type", "reason"}.
    """
    gi = GraphIndex(model)
    batch = batch_dim(gi)
    probed = {} if isinstance(batch, int) else _probe_dim0(gi)
    free = _image_free(gi) if skipped is not None else set()
    found = []
    for i, node in enumerate(gi.nodes):
        if node.op_type not in NEURON_OPS:
            continue
        facts = _neuron(gi, node)
        if facts is None:
            reason = _why_not(gi, node, free) if skipped is not None else None
            if reason:
                skipped.append({"node": gi.names[i], "op_type": node.op_type, "reason": reason})
            continue
        channels, rank = facts
        chain, read = _chain(gi, i, channels, rank)
        if _not_per_image(gi, read, batch, probed):
            if skipped is not None:
                skipped.append({"node": gi.names[i], "op_type": node.op_type,
                                "reason": f"its channels are read on {read!r}, whose first axis is not the batch "
                                          "(e.g. an attention projection on (tokens, N, C)): no per-image norm"})
            continue
        shape = gi.shape(read)
        rank = len(shape) if shape else rank
        if rank is None:
            continue
        channel_axis = 1 if node.op_type in CONV_OPS else rank - 1
        nonneg, zero_pres = False, True
        last = gi.nodes[chain[-1]]
        if last.op_type in ACTIVATIONS:
            nonneg, zero_pres = activation_facts(gi, last)
        name = gi.names[i]
        found.append(
            dict(
                id=f"{name}:{node.output[0]}",
                op_type=node.op_type,
                node=name,
                output=node.output[0],
                read=read,
                chain=tuple(gi.nodes[j].op_type for j in chain),
                chain_nodes=tuple(gi.names[j] for j in chain),
                channels=int(channels),
                channel_axis=channel_axis,
                rank=rank,
                spatial=_spatial(shape, rank, channel_axis),
                nonnegative=nonneg,
                zero_preserving=zero_pres,
                is_last_conv=False,
                is_head=(node.op_type in LINEAR_OPS or _pointwise_on_pooled(gi, node)) and _is_head(gi, read),
                index=len(found),
                input=node.input[0],
            )
        )
    convs = [f for f in found if f["op_type"] in CONV_OPS and not f["is_head"]]
    if convs:
        convs[-1]["is_last_conv"] = True
    return [Layer(**f) for f in found]


def select(layers, spec):
    """The layers named by ``spec``: ``"last"``, ``"all"``, ``"ID[,ID...]"`` or a list of ids / unique node names.

    ``last`` is the last conv layer (the paper's choice), else the last non-head layer. Topological order.
    """
    layers = list(layers)
    if not layers:
        raise NothingToAnalyse("no Conv, ConvTranspose, Gemm or MatMul layer with constant weights found")
    if isinstance(spec, str) and spec == "last":
        chosen = [l for l in layers if l.is_last_conv] or [l for l in layers if not l.is_head][-1:]
        if not chosen:
            raise NothingToAnalyse("no conv layer and no layer before the head to analyse; try --layers all")
        return chosen
    if isinstance(spec, str) and spec == "all":
        return layers
    by_id = {l.id: l for l in layers}
    if isinstance(spec, str):
        wanted = [spec] if spec in by_id else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        wanted = [getattr(s, "id", s) for s in spec]
    by_node = defaultdict(list)
    for l in layers:
        by_node[l.node].append(l)
    picked = set()
    for w in wanted:
        if w in by_id:
            picked.add(w)
        elif len(by_node.get(w, ())) == 1:
            picked.add(by_node[w][0].id)
        else:
            hint = ", ".join(l.id for l in layers[:5]) + (", ..." if len(layers) > 5 else "")
            raise ScannerError(f"unknown layer {w!r}; valid ids: {hint} (see `scanner inspect`)")
    if not picked:
        raise ScannerError("no layer selected; use last, all or layer ids")
    return [l for l in layers if l.id in picked]
