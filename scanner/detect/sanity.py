"""Before any verdict: do the clean images, preprocessed as resolved, give the model sensible predictions?

A model fed the wrong preprocessing (0-255 where it was trained on normalized input, BGR for RGB) or images from
another domain answers with one class for nearly everything, or with near-uniform probabilities. A trigger
search on such predictions measures nothing, and its verdict would be noise: the run stops, naming the symptom.
"""

import numpy as np

from scanner.errors import NothingToAnalyse
from scanner.runtime.runner import probabilities

DOMINANT_SHARE = 0.5
"""Degenerate when one class takes at least this share of the clean images' predictions (most images in one class:
measured, a model fed inverted images puts 51-87% of them in one class; fed right, 12-16%)."""
UNIFORM_FACTOR = 1.5
"""Degenerate when the mean top-1 probability is at most this many times 1/K (near-uniform over K classes)."""
MIN_IMAGES = 20
"""Fewer images than this are not judged."""


class DegenerateData(NothingToAnalyse):
    """The model's predictions on the clean images are degenerate: nothing can be analysed (exit 3)."""


def prediction_facts(scores):
    """{"images", "classes", "top_class", "top_share", "mean_confidence", "classes_predicted"} of a scores array."""
    probs = probabilities(np.asarray(scores, np.float64))
    preds = probs.argmax(1)
    counts = np.bincount(preds, minlength=probs.shape[1])
    return {"images": int(len(preds)), "classes": int(probs.shape[1]), "top_class": int(counts.argmax()),
            "top_share": round(float(counts.max() / max(len(preds), 1)), 6),
            "mean_confidence": round(float(probs.max(1).mean()), 6), "classes_predicted": int((counts > 0).sum())}


def check_fit(scores, source=None):
    """Raise :class:`DegenerateData` when the predictions ``scores`` (N, K) on clean images are degenerate; return
    their facts otherwise."""
    f = prediction_facts(scores)
    if f["images"] < MIN_IMAGES:
        return f
    why = None
    if f["top_share"] >= DOMINANT_SHARE:
        why = f"{f['top_share']:.0%} of {f['images']} clean images are predicted as class {f['top_class']}"
    elif f["mean_confidence"] <= UNIFORM_FACTOR / f["classes"]:
        why = (f"the predicted probabilities are near-uniform (mean top-1 {f['mean_confidence']:.3f} over "
               f"{f['classes']} classes)")
    if why:
        raise DegenerateData(f"the model's predictions on the clean images are degenerate: {why}; the preprocessing "
                             "(--preprocess) or the data probably does not fit the model", source)
    return f
