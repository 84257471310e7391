"""Measure per-channel l-inf / l1 / l2 norms on clean and probe images (the paper's statistic)."""

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from scanner import __version__
from scanner.data.images import ImageSet, resolve_preprocess
from scanner.errors import ScannerError
from scanner.instrument import NORMS, instrument
from scanner.layers import discover, select
from scanner.model import ModelFile, load_model
from scanner.data.probes import Probe
from scanner.progress import Progress
from scanner.runtime import Session
from scanner.stats import OUTLIER_Z, ChannelStats, _r, probe_scores, relative_rise

log = logging.getLogger("scanner")
SCHEMA = "scanner.scan/1"


@dataclass
class Measurement:
    """What one pass over a set of images gives: norm statistics and the model's predictions."""

    stats: ChannelStats
    preds: np.ndarray
    names: list
    labels: np.ndarray = None
    seconds: float = 0.0
    kept: dict = field(default_factory=dict)

    @property
    def images(self):
        return len(self.preds)

    def rate(self):
        return self.images / self.seconds if self.seconds > 0 else 0.0


class Instrument:
    """A model with in-graph norms for the chosen layers, its session and its preprocessing.

    ``masks=True`` adds a channel-mask input per layer (for prune sweeps); ``features`` exposes tensors;
    ``discovered`` is the model's layer list when the caller already ran :func:`discover`.
    """

    def __init__(self, model, layers="last", device="auto", threads=None, preprocess=None, masks=False, features=(),
                 discovered=None):
        self.model = model if isinstance(model, ModelFile) else load_model(model)
        self.preprocess = resolve_preprocess(self.model.input.shape, self.model.input.dtype, self.model.metadata, preprocess,
                                             source=self.model.path)
        self.all_layers = discovered if discovered is not None else discover(self.model.proto)
        self.layers = select(self.all_layers, layers)
        self.instrumented = instrument(self.model.proto, self.layers, masks=masks, features=features)
        self.slices = [self.instrumented.slices[l.id] for l in self.layers]
        self.channels = sum(hi - lo for lo, hi in self.slices)
        self.session = Session(self.instrumented.model, device=device, threads=threads, source=self.model.path)
        self.logits = self.model.outputs[0].name

    def masks_feed(self, masks=None):
        """Feeds for the mask inputs: all ones, then ``masks[layer_id]`` (a 0/1 vector) where given."""
        feeds = {}
        for layer in self.layers:
            name = self.instrumented.mask_inputs.get(layer.id)
            if name is not None:
                m = np.ones(layer.channels, np.float32)
                if masks and layer.id in masks:
                    m = np.asarray(masks[layer.id], np.float32)
                feeds[name] = m
        return feeds

    def measure(self, images, trigger=None, batch_size=64, label="clean", masks=None, keep=(), norms=True):
        """One pass over ``images`` (an ImageSet), with ``trigger`` stamped on when given.

        ``keep`` names extra outputs to keep whole (e.g. ``"logits"`` or exposed features).
        """
        stats = ChannelStats(self.channels)
        outputs = [self.logits] + ([self.instrumented.norm_outputs[k] for k in NORMS] if norms else [])
        extra = [self.logits if k == "logits" else self.instrumented.features.get(k, k) for k in keep]
        wanted = list(dict.fromkeys(outputs + extra))
        feeds = self.masks_feed(masks)
        preds, names, labels, kept = [], [], [], {k: [] for k in keep}
        start = time.perf_counter()
        with Progress(len(images), label) as bar:
            for batch in images.batches(self.preprocess, batch_size):
                pixels = batch.pixels if trigger is None else trigger.apply(batch.pixels, color=self.preprocess.color)
                out = self.session.run(self.preprocess.to_tensor(pixels), wanted, feeds)
                logits = out[self.logits].reshape(len(pixels), -1)
                preds.append(logits.argmax(1))
                if norms:
                    stats.update({k: out[self.instrumented.norm_outputs[k]] for k in NORMS})
                for k, name in zip(keep, extra):
                    kept[k].append(out[name].reshape(len(pixels), -1))
                names += batch.names
                if batch.labels is not None:
                    labels.append(batch.labels)
                bar.advance(len(pixels))
        seconds = time.perf_counter() - start
        return Measurement(
            stats,
            np.concatenate(preds),
            names,
            np.concatenate(labels) if labels else None,
            seconds,
            {k: np.concatenate(v) for k, v in kept.items()},
        )

    def layer_facts(self):
        """JSON-ready facts of the measured layers."""
        return [
            {
                "id": l.id,
                "op_type": l.op_type,
                "node": l.node,
                "read": l.read,
                "chain": list(l.chain),
                "channels": l.channels,
                "spatial": list(l.spatial) if l.spatial else None,
                "is_last_conv": l.is_last_conv,
            }
            for l in self.layers
        ]


