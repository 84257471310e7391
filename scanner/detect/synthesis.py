"""Gradient-free trigger synthesis: the smallest trigger per class, found with forward passes only, on a budget.

A trigger belongs to a family (:mod:`scanner.detect.families`: patch, blend, signal, warp, filter), each with a size.
The search runs in stages, every one inside one query budget (a number of forward passes, fixed from the model
before it starts, so that the same model, data and seed give the same result on any machine under any load):

1. Clean pass: the model's predictions on the search and held-out images (and a sanity check of them,
   :mod:`scanner.detect.sanity`).
2. Screening, for all classes at once: a bank of templates per family, each stamped on a few images; one
   forward batch gives, through the histogram of predicted classes, its success for every class. The cost does
   not grow with the number of classes.
3. Suspects and references: the classes whose templates work best (``suspects``), and a seeded random sample of
   the others (``references``, an unbiased reference for the anomaly statistic); with few classes, all of them.
4. Refinement: a random search for every chosen (class, family) in lockstep, one proposal each per step, all in
   one batch: content moves (a square re-drawn), position shifts, size and strength moves (shrink while it works,
   grow while it does not). A proposal is kept when it is at least as good: working beats not working, then
   smaller, then the soft success (mean probability of the target) decides.
5. Calibration and validation on the held-out images: a continuous strength is bisected down to the smallest
   that still works there; then success, size, and the l-inf fingerprint (how far the trigger drives each
   last-conv channel's peak above its clean range, as robust z-scores).

Success is measured on images whose clean prediction is not the target. Every forward pass is chunked
(``batch_size`` images at a time): nothing of size classes x images x pixels is held. A wall-clock cap
(``budget`` seconds) stays as a safety net only; a search that hits it says so (``truncated``).
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from scanner.detect.families import FAMILIES
from scanner.detect.sanity import check_fit
from scanner.detect.stats import robust_z
from scanner.errors import ScannerError
from scanner.progress import Progress
from scanner.runtime.runner import probabilities

log = logging.getLogger("scanner")

DEFAULT_FAMILIES = ("patch", "blend", "signal", "warp", "filter")
SUCCESS = 0.9
"""A trigger works when it sends at least this fraction of other-class images to its target."""
COMPUTE = 4e12
"""Floating-point operations a default search may spend (about 1-2 minutes of 2 CPU cores): the default query
budget is this over the model's cost per image, within [QUERIES_MIN, QUERIES_MAX]."""
QUERIES_MIN = 20_000
"""Enough for the least plan of 20 refined classes (clean passes, screening, one refinement step, checks on
MIN_VAL_IMAGES held-out images)."""
QUERIES_MAX = 200_000
SHARES = {"screen": 0.3, "refine": 0.5, "check": 0.2}
"""How the budget is split between screening, refinement, and calibration + validation."""
MIN_VAL_IMAGES = 8
BACKOFF = 6
"""Fallbacks of a patch tried on the held-out images when it falls short there: itself shifted by a pixel, and the
larger working states its refinement shrank through (a patch fitted to 48 search images can be a row too small or
a pixel off for the rest)."""
PATIENCE = 12
"""Refinement steps a candidate that does not work may go without coming closer (soft success) before it stops
(fewer, down to 3, when the plan affords few steps)."""


