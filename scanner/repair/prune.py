"""What to prune: one model, clean images and probes measured once, channels ranked, prune levels swept.

The sweep never rebuilds a session per level: the runner's model carries one channel-mask input per layer
(pruning channel k makes the activation where the layer is read exactly 0, which is what a zero in the mask
does); the written model gets real zeroed weights and no mask (:mod:`scanner.repair.verify`).
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from scanner.data.images import HOLDOUT_FRACTION, ImageSet, cached, holdout_split
from scanner.data.probes import Probe
from scanner.detect.scan import dominant_class, measure
from scanner.detect.stats import probe_scores
from scanner.errors import ScannerError
from scanner.graph.instrument import NORMS

log = logging.getLogger("scanner")

PROBE_EFFECT = 0.5
"""A probe that sends at least this fraction of other-class images to one class moves the model."""
SOURCE_IMAGES = 10
"""A source class is judged on its own (a source-specific trigger) only when it has at least this many images."""
MAX_PRUNE_FRACTION = 0.5
DEFAULT_MAX_DROP = 0.02


@dataclass
class Level:
    """One prune level of the sweep: how many channels, and what it does on clean and probe images."""

    count: int
    agreement: float
    accuracy: float = None
    probe_success: list = field(default_factory=list)

    def drop(self, base):
        """Clean-accuracy drop against the unpruned level (agreement stands in without labels)."""
        if self.accuracy is not None and base.accuracy is not None:
            return base.accuracy - self.accuracy
        return 1.0 - self.agreement

    def to_dict(self):
        d = {"channels": self.count, "agreement": round(self.agreement, 6)}
        if self.accuracy is not None:
            d["accuracy"] = round(self.accuracy, 6)
        d["probe_success"] = [round(s, 6) for s in self.probe_success]
        return d


class Repair:
    """A model context, clean images and one or more probes, with everything measured once at the start.

    ``probes`` are :class:`Probe` objects (or paths); each gets a target class (given, or the class it
    pushes the most images to). The runner measures the chosen ``layers`` with mask inputs, and exposes the
    head's input and output (the refit's features and targets).

    ``holdout``: a fraction of the clean images (and of unpaired probe folders) kept out of every measurement
    and fit here, for checking the repaired model afterwards (:func:`scanner.repair.verify.removal`); or an
    image set already held out by the caller (then nothing is split here).

    ``reference``: the context of the model before an earlier repair step (the activation clipping): agreement is
    measured against its predictions and the refit fits its head scores (default: ``ctx``'s own). ``sources``: each
    probe's source classes (see :meth:`_sources`) and ``untargeted`` whether it is all-to-all (:meth:`_untargeted`),
    when an earlier Repair of the same images found them.

    ``previous``: an earlier Repair of the same model context, ``data``, layers, held-out split and reference whose
    probes are the first of ``probes`` (a blind repair's next round, with more probes): its clean, reference and
    probe measurements are taken over instead of measured again (the same passes would give the same values).
    """

    def __init__(self, ctx, data, probes, layers="last", batch_size=64, limit=None, targets=None, labeled=None,
                 min_images=1, holdout=HOLDOUT_FRACTION, reference=None, sources=None, untargeted=None, previous=None):
        self._made_of = (ctx, data, layers, batch_size, limit, labeled, holdout, reference)
        same = lambda a, b: a is b or (isinstance(a, (str, int, float)) and a == b)  # noqa: E731
        if previous is not None and not all(same(a, b) for a, b in zip(previous._made_of, self._made_of)):
            raise ValueError("Repair(previous=...): an earlier Repair of other inputs")
        self.ctx = ctx
        self.model, self.pre = ctx.model, ctx.preprocess
        self.clean_set = data if not isinstance(data, (str, bytes)) and hasattr(data, "batches") else ImageSet(
            data, limit=limit, labeled=labeled, min_images=min_images)
        self.probes = [p if isinstance(p, Probe) else Probe.open(p, limit=limit, min_images=min_images) for p in probes]
        self.batch_size = batch_size
        self.head = ctx.head
        self.layers = ctx.select(layers)
        self.runner = ctx.runner(self.layers, norms=NORMS, masks=True, features=self._keep(), batch_size=batch_size)
        started = time.perf_counter()
        self.clean_set = cached(self.clean_set, self.pre)
        for p in self.probes:
            if p.images is not None:
                p.images = cached(p.images, self.pre)
        self._hold_out(holdout)
        if previous is not None:
            self.clean, self.reference = previous.clean, previous.reference
        else:
            self.clean = measure(self.runner, self.clean_set, label="clean", keep=self._keep())
            self.reference = self.clean
            if reference is not None:
                keep = (self.head.read,) if self.head is not None else ()
                self.reference = measure(reference.runner(features=keep, batch_size=batch_size), self.clean_set,
                                         norms=False, keep=keep, label="reference")
        self.labels = self.clean.labels
        known = [] if previous is None else previous.probed
        for p, q in zip(self.probes, previous.probes if previous is not None else []):
            if p.describe() != q.describe():
                raise ValueError(f"Repair(previous=...): probe {p.describe()} where the earlier Repair had {q.describe()}")
        self.probed = known[: len(self.probes)] + [self._measure_probe(p) for p in self.probes[len(known) :]]
        self.targets = list(targets) if targets is not None else [self._dominant(m) for m in self.probed]
        self.untargeted = (list(untargeted) if untargeted is not None else
                           [self._untargeted(i, m.preds) for i, m in enumerate(self.probed)])
        self.sources = (list(sources) if sources is not None else
                        [None if u else self._sources(i, m.preds) for i, (u, m) in enumerate(zip(self.untargeted, self.probed))])
        scores = [probe_scores(self.clean.stats, m.stats, self.runner.slices) for m in self.probed]
        zeros = np.zeros(self.runner.channels)
        self.rise = np.max([r for r, _ in scores], axis=0) if scores else zeros
        self.score = np.max([s for _, s in scores], axis=0) if scores else zeros
        self.base = self.level(0, self.clean.preds, [m.preds for m in self.probed])
        self.seconds = {"measure": time.perf_counter() - started}

    def _hold_out(self, holdout):
        """Split off the held-out images (see the class docstring)."""
        self.probe_holdout = [None] * len(self.probes)
        if holdout is None or hasattr(holdout, "batches"):
            self.holdout_set = holdout
            return
        whole = self.clean_set
        self.clean_set, self.holdout_set, split = holdout_split(whole, holdout)
        if split is None:
            return
        for i, p in enumerate(self.probes):
            if p.images is None:
                continue
            if p.paired_with(whole):
                p.images, self.probe_holdout[i] = p.images.subset(split[0]), p.images.subset(split[1])
            else:
                p.images, self.probe_holdout[i], _ = holdout_split(p.images, holdout, seed=1 + i)

    def _keep(self):
        return (self.head.input, self.head.read) if self.head is not None else ()

    def _measure_probe(self, probe, masks=None, norms=True, keep=None):
        keep = self._keep() if keep is None else keep
        images = self.clean_set if probe.trigger is not None else probe.images
        return measure(self.runner, images, probe.trigger, masks, keep, norms, "probe")

    def _dominant(self, m):
        """The class the probe pushes images to (among moved pairs), else its most common prediction (the same rule
        as :func:`scanner.commands.sanitize.probe_targets`)."""
        k = dominant_class(self.reference.preds, m.preds) if len(m.preds) == len(self.reference.preds) else None
        return k if k is not None else int(np.bincount(m.preds).argmax())

    def _untargeted(self, i, preds):
        """Whether probe ``i`` is an all-to-all trigger: it changes the prediction of at least PROBE_EFFECT of the
        (paired) images but sends fewer than PROBE_EFFECT of the other-class images to any one class, and most of the
        images it changes go elsewhere than its dominant class. Its success is then the fraction it changes."""
        if not self.paired(i):
            return False
        ref, target = self.reference.preds, self.targets[i]
        moved = preds != ref
        if moved.mean() < PROBE_EFFECT:
            return False
        others = ref != target
        to_target = float((preds[others] == target).mean()) if others.any() else 0.0
        return to_target < PROBE_EFFECT and float((preds[moved] == target).mean()) < 0.5

    def _sources(self, i, preds):
        """The source classes of a source-specific probe ``i``: when it moves too few of all other-class images (under
        PROBE_EFFECT) but at least PROBE_EFFECT of some classes' own images (each with SOURCE_IMAGES or more), those
        classes; None for a probe that works on every class (or could not be judged: unpaired)."""
        if not self.paired(i):
            return None
        target, ref = self.targets[i], self.reference.preds
        others = ref != target
        if not others.any() or float((preds[others] == target).mean()) >= PROBE_EFFECT:
            return None
        moved = [int(c) for c in np.unique(ref[others])
                 if (ref == c).sum() >= SOURCE_IMAGES and float((preds[ref == c] == target).mean()) >= PROBE_EFFECT]
        return moved or None

    def paired(self, i):
        """Whether probe ``i`` gives the same images as the clean set with the trigger (pairs)."""
        return self.probes[i].paired_with(self.clean_set)

    def success(self, i, preds):
        """Probe ``i``'s success: the fraction of its images sent to its target (over images not already there; for a
        source-specific probe, over its source classes' images; for an all-to-all one, the fraction whose prediction
        it changes)."""
        target = self.targets[i]
        if self.paired(i) and self.untargeted[i]:
            return float((preds != self.reference.preds).mean())
        if self.paired(i):
            others = self.reference.preds != target
            if self.sources[i]:
                others &= np.isin(self.reference.preds, self.sources[i])
            return float((preds[others] == target).mean()) if others.any() else 0.0
        return float((preds == target).mean())

    def level(self, count, clean_preds, probe_preds):
        """The :class:`Level` of predictions on the clean set and on each probe."""
        acc = float((clean_preds == self.labels).mean()) if self.labels is not None else None
        agree = float((clean_preds == self.reference.preds).mean())
        return Level(count, agree, acc, [self.success(i, p) for i, p in enumerate(probe_preds)])


    @property
    def found(self):
        """Whether any probe moves the model (sends at least PROBE_EFFECT of other-class images to its target)."""
        return any(s >= PROBE_EFFECT for s in self.base.probe_success)

    # ---- which channels -------------------------------------------------------------------------
    def ranking(self):
        """(layer index, channel) pairs, highest probe score first; only channels the probe drives up."""
        order = np.argsort(-self.score, kind="stable")
        slices = self.runner.slices
        owner = np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(slices)])
        out = []
        for j in order:
            if self.rise[j] <= 0:
                continue
            i = int(owner[j])
            if not self.layers[i].zero_preserving:
                continue
            out.append((i, int(j - slices[i][0])))
        return out

    def plan(self, count):
        """The prune plan ``{layer id: [channels]}`` of the top ``count`` ranked channels."""
        plan = {}
        for i, k in self.ranking()[:count]:
            plan.setdefault(self.layers[i].id, []).append(k)
        return {lid: sorted(ch) for lid, ch in plan.items()}

    def masks(self, plan):
        masks = {}
        for layer in self.layers:
            if layer.id in plan:
                m = np.ones(layer.channels, np.float32)
                m[plan[layer.id]] = 0
                masks[layer.id] = m
        return masks

    def evaluate_plan(self, plan, keep=False):
        """Level for a prune plan, measured through the mask inputs (no new session)."""
        masks = self.masks(plan)
        k = self._keep() if keep else ()
        clean = measure(self.runner, self.clean_set, None, masks, k, norms=False, label="sweep")
        probed = [self._measure_probe(p, masks, norms=False, keep=k) for p in self.probes]
        level = self.level(sum(len(v) for v in plan.values()), clean.preds, [m.preds for m in probed])
        return (level, clean, probed) if keep else level

    def sweep(self, max_count=None):
        """Levels for a grid of prune counts up to ``max_count`` ranked channels."""
        ranked = len(self.ranking())
        limit = min(ranked, max_count if max_count is not None else int(MAX_PRUNE_FRACTION * self.runner.channels))
        grid = sorted({c for c in list(range(0, min(limit, 8) + 1)) + [int(round(x)) for x in np.geomspace(1, max(limit, 1), 16)] if c <= limit})
        levels = []
        for c in grid:
            levels.append(self.base if c == 0 else self.evaluate_plan(self.plan(c)))
            log.debug("sweep %d channels: %s", c, levels[-1].to_dict())
        return levels

    def choose_count(self, count=None, ratio=None, max_drop=None):
        """Channels to prune: ``count``, ``ratio`` of the measured channels, or the largest within ``max_drop``."""
        given = sum(v is not None for v in (count, ratio, max_drop))
        if given > 1:
            raise ScannerError("give only one of --count, --ratio, --max-accuracy-drop")
        if count is not None:
            return min(int(count), len(self.ranking())), None
        if ratio is not None:
            if not 0 <= ratio <= 1:
                raise ScannerError(f"--ratio must be in [0, 1], got {ratio}")
            return min(int(round(ratio * self.runner.channels)), len(self.ranking())), None
        max_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
        levels = self.sweep()
        ok = [lv for lv in levels if lv.drop(self.base) <= max_drop + 1e-12]
        return (max(lv.count for lv in ok) if ok else 0), levels
