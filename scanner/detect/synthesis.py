"""Gradient-free trigger synthesis: the smallest trigger per class, found with forward passes only.

Every trigger is ``x' = (1 - m) * x + m * p`` (mask ``m``, pattern ``p``, pixels 0-255) in one of two families:

- ``patch``: a rectangle (position, height, width, content); its size is its area / the image's area.
- ``blend``: the whole image, one opacity ``alpha``, a pattern; its size is ``alpha``.

The search, per family, with a query budget and a time deadline:

1. Screening: a bank of template triggers (patches of a few sizes over a grid of positions with white,
   black, checker and noise content; blends of noise, checker, stripes and class-prototype patterns at a
   few opacities). One forward batch of a template gives, through the histogram of predicted classes,
   its success for every target class at once; each class starts from its best template.
2. Refinement: a random search for every class in lockstep (one proposal per class per step, all in one
   batch, so every class gets the same effort): content moves (a random square re-drawn, Square-Attack
   style), position shifts, and size moves (shrink while the trigger works, grow while it does not).
   A proposal is kept when it is at least as good: working beats not working, then smaller, then the
   soft success (mean softmax probability of the target) decides.
3. Calibration and validation on held-out clean images: a blend's opacity is bisected down to the
   smallest that still works there; then success rate, size, and the l-inf fingerprint (how far the
   trigger drives each last-conv channel's peak above its clean range, as robust z-scores).

Success is measured on images whose clean prediction is not the target. Results are deterministic for a
seed while the deadline is not reached (the query budget, not the clock, decides the work done).
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from scanner.data.triggers import Trigger
from scanner.detect.sanity import check_fit
from scanner.detect.stats import robust_z
from scanner.errors import ScannerError
from scanner.progress import Progress
from scanner.runtime.runner import probabilities

log = logging.getLogger("scanner")

FAMILIES = ("patch", "blend")
SUCCESS = 0.9
"""A trigger works when it sends at least this fraction of other-class images to its target."""


@dataclass
class Config:
    """Search settings; the defaults keep ``scanner sanitize`` under a minute on a small model and 2 cores."""

    seed: int = 0
    budget: float = 40.0
    """Seconds (a deadline: the search stops early, and says so, when it is reached)."""
    families: tuple = FAMILIES
    success: float = SUCCESS
    search_images: int = 48
    screen_images: int = 16
    """Templates are screened on the first of the search images."""
    val_images: int = 200
    search_margin: float = 0.05
    """The search aims at ``success + search_margin`` on its few images, so that the trigger still works on
    the held-out ones."""
    steps: int = 50
    """Refinement steps per class and family."""
    patch_sizes: tuple = (0.12, 0.22)
    """Screening patch sides, as fractions of the image side."""
    patch_grid: int = 6
    max_patch: float = 0.4
    """Largest patch side, as a fraction of the image side."""
    alphas: tuple = (0.1, 0.2, 0.3, 0.45, 0.6)
    max_alpha: float = 0.8
    min_alpha: float = 0.01
    calib_steps: int = 6
    batch_size: int = 512


@dataclass
class Candidate:
    """One trigger of a family: its parameters, and what it does on a batch."""

    family: str
    target: int
    pattern: np.ndarray  # (H, W, C) float32 0-255 (patch: the content, (h, w, C))
    box: tuple = None  # patch: (y, x, h, w)
    alpha: float = None  # blend
    success: float = 0.0
    soft: float = 0.0
    shape: tuple = None  # (H, W) of the image

    @property
    def size(self):
        """Mask L1 as a fraction of the image: patch area, or blend opacity."""
        if self.family == "patch":
            return self.box[2] * self.box[3] / float(self.shape[0] * self.shape[1])
        return float(self.alpha)

    def key(self, success):
        """Order of preference: working, then smaller, then higher soft success."""
        ok = self.success >= success
        return (ok, -self.size if ok else 0.0, self.soft)

    def stamp(self, x):
        """``x`` (N, H, W, C) float32 with the trigger on (a new array)."""
        out = x.copy()
        if self.family == "patch":
            y, x0, h, w = self.box
            out[:, y : y + h, x0 : x0 + w, :] = self.pattern
        else:
            a = np.float32(self.alpha)
            out *= 1 - a
            out += a * self.pattern
        return out

    def copy(self, **changes):
        c = Candidate(self.family, self.target, self.pattern.copy(), self.box, self.alpha, 0.0, 0.0, self.shape)
        for k, v in changes.items():
            setattr(c, k, v)
        return c

    def trigger(self, color="rgb"):
        """This candidate as a :class:`Trigger` (pattern rounded to whole pixel values)."""
        img = np.clip(np.rint(self.pattern), 0, 255).astype(np.float32)
        if color == "bgr" and img.shape[2] == 3:
            img = img[:, :, ::-1].copy()
        extra = {"synthesized": True, "target": int(self.target)}
        if self.family == "patch":
            y, x, h, w = self.box
            return Trigger(kind="patch", image=img, position=[int(y), int(x)], margin=0, extra=extra)
        return Trigger(kind="blend", image=img, alpha=round(float(self.alpha), 4), extra=extra)

    def describe(self):
        if self.family == "patch":
            y, x, h, w = self.box
            return f"patch {h}x{w} at [{y}, {x}]"
        return f"blend alpha {self.alpha:.3f}"


@dataclass
class ClassResult:
    """The best trigger of each family for one target class, validated on held-out images."""

    target: int
    found: dict = field(default_factory=dict)  # family -> Candidate
    fingerprint: dict = field(default_factory=dict)  # family -> l-inf evidence

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

    def sizes(self, family):
        """Per class size of the family's smallest working trigger (``None`` where none works)."""
        out = []
        for r in self.classes:
            c = r.found.get(family)
            out.append(c.size if c is not None and c.success >= self.config.success else None)
        return out

    def to_dict(self):
        """JSON-ready summary (no pixel arrays)."""
        rows = []
        for r in self.classes:
            row = {"target": r.target}
            for fam, c in r.found.items():
                row[fam] = {
                    "trigger": c.describe(),
                    "size": round(c.size, 6),
                    "success": round(c.success, 6),
                    "soft_success": round(c.soft, 6),
                    "works": bool(c.success >= self.config.success),
                    **({"fingerprint": r.fingerprint[fam]} if fam in r.fingerprint else {}),
                }
            rows.append(row)
        return {
            "families": list(self.config.families),
            "success_threshold": self.config.success,
            "seed": self.config.seed,
            "queries": int(self.queries),
            "seconds": round(self.seconds, 3),
            "truncated": bool(self.truncated),
            "fingerprint_layer": self.layer,
            "clean_predictions": self.clean,
            "classes": rows,
        }


