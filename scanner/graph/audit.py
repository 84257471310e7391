"""The graph audit: logic a classifier does not need on the path from the image to its scores (no forward pass).

A backdoor can live in the ONNX graph itself, as a few extra operators beside clean weights (a crop of the
raw input, a statistic, a comparison, a switch into the scores). Such logic survives conversion and
fine-tuning and is invisible to a scan of weights and activations; it is visible in the graph. The audit
follows the image input's *values* through the graph (a Shape or Size of a tensor carries its shape, not its
values, so shape arithmetic is not followed) and reports, on the way to the scores:

- ``side-branch`` (high): the scores depend on the image through a path that does not pass through the
  classifier's head (the deepest neuron layer feeding the scores): a branch joining after the head;
- ``control-flow`` (high): If / Loop / Scan whose condition or inputs come from the image;
- ``input-switch`` (medium): a comparison, boolean op, boolean Cast or step function (Sign, Floor, Ceil,
  Round) of image-derived values: a switch, outside a side branch;
- ``raw-input-crop`` (medium): a Slice / Gather / Crop of the raw input (before any layer) on a spatial axis;
- ``unusual-op`` (low): operators a feed-forward classifier has no use for (TopK, ArgMax, NonZero, random
  generators, ...), or operators from a non-default domain.

Each finding names its nodes; a side branch names the join (node, op, which input is the head's) so that
:mod:`scanner.graph.surgery` can cut it, and the class a constant in the branch favours, when there is one.
"""

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import numpy_helper

from scanner.graph.layers import NEURON_OPS, GraphIndex, _all_nodes, _subgraphs

SEVERITIES = ("low", "medium", "high")
SHAPE_ONLY = ("Shape", "Size")
"""Ops whose output depends on their input's shape, not its values."""
TYPE_ONLY = {"CastLike": (1,)}
"""Inputs that give only a dtype."""
CONTROL_FLOW = ("If", "Loop", "Scan")
COMPARISONS = ("Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf")
STEPS = ("Sign", "Floor", "Ceil", "Round")
CROPS = ("Slice", "Gather", "Crop", "GatherElements", "GatherND")
ELEMENTWISE = ("Cast", "Sub", "Div", "Mul", "Add", "Identity", "Clip", "Neg", "Abs")
"""Ops a raw input can pass through (normalization) and still count as raw."""
UNUSUAL = ("TopK", "ArgMax", "ArgMin", "NonZero", "Unique", "Hardmax", "RandomNormal", "RandomUniform",
           "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "OneHot", "Compress",
           "ScatterElements", "ScatterND", "Scatter", "ReverseSequence", "StringNormalizer", "TfIdfVectorizer")
CUTTABLE = ("Add", "Sum", "Mul", "Where", "Max", "Min")
"""Join ops a side branch can be cut from: the head's input takes the join's place."""


@dataclass
class Finding:
    """One audit finding."""

    rule: str
    severity: str
    message: str
    nodes: list = field(default_factory=list)
    join: dict = None
    target: int = None

    def to_dict(self):
        return {k: v for k, v in asdict(self).items() if v is not None}


def _names(gi, indices):
    return [gi.names[i] for i in sorted(indices)]


