"""``scanner inspect``: model facts, preprocessing and the layer table."""

from scanner.context import ModelContext


def inspect_model(model, preprocess=None):
    """JSON-ready facts about a model (a path or a ModelContext) and its neuron layers."""
    ctx = model if isinstance(model, ModelContext) else ModelContext.open(model, preprocess)
    pre = ctx.preprocess
    return {
        "schema": "scanner.inspect/1",
        "model": ctx.facts(),
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
            for l in ctx.layers
        ],
        "audit": ctx.audit,
    }
