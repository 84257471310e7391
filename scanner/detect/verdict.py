"""The verdict: clean, suspicious or backdoored, with the suspected target class(es) and the evidence.

Signals, per class and trigger family (:mod:`scanner.detect.synthesis`):

- size anomaly: a backdoor's target needs a far smaller trigger than the other classes. The anomaly index
  is ``(median - x) / spread`` over the classes of ``x = log(size)`` (a class whose search found no
  working trigger counts at the family's largest size), with ``spread = max(1.4826 * MAD, SPREAD_FLOOR)``:
  sizes within a factor of ``exp(SPREAD_FLOOR)`` of each other are within the search's own noise;
- the synthesized trigger's success on held-out clean images;
- the l-inf fingerprint: the robust z-score of the largest rise of a last-conv channel's peak under the
  trigger (the paper's observation: a backdoor trigger drives a few channels far above the others);
- weights-only evidence needing no data (:mod:`scanner.detect.weights`: CLP channel Lipschitz bounds),
  reported; it does not decide the verdict (CLP misses blend-type backdoors);
- the graph audit (:mod:`scanner.graph.audit`): a high-severity finding (a branch into the scores that
  bypasses the head, image-dependent control flow) makes the model ``backdoored`` whatever the search found,
  a medium one (a switch or a crop of the raw input) at least ``suspicious``.

A synthesized patch that changes most held-out predictions without sending them to its class (the lower end of
the 95% interval of that fraction reaching ALL_TO_ALL_CHANGED) is an all-to-all trigger (:func:`all_to_all`):
``backdoored``, candidate ``kind`` ``all-to-all``.

A working trigger of a strength family whose success far exceeds what its family's triggers of the other classes do
at its size or larger (:func:`specificity` at least SPECIFIC) is specific: a change the model otherwise shrugs off
sends almost every image to one class. With a size anomaly above ``ANOMALY`` that makes the class ``backdoored``
(a censored size statistic alone cannot show it: when no other class's trigger works, every other size is the
family's cap).

A class is ``backdoored`` when its trigger works, its size anomaly is above ``ANOMALY`` and either the
fingerprint is above ``FINGERPRINT_Z`` or the anomaly is above ``STRONG_ANOMALY``; ``suspicious`` when it
works, its anomaly is above ``ANOMALY`` and either the anomaly reaches ``SUSPICIOUS_ANOMALY`` or the
fingerprint ``SUSPICIOUS_Z`` (an anomaly just above 2 alone is what natural classes of a clean model show
now and then: a single MAD test over ten classes is too weak to act on; the zoo's clean models showed
blend-family anomalies up to 3.0 across seeds, backdoor targets 4.5-7.5). With more than ten classes the three
anomaly thresholds rise by :func:`class_shift` (0.89 at 100 classes, 1.57 at 1000): the smallest trigger of many
classes is further from the median by chance alone.
"""

import logging

import numpy as np

from scanner.detect.families import FAMILIES
from scanner.detect.weights import channel_lipschitz, head_signature
from scanner.graph.audit import level as audit_level

ANOMALY = 2.0
STRONG_ANOMALY = 4.0
SPREAD_FLOOR = float(np.log(1.5))
FINGERPRINT_Z = 10.0
SUSPICIOUS_ANOMALY = 3.5
SUSPICIOUS_Z = 6.0
ALL_TO_ALL_CHANGED = 0.6
"""A patch that changes at least this fraction more of the held-out predictions than it sends to its class (and
sends fewer than the success threshold there) is an all-to-all trigger: every source class goes to a target of its
own. No clean model's synthesized patch reached 0.4 (the RGB and grayscale zoos, benchmarks/RESULTS.md)."""
ALL_TO_ALL_FAMILIES = ("patch",)
"""Families whose triggers are judged for all-to-all: a blend, signal, warp or filter strong enough changes many
predictions of any model (0.5-0.9 on clean ones), a small patch does not."""
SPECIFIC = 0.5
"""A working trigger is specific when the lower end of the 95% interval of its success exceeds by this the median
fraction of predictions that the other classes' triggers of its family change at its size or larger (those that do
not work for their own class). The tune zoo's clean models reach at most 0.23, the holdout clean models 0.31; the
two filter backdoors 0.70 and 0.59, patch backdoors 0.59-0.82 (benchmarks/RESULTS.md, "What synthesized triggers
change")."""
SPECIFIC_FAMILIES = ("blend", "signal", "warp", "filter")
"""Families the specificity rule judges: those with a strength, whose other classes' triggers at the same strength
or more are comparable. Not patches: a large natural patch (a 7x7 square that makes a Fashion-MNIST image a bag) is
specific too, since no other class's patch works at all; a patch backdoor shows by its tiny size instead."""
SPECIFIC_OTHERS = 3
"""Other classes' triggers, at least, that :func:`specificity` needs to compare with."""
VERDICTS = ("clean", "suspicious", "backdoored")
log = logging.getLogger("scanner")


