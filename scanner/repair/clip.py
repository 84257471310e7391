"""Activation clipping: bound every measured layer's channels by the peaks clean images reach.

Cheng et al. found that a trigger drives a few channels to peak activations (l-inf of their maps) far above
what clean images produce. Holding each channel of every layer under a quantile of its clean per-image peaks
(and a signed map inside the same bound below) keeps clean behaviour nearly intact and takes much of a
trigger's effect away before the head refit sees it. The quantile is the tightest of QUANTILES that keeps
CLIP_AGREEMENT with the original model on the clean images, and no tighter than needed: the walk stops at the
first bound under which no synthesized trigger has an effect left (NO_EFFECT). Bounds and choice come from the repair's own clean
images, never from the held-out ones.
"""

import logging

import numpy as np
import onnx

from scanner.graph import surgery
from scanner.graph.layers import GraphIndex
from scanner.repair.verify import NO_EFFECT

log = logging.getLogger("scanner")

QUANTILES = (100.0, 99.0, 98.0, 95.0, 90.0)
"""Percentiles of the clean per-image channel peaks tried as bounds, loosest first."""
CLIP_AGREEMENT = 0.995
"""Agreement with the original model on the clean images the clipping may not go below: most of the repair's
allowance (the removal check asks for 0.98 on held-out images) is left to the head refit."""
CLIP_IMAGES = (64, 512)
"""Fewest and most clean images (each also with every trigger) the bounds are tried on."""
CLIP_SHARE = 0.1
"""The share of the search's query budget the walk over QUANTILES may spend (within CLIP_IMAGES)."""


def clip_layers(ctx):
    """The layers to bound: every measured layer but the head (its scores are the model's output)."""
    return [l for l in ctx.layers if not l.is_head]


def peaks(ctx, layers, pixels):
    """The clean per-image peak (l-inf) of every channel of ``layers``: (N, channels) and the layers' column slices."""
    runner = ctx.runner(layers, norms=("linf",))
    return runner.run(pixels).norms["linf"], runner.slices


def map_dtypes(ctx, layers):
    """The numpy dtype of each layer's read (its bounds are written in it)."""
    gi = GraphIndex(ctx.proto, infer=False)
    return [onnx.helper.tensor_dtype_to_np_dtype(gi.elem_type(l.read)) for l in layers]


def bounds_at(layers, slices, dtypes, peak, quantile):
    """{layer id: (low, high)}: ``quantile`` of the per-image peaks per channel; low = -high for a signed map
    (None for a nonnegative one), in each map's dtype (``dtypes``, see :func:`map_dtypes`)."""
    top = np.percentile(peak, quantile, axis=0)
    out = {}
    for layer, (lo, hi), dtype in zip(layers, slices, dtypes):
        b = top[lo:hi].astype(dtype)
        out[layer.id] = (None if layer.nonnegative else -b, b)
    return out


def _success(runner, pixels, trigger, target, color, clean_preds):
    others = clean_preds != target
    if not others.any():
        return 0.0
    preds = runner.run(trigger.apply(pixels[others], color=color), norms=False, features=False).scores.argmax(1)
    return float((preds == target).mean())


def sample_size(queries, probes):
    """Clean images to try each bound on: CLIP_SHARE of ``queries`` over the walk's passes, within CLIP_IMAGES."""
    return int(np.clip(CLIP_SHARE * queries / (len(QUANTILES) * (1 + probes)), *CLIP_IMAGES))


def clip(ctx, pixels, probes, queries):
    """Bound ``ctx``'s model (see the module docstring) with ``probes`` [(Trigger, target)] on clean ``pixels``,
    trying each bound on :func:`sample_size` of them (``queries``: the search's budget).

    Returns (clipped proto or None when no bound keeps CLIP_AGREEMENT, the report entry: every quantile tried
    with its agreement and trigger success, and the one chosen)."""
    layers = clip_layers(ctx)
    if not layers:
        return None, {"layers": 0, "chosen": None, "tried": [], "reason": "no layer to bound"}
    peak, slices = peaks(ctx, layers, pixels)
    dtypes = map_dtypes(ctx, layers)
    sample = pixels[:sample_size(queries, len(probes))]
    color = ctx.preprocess.color
    base = ctx.runner().run(sample, norms=False, features=False).scores.argmax(1)
    tried, chosen, passes = [], None, len(pixels) + len(sample)
    for q in QUANTILES:
        proto = surgery.clip(ctx.proto, layers, bounds_at(layers, slices, dtypes, peak, q))
        runner = ctx.derived(proto).runner()
        agreement = float((runner.run(sample, norms=False, features=False).scores.argmax(1) == base).mean())
        success = [_success(runner, sample, t, k, color, base) for t, k in probes]
        passes += len(sample) + sum(int((base != k).sum()) for _, k in probes)
        tried.append({"quantile": q, "agreement": round(agreement, 6), "trigger_success": [round(s, 6) for s in success]})
        log.info("clip at the %g%% quantile of clean peaks: agreement %.2f%%, trigger success %s", q, 100 * agreement,
                 ", ".join(f"{100 * s:.1f}%" for s in success))
        if agreement < CLIP_AGREEMENT:
            break
        chosen = (q, proto)
        if all(s <= NO_EFFECT for s in success):
            break
    entry = {"layers": len(layers), "images": int(len(pixels)), "sample_images": int(len(sample)),
             "queries": passes, "min_agreement": CLIP_AGREEMENT, "tried": tried, "chosen": chosen[0] if chosen else None,
             "nodes_added": sum(n.name.endswith(surgery.CLIP_SUFFIX) for n in chosen[1].graph.node) if chosen else 0}
    return (chosen[1] if chosen else None), entry
