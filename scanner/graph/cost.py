"""What one forward pass costs, from the graph alone, and a fixed batch size made dynamic when the graph allows.

:func:`flops_per_image` counts the multiply-adds of the Conv, ConvTranspose, Gemm and MatMul nodes (x2) from
inferred shapes: a property of the model, the same on every machine, so a search budget derived from it gives
the same work (and verdict) under any load. :func:`largest_map` is the size of the largest tensor one image fills
(what sizes the runner's session calls on CPU). :func:`dynamic_batch` turns an input exported with batch 1 into a
symbolic batch, kept only when the model then gives the same outputs for a batch as for its images one by one.
"""

import logging

import numpy as np
import onnx

from scanner.graph.layers import GraphIndex, copy_model

log = logging.getLogger("scanner")


def _known(dims):
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


def flops_per_image(model):
    """Floating-point operations (2 x multiply-adds) of the neuron nodes for one image, from the nodes whose shapes
    are known (None when none is)."""
    gi = GraphIndex(model)
    total, counted = 0, 0
    for node in gi.nodes:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out = gi.shape(node.output[0])
        w = gi.const(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("Conv", "ConvTranspose"):
            if w is None or not _known(out[1:] if out else None):
                continue
            group = gi.attr(node, "group", 1)
            per_out = int(np.prod(w.shape[1:])) if node.op_type == "Conv" else int(w.shape[0] // group * np.prod(w.shape[2:]))
            total += int(np.prod(out[1:])) * per_out
            counted += 1
        else:
            a = gi.shape(node.input[0])
            b = w.shape if w is not None else gi.shape(node.input[1])
            if not a or not b or not _known(a[1:]) or not _known(list(b)[-1:]):
                continue
            k = a[-1] if node.op_type == "MatMul" or not gi.attr(node, "transA", 0) else a[0]
            n = b[-1] if node.op_type == "MatMul" or not gi.attr(node, "transB", 0) else b[0]
            rows = int(np.prod(a[1:-1])) if node.op_type == "MatMul" and len(a) > 2 else 1
            total += rows * int(k) * int(n)
            counted += 1
    return 2 * total if counted else None


def largest_map(model):
    """Bytes (as float32) of the largest tensor a node computes for one image, from the tensors whose shapes past
    the batch axis are known; None when none is."""
    gi = GraphIndex(model)
    sizes = [int(np.prod(dims[1:])) * 4 for node in gi.nodes for out in node.output if out
             for dims in [gi.shape(out)] if dims and len(dims) > 1 and _known(dims[1:])]
    return max(sizes) if sizes else None


def dynamic_batch(model, source=None):
    """(model, changed): ``model`` with its image input's batch of 1 made symbolic (outputs too), when onnxruntime
    then runs a batch of 3 with the same outputs as three single images; else the model as it is."""
    from scanner.runtime.session import Session

    g = model.graph
    inits = {t.name for t in g.initializer}
    image = next(vi for vi in g.input if vi.name not in inits)
    dims = image.type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
        return model, False
    m = copy_model(model)
    for vi in [v for v in m.graph.input if v.name == image.name] + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim
        if d and d[0].HasField("dim_value") and d[0].dim_value == 1:
            d[0].Clear()
            d[0].dim_param = "N"
    del m.graph.value_info[:]
    try:
        onnx.checker.check_model(m)
        single, batch = Session(model, device="cpu", source=source), Session(m, device="cpu", source=source)
        shape = [d.dim_value for d in dims]
        dtype = {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.FLOAT16: np.float16,
                 onnx.TensorProto.DOUBLE: np.float64}.get(image.type.tensor_type.elem_type, np.float32)
        x = (np.random.RandomState(0).rand(3, *shape[1:]) * (255 if dtype in (np.uint8, np.int8) else 1)).astype(dtype)
        one = single.run(x)  # the fixed-batch session runs them one by one
        three = batch.session.run(None, {batch.input_name: x})
        for name, value in zip(batch.output_names, three):
            if value.shape != one[name].shape or not np.allclose(value, one[name], rtol=1e-4, atol=1e-5):
                raise ValueError(f"output {name} differs")
    except Exception as exc:  # noqa: BLE001 - the graph hard-codes its batch: run image by image
        log.info("%s: the batch of 1 stays fixed (%s); images run one at a time", source or "model",
                 " ".join(str(exc).split())[:120])
        return model, False
    log.info("%s: batch dimension made dynamic (was 1)", source or "model")
    return m, True