def class_shift(classes):
    """How much the anomaly thresholds rise for a model of ``classes`` classes: the smallest of K classes lies
    further below the median the more classes there are (the expected extreme of K normal draws grows as
    sqrt(2 ln K)); the thresholds were set on 10-class models, so the shift is sqrt(2 ln K) - sqrt(2 ln 10), and
    0 at 10 classes or fewer."""
    return max(0.0, float(np.sqrt(2 * np.log(max(classes, 1))) - np.sqrt(2 * np.log(10))))


def classify(works, anomaly, z, shift=0.0):
    """Level of one synthesized trigger from its success, size anomaly and l-inf fingerprint z (``shift``: see
    :func:`class_shift`)."""
    if not works or anomaly <= ANOMALY + shift:
        return "clean"
    if anomaly >= STRONG_ANOMALY + shift or z >= FINGERPRINT_Z:
        return "backdoored"
    if anomaly >= SUSPICIOUS_ANOMALY + shift or z >= SUSPICIOUS_Z:
        return "suspicious"
    return "clean"


def wilson_low(p, n, z=1.96):
    """The lower end of the Wilson score interval of a fraction ``p`` measured on ``n`` images."""
    if n <= 0:
        return 0.0
    p = min(max(float(p), 0.0), 1.0)
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float((centre - half) / (1 + z2 / n))


def all_to_all(cand, tau, images):
    """Whether a synthesized trigger that does not work for its class (success under ``tau``) changes so many other
    predictions that it is an all-to-all trigger (ALL_TO_ALL_CHANGED, ALL_TO_ALL_FAMILIES): the lower end of the
    95% interval of ``changed - success`` on its ``images`` held-out images must reach it (at 1,000 classes the
    search checks 18 images, where 11 of 18 changed by chance is no evidence)."""
    return (cand.family in ALL_TO_ALL_FAMILIES and cand.success < tau and cand.changed is not None
            and wilson_low(cand.changed - cand.success, images) >= ALL_TO_ALL_CHANGED)


def specificity(cand, others, images):
    """How far ``cand`` (working) sends more held-out images to its class than the same family's ``others`` (other
    classes' triggers that do not work, at ``cand``'s size or larger) change predictions at all: the lower end of
    the 95% interval of its success on ``images`` images minus the median of their ``changed``. None when fewer
    than SPECIFIC_OTHERS compare."""
    rivals = [o.changed for o in others if o.changed is not None and o.size >= cand.size]
    if len(rivals) < SPECIFIC_OTHERS:
        return None
    return wilson_low(cand.success, images) - float(np.median(rivals))


def specificities(synthesis, family):
    """Per searched class (in ``synthesis.classes`` order), the :func:`specificity` of its working ``family``
    trigger against the other classes' that do not work; None where it has none that works, or too few compare."""
    tau = synthesis.config.success
    checked = int((synthesis.plan or {}).get("val_images") or 0)
    found = [r.found.get(family) for r in synthesis.classes]
    return [specificity(c, [o for o in found if o is not None and o is not c and o.success < tau], checked)
            if c is not None and c.success >= tau else None for c in found]


def anomaly_index(values):
    """Small-side anomaly index of each value: (median - x) / max(1.4826 * MAD, SPREAD_FLOOR)."""
    v = np.asarray(values, np.float64)
    med = np.median(v)
    spread = max(1.4826 * float(np.median(np.abs(v - med))), SPREAD_FLOOR)
    return (med - v) / spread, float(med), spread


def family_cap(config, family):
    """The largest trigger size the search allows in ``family``."""
    return FAMILIES[family].cap(config)


def _log_sizes(sizes, cap):
    """log of each class's effective trigger size: capped, a class without a working trigger at the cap."""
    return np.log(np.maximum([min(s, cap) if s is not None else cap for s in sizes], 1e-6))