@dataclass
class Config:
    """Search settings. ``queries`` (forward passes) is the budget; ``budget`` (seconds) only a safety cap."""

    seed: int = 0
    queries: int = None
    """Forward passes for the whole search (None: :func:`default_queries` of the model)."""
    budget: float = 600.0
    """Seconds: a safety cap (0 or None: none). A search that reaches it is cut short and says so."""
    families: tuple = DEFAULT_FAMILIES
    success: float = SUCCESS
    search_images: int = 48
    screen_images: int = 16
    val_images: int = 200
    search_margin: float = 0.05
    """The search aims at ``success + search_margin`` on its few images, so that the trigger still works on
    the held-out ones."""
    steps: int = 50
    """Refinement steps per class and family, at most (fewer when the budget asks for it)."""
    suspects: int = 12
    references: int = 8
    patch_sizes: tuple = (0.1, 0.22)
    patch_grid: int = 6
    max_patch: float = 0.4
    alphas: tuple = (0.1, 0.2, 0.3, 0.45, 0.6)
    max_alpha: float = 0.8
    prototypes: int = 20
    natural: int = 4
    frequencies: tuple = (2, 4, 6, 10)
    amplitudes: tuple = (0.06, 0.12, 0.2)
    max_amplitude: float = 0.4
    warp_grids: tuple = (4, 8)
    warp_fields: int = 3
    warp_strengths: tuple = (1.0, 2.0, 4.0)
    max_warp: float = 12.0
    filter_mixes: tuple = (0.5, 1.0)
    max_filter: float = 0.5
    calib_steps: int = 6
    batch_size: int = None
    """Stamped images per forward pass (None: :func:`chunk_images` of the input size)."""


def queries_for(ctx):
    """The default query budget of a model context (:func:`default_queries` of its cost per image)."""
    from scanner.graph.cost import flops_per_image

    h, w = ctx.preprocess.size
    return default_queries(flops_per_image(ctx.proto), h * w * ctx.preprocess.channels)


def default_queries(flops, pixels):
    """The default query budget of a model costing ``flops`` per image (None: unknown, then from ``pixels`` per
    image): COMPUTE / cost, within [QUERIES_MIN, QUERIES_MAX]."""
    cost = flops if flops else 2000.0 * pixels
    return int(np.clip(COMPUTE / max(cost, 1.0), QUERIES_MIN, QUERIES_MAX))


@dataclass
class ClassResult:
    """The best trigger of each family for one target class, validated on held-out images."""

    target: int
    found: dict = field(default_factory=dict)  # family -> Candidate
    fingerprint: dict = field(default_factory=dict)  # family -> l-inf evidence
    role: str = "all"
    """Why this class was searched: ``all`` (every class is), ``suspect`` or ``reference``."""

    def best(self, success=SUCCESS):
        """The smallest working trigger over the families (else the one with the highest success)."""
        return max(self.found.values(), key=lambda c: c.key(success))


@dataclass
class Synthesis:
    """Per class results, and how the search went."""

    classes: list
    config: Config
    queries: int = 0
    seconds: float = 0.0
    truncated: bool = False
    layer: str = None
    color: str = "rgb"
    clean: dict = None
    """Facts of the model's predictions on the clean images (:func:`scanner.detect.sanity.prediction_facts`)."""
    plan: dict = None
    """The budget and how it was spent."""
    screening: dict = None

    @property
    def families(self):
        return [f for f in self.config.families if any(f in r.found for r in self.classes)]

    def sizes(self, family):
        """Per searched class, the size of the family's smallest working trigger (``None`` where none works)."""
        out = []
        for r in self.classes:
            c = r.found.get(family)
            out.append(c.size if c is not None and c.success >= self.config.success else None)
        return out

    def to_dict(self):
        """JSON-ready summary (no pixel arrays)."""
        rows = []
        for r in self.classes:
            row = {"target": r.target, "role": r.role}
            for fam, c in r.found.items():
                row[fam] = {
                    "trigger": c.describe(),
                    "size": round(c.size, 6),
                    "success": round(c.success, 6),
                    "soft_success": round(c.soft, 6),
                    "changed": None if c.changed is None else round(c.changed, 6),
                    "works": bool(c.success >= self.config.success),
                    **({"fingerprint": r.fingerprint[fam]} if fam in r.fingerprint else {}),
                }
            rows.append(row)
        return {
            "families": self.families,
            "success_threshold": self.config.success,
            "seed": self.config.seed,
            "queries": int(self.queries),
            "seconds": round(self.seconds, 3),
            "truncated": bool(self.truncated),
            "fingerprint_layer": self.layer,
            "clean_predictions": self.clean,
            "plan": self.plan,
            "screening": self.screening,
            "classes": rows,
        }