class _Audit:
    def __init__(self, model, scores):
        self.gi = gi = GraphIndex(model, infer=False)
        inits = set(gi.initializers)
        self.image = next(vi.name for vi in model.graph.input if vi.name not in inits)
        self.scores = scores or model.graph.output[0].name
        self.tainted = self._taint()
        self.ancestors = self._ancestors(self.scores)

    def _taint(self):
        """Tensors whose values depend on the image's values (through subgraphs too)."""
        gi, tainted = self.gi, {self.image}
        for node in gi.nodes:  # topological order (checked by onnx.checker at load)
            if node.op_type in SHAPE_ONLY:
                continue
            ins = [x for slot, x in enumerate(node.input) if x and slot not in TYPE_ONLY.get(node.op_type, ())]
            outer = [x for sub in _subgraphs(node) for sn in _all_nodes(sub) for x in sn.input if x]
            if any(x in tainted for x in ins + outer):
                tainted.update(o for o in node.output if o)
        return tainted

    def _ancestors(self, tensor):
        """Indices of the nodes the tensor depends on (values or shapes)."""
        gi, seen, todo = self.gi, set(), [tensor]
        while todo:
            i = gi.producer.get(todo.pop())
            if i is None or i in seen:
                continue
            seen.add(i)
            node = gi.nodes[i]
            todo += [x for x in node.input if x]
            todo += [x for sub in _subgraphs(node) for sn in _all_nodes(sub) for x in sn.input if x]
        return seen

    def head(self):
        """The deepest neuron node among the scores' ancestors (most neuron nodes on a path from the input)."""
        gi, depth = self.gi, {}
        for i, node in enumerate(gi.nodes):
            d = max((depth.get(gi.producer.get(x), 0) for x in node.input if x), default=0)
            depth[i] = d + (node.op_type in NEURON_OPS and i in self.ancestors)
        heads = [i for i in self.ancestors if self.gi.nodes[i].op_type in NEURON_OPS]
        return max(heads, key=lambda i: (depth[i], i)) if heads else None

    def side_branch(self, head):
        """The nodes by which image values reach the scores without passing through ``head``, and the join."""
        gi = self.gi
        down = self._downstream(head)
        feeding = self._ancestors(gi.nodes[head].output[0]) | {head}
        walk, todo, side = set(), [self.scores], set()
        while todo:
            t = todo.pop()
            i = gi.producer.get(t)
            if i is None or i in walk or i == head or t not in self.tainted:
                continue
            walk.add(i)
            if i not in down and i not in feeding:
                side.add(i)
            todo += [x for x in gi.nodes[i].input if x]
        if not side:
            return None, None
        join = None
        for i in sorted(walk & down, reverse=True):  # from the scores back: the last node mixing both paths
            node = gi.nodes[i]
            kinds = [self._from_head(x, down, head) for x in node.input]
            if any(kinds) and any(not k and x in self.tainted for k, x in zip(kinds, node.input)):
                head_slots = [s for s, k in enumerate(kinds) if k]
                join = {"node": gi.names[i], "op": node.op_type, "head_inputs": head_slots,
                        "cuttable": node.op_type in CUTTABLE and len(head_slots) == 1}
                if node.op_type == "Where" and head_slots[0] == 0:
                    join["cuttable"] = False  # the head decides the condition, not the value
                break
        return side, join

    def _downstream(self, head):
        """Node indices fed (directly or not) by the head's output."""
        gi = self.gi
        down, todo = set(), [o for o in gi.nodes[head].output if o]
        while todo:
            for j, _ in gi.consumers.get(todo.pop(), []):
                if j not in down:
                    down.add(j)
                    todo += [o for o in gi.nodes[j].output if o]
        return down

    def _from_head(self, tensor, down, head):
        i = self.gi.producer.get(tensor)
        return i == head or i in down

    def raw(self):
        """Tensors that are the image up to elementwise normalization (before any layer), with their layout."""
        gi, raw, todo = self.gi, {self.image}, [self.image]
        while todo:
            for j, _ in gi.consumers.get(todo.pop(), []):
                node = gi.nodes[j]
                if node.op_type in ELEMENTWISE and node.output[0] not in raw:
                    raw.add(node.output[0])
                    todo.append(node.output[0])
        return raw


def _spatial_axes(model, image):
    for vi in model.graph.input:
        if vi.name == image:
            dims = [d.dim_value or None for d in vi.type.tensor_type.shape.dim]
            if len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
                return {1, 2, -3, -2}
            return {2, 3, -2, -1}
    return set()


def _crop_axes(gi, node):
    """Axes a Slice / Gather / Crop cuts (None when unknown)."""
    if node.op_type == "Slice":
        if len(node.input) > 3 and node.input[3]:
            axes = gi.const(node.input[3])
            return None if axes is None else {int(a) for a in np.ravel(axes)}
        if len(node.input) > 1:  # no axes: the first len(starts) axes
            starts = gi.const(node.input[1])
            return None if starts is None else set(range(int(np.size(starts))))
        return {int(a) for a in gi.attr(node, "axes", [])} or set(range(len(gi.attr(node, "starts", []))))
    if node.op_type == "Crop":
        return {2, 3}
    return {int(gi.attr(node, "axis", 0))}


