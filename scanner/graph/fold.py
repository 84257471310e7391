"""Fold constant subgraphs: weights that other exporters compute in the graph become plain initializers.

Third-party files build weights with operators: a float16 initializer behind a Cast, a flat weight behind a
Reshape, a bias from Shape/Expand or ConstantOfShape (torch's dynamo exporter with ``optimize=False``, the
caffe2-converted ONNX Model Zoo). Layer discovery and surgery need the value, so every node whose inputs are all
fixed is evaluated once (onnxruntime, on a model of just those nodes) and its consumed outputs become
initializers; nodes left without consumers are dropped. DequantizeLinear is not folded: a QDQ model keeps its
quantized weights (:class:`scanner.graph.layers.GraphIndex` reads through it). The folded model is checked
against the original on random inputs before it is used; on any difference the original is kept (and a warning
says why).
"""

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from scanner.graph.layers import GraphIndex, _subgraphs, copy_model

log = logging.getLogger("scanner")

NOT_FOLDED = ("DequantizeLinear", "QuantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike", "Multinomial", "Bernoulli", "Constant")
TYPE_ONLY = {"CastLike": (1,)}
"""Inputs that give only a dtype (CastLike's second input): a value computed from constants through them is fixed."""
MAX_FOLDED_ELEMENTS = 1 << 26
"""A folded tensor larger than this stays computed in the graph (folding it would bloat the file)."""


def _fixed(gi):
    """Indices of the nodes whose outputs do not depend on any graph input that is not an initializer."""
    inputs = {vi.name for vi in gi.model.graph.input} - set(gi.initializers)
    known, fixed = set(gi.initializers), set()
    for i, node in enumerate(gi.nodes):
        if node.op_type == "Constant":
            known.update(node.output)
            continue
        if node.op_type in NOT_FOLDED or any(True for _ in _subgraphs(node)) or node.domain not in ("", "ai.onnx"):
            continue
        ins = [x for slot, x in enumerate(node.input) if x and slot not in TYPE_ONLY.get(node.op_type, ())]
        if all(x in known and x not in inputs for x in ins):
            fixed.add(i)
            known.update(o for o in node.output if o)
    return fixed


def foldable(model):
    """(fixed node indices, tensors to fold): the outputs of fixed nodes that a non-fixed node or a graph output uses."""
    gi = GraphIndex(model, infer=False)
    fixed = _fixed(gi)
    frontier = []
    for i in sorted(fixed):
        for out in gi.nodes[i].output:
            users = [j for j, _ in gi.consumers.get(out, [])]
            if out and (out in gi.outputs or any(j not in fixed for j in users)) and out not in frontier:
                frontier.append(out)
    return fixed, frontier


def _evaluate(model, fixed, frontier):
    """{tensor: value} of the frontier tensors, computed by onnxruntime on a model of the fixed nodes only."""
    from scanner.runtime.session import ort

    gi = GraphIndex(model, infer=True)
    sub = onnx.ModelProto(ir_version=model.ir_version)
    sub.opset_import.extend(model.opset_import)
    g = sub.graph
    g.name = "fold"
    nodes = [_as_cast(gi, gi.nodes[i]) for i in sorted(fixed)]
    used = {x for n in nodes for x in n.input if x}
    constants = [n for n in gi.nodes if n.op_type == "Constant" and any(o in used for o in n.output)]
    g.node.extend(constants + nodes)
    g.initializer.extend(t for t in model.graph.initializer if t.name in used)
    if model.ir_version < 4:
        g.input.extend(vi for vi in model.graph.input if vi.name in used and vi.name in gi.initializers)
    for name in frontier:
        g.output.add(name=name).type.tensor_type.elem_type = gi.elem_type(name)
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = rt.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip(frontier, session.run(frontier, {})))


def _as_cast(gi, node):
    """A CastLike whose type comes from a non-constant tensor, as the Cast it amounts to (other nodes as they are)."""
    if node.op_type != "CastLike":
        return node
    return onnx.helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=gi.elem_type(node.input[1]))


