"""The measuring stage: one pass of an image set through a runner gives norm statistics and predictions."""

import time
from dataclasses import dataclass, field

import numpy as np

from scanner.detect.stats import ChannelStats
from scanner.progress import Progress


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


def measure(runner, images, trigger=None, masks=None, keep=(), norms=True, label="clean"):
    """One pass of ``images`` (an image set) through ``runner``, ``trigger`` stamped on when given.

    ``masks``: {layer id: 0/1 vector} fed to the runner's mask inputs; ``keep``: exposed feature tensors (or
    ``"scores"``) to keep whole, flattened per image; ``norms`` False skips the norm outputs (a prune sweep).
    """
    stats = ChannelStats(runner.channels)
    preds, names, labels, kept = [], [], [], {k: [] for k in keep}
    start = time.perf_counter()
    saved, runner.progress = runner.progress, None
    try:
        with Progress(len(images), label) as bar:
            runner.progress = bar
            for batch, out in runner.stream(images, trigger, masks, norms, features=any(k != "scores" for k in keep)):
                preds.append(out.preds)
                if norms and out.norms:
                    stats.update(out.norms)
                for k in keep:
                    kept[k].append(out.scores if k == "scores" else out.features[k])
                names += batch.names
                if batch.labels is not None:
                    labels.append(batch.labels)
    finally:
        runner.progress = saved
    return Measurement(
        stats,
        np.concatenate(preds),
        names,
        np.concatenate(labels) if labels else None,
        time.perf_counter() - start,
        {k: np.concatenate(v) for k, v in kept.items()},
    )


def dominant_class(clean_preds, probe_preds):
    """The class a probe pushes images to: the most common prediction among the paired images it moved, or None."""
    moved = clean_preds != probe_preds
    if not moved.any():
        return None
    return int(np.bincount(probe_preds[moved]).argmax())


def layer_facts(layers):
    """JSON-ready facts of measured layers."""
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
        for l in layers
    ]
