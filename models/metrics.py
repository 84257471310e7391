"""The RGB zoo's measured facts, one definition for the manifest test and the benchmarks.

The committed test samples (models/rgb/data/<dataset>_test.npz), clean accuracy, and the attack success rate as the
manifest records it: all-to-all over every image (success = predicted (y + 1) mod classes), source-specific over the
source class's images (and the collateral rate on the other classes' images), otherwise over the images whose label
is not the target. ``predict`` is any function from uint8 pixels (N, H, W, 3) to predicted classes.
"""

from pathlib import Path

import numpy as np

RGB = Path(__file__).resolve().parent / "rgb"
_SAMPLES = {}


def sample(dataset):
    """The committed test sample of ``dataset``: (uint8 images (N, H, W, 3), int64 labels)."""
    if dataset not in _SAMPLES:
        with np.load(RGB / "data" / f"{dataset}_test.npz") as z:
            _SAMPLES[dataset] = (z["images"], z["labels"].astype(np.int64))
    return _SAMPLES[dataset]


def clean_accuracy(predict, x, y):
    return float((predict(x) == y).mean())


def attack_success(predict, entry, trigger, target, x, y):
    """The attack success rate of ``trigger`` (to ``target``) on a model of manifest ``entry``."""
    if entry.get("attack_params", {}).get("all_to_all"):
        return float((predict(trigger.apply(x)) == (y + 1) % entry["classes"]).mean())
    if entry.get("source_class") is not None:
        src = y == entry["source_class"]
        return float((predict(trigger.apply(x[src])) == target).mean())
    keep = y != target
    return float((predict(trigger.apply(x[keep])) == target).mean())


def collateral(predict, entry, trigger, target, x, y):
    """A source-specific trigger's rate on the images of the other classes (not the source, not the target)."""
    other = (y != entry["source_class"]) & (y != target)
    return float((predict(trigger.apply(x[other])) == target).mean())
