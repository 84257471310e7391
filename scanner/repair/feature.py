"""The feature refit: one layer deeper than the head, so that the probes' features look like clean ones.

Where the head refit cannot stop a trigger (a filter, a signal, a natural blend spread over every feature the head
reads), the repair corrects the last feature layer before the head (a group-1 Conv, or a Gemm / MatMul on tokens):
its weights get a change dW, fitted by ridge regression with forward passes only, so that where the layer's output
enters its activation (after its bias, batch norm and residual join, the *site*) the change adds nothing on clean
images and gives back the clean image's values on the same image with a probe's trigger. The rows are the
layer's own receptive fields (its kernel, strides and pads over its input; every token of a MatMul), so one fit
is one least-squares problem. The change is folded into the layer's weights and bias through the per-channel
scale of the ops between the layer and the site: the graph keeps its operators.

The fit is tried at each of the last SITES feature layers, the last first, and the best of them all is kept: where a
trigger is best corrected depends on the network (a ViT's patch and blend triggers are corrected in the residual
stream before its last block, not after it; a ResNet's at its last conv: benchmarks/RESULTS.md). The sites after
the last are read in one shared pass over the images, as far as their grams fit GRAM_BYTES.

The probe rows' weight is chosen by k-fold cross-validation over images, each fold predicted by a model fitted
without it (a repaired copy run through onnxruntime; where the tensors the layer's part of the network starts from
fit TAIL_BYTES, the gram pass keeps them and only that part runs, :func:`scanner.graph.surgery.tail`, once checked
to give the whole model's predictions): the lowest probe success among the weights that keep
TARGET_AGREEMENT with the original on clean images, else the highest agreement (the head refit's rule). The
weights are tried lightest first, and the walk stops at the first that misses TARGET_AGREEMENT (heavier probe rows
change more of the clean images).
"""

import logging

import numpy as np

from scanner.errors import ScannerError
from scanner.graph import surgery
from scanner.graph.layers import GraphIndex, bn_scale
from scanner.repair.refit import TARGET_AGREEMENT, cost
from scanner.runtime.session import Session

log = logging.getLogger("scanner")

PROBE_WEIGHTS = (0.03, 0.1, 0.3, 1.0)
"""Weights of the probe rows against the clean rows the cross-validation tries."""
RIDGE = 0.01
"""Ridge strength, relative to the mean energy of the layer's input rows."""
MAX_INPUTS = 2048
"""A conv whose receptive field has more inputs than this (channels x kernel) is corrected at its kernel's centre
tap only (a 1x1 change of its weights): the gram stays (channels + 1)^2."""
SITES = 6
"""Feature layers, from the last before the head back, where the correction is fitted and cross-validated."""
GRAM_BYTES = 512 << 20
"""Bytes of float64 grams (all folds) that the sites sharing one pass over the images may fill (see :func:`_passes`)."""
TAIL_BYTES = 256 << 20
"""Bytes of float32 tensors (clean and probe images, the sites of one pass) the gram pass may keep so that the
cross-validation runs only the network after each site (see :class:`Tail`)."""
AFFINE = ("Add", "Sub", "Mul", "Div", "BatchNormalization")
"""Ops between the layer and its site: a per-channel scale and shift (or a residual join, which adds)."""


class Site:
    """Where the feature refit corrects a model: the layer, the tensor it reads (``input``), the tensor where its
    output enters the activation (``read``), and the per-channel scale from the layer's output to there; ``inputs``
    per row of its least squares, and whether the correction may change the bias (``intercept``: a MatMul without a
    bias Add gets none)."""

    def __init__(self, layer, read, scale, path, geometry, inputs, intercept):
        self.layer, self.input, self.read, self.scale, self.path = layer, layer.input, read, scale, path
        self.geometry = geometry  # Conv: (kernel, strides, pads, centre only); None for a Gemm / MatMul
        self.inputs, self.intercept = int(inputs), bool(intercept)

    def to_dict(self):
        d = {"layer": self.layer.id, "op_type": self.layer.op_type, "input": self.input, "site": self.read,
             "path": list(self.path)}
        if self.geometry is not None:
            d["kernel"] = list(self.geometry[0])
            d["centre_tap_only"] = self.geometry[3]
        return d


