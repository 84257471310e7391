"""Graph surgery: zero channels, rewrite a linear layer, record what was done (plain onnx protos).

Every function returns a new model; the input proto is never modified. A weight used by any other node (or
slot) is copied into a new initializer before it is edited, so other consumers keep the original. Model and
node metadata, doc strings, versions, opset imports and node names are kept as they are.
"""

import json

import numpy as np
import onnx
from onnx import numpy_helper

from scanner.errors import ScannerError
from scanner.graph.instrument import Names
from scanner.graph.layers import LINEAR_OPS, GraphIndex, _copy_fields, _subgraphs, copy_model


class _Editor:
    """Edits weights of one model copy, copying shared ones first."""

    def __init__(self, model):
        self.model = model
        self.names = Names(model)
        self.refresh()

    def refresh(self):
        self.gi = GraphIndex(self.model, infer=False)

    def node(self, layer, position=0):
        """The node at ``position`` in ``layer``'s chain, checked against the layer's facts."""
        indices = [self.gi.by_name.get(name) for name in layer.chain_nodes]
        nodes = [self.gi.nodes[i] if i is not None else None for i in indices]
        if (
            any(n is None or n.op_type != op for n, op in zip(nodes, layer.chain))
            or nodes[0].output[0] != layer.output
            or layer.read not in nodes[-1].output
        ):
            raise ScannerError(f"layer {layer.id} does not match this model; rediscover layers")
        return self.model.graph.node[indices[position]]

    def read(self, node, slot):
        """The constant at ``node.input[slot]``."""
        value = self.gi.const(node.input[slot]) if slot < len(node.input) and node.input[slot] else None
        if value is None:
            raise ScannerError(f"node {node.name or node.op_type}: input {slot} is not a constant weight")
        return value

    def write(self, node, slot, value):
        """Set ``node.input[slot]`` to ``value``: in place when nothing else uses it, else as a new initializer.

        A quantized weight (behind a DequantizeLinear) is written in its quantized form: requantized with its
        scale (a new scale when the values do not fit it); zeros stay exact zeros (the zero point)."""
        name = node.input[slot] if slot < len(node.input) else ""
        value = np.ascontiguousarray(value)
        uses = len(self.gi.consumers.get(name, ())) + (name in self.gi.outputs) if name else 0
        g = self.model.graph
        dq = self.gi.quantized(name) if name else None
        if dq is not None:
            if uses != 1:
                raise ScannerError(f"node {node.name or node.op_type}: its quantized weight {name!r} is shared with other "
                                   "nodes; scanner cannot edit it for one of them")
            q, scale = _requantize(self.gi, dq, value)
            if scale is not None:
                self.write(dq, 1, scale)
            self.write(dq, 0, q)
            return
        if uses == 1 and name in self.gi.initializers:
            self.gi.initializers[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        producer = self.gi.producer.get(name)
        if uses == 1 and producer is not None and g.node[producer].op_type == "Constant":
            attrs = g.node[producer].attribute
            if len(attrs) == 1 and attrs[0].name == "value":
                attrs[0].t.CopyFrom(numpy_helper.from_array(value, attrs[0].t.name))
                return
        new = self.names(f"{name or node.output[0] + '.bias'}.scanner")
        g.initializer.append(numpy_helper.from_array(value, new))
        _declare_input(self.model, new, value)
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = new
        self.refresh()

    def zero(self, node, slot, index):
        """Zero ``value[index]`` of the constant at ``node.input[slot]``."""
        value = self.read(node, slot).copy()
        value[index] = 0
        self.write(node, slot, value)

    def zero_last_axis(self, node, slot, channels, ks):
        """Zero entries ``ks`` on the last axis of a bias that broadcasts over ``channels``."""
        value = self.read(node, slot)
        if value.ndim == 0 or value.shape[-1] != channels:
            value = np.broadcast_to(value, value.shape[:-1] + (channels,) if value.ndim else (channels,))
        value = value.copy()
        value[..., ks] = 0
        self.write(node, slot, value)


def _declare_input(model, name, value):
    """IR version 3 wants every initializer listed as a graph input too: add one for a new initializer."""
    if model.ir_version < 4:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, list(np.shape(value))))