def fold_constants(model, source=None, inplace=False):
    """(model, record): ``model`` with its constant subgraphs folded, and what was folded ({"nodes", "tensors"};
    None when there was nothing to fold or the fold was refused).

    Exact folds are not checked by running the model: Identity copies of initializers (how torch's legacy exporter
    shares weights) become renamed initializers, and integer tensors (shape arithmetic) are computed by
    onnxruntime from those nodes alone. A fold that computes float values is checked against the original on
    random inputs. The input proto is untouched unless ``inplace`` (then an exact fold edits it instead of a copy:
    one model in memory, not two)."""
    fixed, frontier = foldable(model)
    gi = GraphIndex(model, infer=False)
    frontier = [t for t in frontier if gi.producer.get(t) in fixed]
    if not frontier:
        return model, None
    aliases = _identity_aliases(gi, fixed, frontier)
    computed = [t for t in frontier if t not in aliases]
    values = {}
    if computed:
        try:
            values = _evaluate(model, _ancestors(gi, fixed, computed), computed)
        except Exception as exc:  # noqa: BLE001 - an op onnxruntime cannot run alone: keep the graph as it is
            log.warning("%s: could not fold %d constant tensor(s) (%s); layers whose weights they are will be left out",
                        source or "model", len(computed), " ".join(str(exc).split())[:160])
            values = {}
        values = {t: v for t, v in values.items() if np.size(v) <= MAX_FOLDED_ELEMENTS}
    if not values and not aliases:
        return model, None
    exact = all(np.asarray(v).dtype.kind in "iub" for v in values.values())
    from scanner.graph.surgery import drop_dead

    m = model if inplace and exact else copy_model(model)
    g = m.graph
    by_name = {t.name: t for t in g.initializer}
    for name, origin in aliases.items():
        t = g.initializer.add()
        t.CopyFrom(by_name[origin])
        t.name = name
    for name, value in values.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    if m.ir_version < 4:  # IR 3: every initializer is also a graph input
        for name in list(aliases) + list(values):
            t = next(t for t in g.initializer if t.name == name)
            g.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    done = set(aliases) | set(values)
    for node in g.node:  # the folded tensors now come from initializers: their producers lose those outputs
        node.output[:] = ["" if o in done else o for o in node.output]
    removed = drop_dead(m)
    if not exact and not _same_outputs(model, m, source):
        return model, None
    log.info("%s: folded %d constant tensor(s) computed by %d node(s)%s", source or "model", len(done), len(removed),
             "" if exact else " (checked on random inputs)")
    return m, {"tensors": len(done), "nodes": len(removed)}


def _identity_aliases(gi, fixed, frontier):
    """{frontier tensor: initializer it copies} for the folded tensors that are an Identity chain over an
    initializer."""
    aliases = {}
    for name in frontier:
        source = name
        while source in gi.producer and gi.producer[source] in fixed and gi.nodes[gi.producer[source]].op_type == "Identity":
            source = gi.nodes[gi.producer[source]].input[0]
        if source in gi.initializers:
            aliases[name] = source
    return aliases


def _ancestors(gi, fixed, tensors):
    """The fixed nodes that ``tensors`` are computed from."""
    need, todo = set(), list(tensors)
    while todo:
        i = gi.producer.get(todo.pop())
        if i is None or i not in fixed or i in need:
            continue
        need.add(i)
        todo.extend(x for x in gi.nodes[i].input if x)
    return need


def _same_outputs(a, b, source, tries=2):
    """Whether models ``a`` and ``b`` give the same outputs on random inputs (the fold changed nothing)."""
    from scanner.runtime.session import Session

    try:
        sa, sb = Session(a, device="cpu", source=source), Session(b, device="cpu", source=source)
    except Exception as exc:  # noqa: BLE001 - the folded model does not load: keep the original
        log.warning("%s: the folded model does not load (%s); using the model as it is", source or "model", exc)
        return False
    inp = sa.session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 2 for d in inp.shape]
    rng = np.random.RandomState(0)
    for _ in range(tries):
        if "uint8" in inp.type or "int8" in inp.type:
            x = rng.randint(0, 128, size=shape).astype(np.uint8 if "uint8" in inp.type else np.int8)
        else:
            x = rng.randn(*shape).astype(np.float16 if "float16" in inp.type else np.float64 if "double" in inp.type else np.float32)
        ra, rb = sa.run(x), sb.run(x)
        for name in ra:
            va, vb = np.asarray(ra[name]), np.asarray(rb[name])
            if va.shape != vb.shape or not np.allclose(va.astype(np.float64), vb.astype(np.float64), rtol=1e-4, atol=1e-5):
                log.warning("%s: folding constants changed output %r; using the model as it is", source or "model", name)
                return False
    return True