def site_layers(ctx, most=SITES):
    """The layers a correction may be fitted at: the last ``most`` Conv, Gemm and MatMul layers before the head,
    the last first."""
    return [l for l in ctx.layers if not l.is_head and l.op_type in ("Conv", "Gemm", "MatMul")][::-1][: max(1, most)]


def site(ctx, layer=None):
    """The :class:`Site` of ``ctx``'s model at ``layer`` (default: the last feature layer), or (None, why not)."""
    if layer is None:
        features = site_layers(ctx, 1)
        if not features:
            return None, "no Conv, Gemm or MatMul layer before the head"
        layer = features[0]
    gi = GraphIndex(ctx.proto, infer=False)
    node = gi.nodes[gi.by_name[layer.node]]
    if not layer.input or gi.const(layer.input) is not None:
        return None, f"layer {layer.id} reads no image-dependent tensor"
    geometry, w = None, gi.const(node.input[1])
    if layer.op_type == "Conv":
        if gi.attr(node, "group", 1) != 1 or w is None or w.ndim != 4:
            return None, f"layer {layer.id} is a grouped or non-2D conv"
        if list(gi.attr(node, "dilations", [1, 1])) != [1, 1] or gi.attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None, f"layer {layer.id} is a dilated or auto-padded conv"
        kernel = tuple(int(k) for k in w.shape[2:])
        centre = w.shape[1] * kernel[0] * kernel[1] > MAX_INPUTS
        geometry = (kernel, tuple(gi.attr(node, "strides", [1, 1])), tuple(gi.attr(node, "pads", [0, 0, 0, 0])), centre)
        inputs = w.shape[1] * (1 if centre else kernel[0] * kernel[1])
    elif layer.op_type == "Gemm" and (gi.attr(node, "transA", 0) or gi.attr(node, "alpha", 1.0) == 0):
        return None, f"layer {layer.id} is a transposed-input Gemm"
    else:  # a Gemm / MatMul layer's weight is a constant matrix (scanner.graph.layers): (in, out), or (out, in)
        inputs = w.shape[1] if layer.op_type == "Gemm" and gi.attr(node, "transB", 0) else w.shape[0]
    scale = np.ones(layer.channels)
    cur, path = node.output[0], []
    while True:
        cons = gi.consumers.get(cur, [])
        if len(cons) != 1 or cur in gi.outputs:
            break
        nxt, slot = gi.nodes[cons[0][0]], cons[0][1]
        factor = _affine(gi, nxt, slot, layer.channels)
        if factor is None:
            break
        scale, cur = scale * factor, nxt.output[0]
        path.append(nxt.op_type)
    return Site(layer, cur, scale, path, geometry, inputs, surgery.has_bias(ctx.proto, layer)), None


def _affine(gi, node, slot, channels):
    """The per-channel factor an elementwise ``node`` applies to its input ``slot`` (1 for an added tensor, a
    residual included), or None when it is not such an op."""
    if node.op_type not in AFFINE or len([o for o in node.output if o]) != 1 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "BatchNormalization":
        if slot != 0 or any(gi.const(n) is None for n in node.input[1:5]):
            return None
        return _per_channel(bn_scale(gi, node), channels)
    other = gi.const(node.input[1 - slot]) if len(node.input) == 2 else None
    if node.op_type == "Add":
        return np.ones(channels) if len(node.input) == 2 else None
    if node.op_type == "Sub":
        return np.full(channels, 1.0 if slot == 0 else -1.0) if len(node.input) == 2 else None
    if other is None or (node.op_type == "Div" and slot != 0):
        return None
    factor = _per_channel(np.asarray(other, np.float64), channels)
    if factor is None:
        return None
    return factor if node.op_type == "Mul" else 1.0 / factor