def _requantize(gi, dq, value):
    """(quantized value, new scale or None) of float ``value`` for the DequantizeLinear node ``dq``."""
    from scanner.graph.layers import _axis_shape

    q0 = np.asarray(gi.const(dq.input[0]))
    scale = np.asarray(gi.const(dq.input[1]), np.float64)
    zp = gi.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    axis = gi.attr(dq, "axis", 1)
    shape = _axis_shape(q0, scale, axis)
    z = 0.0 if zp is None else np.asarray(zp, np.float64).reshape(shape)
    info = np.iinfo(q0.dtype)
    v = np.asarray(value, np.float64)
    q = np.rint(v / scale.reshape(shape)) + z
    new_scale = None
    if q.min() < info.min or q.max() > info.max:  # the new values do not fit the old scale
        reduce = tuple(d for d in range(v.ndim) if shape == () or shape[d] == 1)
        room = np.minimum(info.max - z, z - info.min)
        peak = np.abs(v).max(axis=reduce, keepdims=shape != ()) if reduce else np.abs(v)
        s = np.where(peak > 0, peak / room, scale.reshape(shape) if shape else scale)
        new_scale = np.asarray(s, np.float64).reshape(scale.shape).astype(gi.const(dq.input[1]).dtype)
        q = np.rint(v / np.asarray(new_scale, np.float64).reshape(shape)) + z
    return np.clip(q, info.min, info.max).astype(q0.dtype), new_scale


def _refusal(layer):
    act = next((op for op in reversed(layer.chain) if op not in ("Mul", "BatchNormalization", "Add")), layer.chain[-1])
    return ScannerError(
        f"layer {layer.id}: cannot prune through {act} ({act}(0) != 0, a zeroed channel would not read 0); "
        "choose another layer"
    )


def prune(model, plan, layers):
    """A copy of ``model`` where each channel in ``plan`` ({layer id: [channels]}) reads exactly 0 for every input."""
    by_id = {l.id: l for l in layers}
    m = copy_model(model)
    ed = _Editor(m)
    for layer_id, channels in plan.items():
        layer = by_id.get(layer_id)
        if layer is None:
            raise ScannerError(f"unknown layer {layer_id!r} in the prune plan")
        ks = sorted({int(k) for k in channels})
        if not ks:
            continue
        bad = [k for k in ks if not 0 <= k < layer.channels]
        if bad:
            raise ScannerError(f"layer {layer.id}: channel {bad[0]} out of range (it has {layer.channels})")
        if not layer.zero_preserving:
            raise _refusal(layer)
        _prune_layer(ed, layer, ks)
    return m