def search_runner(ctx, batch_size=512):
    """The runner the search queries: scores, plus the last conv layer's per-channel l-inf (the fingerprint)
    when the model has such a layer."""
    layers = [l for l in ctx.layers if l.is_last_conv] or [l for l in ctx.layers if not l.is_head][-1:]
    if not layers:
        log.debug("no l-inf fingerprint layer: no layer before the head")
    return ctx.runner(layers, norms=("linf",), batch_size=batch_size)


class Synthesizer:
    """Trigger synthesis for one model on clean pixels; :meth:`run` does the whole search.

    ``runner``: a :class:`scanner.runtime.runner.Runner` of the model (see :func:`search_runner`).
    """

    def __init__(self, runner, pixels, config=None):
        self.runner = runner
        self.cfg = config or Config()
        self.pixels = np.asarray(pixels)
        n, self.h, self.w, self.c = self.pixels.shape
        if n < 8:
            raise ScannerError(f"trigger synthesis needs at least 8 clean images, got {n}")
        rng = np.random.RandomState(self.cfg.seed)
        order = rng.permutation(n)
        k = min(self.cfg.search_images, max(4, n // 2))
        self.search_idx = np.sort(order[:k])
        self.val_idx = np.sort(order[k : k + self.cfg.val_images]) if n - k >= 8 else np.sort(order[:k])
        self.x_search = self.pixels[self.search_idx].astype(np.float32)
        self.x_val = self.pixels[self.val_idx].astype(np.float32)
        self.deadline = None
        self.truncated = False

    # ---- measuring ------------------------------------------------------------------------------
    def _run(self, pixels):
        """(scores (N, K), fingerprint-layer l-inf (N, C) or None) of ``pixels``."""
        out = self.runner.run(pixels, batch_size=self.cfg.batch_size)
        return out.scores, out.norms.get("linf")

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
        hit = probs.argmax(2)
        others = pred0[None, :, None] != np.arange(probs.shape[2])[None, None, :]  # (1, B, K)
        denom = np.maximum(others.sum(1), 1)  # (1, K)
        success = ((hit[:, :, None] == np.arange(probs.shape[2])) & others).sum(1) / denom
        soft = (probs * others).sum(1) / denom
        if targets is not None:
            idx = np.arange(k)
            return success[idx, targets], soft[idx, targets]
        return success, soft

    def _evaluate(self, cands, x, pred0):
        """Fill in success and soft success of each candidate (for its own target) on images ``x``."""
        if not cands:
            return
        batch = np.concatenate([c.stamp(x) for c in cands])
        logits, _ = self._run(batch)
        succ, soft = self._score(logits, pred0, np.array([c.target for c in cands]))
        for c, s, q in zip(cands, succ, soft):
            c.success, c.soft = float(s), float(q)

    def _search_success(self):
        return min(1.0, self.cfg.success + self.cfg.search_margin)

    def _expired(self):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            if not self.truncated:
                log.warning("trigger synthesis reached its time budget; results are partial (raise --budget)")
            self.truncated = True
            return True
        return False

    # ---- templates ------------------------------------------------------------------------------
    def _contents(self, h, w, rng):
        """Template patch contents (h, w, C): white, black, checker, binary noise."""
        c = self.c
        yy, xx = np.indices((h, w))
        checker = ((yy + xx) % 2 * 255.0)[:, :, None].repeat(c, 2)
        noise = (rng.rand(h, w, c) > 0.5) * 255.0
        return [np.full((h, w, c), 255.0), np.zeros((h, w, c)), checker, noise]

    def _patterns(self, rng):
        """Template blend patterns (H, W, C): noise, checkers, stripes, flat, and class prototypes."""
        h, w, c = self.h, self.w, self.c
        yy, xx = np.indices((h, w)).astype(np.float64)
        pats = [rng.rand(h, w, c) * 255.0, (rng.rand(h, w, c) > 0.5) * 255.0]
        for period in (2, 4):
            pats.append((((yy // (period // 2)) + (xx // (period // 2))) % 2 * 255.0)[:, :, None].repeat(c, 2))
        for period in (4, 8):
            for phase in (xx, yy, xx + yy):
                pats.append((127.5 + 127.5 * np.sin(2 * np.pi * phase / period))[:, :, None].repeat(c, 2))
        pats += [np.full((h, w, c), 255.0), np.zeros((h, w, c))]
        for k in range(self.classes):
            sel = self.val_pred == k
            if sel.any():
                pats.append(self.x_val[sel].mean(0))
        return [p.astype(np.float32) for p in pats]

    def _screen(self, family, rng):
        """Templates of ``family`` measured on the search images; the best template per class."""
        shape = (self.h, self.w)
        templates = []
        if family == "patch":
            side = min(self.h, self.w)
            for k, f in enumerate(self.cfg.patch_sizes):
                s = max(1, int(round(f * side)))
                ys = np.linspace(0, self.h - s, self.cfg.patch_grid).round().astype(int)
                xs = np.linspace(0, self.w - s, self.cfg.patch_grid).round().astype(int)
                if k == 0:  # the smallest patches also sit 1-2 pixels from the borders, where triggers usually go
                    ys = np.concatenate([ys, [1, 2, self.h - s - 2, self.h - s - 1]])
                    xs = np.concatenate([xs, [1, 2, self.w - s - 2, self.w - s - 1]])
                ys = np.unique(np.clip(ys, 0, self.h - s))
                xs = np.unique(np.clip(xs, 0, self.w - s))
                contents = self._contents(s, s, rng)
                for y in ys:
                    for x in xs:
                        for content in contents:
                            templates.append(Candidate("patch", -1, content.astype(np.float32), (int(y), int(x), s, s), shape=shape))
        else:
            for pat in self._patterns(rng):
                for a in self.cfg.alphas:
                    templates.append(Candidate("blend", -1, pat, alpha=float(a), shape=shape))
        succ, soft = np.zeros((0, self.classes)), np.zeros((0, self.classes))
        x, pred = self.x_search[: self.cfg.screen_images], self.search_pred[: self.cfg.screen_images]
        step = max(1, self.cfg.batch_size * 4 // len(x))
        for s in range(0, len(templates), step):
            group = templates[s : s + step]
            batch = np.concatenate([t.stamp(x) for t in group])
            logits, _ = self._run(batch)
            a, b = self._score(logits, pred)
            succ, soft = np.vstack([succ, a]), np.vstack([soft, b])
        best, tau = [], self._search_success()
        for t in range(self.classes):
            keys = [(succ[i, t] >= tau, -templates[i].size if succ[i, t] >= tau else 0.0, soft[i, t])
                    for i in range(len(templates))]
            i = max(range(len(templates)), key=lambda j: keys[j])
            best.append(templates[i].copy(target=t))
        self._evaluate(best, self.x_search, self.search_pred)
        return best

    # ---- refinement -----------------------------------------------------------------------------
    def _propose(self, cur, rng, step):
        """A random neighbour of ``cur``."""
        frac = 1.0 - step / max(1, self.cfg.steps)
        ok = cur.success >= self._search_success()
        if cur.family == "patch":
            y, x, h, w = cur.box
            u = rng.rand()
            if u < 0.3:  # resize: shrink while it works, grow while it does not
                side = rng.randint(4)
                new = cur.pattern
                if ok and (h > 1 or w > 1):
                    if side in (0, 1) and h > 1 or w == 1:
                        new, y, h = (new[1:], y + 1, h - 1) if side % 2 == 0 else (new[:-1], y, h - 1)
                    else:
                        new, x, w = (new[:, 1:], x + 1, w - 1) if side % 2 == 0 else (new[:, :-1], x, w - 1)
                elif not ok:
                    cap = max(1, int(round(self.cfg.max_patch * min(self.h, self.w))))
                    fill = (rng.rand(*new.shape[:1], 1, self.c) > 0.5) * 255.0
                    if side < 2 and h < cap and h < self.h:
                        row = (rng.rand(1, w, self.c) > 0.5) * 255.0
                        if side == 0 and y > 0:
                            new, y, h = np.concatenate([row, new]), y - 1, h + 1
                        elif y + h < self.h:
                            new, h = np.concatenate([new, row]), h + 1
                    elif w < cap and w < self.w:
                        if side == 2 and x > 0:
                            new, x, w = np.concatenate([fill, new], 1), x - 1, w + 1
                        elif x + w < self.w:
                            new, w = np.concatenate([new, fill], 1), w + 1
                return cur.copy(pattern=new.astype(np.float32), box=(y, x, h, w))
            if u < 0.5:  # shift
                dy, dx = rng.randint(-2, 3, size=2)
                y = int(np.clip(y + dy, 0, self.h - h))
                x = int(np.clip(x + dx, 0, self.w - w))
                return cur.copy(box=(y, x, h, w))
            new = cur.pattern.copy()
            self._square(new, rng, frac)
            return cur.copy(pattern=new)
        if rng.rand() < 0.3:
            factor = 0.88 if ok else 1.0 / 0.88
            return cur.copy(alpha=float(np.clip(cur.alpha * factor, 0.01, self.cfg.max_alpha)))
        new = cur.pattern.copy()
        self._square(new, rng, frac)
        return cur.copy(pattern=new)

    @staticmethod
    def _square(pattern, rng, frac):
        """Re-draw a random square of ``pattern`` in place (its side shrinks as the search goes on)."""
        h, w, c = pattern.shape
        side = max(1, int(round(max(1.0, 0.5 * frac * min(h, w) + 0.5))))
        side = min(side, h, w)
        y, x = rng.randint(0, h - side + 1), rng.randint(0, w - side + 1)
        if rng.rand() < 0.5:
            pattern[y : y + side, x : x + side] = (rng.rand(1, 1, c) > 0.5) * 255.0
        else:
            pattern[y : y + side, x : x + side] = (rng.rand(side, side, c) > 0.5) * 255.0

    def _refine(self, starts, rngs):
        """Random search for every class in lockstep; returns the best candidate per class."""
        cur = list(starts)
        for step in range(self.cfg.steps):
            if self._expired():
                break
            props = [self._propose(c, rng, step) for c, rng in zip(cur, rngs)]
            self._evaluate(props, self.x_search, self.search_pred)
            tau = self._search_success()
            for i, p in enumerate(props):
                if p.key(tau) >= cur[i].key(tau):
                    cur[i] = p
        return cur

    # ---- validation -----------------------------------------------------------------------------
    def _calibrate(self, cands):
        """Blend opacities: the smallest that works on the held-out images, by bisection (classes in lockstep)."""
        blends = [c for c in cands if c.family == "blend"]
        if not blends:
            return
        lo = np.full(len(blends), self.cfg.min_alpha)
        hi = np.full(len(blends), np.nan)
        trial = np.array([c.alpha for c in blends])
        for step in range(self.cfg.calib_steps):  # bounded work: not cut by the deadline
            tries = [c.copy(alpha=float(a)) for c, a in zip(blends, trial)]
            self._evaluate(tries, self.x_val, self.val_pred)
            works = np.array([t.success >= self.cfg.success for t in tries])
            hi = np.where(works, trial, hi)
            lo = np.where(works, lo, trial)
            up = np.minimum(trial * 1.6, self.cfg.max_alpha)
            trial = np.where(np.isnan(hi), np.where(lo >= self.cfg.max_alpha, self.cfg.max_alpha, up), np.sqrt(lo * np.nan_to_num(hi, nan=1.0)))
        for c, a in zip(blends, hi):
            if np.isfinite(a):
                c.alpha = float(a)

    def _validate(self, cand):
        """Success on the held-out images and the l-inf fingerprint of ``cand``."""
        logits, linf = self._run(cand.stamp(self.x_val))
        succ, soft = self._score(logits, self.val_pred, np.array([cand.target]))
        cand.success, cand.soft = float(succ[0]), float(soft[0])
        if linf is None or self.clean_linf is None:
            return None
        return fingerprint(self.clean_linf, linf)

    def measure(self, cands):
        """Success of ``cands`` on the held-out images (in place); returns them."""
        if not hasattr(self, "val_pred"):
            self._clean()
        self._evaluate(list(cands), self.x_val, self.val_pred)
        return cands

    def polish(self, cands, steps):
        """Continue the random search from ``cands`` for ``steps`` steps (e.g. on a repaired model), then validate."""
        if not hasattr(self, "val_pred"):
            self._clean()
        started = time.perf_counter()
        self.deadline = started + self.cfg.budget if self.cfg.budget else None
        starts = [c.copy() for c in cands]
        self._evaluate(starts, self.x_search, self.search_pred)
        rngs = [np.random.RandomState([self.cfg.seed, 7, 100 + c.target]) for c in cands]
        saved = self.cfg.steps
        try:
            self.cfg.steps = steps
            found = self._refine(starts, rngs)
        finally:
            self.cfg.steps = saved
        self._calibrate(found)
        for c in found:
            self._validate(c)
        return found

    def run(self, targets=None):
        """Search every class (or ``targets``); returns a :class:`Synthesis`."""
        started = time.perf_counter()
        self.deadline = started + self.cfg.budget if self.cfg.budget else None
        q0 = self.runner.queries
        self._clean()
        # Before any verdict: do the predictions make sense? (on every clean image the search holds)
        self.fit = check_fit(np.concatenate([self.val_logits, self.search_logits])
                             if not np.array_equal(self.val_idx, self.search_idx) else self.val_logits, self.runner.source)
        targets = list(range(self.classes)) if targets is None else [int(t) for t in targets]
        results = {t: ClassResult(t) for t in targets}
        est = len(targets) * len(self.cfg.families) * (self.cfg.steps * len(self.x_search) + len(self.x_val))
        with Progress(est, "synthesis") as bar:
            self.runner.progress = bar
            try:
                for f, family in enumerate(self.cfg.families):
                    if self.cfg.budget:  # each family gets its share of the time
                        self.deadline = started + self.cfg.budget * (f + 1) / len(self.cfg.families)
                    rng = np.random.RandomState([self.cfg.seed, 1 + f])
                    starts = self._screen(family, rng)
                    starts = [starts[t] for t in targets]
                    rngs = [np.random.RandomState([self.cfg.seed, 1 + f, 100 + t]) for t in targets]
                    found = self._refine(starts, rngs)
                    self._calibrate(found)
                    for cand in found:
                        fp = self._validate(cand)
                        results[cand.target].found[family] = cand
                        if fp is not None:
                            results[cand.target].fingerprint[family] = fp
                        log.debug("class %d %s: %s success %.3f size %.4f", cand.target, family, cand.describe(), cand.success, cand.size)
            finally:
                self.runner.progress = None
        return Synthesis(
            [results[t] for t in targets],
            self.cfg,
            self.runner.queries - q0,
            time.perf_counter() - started,
            self.truncated,
            self.runner.layers[0].id if self.runner.layers else None,
            self.runner.pre.color,
            self.fit,
        )


def variants(cand, shape):
    """Neighbours of a synthesized trigger that a backdoor likely also answers to (probe augmentation).

    Patch: one row or column cropped off, and shifted by one or two pixels; blend: stronger opacities (the
    strongest first). Each is a new, unmeasured Candidate.
    """
    h, w = shape
    out = []
    if cand.family == "patch":
        y, x, ph, pw = cand.box
        for top, left, dh, dw in ((1, 0, 1, 0), (0, 0, 1, 0), (0, 1, 0, 1), (0, 0, 0, 1)):  # one row / column less
            if ph - dh >= 1 and pw - dw >= 1 and (dh or dw) and (ph > 1 if dh else pw > 1):
                sub = cand.pattern[top : top + ph - dh, left : left + pw - dw]
                out.append(cand.copy(pattern=sub.copy(), box=(y + top, x + left, ph - dh, pw - dw)))
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                if (dy or dx) and abs(dy) + abs(dx) <= 2:
                    ny, nx = int(np.clip(y + dy, 0, h - ph)), int(np.clip(x + dx, 0, w - pw))
                    if (ny, nx) != (y, x) and all(c.box != (ny, nx, ph, pw) for c in out):
                        out.append(cand.copy(box=(ny, nx, ph, pw)))
    else:
        for factor in (2.0, 1.5):
            out.append(cand.copy(alpha=float(min(1.0, cand.alpha * factor))))
    return out


def fingerprint(clean_linf, linf, top=3):
    """How a trigger drives last-conv channel peaks: robust z of the mean l-inf rise, and the peak ratio.

    ``peak_ratio`` is the triggered mean l-inf of the top channel over its clean 99th percentile.
    """
    rise = linf.mean(0) - clean_linf.mean(0)
    z = robust_z(rise)
    order = np.argsort(-z, kind="stable")[:top]
    q99 = np.quantile(clean_linf, 0.99, axis=0)
    ratio = np.where(q99 > 0, linf.mean(0) / np.maximum(q99, 1e-12), 0.0)
    return {
        "channels": [int(k) for k in order],
        "z": [round(float(z[k]), 3) for k in order],
        "peak_ratio": [round(float(ratio[k]), 3) for k in order],
    }