def _per_channel(value, channels):
    v = np.asarray(value, np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    return v.reshape(-1) if v.size == channels else None


def rows(site, x):
    """The layer's receptive fields over its input ``x`` (one row per output position) as (rows, inputs)."""
    if site.geometry is None:
        return x.reshape(-1, x.shape[-1]).astype(np.float32)
    (kh, kw), (sh, sw), pads, centre = site.geometry
    n, c, h, w = x.shape
    ho, wo = (h + pads[0] + pads[2] - kh) // sh + 1, (w + pads[1] + pads[3] - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    taps = [(kh // 2, kw // 2)] if centre else [(i, j) for i in range(kh) for j in range(kw)]
    out = np.empty((n, ho, wo, c, len(taps)), np.float32)
    for t, (i, j) in enumerate(taps):
        out[..., t] = xp[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw].transpose(0, 2, 3, 1)
    return out.reshape(n * ho * wo, -1)


def outputs(site, a):
    """The site's values ``a`` as (rows, channels), in the order of :func:`rows`."""
    if site.geometry is None:
        return a.reshape(-1, a.shape[-1]).astype(np.float32)
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]).astype(np.float32)


def feature_refit(rep, folds=3, weights=PROBE_WEIGHTS, sites=SITES, only=None):
    """Fit and fold the feature correction of ``rep``'s model from its clean images and paired trigger probes, at
    each of the last ``sites`` feature layers (:func:`site_layers`; ``only``: those of these layer ids), and keep the
    best (:func:`cost`, cross-validated). The walk stops at the first site where no probe image goes to its target any
    more at the agreement target: a site further back could at best tie. (Stopping at NO_EFFECT instead kept
    rgb10_vit_two's patch at its last MatMul, 1.0% cross-validated, 2.89% on the test sample, where the residual
    stream before its last block gives 1.50%: benchmarks/RESULTS.md.)

    Returns (proto, cross-validated :class:`scanner.repair.prune.Level`, fit entry: the kept site and weight, every
    site and weight tried, the layers no site could be made at and why); raises ScannerError when the model has no
    site or no paired trigger probe."""
    pairs = [i for i, p in enumerate(rep.probes) if p.trigger is not None and rep.paired(i)]
    layers = [l for l in site_layers(rep.ctx, sites) if only is None or l.id in only]
    if not layers:
        raise ScannerError("no layer for the feature refit: no Conv, Gemm or MatMul layer before the head")
    if not pairs:
        raise ScannerError("the feature refit needs trigger probes paired with the clean images")
    pixels = rep.clean_set.load_all(rep.pre).pixels
    n, k = len(pixels), max(2, folds)
    fold = np.arange(n) % k
    best, tried, skipped, wheres = None, [], [], []
    for layer in layers:
        where, why = site(rep.ctx, layer)
        if where is None:
            log.info("feature refit: no site at %s (%s)", layer.id, why)
            skipped.append({"layer": layer.id, "reason": why})
        else:
            wheres.append(where)
    passes, grams, tails = _passes(wheres, k), {}, {}
    for where in wheres:
        if where.layer.id not in grams:  # one pass over the images for this site and the next ones of its group
            group = next(g for g in passes if where in g)
            made, kept = _grams(rep, group, pixels, pairs, fold, k, _cuts(rep, group))
            grams.update(zip((w.layer.id for w in group), made))
            tails.update(kept)
        tail = tails.pop(where.layer.id, None)
        if tail is not None and not tail.agrees(rep, pairs):
            tail = None
        found = _fit_site(rep, where, grams.pop(where.layer.id), pixels, pairs, fold, k, weights, tried, tail)
        if best is None or found[0] < best[0]:
            best = found + (where,)
        kept = best[2]
        if kept.agreement >= TARGET_AGREEMENT and max(kept.probe_success or [0.0]) == 0.0:
            break  # no probe image reaches its target at the agreement target: a site further back could only tie
    if best is None:
        raise ScannerError("no layer for the feature refit: " + "; ".join(f"{e['layer']}: {e['reason']}" for e in skipped))
    _, weight, level, total, intercept, where = best
    proto = fold_into(rep.ctx.proto, where, _solve(total, weight, intercept))
    log.info("feature refit kept at %s, probe weight %g (%d site(s) tried)", where.layer.id, weight,
             len({e["layer"] for e in tried}))
    return proto, level, {**where.to_dict(), "probe_weight": weight, "ridge": RIDGE, "folds": k, "intercept": intercept,
                          "inputs": int(total[0].shape[0] - 1), "rows": int(total[3]), "tried": tried,
                          "sites_skipped": skipped}