def _prune_layer(ed, layer, ks):
    node = ed.node(layer)
    op = layer.op_type
    attr = ed.gi.attr
    if op == "Conv":
        ed.zero(node, 1, ks)
    elif op == "ConvTranspose":
        w = ed.read(node, 1).copy()
        group = attr(node, "group", 1)
        cin_g, cout_g = w.shape[0] // group, w.shape[1]
        for k in ks:
            g = k // cout_g
            w[g * cin_g : (g + 1) * cin_g, k % cout_g] = 0
        ed.write(node, 1, w)
    elif op == "Gemm":
        ed.zero(node, 1, (ks, slice(None)) if attr(node, "transB", 0) else (slice(None), ks))
    elif op == "MatMul":
        ed.zero(node, 1, (slice(None), ks))
    if op in ("Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
        ed.zero(node, 2, ks)
    if op == "Gemm" and len(node.input) > 2 and node.input[2]:
        ed.zero_last_axis(node, 2, layer.channels, ks)
    for pos, kind in enumerate(layer.chain[1:], 1):
        if kind == "Add" and op in LINEAR_OPS and pos == 1:
            add = ed.node(layer, pos)
            prev = ed.model.graph.node[ed.gi.by_name[layer.chain_nodes[0]]].output[0]
            ed.zero_last_axis(add, 1 if add.input[0] == prev else 0, layer.channels, ks)
        elif kind == "BatchNormalization":
            bn = ed.node(layer, pos)
            ed.zero(bn, 1, ks)
            ed.zero(bn, 2, ks)


def _linear_parts(ed, layer):
    """(node, bias node, bias slot): the bias lives in the Gemm's C or the Conv's B, in the Add after the
    Gemm/MatMul, or nowhere (a MatMul without Add)."""
    if layer.op_type not in LINEAR_OPS + ("Conv",):
        raise ScannerError(f"layer {layer.id} is a {layer.op_type}, not a Gemm, MatMul or Conv")
    node = ed.node(layer)
    if layer.op_type == "Conv":
        return node, node, 2
    has_c = layer.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
    if len(layer.chain) > 1 and layer.chain[1] == "Add":
        if has_c:
            raise ScannerError(
                f"layer {layer.id}: a Gemm with C and a bias Add after it is not supported; fold the Add"
            )
        add = ed.node(layer, 1)
        return node, add, 1 if add.input[0] == node.output[0] else 0
    return (node, node, 2) if layer.op_type == "Gemm" else (node, None, None)


def linear_weights(model, layer):
    """(weight (out, in), bias (out,)) of a Gemm/MatMul(+Add) layer: ``y = x @ weight.T + bias`` (alpha, beta applied)."""
    ed = _Editor(model)
    node, bias_node, slot = _linear_parts(ed, layer)
    w = ed.read(node, 1).astype(np.float64)
    alpha = beta = 1.0
    if layer.op_type == "Conv":
        w = w.reshape(w.shape[0], -1)
    elif layer.op_type == "Gemm":
        alpha = ed.gi.attr(node, "alpha", 1.0)
        beta = ed.gi.attr(node, "beta", 1.0) if bias_node is node else 1.0
        w = w if ed.gi.attr(node, "transB", 0) else w.T
    else:
        w = w.T
    bias = np.zeros(layer.channels)
    if bias_node is not None and slot < len(bias_node.input) and bias_node.input[slot]:
        b = ed.read(bias_node, slot).astype(np.float64)
        if b.size not in (1, layer.channels):
            raise ScannerError(f"layer {layer.id}: bias of shape {b.shape} is not per channel")
        bias = np.broadcast_to(b.reshape(-1), (layer.channels,)) * beta
    return (w * alpha).astype(np.float32), bias.astype(np.float32)


def has_bias(model, layer):
    """Whether a linear layer has (or can take, as an input slot) a bias: not a MatMul without a bias Add."""
    return _linear_parts(_Editor(model), layer)[1] is not None


def set_linear(model, layer, weight, bias):
    """A copy of ``model`` whose Gemm/MatMul(+Add) or Conv layer computes ``x @ weight.T + bias`` (a Conv's weight is
    (out, in x kernel)), in the layer's own layout.

    A Gemm without C (a Conv without B) gets one when the bias is not zero; a MatMul without bias Add gets an Add
    (the refit avoids that: it fits such a head without a bias, see :func:`has_bias`).
    """
    m = copy_model(model)
    ed = _Editor(m)
    node, bias_node, slot = _linear_parts(ed, layer)
    old = ed.read(node, 1)
    weight = np.asarray(weight, np.float64)
    bias = np.asarray(bias, np.float64).reshape(-1)
    expected = (layer.channels, old.size // layer.channels)
    if weight.shape != expected or bias.shape != (layer.channels,):
        raise ScannerError(
            f"layer {layer.id}: expected weight {expected} and bias ({layer.channels},), got {weight.shape} and {bias.shape}"
        )
    if layer.op_type == "Conv":
        ed.write(node, 1, weight.reshape(old.shape).astype(old.dtype))
    elif layer.op_type == "Gemm":
        w = weight / ed.gi.attr(node, "alpha", 1.0)
        ed.write(node, 1, (w if ed.gi.attr(node, "transB", 0) else w.T).astype(old.dtype))
    else:
        ed.write(node, 1, weight.T.astype(old.dtype))
    if bias_node is node:  # Gemm C / Conv B (present or added)
        has_c = len(node.input) > 2 and node.input[2]
        if has_c or np.any(bias):
            c = bias / (ed.gi.attr(node, "beta", 1.0) if layer.op_type == "Gemm" else 1.0)
            if has_c:
                old_c = ed.read(node, 2)
                c = c.reshape(old_c.shape) if old_c.size == layer.channels else c
            ed.write(node, 2, c.astype(old.dtype))
    elif bias_node is not None:
        old_b = ed.read(bias_node, slot)
        ed.write(bias_node, slot, bias.reshape(old_b.shape if old_b.size == layer.channels else -1).astype(old_b.dtype))
    elif np.any(bias):
        _add_bias(ed, node, bias.astype(old.dtype))
    return m


def _add_bias(ed, node, bias):
    """Insert Add(MatMul output, bias) after a MatMul that had no bias; consumers keep the original tensor name."""
    g = ed.model.graph
    out = node.output[0]
    pre = ed.names(f"{out}.nobias")
    node.output[0] = pre
    b = ed.names(f"{out}.bias")
    g.initializer.append(numpy_helper.from_array(bias, b))
    _declare_input(ed.model, b, bias)
    add = onnx.helper.make_node("Add", [pre, b], [out], name=ed.names(f"{node.name or 'MatMul'}/bias"))
    index = list(g.node).index(node)
    g.node.insert(index + 1, add)


def record(model, key_values):
    """A copy of ``model`` with ``metadata_props`` entries set (non-string values are stored as JSON)."""
    m = copy_model(model)
    props = {p.key: p for p in m.metadata_props}
    for key, value in key_values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in props:
            props[key].value = text
        else:
            entry = m.metadata_props.add()
            entry.key, entry.value = key, text
    return m


def cut_branch(model, join, keep_input):
    """A copy of ``model`` where node ``join`` (a name) is replaced by an Identity of its input ``keep_input`` (a
    slot), and every node that then feeds nothing is dropped: how a side branch joining the scores is cut
    (:mod:`scanner.graph.audit`). Returns (model, names of the removed nodes)."""
    m = copy_model(model)
    g = m.graph
    gi = GraphIndex(m, infer=False)
    if join not in gi.by_name:
        raise ScannerError(f"node {join!r} not found; cannot cut the branch")
    i = gi.by_name[join]
    node = g.node[i]
    if not 0 <= keep_input < len(node.input) or not node.input[keep_input]:
        raise ScannerError(f"node {join!r} has no input {keep_input}")
    ident = onnx.helper.make_node("Identity", [node.input[keep_input]], [node.output[0]], name=f"{node.name or join}/cut")
    g.node.remove(node)
    g.node.insert(i, ident)
    removed = [join] + drop_dead(m)
    return m, removed


def drop_dead(model):
    """Remove nodes none of whose outputs is used (by a node, a subgraph or a graph output), repeatedly; drop the
    initializers nothing reads any more. Returns the removed nodes' names."""
    g = model.graph
    removed = []
    while True:
        gi = GraphIndex(model, infer=False)
        dead = [j for j, n in enumerate(g.node)
                if not any(o in gi.outputs or gi.consumers.get(o) for o in n.output if o)]
        if not dead:
            break
        for j in sorted(dead, reverse=True):
            removed.append(gi.names[j])
            del g.node[j]
    gi = GraphIndex(model, infer=False)
    inputs = {vi.name for vi in g.input}
    for t in [t for t in g.initializer if not gi.consumers.get(t.name) and t.name not in gi.outputs]:
        g.initializer.remove(t)
        if t.name in inputs:  # IR < 4: the initializer's graph input goes with it
            g.input.remove(next(vi for vi in g.input if vi.name == t.name))
    return removed


CLIP_SUFFIX = "/scanner_clip"
"""Name suffix of the Min / Max nodes :func:`clip` adds (how verification tells them from the model's own)."""


def clip(model, layers, bounds):
    """A copy of ``model`` where each layer's read is bounded per channel: ``bounds`` maps a layer id to (low, high)
    arrays of its channels (low None: no lower bound). A Min (and a Max) node right after the read's producer;
    every node that read the tensor reads the bounded one. A read that is a graph output is left as it is."""
    m = copy_model(model)
    g = m.graph
    names = Names(m)
    outputs = {o.name for o in g.output}
    producer = {o: j for j, n in enumerate(g.node) for o in n.output}
    inserts = {}
    for layer in layers:
        if layer.id not in bounds or layer.read in outputs or layer.read not in producer:
            continue
        low, high = bounds[layer.id]
        shape = [1] * layer.rank
        shape[layer.channel_axis] = -1
        src, nodes = layer.read, []
        for op, value in (("Min", high), ("Max", low)):
            if value is None:
                continue
            const = names(f"{layer.read}_clip_{op.lower()}")
            g.initializer.append(numpy_helper.from_array(np.asarray(value).reshape(shape), const))
            out = names(f"{layer.read}_clipped")
            nodes.append(onnx.helper.make_node(op, [src, const], [out], name=names(f"{layer.read}/{op}{CLIP_SUFFIX}")))
            src = out
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == layer.read:
                    n.input[k] = src
        inserts[producer[layer.read]] = nodes
    order = []
    for j, n in enumerate(g.node):
        order.append(n)
        order += inserts.get(j, [])
    copies = [onnx.NodeProto() for _ in order]
    for c, n in zip(copies, order):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)
    return m


def tail(model, node, output):
    """(a model computing ``output`` from the image-dependent float tensors alive just before ``node`` (a name), those
    tensors' names in the order of its inputs): the rest of the network from a layer on, fed what the layers before
    it computed. A tensor made from constants only, or a non-float one (a Shape's dims), is computed in the tail
    from what it depends on. Unnamed nodes are named as :func:`scanner.graph.layers.node_name` calls them, so the
    layers of ``model`` match the tail's. Raises ScannerError where no such cut exists: a tail that would need the
    graph's own input, a graph with subgraphs (If / Loop), an input tensor of unknown or fixed batch size."""
    gi = GraphIndex(model)
    if node not in gi.by_name:
        raise ScannerError(f"node {node!r} not found; no tail")
    if any(True for n in gi.nodes for _ in _subgraphs(n)):
        raise ScannerError("a graph with subgraphs (If / Loop / Scan) has no tail")
    start = gi.by_name[node]
    data = gi.inputs - set(gi.initializers)  # what depends on the image
    for n in gi.nodes:
        if any(i in data for i in n.input):
            data.update(o for o in n.output if o)
    keep, cut, seen, stack = set(), [], set(), [output]
    while stack:
        t = stack.pop()
        if not t or t in seen or t in gi.initializers:
            continue
        seen.add(t)
        i = gi.producer.get(t)
        if i is None:
            raise ScannerError(f"the tail from {node!r} needs the graph input {t!r}")
        vi = gi.value_info.get(t)
        floating = vi is not None and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        if i < start and t in data and floating:
            dims = vi.type.tensor_type.shape.dim
            if not dims or dims[0].HasField("dim_value"):
                raise ScannerError(f"the tail from {node!r}: tensor {t!r} has no dynamic batch dimension")
            cut.append(t)
            continue
        keep.add(i)
        stack.extend(gi.nodes[i].input)
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    g = out.graph
    g.name = model.graph.name
    for i in sorted(keep):
        g.node.add().CopyFrom(gi.nodes[i])
        g.node[-1].name = gi.names[i]
    used = {name for i in keep for name in gi.nodes[i].input}
    g.initializer.extend(t for t in model.graph.initializer if t.name in used)
    cut.sort(key=lambda t: gi.producer[t])
    g.input.extend(gi.value_info[t] for t in cut)
    if model.ir_version < 4:  # an initializer is a graph input there too
        g.input.extend(vi for vi in model.graph.input if vi.name in used and vi.name in gi.initializers)
    g.output.extend(o for o in model.graph.output if o.name == output)
    if not len(g.output):
        raise ScannerError(f"{output!r} is not an output of the model; no tail")
    return out, cut
