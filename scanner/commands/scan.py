"""``scanner scan``: per-channel l-inf / l1 / l2 norms on clean and probe images, and the probe's top channels."""

import time

import numpy as np

from scanner import __version__
from scanner.context import ModelContext
from scanner.data.images import ImageSet
from scanner.data.probes import Probe
from scanner.detect.scan import dominant_class, layer_facts, measure
from scanner.detect.stats import OUTLIER_Z, _r, probe_scores, relative_rise
from scanner.graph.instrument import NORMS

SCHEMA = "scanner.scan/1"


def scan(model, data, probe=None, layers="last", device="auto", batch_size=64, threads=None, limit=None, preprocess=None,
         top=10, min_images=1):
    """Scan ``model`` (a path or a ModelContext) on the images at ``data`` (and a probe); the JSON-ready report."""
    started = time.perf_counter()
    ctx = model if isinstance(model, ModelContext) else ModelContext.open(model, preprocess, device, threads, batch_size)
    chosen = ctx.select(layers)
    runner = ctx.runner(chosen, norms=NORMS)
    clean_set = ImageSet(data, limit=limit, min_images=min_images)
    probe = Probe.open(probe, limit=limit, min_images=min_images) if probe is not None and not isinstance(probe, Probe) else probe
    clean = measure(runner, clean_set, label="clean")
    probed = None
    if probe is not None:
        probed = measure(runner, clean_set if probe.trigger is not None else probe.images, probe.trigger, label="probe")
    return build_report(ctx, runner, clean_set, clean, probe, probed, time.perf_counter() - started, top)


def build_report(ctx, runner, clean_set, clean, probe, probed, seconds, top=10):
    """The scan report (schema ``scanner.scan/1``)."""
    layers = layer_facts(runner.layers)
    rise = score = rel = None
    if probed is not None:
        rise, score = probe_scores(clean.stats, probed.stats, runner.slices)
        rel = {k: relative_rise(clean.stats, probed.stats, k) for k in NORMS}
    for facts, (lo, hi) in zip(layers, runner.slices):
        facts["clean"] = clean.stats.summary(lo, hi)
        if probed is not None:
            facts["probe"] = probed.stats.summary(lo, hi)
            facts["rise"] = _r(rise[lo:hi])
            facts["score"] = _r(score[lo:hi])
            facts["outliers"] = [int(i) for i in np.flatnonzero(score[lo:hi] > OUTLIER_Z)]
    report = {
        "schema": SCHEMA,
        "tool": {"name": "scanner", "version": __version__},
        "model": ctx.facts(),
        "preprocess": ctx.preprocess.to_dict(),
        "runtime": {"provider": runner.provider, "device": runner.session.device},
        "data": {"clean": _data_facts(clean_set, clean)},
        "layers": layers,
        "audit": ctx.audit,
        "top_channels": [],
        "timing": {"seconds": round(seconds, 3), "clean_images_per_second": round(clean.rate(), 1)},
    }
    if probed is not None:
        report["probe"] = probe.describe()
        report["data"]["probe"] = _data_facts(probe.images or clean_set, probed)
        report["probe"]["effect"] = prediction_shift(clean, probed, probe.paired_with(clean_set))
        report["top_channels"] = top_channels(runner, clean, probed, rise, score, rel, top)
        report["timing"]["probe_images_per_second"] = round(probed.rate(), 1)
    return report


def top_channels(runner, clean, probed, rise, score, rel, top=10):
    """The ``top`` channels by probe score across the measured layers."""
    order = np.argsort(-score, kind="stable")[:top]
    owner = np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(runner.slices)])
    rows = []
    for j in order:
        i = int(owner[j])
        lo = runner.slices[i][0]
        rows.append(
            {
                "layer": runner.layers[i].id,
                "channel": int(j - lo),
                "score": _r([score[j]])[0],
                "outlier": bool(score[j] > OUTLIER_Z),
                "clean_linf_mean": _r([clean.stats.mean("linf")[j]])[0],
                "probe_linf_mean": _r([probed.stats.mean("linf")[j]])[0],
                "linf_rise": _r([rise[j]])[0],
                "relative_rise": {k: _r([rel[k][j]])[0] for k in NORMS},
            }
        )
    return rows


def prediction_shift(clean, probed, paired):
    """How the probe moves predictions: flip rate (paired) and the class the probe pushes toward."""
    counts = np.bincount(probed.preds, minlength=int(max(probed.preds.max(), clean.preds.max()) + 1))
    effect = {"paired": bool(paired), "probe_prediction_counts": counts.tolist()}
    if paired and len(clean.preds) == len(probed.preds):
        flipped = clean.preds != probed.preds
        effect["flip_rate"] = round(float(flipped.mean()), 6)
        k = dominant_class(clean.preds, probed.preds)
        if k is not None:
            effect["dominant_class"] = k
            others = clean.preds != k
            effect["dominant_class_success"] = round(float((probed.preds[others] == k).mean()), 6) if others.any() else 0.0
    return effect


def _data_facts(images, measurement):
    return {
        "path": str(images.path),
        "images": measurement.images,
        "skipped": len(images.skipped),
        "skipped_examples": [f"{n} ({r})" for n, r in images.skipped[:5]],
    }