def _fit_site(rep, where, grams, pixels, pairs, fold, k, weights, tried, tail=None):
    """(cost, weight, level, summed grams, intercept) of the best probe weight at site ``where`` (its per-fold
    ``grams``), cross-validated over the ``k`` folds (through ``tail``, a :class:`Tail` of the site, when given);
    each weight's result is appended to ``tried``."""
    intercept = where.intercept
    total = [sum(g[j] for g in grams) for j in range(4)]
    best = None
    for weight in weights:
        clean_preds = np.zeros(len(pixels), np.int64)
        probe_preds = [m.preds.copy() for m in rep.probed]
        for f in range(k):
            theta = _solve([t - g for t, g in zip(total, grams[f])], weight, intercept)
            held = fold == f
            if tail is not None:
                session = tail.session(fold_into(tail.proto, where, theta))
                clean_preds[held] = tail.preds(session, None, held)
                for i in pairs:
                    probe_preds[i][held] = tail.preds(session, i, held)
                runner = None
            else:
                runner = rep.ctx.derived(fold_into(rep.ctx.proto, where, theta)).runner(batch_size=rep.batch_size)
                clean_preds[held] = runner.run(pixels[held], norms=False, features=False).preds
                for i in pairs:
                    stamped = rep.probes[i].trigger.apply(pixels[held], color=rep.pre.color)
                    probe_preds[i][held] = runner.run(stamped, norms=False, features=False).preds
            for i, p in enumerate(rep.probes):  # probe folders take no part in the fit: any fold's model judges them
                if i not in pairs and f == 0 and p.images is not None:
                    runner = runner or rep.ctx.derived(fold_into(rep.ctx.proto, where, theta)).runner(
                        batch_size=rep.batch_size)
                    probe_preds[i] = runner.predict(p.images, label="feature refit")[0]
        level = rep.level(0, clean_preds, probe_preds)
        log.info("feature refit at %s, probe weight %g: agreement %.2f%%, probe success %s (cross-validated)",
                 where.layer.id, weight, 100 * level.agreement, ", ".join(f"{100 * s:.1f}%" for s in level.probe_success))
        tried.append({"layer": where.layer.id, "probe_weight": weight, **level.to_dict()})
        if best is None or cost(level) < best[0]:
            best = (cost(level), weight, level)
        if level.agreement < TARGET_AGREEMENT:  # heavier probe rows only lose more agreement: no better fit there
            break
    return best + (total, intercept)


def _gram_bytes(where):
    """Bytes of one fold's grams of a site (float64): two square ones of its rows' inputs and the right-hand side."""
    return 8 * (where.inputs + 1) * (2 * (where.inputs + 1) + where.layer.channels)


def _passes(wheres, k, budget=GRAM_BYTES):
    """The sites grouped into passes over the images: the first site alone (the walk ends there when it stops every
    probe), then the next ones together while their ``k`` folds' grams fit ``budget`` bytes. One pass reads all of its
    sites' tensors: the walk over a ViT's six sites ran 1.5x faster in one pass than in six, with the same fits."""
    if not wheres:
        return []
    out, group, used = [[wheres[0]]], [], 0
    for w in wheres[1:]:
        b = k * _gram_bytes(w)
        if group and used + b > budget:
            out.append(group)
            group, used = [], 0
        group.append(w)
        used += b
    return out + ([group] if group else [])


