"""``scanner inspect``: model facts, preprocessing and the layer table."""

from scanner.data.images import resolve_preprocess
from scanner.layers import discover
from scanner.model import load_model


def inspect_model(path, preprocess=None):
    """JSON-ready facts about a model and its neuron layers."""
    model = load_model(path)
    pre = resolve_preprocess(model.input.shape, model.input.dtype, model.metadata, preprocess, source=model.path)
    layers = discover(model.proto)
    return {
        "schema": "scanner.inspect/1",
        "model": model.facts(),
        "preprocess": pre.to_dict(),
        "preprocess_sources": pre.sources,
        "layers": [
            {
                "index": l.index,
                "id": l.id,
                "op_type": l.op_type,
                "node": l.node,
                "output": l.output,
                "read": l.read,
                "chain": list(l.chain),
                "channels": l.channels,
                "spatial": list(l.spatial) if l.spatial else None,
                "nonnegative": l.nonnegative,
                "is_last_conv": l.is_last_conv,
                "is_head": l.is_head,
            }
            for l in layers
        ],
    }
