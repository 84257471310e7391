"""Weights-only evidence: what the weights alone say, with no data and no forward pass.

CLP (channel Lipschitz): per conv output channel, the largest singular value of its kernel (C_in x kH*kW)
times ``|gamma| / sqrt(var + eps)`` of a BatchNormalization right after it when the BN is not folded; channels
above ``mean + CLP_U * std`` of their layer are outliers. Computed from the graph's real topology (the layer's
read chain), so pre-activation networks, where BN does not follow the conv, get the bare kernel bound.
"""

import numpy as np

from scanner.graph.layers import CONV_OPS, GraphIndex

CLP_U = 3.0


def channel_lipschitz(proto, layers):
    """Per conv layer of ``layers`` (discovered on ``proto``): channel Lipschitz upper bounds and CLP outliers."""
    gi = GraphIndex(proto, infer=False)
    rows = []
    for layer in layers:
        if layer.op_type not in CONV_OPS:
            continue
        node = gi.nodes[gi.by_name[layer.node]]
        w = gi.const(node.input[1])
        group = gi.attr(node, "group", 1)
        if w is None or w.ndim < 3:
            continue
        w = np.asarray(w, np.float64)
        if layer.op_type == "ConvTranspose":
            if group != 1:
                continue
            w = np.moveaxis(w, 1, 0)
        kernels = w.reshape(w.shape[0], w.shape[1], -1)
        bound = np.array([np.linalg.norm(k, 2) for k in kernels])
        bn = "folded or absent"
        if "BatchNormalization" in layer.chain:
            bn_node = gi.nodes[gi.by_name[layer.chain_nodes[layer.chain.index("BatchNormalization")]]]
            gamma, _, _, var = (np.asarray(gi.const(n), np.float64).reshape(-1) for n in bn_node.input[1:5])
            eps = gi.attr(bn_node, "epsilon", 1e-5)
            bound = bound * np.abs(gamma) / np.sqrt(var + eps)
            bn = "unfused BatchNormalization"
        mean, std = float(bound.mean()), float(bound.std())
        z = (bound - mean) / std if std > 0 else np.zeros_like(bound)
        rows.append(
            {
                "layer": layer.id,
                "channels": int(len(bound)),
                "batchnorm": bn,
                "max_z": round(float(z.max()), 3),
                "outliers": [int(k) for k in np.flatnonzero(z > CLP_U)],
            }
        )
    return {"u": CLP_U, "layers": rows, "outliers": int(sum(len(r["outliers"]) for r in rows))}