def _cuts(rep, wheres):
    """{layer id: (tail proto, its input tensors)} of the sites of ``wheres`` that have a tail
    (:func:`scanner.graph.surgery.tail`); the others run the whole model in the cross-validation."""
    out = {}
    for w in wheres:
        try:
            out[w.layer.id] = surgery.tail(rep.ctx.proto, w.layer.node, rep.ctx.scores)
        except ScannerError as exc:
            log.debug("feature refit at %s: the cross-validation runs the whole model (%s)", w.layer.id, exc)
    return out


class Tail:
    """The network from a site's layer on (``proto``), and its input tensors on the clean images (``clean``) and on
    each paired probe's (``probes[i]``), kept by the gram pass: a cross-validation fold runs only this part. A probe's
    trigger is then stamped as the gram pass stamped it (a sticker at random positions: by each image's index in the
    clean set, as the Repair measured it), where the whole model's folds stamp each fold's images afresh."""

    def __init__(self, rep, proto, cut, clean, probes):
        self.ctx, self.batch_size, self.proto, self.cut = rep.ctx, rep.batch_size, proto, cut
        self.clean, self.probes = clean, probes

    def session(self, proto):
        return Session(proto, device=self.ctx.device, threads=self.ctx.threads)

    def preds(self, session, probe, held):
        """Predicted classes on the images ``held`` (a mask) of the clean set (``probe`` None) or of probe ``probe``."""
        tensors = self.clean if probe is None else self.probes[probe]
        index = np.flatnonzero(held)
        out = []
        for s in range(0, len(index), self.batch_size):
            part = index[s : s + self.batch_size]
            feeds = {t: a[part] for t, a in zip(self.cut[1:], tensors[1:])}
            out.append(session.run(tensors[0][part], [self.ctx.scores], feeds)[self.ctx.scores].reshape(len(part), -1))
        return np.concatenate(out).argmax(1)

    def agrees(self, rep, pairs):
        """Whether the tail, unchanged, gives the whole model's predictions on every clean and probe image (else the
        cross-validation runs the whole model: a tail is a shortcut, never a different answer)."""
        session = self.session(self.proto)
        everything = np.ones(len(self.clean[0]), bool)
        same = np.array_equal(self.preds(session, None, everything), rep.clean.preds) and all(
            np.array_equal(self.preds(session, i, everything), rep.probed[i].preds) for i in pairs)
        if not same:
            log.info("feature refit: the network after %s does not reproduce the model's predictions on the tensors "
                     "it starts from; its cross-validation runs the whole model", self.cut)
        return same