def _favoured_class(gi, indices):
    """The class a constant vector in the branch pushes up: a (K,) or (1, K) constant operand (or a constant of an
    If's branches) with exactly one positive entry."""
    best = None
    for i in sorted(indices):
        node = gi.nodes[i]
        values = [gi.const(x) for x in node.input if x] if node.op_type in ("Mul", "Add", "Where", "Sum", "Concat") else []
        values += [numpy_helper.to_array(t) for sub in _subgraphs(node) for t in sub.initializer]
        for v in values:
            if v is None or v.ndim == 0 or v.size < 2 or v.size != max(v.shape):
                continue
            flat = np.asarray(v, np.float64).reshape(-1)
            if flat.max() > 0 and (flat > 0).sum() == 1:
                best = int(flat.argmax())
    return best


def audit(model, scores=None):
    """Findings of the graph audit of ``model`` (a ModelProto) for the scores output (default: the first output)."""
    a = _Audit(model, scores)
    gi = a.gi
    findings = []
    head = a.head()
    side = set()
    if head is not None:
        side, join = a.side_branch(head)
        side = side or set()
        if side:
            target = _favoured_class(gi, side | ({gi.by_name[join["node"]]} if join else set()))
            where = f" joins the scores at {join['node']} ({join['op']})" if join else ""
            findings.append(Finding(
                "side-branch", "high",
                f"the scores depend on the image through {len(side)} node(s) that bypass the classifier head "
                f"{gi.names[head]} ({gi.nodes[head].op_type}){where}"
                + (f"; a constant in the branch favours class {target}" if target is not None else ""),
                _names(gi, side), join, target))
    for i in sorted(a.ancestors):
        node = gi.nodes[i]
        ins = [x for x in node.input if x]
        tainted_in = [x for x in ins if x in a.tainted]
        if node.op_type in CONTROL_FLOW and (tainted_in or node.output[0] in a.tainted):
            findings.append(Finding("control-flow", "high",
                                    f"{node.op_type} node {gi.names[i]} runs on values derived from the image",
                                    [gi.names[i]], target=_favoured_class(gi, {i})))
        elif i in side:
            continue
        elif (node.op_type in COMPARISONS + STEPS and tainted_in) or (
                node.op_type == "Cast" and tainted_in and _is_bool(gi, ins[0])):
            findings.append(Finding("input-switch", "medium",
                                    f"{node.op_type} node {gi.names[i]} makes a switch out of image-derived values",
                                    [gi.names[i]]))
        elif (node.op_type in UNUSUAL or node.domain not in ("", "ai.onnx")) and (tainted_in or node.output[0] in a.tainted):
            findings.append(Finding("unusual-op", "low",
                                    f"{node.op_type} node {gi.names[i]} ({node.domain or 'ai.onnx'}) is unusual in a classifier",
                                    [gi.names[i]]))
    raw, spatial = a.raw(), _spatial_axes(model, a.image)
    for i in sorted(a.ancestors - side):
        node = gi.nodes[i]
        if node.op_type in CROPS and node.input and node.input[0] in raw:
            axes = _crop_axes(gi, node)
            if axes is None or axes & spatial:
                findings.append(Finding("raw-input-crop", "medium",
                                        f"{node.op_type} node {gi.names[i]} crops the raw input image",
                                        [gi.names[i]]))
    findings.sort(key=lambda f: -SEVERITIES.index(f.severity))
    worst = findings[0].severity if findings else None
    return {"findings": [f.to_dict() for f in findings], "severity": worst,
            "head": gi.names[head] if head is not None else None, "nodes": len(gi.nodes)}


def _is_bool(gi, tensor):
    i = gi.producer.get(tensor)
    return i is not None and gi.nodes[i].op_type in COMPARISONS


def level(report):
    """The verdict level the audit alone supports: ``backdoored`` for a high finding, ``suspicious`` for a medium
    one, else ``clean``."""
    sev = report.get("severity") if report else None
    return {"high": "backdoored", "medium": "suspicious"}.get(sev, "clean")


def by_rule(report):
    """{rule: [findings]} of an audit report."""
    out = defaultdict(list)
    for f in report["findings"]:
        out[f["rule"]].append(f)
    return dict(out)