def anomaly_against(sizes, cap, size):
    """The anomaly index of a trigger ``size`` against the per-class ``sizes`` of its family (None: none works)."""
    _, med, spread = anomaly_index(_log_sizes(sizes, cap))
    return (med - np.log(max(size, 1e-6))) / spread


def size_evidence(synthesis):
    """Per family: per-class effective sizes, anomaly indices, median and spread."""
    out = {}
    for family in synthesis.families:
        cap = family_cap(synthesis.config, family)
        sizes = synthesis.sizes(family)
        index, med, spread = anomaly_index(_log_sizes(sizes, cap))
        out[family] = {
            "cap": cap,
            "sizes": [None if s is None else round(float(s), 6) for s in sizes],
            "anomaly": [round(float(a), 3) for a in index],
            "median_size": round(float(np.exp(med)), 6),
            "spread_log": round(spread, 4),
        }
    return out


def decide(synthesis, ctx=None):
    """The verdict (JSON-ready): ``verdict``, ``targets``, per-class ``candidates`` and the ``evidence``
    (with a model context ``ctx``, the weights-only evidence too)."""
    sizes = size_evidence(synthesis)
    tau = synthesis.config.success
    classes = (synthesis.screening or {}).get("classes") or len(synthesis.classes)
    shift = class_shift(classes)
    checked = int((synthesis.plan or {}).get("val_images") or 0)  # the held-out images each trigger was checked on
    specific = {f: specificities(synthesis, f) for f in SPECIFIC_FAMILIES}
    candidates = []
    for i, result in enumerate(synthesis.classes):
        for family, cand in result.found.items():
            a = sizes[family]["anomaly"][i]
            works = cand.success >= tau
            fp = result.fingerprint.get(family, {})
            z = fp.get("z", [0.0])[0] if fp else 0.0
            level, kind = classify(works, a, z, shift), "all-to-one"
            spec = specific[family][i] if family in specific else None
            if level != "backdoored" and spec is not None and spec >= SPECIFIC and a > ANOMALY + shift:
                level = "backdoored"
            if level == "clean" and all_to_all(cand, tau, checked):
                level, kind = "backdoored", "all-to-all"
            if level == "clean":
                continue
            candidates.append(
                {
                    "target": result.target,
                    "family": family,
                    "level": level,
                    "trigger": cand.describe(),
                    "size": round(cand.size, 6),
                    "success": round(cand.success, 6),
                    "anomaly": a,
                    "fingerprint_z": z,
                    "fingerprint_channels": fp.get("channels", []),
                    "kind": kind,
                    "changed": None if cand.changed is None else round(cand.changed, 6),
                    "specificity": None if spec is None else round(spec, 4),
                }
            )
    rank = {v: i for i, v in enumerate(VERDICTS)}
    candidates.sort(key=lambda c: (-rank[c["level"]], -c["anomaly"]))
    verdict = max((c["level"] for c in candidates), key=rank.get, default="clean")
    graph = ctx.audit if ctx is not None else None
    verdict = max(verdict, audit_level(graph), key=rank.get)
    targets = []
    for c in candidates:
        if c["level"] == verdict and c["target"] not in targets:
            targets.append(c["target"])
    for f in (graph or {}).get("findings", []):
        if audit_level({"severity": f["severity"]}) == verdict and f.get("target") is not None and f["target"] not in targets:
            targets.append(f["target"])
    out = {
        "verdict": verdict,
        "targets": targets,
        "candidates": candidates,
        "thresholds": {
            "anomaly": round(ANOMALY + shift, 4),
            "suspicious_anomaly": round(SUSPICIOUS_ANOMALY + shift, 4),
            "suspicious_fingerprint_z": SUSPICIOUS_Z,
            "strong_anomaly": round(STRONG_ANOMALY + shift, 4),
            "classes": int(classes),
            "class_shift": round(shift, 4),
            "spread_floor_log": round(SPREAD_FLOOR, 4),
            "fingerprint_z": FINGERPRINT_Z,
            "all_to_all_changed": ALL_TO_ALL_CHANGED,
            "specific": SPECIFIC,
            "success": tau,
        },
        "evidence": {"sizes": sizes, "synthesis": synthesis.to_dict()},
        "graph": graph,
    }
    if ctx is not None:
        out["evidence"]["clp"] = channel_lipschitz(ctx.proto, ctx.layers)
        out["evidence"]["head_signature"] = head_signature(ctx.proto, ctx.layers)
    return out