CHUNK_BYTES = 64 * 2**20
"""Stamped float32 pixels one forward pass of the search holds at most (224x224x3: 111 images; 32x32x3: 512)."""


def chunk_images(h, w, c, most=512):
    """Images per forward pass of the search for inputs of (h, w, c): CHUNK_BYTES of float32, within [8, most]."""
    return int(np.clip(CHUNK_BYTES // (h * w * c * 4), 8, most))


def fingerprint_layers(layers):
    """The layer whose per-channel l-inf is the fingerprint: the last conv layer (the paper's), unless feature
    layers of another kind come after it (a ViT, whose one conv is the patch embedding on the pixels: its peaks
    measure the pixels, not the features), then the last layer before the head; [] when there is none."""
    features = [l for l in layers if not l.is_head]
    last_conv = [l for l in features if l.is_last_conv]
    if last_conv and not any(l.op_type in ("Gemm", "MatMul") for l in features[features.index(last_conv[0]) + 1 :]):
        return last_conv
    return features[-1:]


def search_runner(ctx, batch_size=None):
    """The runner the search queries: scores, plus the fingerprint layer's per-channel l-inf
    (:func:`fingerprint_layers`) when the model has such a layer."""
    layers = fingerprint_layers(ctx.layers)
    if not layers:
        log.debug("no l-inf fingerprint layer: no layer before the head")
    h, w = ctx.preprocess.size
    return ctx.runner(layers, norms=("linf",), batch_size=batch_size or chunk_images(h, w, ctx.preprocess.channels))


class Truncated(Exception):
    """The wall-clock safety cap was reached."""


class Synthesizer:
    """Trigger synthesis for one model on clean pixels; :meth:`run` does the whole search.

    ``runner``: a :class:`scanner.runtime.runner.Runner` of the model (see :func:`search_runner`); ``queries``
    is taken from ``config.queries`` or, when None, the caller's default (see :func:`default_queries`).
    """

    def __init__(self, runner, pixels, config=None, queries=None):
        self.runner = runner
        self.cfg = config or Config()
        self.pixels = np.asarray(pixels)
        n, self.h, self.w, self.c = self.pixels.shape
        self.shape = (self.h, self.w)
        self.batch = self.cfg.batch_size or chunk_images(self.h, self.w, self.c)
        if n < 8:
            raise ScannerError(f"trigger synthesis needs at least 8 clean images, got {n}")
        self.queries_budget = int(self.cfg.queries or queries or QUERIES_MAX)
        families = [f for f in self.cfg.families if f in FAMILIES]
        unknown = [f for f in self.cfg.families if f not in FAMILIES]
        if unknown:
            raise ScannerError(f"unknown trigger family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
        self.families = [f for f in families if not (f == "filter" and self.c != 3)]
        rng = np.random.RandomState(self.cfg.seed)
        order = rng.permutation(n)
        k = min(self.cfg.search_images, max(4, n // 2))
        self.search_idx = np.sort(order[:k])
        self.val_idx = np.sort(order[k : k + self.cfg.val_images]) if n - k >= 8 else np.sort(order[:k])
        self.x_search = self.pixels[self.search_idx].astype(np.float32)
        self.x_val = self.pixels[self.val_idx].astype(np.float32)
        self.deadline = None
        self.truncated = False
        self.q0 = 0
        self._buffer = None

    @classmethod
    def for_model(cls, ctx, pixels, config=None, queries=None):
        """The search of model context ``ctx`` as the commands run it: :func:`search_runner` at the config's batch
        size, and the model's default query budget (:func:`queries_for`) unless ``queries`` or the config sets one."""
        cfg = config or Config()
        return cls(search_runner(ctx, cfg.batch_size), pixels, cfg, queries if queries is not None else queries_for(ctx))

    # ---- measuring ------------------------------------------------------------------------------
    def _run(self, pixels):
        """(scores (N, K), fingerprint-layer l-inf (N, C) or None) of ``pixels``."""
        out = self.runner.run(pixels, batch_size=self.batch)
        return out.scores, out.norms.get("linf")

    def _stamps(self, cands, x):
        """``cands`` stamped on images ``x``, one after the other, in one buffer reused pass after pass (a view of
        it): no new array of stamped images per pass, whose first touch of fresh memory costs as much as the stamp."""
        n = len(cands) * len(x)
        if self._buffer is None or len(self._buffer) < n or self._buffer.shape[1:] != x.shape[1:]:
            self._buffer = np.empty((max(n, self.batch),) + x.shape[1:], np.float32)
        out = self._buffer[:n]
        for j, c in enumerate(cands):
            c.stamp(x, out[j * len(x) : (j + 1) * len(x)])
        return out

    def used(self):
        return self.runner.queries - self.q0

    def _clean(self):
        logits, linf = self._run(self.x_val)
        self.val_logits = logits
        self.val_pred = logits.argmax(1)
        self.classes = logits.shape[1]
        self.clean_linf = linf
        s_logits, _ = self._run(self.x_search)
        self.search_logits = s_logits
        self.search_pred = s_logits.argmax(1)

    def _score(self, logits, pred0, targets=None):
        """(success, soft) per (candidate, target) for logits of candidates stacked in groups of len(pred0)."""
        b = len(pred0)
        k = len(logits) // b
        probs = probabilities(logits).reshape(k, b, -1)
        classes = probs.shape[2]
        if targets is not None:  # one target per candidate: no (candidates x images x classes) boolean array
            idx = np.arange(k)
            t = np.asarray(targets)
            others = pred0[None, :] != t[:, None]
            denom = np.maximum(others.sum(1), 1)
            hit = (probs.argmax(2) == t[:, None]) & others
            soft = (probs[idx, :, t] * others).sum(1)
            return hit.sum(1) / denom, soft / denom
        hit = probs.argmax(2)
        others = pred0[None, :, None] != np.arange(classes)[None, None, :]  # (1, B, K)
        denom = np.maximum(others.sum(1), 1)
        success = ((hit[:, :, None] == np.arange(classes)) & others).sum(1) / denom
        soft = (probs * others).sum(1) / denom
        return success, soft

    def _evaluate(self, cands, x, pred0, linf0=None):
        """Fill in success and soft success of each candidate (for its own target) on images ``x``, in chunks of
        at most ``batch_size`` stamped images. With the clean l-inf ``linf0`` of ``x``, return each candidate's
        l-inf fingerprint (None where the model has no fingerprint layer)."""
        fps = []
        per = max(1, self.batch // len(x))
        for s in range(0, len(cands), per):
            group = cands[s : s + per]
            self._check_time()
            logits, linf = self._run(self._stamps(group, x))
            succ, soft = self._score(logits, pred0, np.array([c.target for c in group]))
            changed = (logits.reshape(len(group), len(x), -1).argmax(2) != pred0[None, :]).mean(1)
            for j, c in enumerate(group):
                c.success, c.soft, c.changed = float(succ[j]), float(soft[j]), float(changed[j])
                if linf0 is not None:
                    fps.append(None if linf is None else fingerprint(linf0, linf[j * len(x) : (j + 1) * len(x)]))
        return fps

    def _search_success(self):
        return min(1.0, self.cfg.success + self.cfg.search_margin)

    def _check_time(self):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            if not self.truncated:
                log.warning("trigger synthesis reached its time cap (%.0fs); results are partial (raise --budget)",
                            self.cfg.budget)
            self.truncated = True
            raise Truncated()

    # ---- the plan -------------------------------------------------------------------------------
    def plan(self, classes, templates):
        """How the query budget is spent: templates per family screened, classes refined, steps, held-out images."""
        q = self.queries_budget - len(self.x_val) - len(self.x_search)
        n_screen = min(self.cfg.screen_images, len(self.x_search))
        max_templates = max(len(self.families), int(SHARES["screen"] * q / n_screen))
        per_family = {f: len(t) for f, t in templates.items()}
        total = sum(per_family.values())
        if total > max_templates:  # keep a share of each family's bank, at least a few templates each
            per_family = {f: max(4, int(n * max_templates / total)) for f, n in per_family.items()}
        refined = min(classes, self.cfg.suspects + self.cfg.references)
        pairs = refined * len(self.families)
        strong = sum(FAMILIES[f].strength for f in self.families)
        validation = refined * (len(self.families) + strong * self.cfg.calib_steps)
        # held-out images from the check share for validation and calibration; the patch fallbacks on top of it
        val = int(np.clip(SHARES["check"] * q / max(validation, 1), MIN_VAL_IMAGES, len(self.x_val)))
        backing = sum(hasattr(FAMILIES[f], "fallbacks") for f in self.families)
        check_cost = validation + refined * BACKOFF * backing
        screen_cost = sum(per_family.values()) * n_screen
        least = screen_cost + check_cost * val + pairs * len(self.x_search)
        if least > q:
            need = least + len(self.x_val) + len(self.x_search)
            raise ScannerError(f"a query budget of {self.queries_budget} is below the least this search needs "
                               f"({need}: {refined} classes x {len(self.families)} families); raise --queries")
        left = max(0, q - screen_cost - check_cost * val)
        steps = int(np.clip(left / max(pairs * len(self.x_search), 1) - 1, 0, self.cfg.steps))  # - 1: the starts
        return {"queries": self.queries_budget, "screen_images": n_screen, "templates": per_family, "refined_classes": refined,
                "steps": steps, "val_images": val, "search_images": len(self.x_search), "check_reserve": int(check_cost * val)}

    # ---- screening ------------------------------------------------------------------------------
    def _templates(self):
        out = {}
        for f, family in enumerate(self.families):
            rng = np.random.RandomState([self.cfg.seed, 1 + f])
            out[family] = FAMILIES[family].templates(self, rng)
        return out

    def _screen(self, templates, plan):
        """Success of each kept template for every class at once. Returns (best, facts): per family, its bank and
        the index of the best template of each class."""
        x, pred = self.x_search[: plan["screen_images"]], self.search_pred[: plan["screen_images"]]
        best, facts = {}, {}
        for f, family in enumerate(self.families):
            bank = templates[family]
            keep = plan["templates"][family]
            if keep < len(bank):  # a seeded, even subsample
                rng = np.random.RandomState([self.cfg.seed, 11 + f])
                bank = [bank[i] for i in np.sort(rng.choice(len(bank), keep, replace=False))]
            succ, soft = np.zeros((len(bank), self.classes)), np.zeros((len(bank), self.classes))
            per = max(1, self.batch // len(x))
            for s in range(0, len(bank), per):
                self._check_time()
                logits, _ = self._run(self._stamps(bank[s : s + per], x))
                succ[s : s + per], soft[s : s + per] = self._score(logits, pred)
            for i, t in enumerate(bank):  # a class's own images blended in are no trigger for it
                if t.depicts is not None:
                    succ[i, t.depicts], soft[i, t.depicts] = 0.0, -1.0
            tau = self._search_success()
            sizes = np.array([t.size for t in bank])
            works = succ >= tau
            # per class: the key of its best template (working, smaller, softer)
            keyed = np.where(works, 2.0 - sizes[:, None] / max(sizes.max(), 1e-9), 0.0) + soft * 1e-3
            pick = keyed.argmax(0)
            best[family] = (bank, pick)  # candidates are made for the chosen classes only (no classes x pixels)
            facts[family] = {"templates": len(bank), "rank": np.argsort(-keyed.max(0), kind="stable"),
                             "working_classes": int(works.any(0).sum())}
        return best, facts

    def _choose(self, facts):
        """(suspects, references): the classes to refine."""
        k = self.classes
        if k <= self.cfg.suspects + self.cfg.references:
            return list(range(k)), []
        suspects = []
        ranks = [facts[f]["rank"] for f in self.families]
        i = 0
        while len(suspects) < self.cfg.suspects and i < k:
            for r in ranks:
                if r[i] not in suspects and len(suspects) < self.cfg.suspects:
                    suspects.append(int(r[i]))
            i += 1
        rest = np.array(sorted(set(range(k)) - set(suspects)))
        rng = np.random.RandomState([self.cfg.seed, 5])
        refs = sorted(int(c) for c in rng.choice(rest, min(self.cfg.references, len(rest)), replace=False))
        return sorted(suspects), refs

    # ---- refinement -----------------------------------------------------------------------------
    def _refine(self, starts, rngs, steps, reserve=0, most=None):
        """Random search for every candidate in lockstep, leaving ``reserve`` queries of the budget unspent;
        returns the best candidate of each.

        ``steps`` is the plan's (what the budget pays for with every candidate active); a candidate that does not
        work and has not come closer for ``patience`` steps stops, and the queries it leaves pay for more steps
        of the others, up to ``most`` (default ``config.steps``)."""
        cur = list(starts)
        tau = self._search_success()
        best_soft = [c.soft for c in cur]
        idle = [0] * len(cur)
        active = list(range(len(cur)))
        patience = int(np.clip(steps // 3, 3, PATIENCE))
        for step in range(self.cfg.steps if most is None else most):
            if not active or self.used() + len(active) * len(self.x_search) > self.queries_budget - reserve:
                break
            frac = max(0.0, 1.0 - step / max(1, steps))
            props = [FAMILIES[cur[i].family].propose(self, cur[i], rngs[i], frac, cur[i].success >= tau) for i in active]
            self._evaluate(props, self.x_search, self.search_pred)
            for i, p in zip(active, props):
                if p.key(tau) >= cur[i].key(tau):
                    if hasattr(FAMILIES[p.family], "fallbacks") and cur[i].success >= tau and p.size < cur[i].size:
                        p.earlier = ([cur[i]] + (cur[i].earlier or []))[:BACKOFF]
                    elif cur[i].earlier:
                        p.earlier = cur[i].earlier
                    cur[i] = p
                if cur[i].success >= tau or cur[i].soft > best_soft[i] + 1e-3:
                    best_soft[i], idle[i] = max(best_soft[i], cur[i].soft), 0
                else:
                    idle[i] += 1
            # a candidate that has not worked and has not come closer for PATIENCE steps stops (its family's cap
            # stands for its size): the queries go to the others
            active = [i for i in active if idle[i] < patience]
            if self.runner.progress is not None:
                self.runner.progress.note = (f"step {step + 1}, {len({cur[i].target for i in active})} "
                                             f"class(es) and {len(active)} candidate(s) left")
        return cur

    # ---- validation -----------------------------------------------------------------------------
    def _calibrate(self, cands, x, pred):
        """Strengths: the smallest that works on the held-out images, by bisection (all candidates in lockstep). A
        candidate that failed at its family's strongest is not measured there again (the same stamp on the same
        images: the same answer)."""
        strong = [c for c in cands if FAMILIES[c.family].strength]
        if not strong:
            return
        fams = [FAMILIES[c.family] for c in strong]
        lo = np.array([f.floor for f in fams])
        hi = np.full(len(strong), np.nan)
        top = np.array([f.top(c) for f, c in zip(fams, strong)])
        trial = np.array([c.alpha for c in strong])
        for _ in range(self.cfg.calib_steps):  # bounded work, inside the plan's check share
            open_ = np.flatnonzero(~(np.isnan(hi) & (lo >= top)))
            if not len(open_):
                break
            tries = [strong[i].copy(alpha=float(trial[i])) for i in open_]
            self._evaluate(tries, x, pred)
            works = np.zeros(len(strong), bool)
            works[open_] = [t.success >= self.cfg.success for t in tries]
            hi = np.where(works, trial, hi)
            lo = np.where(works, lo, trial)
            up = np.minimum(trial * 1.6, top)
            trial = np.where(np.isnan(hi), np.where(lo >= top, top, up), np.sqrt(lo * np.nan_to_num(hi, nan=1.0)))
        for c, a in zip(strong, hi):
            if np.isfinite(a):
                c.alpha = float(a)

    def _back_off(self, found, fps, x, pred, linf0):
        """A trigger that falls short on the held-out images gives way to the smallest of its family's
        ``fallbacks`` (a patch's one-pixel shifts and earlier states) that works there (each measured once, inside
        the plan's check share)."""
        short = [i for i, c in enumerate(found)
                 if c.success < self.cfg.success and hasattr(FAMILIES[c.family], "fallbacks")]
        if not short:
            return found, fps
        options = [FAMILIES[found[i].family].fallbacks(found[i], self.shape, BACKOFF) for i in short]
        tries = [e for o in options for e in o]
        tfps = self._evaluate(tries, x, pred, linf0)
        found, fps, k = list(found), list(fps), 0
        for i, o in zip(short, options):
            n = len(o)
            for j in range(k, k + n):  # smallest first
                if tries[j].success >= self.cfg.success:
                    log.debug("class %d patch: %s falls short on held-out images (%.3f); %s works (%.3f)", found[i].target,
                              found[i].describe(), found[i].success, tries[j].describe(), tries[j].success)
                    found[i] = tries[j]
                    if fps:
                        fps[i] = tfps[j]
                    break
            k += n
        return found, fps

    def measure(self, cands):
        """Success of ``cands`` on the held-out images (in place); returns them."""
        if not hasattr(self, "val_pred"):
            self._clean()
        deadline, self.deadline = self.deadline, None  # a bounded measurement, not part of the capped search
        try:
            self._evaluate(list(cands), self.x_val, self.val_pred)
        finally:
            self.deadline = deadline
        return cands

    def polish(self, cands, steps):
        """Continue the random search from ``cands`` for ``steps`` steps (e.g. on a repaired model), then validate."""
        if not hasattr(self, "val_pred"):
            self._clean()
        self.q0 = self.runner.queries
        self.deadline = time.perf_counter() + self.cfg.budget if self.cfg.budget else None
        starts = [c.copy() for c in cands]
        try:
            self._evaluate(starts, self.x_search, self.search_pred)
            rngs = [np.random.RandomState([self.cfg.seed, 7, 100 + c.target]) for c in cands]
            found = self._refine(starts, rngs, steps, most=steps)
            self._calibrate(found, self.x_val, self.val_pred)
            self._evaluate(found, self.x_val, self.val_pred)
        except Truncated:
            return starts
        return found

    def run(self, targets=None):
        """Search every class (or ``targets``; with many classes, the suspects and references); a :class:`Synthesis`."""
        started = time.perf_counter()
        self.deadline = started + self.cfg.budget if self.cfg.budget else None
        self.q0 = self.runner.queries
        self._clean()
        # Before any verdict: do the predictions make sense? (on every clean image the search holds)
        self.fit = check_fit(np.concatenate([self.val_logits, self.search_logits])
                             if not np.array_equal(self.val_idx, self.search_idx) else self.val_logits, self.runner.source)
        templates = self._templates()
        plan = self.plan(self.classes if targets is None else len(targets), templates)
        results, screening = {}, None
        with Progress(self.queries_budget, "screening") as bar:
            bar.note = f"{sum(plan['templates'].values())} templates for all {self.classes} classes"
            self.runner.progress = bar
            try:
                bar.advance(self.used())
                best, facts = self._screen(templates, plan)
                if targets is None:
                    suspects, refs = self._choose(facts)
                    roles = {k: "suspect" for k in suspects} | {k: "reference" for k in refs}
                    if not refs:
                        roles = {k: "all" for k in suspects}
                else:
                    roles = {int(t): "all" for t in targets}
                chosen = sorted(roles)
                screening = {"families": {f: {"templates": facts[f]["templates"], "working_classes": facts[f]["working_classes"]}
                                          for f in self.families},
                             "suspects": [k for k in chosen if roles[k] == "suspect"],
                             "references": [k for k in chosen if roles[k] == "reference"], "classes": self.classes}
                log.info("screened %d templates for %d classes; refining %d class(es) x %d families, %d steps "
                         "(%d of %d queries used)", sum(plan["templates"].values()), self.classes, len(chosen),
                         len(self.families), plan["steps"], self.used(), self.queries_budget)
                results = {k: ClassResult(k, role=roles[k]) for k in chosen}
                starts = [best[f][0][best[f][1][k]].copy(target=k) for k in chosen for f in self.families]
                rngs = [np.random.RandomState([self.cfg.seed, 1 + i, 100 + k]) for k in chosen for i, _ in enumerate(self.families)]
                bar.label, bar.note = "refining", f"{len(chosen)} class(es) x {len(self.families)} families"
                self._evaluate(starts, self.x_search, self.search_pred)
                found = self._refine(starts, rngs, plan["steps"], plan["check_reserve"])
                for c in found:
                    results[c.target].found[c.family] = c
                bar.label, bar.note = "checking", f"{len(found)} candidate(s) on {plan['val_images']} held-out images"
                x_val, val_pred = self.x_val[: plan["val_images"]], self.val_pred[: plan["val_images"]]
                linf0 = self.clean_linf[: plan["val_images"]] if self.clean_linf is not None else None
                self._calibrate(found, x_val, val_pred)
                fps = self._evaluate(found, x_val, val_pred, linf0)
                found, fps = self._back_off(found, fps, x_val, val_pred, linf0)
                for c, fp in zip(found, fps or [None] * len(found)):
                    results[c.target].found[c.family] = c  # a patch may have given way to a fallback
                    if fp is not None:
                        results[c.target].fingerprint[c.family] = fp
                    log.debug("class %d %s: %s success %.3f size %.4f", c.target, c.family, c.describe(), c.success, c.size)
            except Truncated:
                log.warning("the search stopped at its time cap after %d of %d queries", self.used(), self.queries_budget)
            finally:
                self.runner.progress = None
        plan["queries_used"] = int(self.used())
        return Synthesis(
            [results[t] for t in sorted(results)],
            self.cfg,
            self.used(),
            time.perf_counter() - started,
            self.truncated,
            self.runner.layers[0].id if self.runner.layers else None,
            self.runner.pre.color,
            self.fit,
            plan,
            screening,
        )


def variants(cand, shape):
    """Neighbours of a synthesized trigger that a backdoor likely also answers to (probe augmentation): a patch
    cropped by a row or column and shifted by a pixel or two; a stronger version of the others. Each is a new,
    unmeasured Candidate."""
    return FAMILIES[cand.family].variants(cand, shape)


def fingerprint(clean_linf, linf, top=3):
    """How a trigger drives last-conv channel peaks: robust z of the mean l-inf rise, and the peak ratio.

    ``peak_ratio`` is the triggered mean l-inf of the top channel over its clean 99th percentile.
    """
    n = min(len(clean_linf), len(linf))
    rise = linf[:n].mean(0) - clean_linf[:n].mean(0)
    z = robust_z(rise)
    order = np.argsort(-z, kind="stable")[:top]
    q99 = np.quantile(clean_linf, 0.99, axis=0)
    ratio = np.where(q99 > 0, linf.mean(0) / np.maximum(q99, 1e-12), 0.0)
    return {
        "channels": [int(k) for k in order],
        "z": [round(float(z[k]), 3) for k in order],
        "peak_ratio": [round(float(ratio[k]), 3) for k in order],
    }