def scan(model, data, probe=None, layers="last", device="auto", batch_size=64, threads=None, limit=None, preprocess=None, top=10):
    """Scan ``model`` on the images at ``data`` (and a probe); return the JSON-ready report."""
    started = time.perf_counter()
    inst = Instrument(model, layers, device, threads, preprocess)
    clean_set = ImageSet(data, limit=limit)
    probe = Probe.open(probe, limit=limit) if probe is not None and not isinstance(probe, Probe) else probe
    clean = inst.measure(clean_set, batch_size=batch_size, label="clean")
    probed = None
    if probe is not None:
        if probe.trigger is not None:
            probed = inst.measure(clean_set, probe.trigger, batch_size, "probe")
        else:
            probed = inst.measure(probe.images, None, batch_size, "probe")
    return build_report(inst, clean_set, clean, probe, probed, time.perf_counter() - started, top)


def build_report(inst, clean_set, clean, probe, probed, seconds, top=10):
    """The scan report (schema ``scanner.scan/1``)."""
    layers = inst.layer_facts()
    rise = score = None
    if probed is not None:
        rise, score = probe_scores(clean.stats, probed.stats, inst.slices)
        rel = {k: relative_rise(clean.stats, probed.stats, k) for k in NORMS}
    for facts, (lo, hi) in zip(layers, inst.slices):
        facts["clean"] = clean.stats.summary(lo, hi)
        if probed is not None:
            facts["probe"] = probed.stats.summary(lo, hi)
            facts["rise"] = _r(rise[lo:hi])
            facts["score"] = _r(score[lo:hi])
            facts["outliers"] = [int(i) for i in np.flatnonzero(score[lo:hi] > OUTLIER_Z)]
    report = {
        "schema": SCHEMA,
        "tool": {"name": "scanner", "version": __version__},
        "model": inst.model.facts(),
        "preprocess": inst.preprocess.to_dict(),
        "runtime": {"provider": inst.session.provider, "device": inst.session.device},
        "data": {"clean": _data_facts(clean_set, clean)},
        "layers": layers,
        "top_channels": [],
        "timing": {"seconds": round(seconds, 3), "clean_images_per_second": round(clean.rate(), 1)},
    }
    if probed is not None:
        report["probe"] = probe.describe()
        report["data"]["probe"] = _data_facts(probe.images or clean_set, probed)
        report["probe"]["effect"] = prediction_shift(clean, probed, probe.paired_with(clean_set))
        report["top_channels"] = top_channels(inst, clean, probed, rise, score, rel, top)
        report["timing"]["probe_images_per_second"] = round(probed.rate(), 1)
    return report


def top_channels(inst, clean, probed, rise, score, rel, top=10):
    """The ``top`` channels by probe score across the measured layers."""
    order = np.argsort(-score, kind="stable")[:top]
    owner = np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(inst.slices)])
    rows = []
    for j in order:
        i = int(owner[j])
        lo = inst.slices[i][0]
        rows.append(
            {
                "layer": inst.layers[i].id,
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


def dominant_class(clean_preds, probe_preds):
    """The class a probe pushes images to: the most common prediction among the paired images it moved, or None."""
    moved = clean_preds != probe_preds
    if not moved.any():
        return None
    return int(np.bincount(probe_preds[moved]).argmax())


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