def _grams(rep, wheres, pixels, pairs, fold, k, cuts=None):
    """(per site of ``wheres``, per fold of images: [clean gram, probe gram, probe right-hand side, clean rows] of the
    least squares (each batch's products in float32, summed in float64), {layer id: :class:`Tail`}): one pass over the
    images for all of them. The tails are of the sites in ``cuts`` (:func:`_cuts`) whose input tensors, with those of
    the sites before them in ``wheres``, fit TAIL_BYTES."""
    cuts = cuts or {}
    tapped = tuple(dict.fromkeys(t for w in wheres for t in cuts.get(w.layer.id, ((), ()))[1]))
    names = tuple(dict.fromkeys([t for w in wheres for t in (w.input, w.read)] + list(tapped)))
    runner = rep.ctx.runner(features=names, batch_size=rep.batch_size)
    ones = [1.0 if w.intercept else 0.0 for w in wheres]
    grams = [None] * len(wheres)
    kept, store = {}, {}  # layer id -> (proto, cut); tensor -> [clean, probe, ...] arrays over all images
    for s in range(0, len(pixels), rep.batch_size):
        chunk = pixels[s : s + rep.batch_size]
        clean = runner.run(chunk, norms=False, flatten=False).features
        probed = [runner.run(rep.probes[i].trigger.apply(chunk, color=rep.pre.color, start=s), norms=False,
                             flatten=False).features for i in pairs]
        if s == 0:
            kept, store = _keep_cuts(wheres, cuts, clean, len(pixels), 1 + len(pairs), TAIL_BYTES)
        for t, arrays in store.items():
            for a, features in zip(arrays, [clean] + probed):
                a[s : s + len(chunk)] = features[t]
        for j, where in enumerate(wheres):
            zc = _with_ones(rows(where, clean[where.input]), ones[j])
            ac = outputs(where, clean[where.read])
            which = np.repeat(fold[s : s + len(chunk)], len(zc) // len(chunk))
            if grams[j] is None:
                d = zc.shape[1]
                grams[j] = [[np.zeros((d, d)), np.zeros((d, d)), np.zeros((d, ac.shape[1])), 0] for _ in range(k)]
            for f, g in enumerate(grams[j]):
                zf = zc[which == f]
                g[0] += zf.T @ zf
                g[3] += len(zf)
            for features in probed:
                zt = _with_ones(rows(where, features[where.input]), ones[j])
                delta = ac - outputs(where, features[where.read])
                for f, g in enumerate(grams[j]):
                    m = which == f
                    g[1] += zt[m].T @ zt[m]
                    g[2] += zt[m].T @ delta[m]
    tails = {}
    for lid, (proto, cut) in kept.items():
        arrays = [store[t] for t in cut]
        tails[lid] = Tail(rep, proto, cut, [a[0] for a in arrays], {i: [a[1 + j] for a in arrays] for j, i in enumerate(pairs)})
    return grams, tails


def _keep_cuts(wheres, cuts, first, images, copies, budget):
    """({layer id: (proto, cut)} of the sites whose tails are kept, {tensor: ``copies`` arrays of ``images`` each}):
    the sites of ``wheres`` in order while every kept tensor fits ``budget`` bytes (sizes from the ``first`` batch's
    features)."""
    kept, store, used = {}, {}, 0
    for w in wheres:
        if w.layer.id not in cuts:
            continue
        proto, cut = cuts[w.layer.id]
        new = [t for t in cut if t not in store]
        b = sum(copies * images * first[t][0].nbytes for t in new)
        if used + b > budget or any(first[t].dtype != np.float32 for t in cut):
            continue
        used += b
        for t in new:
            store[t] = [np.empty((images,) + first[t].shape[1:], np.float32) for _ in range(copies)]
        kept[w.layer.id] = (proto, cut)
    return kept, store


def _with_ones(z, ones=1.0):
    return np.hstack([z, np.full((len(z), 1), ones, z.dtype)])


def _solve(parts, weight, intercept=True):
    """theta (inputs + 1, channels) minimising |Z_c theta|^2 + weight |Z_t theta - (A_c - A_t)|^2 + ridge |dW|^2,
    each term over the clean rows' count; the last row is the bias change (0 without ``intercept``)."""
    gc, gt, rt, count = parts
    g = (gc + weight * gt) / count
    reg = np.eye(len(g)) * RIDGE * (float(np.mean(np.diag(gc)[:-1])) / count or 1.0)
    reg[-1, -1] = 0.0 if intercept else 1.0
    return np.linalg.solve(g + reg, weight * rt / count)


def fold_into(proto, where, theta):
    """A copy of ``proto`` whose layer at ``where`` computes its output plus the fitted change ``theta`` (in site
    units, divided by the path's per-channel scale; channels the path zeroes get no change)."""
    scale = where.scale
    ok = np.abs(scale) > 1e-8 * max(float(np.abs(scale).max()), 1e-30)
    step = np.where(ok, 1.0 / np.where(ok, scale, 1.0), 0.0)
    dw, db = theta[:-1] * step, theta[-1] * step  # (inputs, channels), (channels,)
    weight, bias = surgery.linear_weights(proto, where.layer)
    weight = weight.astype(np.float64)
    if where.geometry is not None:
        (kh, kw), _, _, centre = where.geometry
        full = weight.reshape(weight.shape[0], -1, kh, kw)
        if centre:
            full[:, :, kh // 2, kw // 2] += dw.T
        else:
            full += dw.T.reshape(full.shape)
        weight = full.reshape(weight.shape[0], -1)
    else:
        weight = weight + dw.T
    return surgery.set_linear(proto, where.layer, weight, bias.astype(np.float64) + db)
