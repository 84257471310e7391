"""Trigger families the search knows: what a trigger of each is, its size, its screening templates, its moves.

Every family stamps a trigger on float pixels (N, H, W, C, 0-255) with forward passes only in mind, has a size
(comparable across the classes of one family, not across families) and a cap (the largest size it searches):

===========  =====================================================================  ============================
family       trigger                                                                 size
===========  =====================================================================  ============================
``patch``    a rectangle of content pasted at a position (BadNets, stickers)         area / image area
``blend``    ``(1 - a) x + a p`` with a whole-image pattern (Blended, noise, photos)  opacity ``a``
``signal``   ``x + A sin(2 pi f t + phi)`` along rows, columns or diagonals (SIG)    amplitude ``A / 255``
``warp``     a smooth displacement field (WaNet), strength ``s``                    strength ``s``
``filter``   a global color transform mixed in by ``t``: ``x ((1 - t) I + t M)^T + t b``,   mean pixel change / 255
             gamma ``1 + t (g - 1)``, vignette ``t v`` (TrojAI's "Instagram" filters)
===========  =====================================================================  ============================

Families with a continuous strength (blend, signal, warp, filter) are calibrated by bisecting it on held-out
images. :class:`Candidate` holds one trigger; ``FAMILIES`` maps names to the family objects.
"""

from dataclasses import dataclass

import numpy as np

from scanner.data import triggers as T


@dataclass
class Candidate:
    """One trigger of a family for a target class, and what it did on the last images it was measured on."""

    family: str
    target: int
    pattern: np.ndarray = None
    """patch: its content (h, w, C); blend: the pattern (H, W, C); signal: the unit wave (H, W, C) in [-1, 1];
    warp: the noise field (H, W, 2)."""
    box: tuple = None
    """patch: (y, x, h, w)."""
    alpha: float = None
    """The strength: blend opacity, signal amplitude / 255, warp strength, filter mix."""
    success: float = 0.0
    soft: float = 0.0
    shape: tuple = None
    """(H, W) of the image."""
    matrix: np.ndarray = None
    """filter: the full-strength color matrix (3, 3) (its bias is ``bias``)."""
    bias: np.ndarray = None
    base: float = None
    """filter: the mean pixel change / 255 of the full-strength filter on the search images."""
    gamma: float = 1.0
    """filter: the full-strength gamma (1: none)."""
    vignette: float = 0.0
    """filter: the full-strength vignette (darkening ``v r^2`` toward the corners; 0: none)."""
    earlier: list = None
    """patch: the larger working states the refinement shrank through (the latest, smallest, first): the fallbacks
    when the final one falls short on held-out images."""
    depicts: int = None
    """blend: the class whose clean images the pattern is made of (a class prototype, a natural image). Blending a
    class's own images in is how that class looks, not a trigger: the pattern never counts for that class."""
    changed: float = None
    """The fraction of the images (any class) whose prediction the trigger changes, on the last images measured: an
    all-to-all trigger changes most of them without sending most to its one target."""

    @property
    def size(self):
        return FAMILIES[self.family].size(self)

    @property
    def strength(self):
        return self.alpha

    def key(self, success):
        """Order of preference: working, then smaller, then higher soft success."""
        ok = self.success >= success
        return (ok, -self.size if ok else 0.0, self.soft)

    def stamp(self, x, out=None):
        """``x`` (N, H, W, C) float32 with the trigger on: a new array, or written into ``out`` (same shape)."""
        return FAMILIES[self.family].stamp(self, x, _buffer(x, out))

    def copy(self, **changes):
        c = Candidate(self.family, self.target, None if self.pattern is None else self.pattern.copy(), self.box,
                      self.alpha, 0.0, 0.0, self.shape, self.matrix, self.bias, self.base, gamma=self.gamma,
                      vignette=self.vignette, depicts=self.depicts)
        for k, v in changes.items():
            setattr(c, k, v)
        return c

    def trigger(self, color="rgb"):
        """This candidate as a :class:`scanner.data.triggers.Trigger` (a file can be saved from it)."""
        return FAMILIES[self.family].trigger(self, color, {"synthesized": True, "target": int(self.target)})

    def describe(self):
        return FAMILIES[self.family].describe(self)


def _buffer(x, out):
    """Where a stamp of images ``x`` goes: ``out`` (checked: float32, x's shape), else a new float32 array."""
    if out is None:
        return np.empty(np.shape(x), np.float32)
    if out.shape != np.shape(x) or out.dtype != np.float32:
        raise ValueError(f"a stamp of {np.shape(x)} images cannot go into a {out.dtype} array of {out.shape}")
    return out


def _gray(c):
    return c == 1


class Patch:
    name = "patch"
    strength = False

    def size(self, c):
        return c.box[2] * c.box[3] / float(c.shape[0] * c.shape[1])

    def cap(self, cfg):
        return float(cfg.max_patch) ** 2

    def stamp(self, c, x, out):
        out[...] = x
        y, x0, h, w = c.box
        out[:, y : y + h, x0 : x0 + w, :] = c.pattern
        return out

    def trigger(self, c, color, extra):
        img = np.clip(np.rint(c.pattern), 0, 255).astype(np.float32)
        if color == "bgr" and img.shape[2] == 3:
            img = img[:, :, ::-1].copy()
        y, x, h, w = c.box
        return T.Trigger(kind="patch", image=img, position=[int(y), int(x)], margin=0, extra=extra)

    def describe(self, c):
        y, x, h, w = c.box
        return f"patch {h}x{w} at [{y}, {x}]"

    def contents(self, h, w, ch, rng):
        """Template patch contents (h, w, C): white, black, checker, binary noise."""
        yy, xx = np.indices((h, w))
        checker = ((yy + xx) % 2 * 255.0)[:, :, None].repeat(ch, 2)
        noise = (rng.rand(h, w, ch) > 0.5) * 255.0
        return [np.full((h, w, ch), 255.0), np.zeros((h, w, ch)), checker, noise]

    def templates(self, s, rng):
        cfg, out = s.cfg, []
        side = min(s.h, s.w)
        for k, f in enumerate(cfg.patch_sizes):
            n = max(1, int(round(f * side)))
            ys = np.linspace(0, s.h - n, cfg.patch_grid).round().astype(int)
            xs = np.linspace(0, s.w - n, cfg.patch_grid).round().astype(int)
            if k == 0:  # the smallest patches also sit 1-2 pixels from the borders, where triggers usually go
                ys = np.concatenate([ys, [1, 2, s.h - n - 2, s.h - n - 1]])
                xs = np.concatenate([xs, [1, 2, s.w - n - 2, s.w - n - 1]])
            ys, xs = np.unique(np.clip(ys, 0, s.h - n)), np.unique(np.clip(xs, 0, s.w - n))
            contents = self.contents(n, n, s.c, rng)
            for y in ys:
                for x in xs:
                    for content in contents:
                        out.append(Candidate("patch", -1, content.astype(np.float32), (int(y), int(x), n, n), shape=s.shape))
        return out

    def propose(self, s, cur, rng, frac, ok):
        y, x, h, w = cur.box
        u = rng.rand()
        if u < 0.3:  # resize: shrink while it works; while it does not, grow, or shrink (a patch over the
            # trigger's surroundings can be too big)
            side = rng.randint(4)
            new = cur.pattern
            shrink = ok or rng.rand() < 0.3
            if shrink and (h > 1 or w > 1):
                if side in (0, 1) and h > 1 or w == 1:
                    new, y, h = (new[1:], y + 1, h - 1) if side % 2 == 0 else (new[:-1], y, h - 1)
                else:
                    new, x, w = (new[:, 1:], x + 1, w - 1) if side % 2 == 0 else (new[:, :-1], x, w - 1)
            elif not shrink:
                cap = max(1, int(round(s.cfg.max_patch * min(s.h, s.w))))
                fill = (rng.rand(*new.shape[:1], 1, s.c) > 0.5) * 255.0
                if side < 2 and h < cap and h < s.h:
                    row = (rng.rand(1, w, s.c) > 0.5) * 255.0
                    if side == 0 and y > 0:
                        new, y, h = np.concatenate([row, new]), y - 1, h + 1
                    elif y + h < s.h:
                        new, h = np.concatenate([new, row]), h + 1
                elif w < cap and w < s.w:
                    if side == 2 and x > 0:
                        new, x, w = np.concatenate([fill, new], 1), x - 1, w + 1
                    elif x + w < s.w:
                        new, w = np.concatenate([new, fill], 1), w + 1
            return cur.copy(pattern=new.astype(np.float32), box=(y, x, h, w))
        if u < 0.5:  # shift
            dy, dx = rng.randint(-2, 3, size=2)
            return cur.copy(box=(int(np.clip(y + dy, 0, s.h - h)), int(np.clip(x + dx, 0, s.w - w)), h, w))
        new = cur.pattern.copy()
        square(new, rng, frac)
        return cur.copy(pattern=new)

    def shifted(self, c, dy, dx, shape):
        """``c`` moved by (dy, dx) pixels, kept inside an image of ``shape`` (a new, unmeasured Candidate)."""
        y, x, ph, pw = c.box
        return c.copy(box=(int(np.clip(y + dy, 0, shape[0] - ph)), int(np.clip(x + dx, 0, shape[1] - pw)), ph, pw))

    def variants(self, c, shape):
        """One row / column less, and shifted by one or two pixels (each a new, unmeasured Candidate)."""
        y, x, ph, pw = c.box
        out = []
        for top, left, dh, dw in ((1, 0, 1, 0), (0, 0, 1, 0), (0, 1, 0, 1), (0, 0, 0, 1)):
            if ph - dh >= 1 and pw - dw >= 1 and (dh or dw) and (ph > 1 if dh else pw > 1):
                sub = c.pattern[top : top + ph - dh, left : left + pw - dw]
                out.append(c.copy(pattern=sub.copy(), box=(y + top, x + left, ph - dh, pw - dw)))
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                if (dy or dx) and abs(dy) + abs(dx) <= 2:
                    s = self.shifted(c, dy, dx, shape)
                    if s.box != c.box and all(o.box != s.box for o in out):
                        out.append(s)
        return out

    def relocations(self, c, shape, grid=3):
        """The same patch at a ``grid`` x ``grid`` lattice of positions across the image, its own box left out (new,
        unmeasured Candidates): a sticker backdoor answers wherever the patch is, a fixed-position one does not."""
        y, x, ph, pw = c.box
        ys = np.linspace(0, shape[0] - ph, grid).round().astype(int)
        xs = np.linspace(0, shape[1] - pw, grid).round().astype(int)
        return [c.copy(box=(int(yy), int(xx), ph, pw)) for yy in ys for xx in xs
                if abs(int(yy) - y) > ph or abs(int(xx) - x) > pw]

    def fallbacks(self, c, shape, most):
        """What a patch that falls short on held-out images may give way to, smallest first (at most ``most``):
        itself shifted by one pixel, then the larger working states its refinement shrank through."""
        shifts = [s for s in (self.shifted(c, dy, dx, shape) for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)))
                  if s.box != c.box]
        return sorted(shifts + [e.copy() for e in (c.earlier or [])], key=lambda e: e.size)[:most]


def square(pattern, rng, frac, low=0.0, high=255.0):
    """Re-draw a random square of ``pattern`` in place (its side shrinks as the search goes on): one random value,
    or binary noise, between ``low`` and ``high``."""
    h, w, c = pattern.shape
    side = min(max(1, int(round(max(1.0, 0.5 * frac * min(h, w) + 0.5)))), h, w)
    y, x = rng.randint(0, h - side + 1), rng.randint(0, w - side + 1)
    if rng.rand() < 0.5:
        pattern[y : y + side, x : x + side] = np.where(rng.rand(1, 1, c) > 0.5, high, low)
    else:
        pattern[y : y + side, x : x + side] = np.where(rng.rand(side, side, c) > 0.5, high, low)


class Strength:
    """Shared parts of the families with a continuous strength ``alpha``."""

    strength = True

    def size(self, c):
        return float(c.alpha)

    def scaled(self, c, ok, rng):
        factor = 0.88 if ok else 1.0 / 0.88
        return c.copy(alpha=float(np.clip(c.alpha * factor, self.floor, self.top(c))))

    floor = 1e-3

    def top(self, c):
        return self.max_strength

    def variants(self, c, shape):
        """Stronger versions (the strongest first)."""
        return [c.copy(alpha=float(min(self.top(c), c.alpha * f))) for f in (2.0, 1.5)]


class Blend(Strength):
    name = "blend"

    def cap(self, cfg):
        return float(cfg.max_alpha)

    def top(self, c):
        return 1.0

    def stamp(self, c, x, out):
        a = np.float32(c.alpha)
        np.multiply(x, 1 - a, out=out)
        out += a * c.pattern
        return out

    def trigger(self, c, color, extra):
        img = np.clip(np.rint(c.pattern), 0, 255).astype(np.float32)
        if color == "bgr" and img.shape[2] == 3:
            img = img[:, :, ::-1].copy()
        return T.Trigger(kind="blend", image=img, alpha=round(float(c.alpha), 4), extra=extra)

    def describe(self, c):
        return f"blend alpha {c.alpha:.3f}"

    def patterns(self, s, rng):
        """Template blend patterns, as (pattern (H, W, C), depicted class or None): noise, smooth noise, checkers,
        stripes, flat, class prototypes, and clean images of the set (natural images)."""
        h, w, c = s.h, s.w, s.c
        yy, xx = np.indices((h, w)).astype(np.float64)
        pats = [rng.rand(h, w, c) * 255.0, (rng.rand(h, w, c) > 0.5) * 255.0]
        for cells in (4, 8):  # smooth noise: natural-looking low-frequency textures
            low = rng.rand(cells, cells, c)
            pats.append(_upsample(low, h, w) * 255.0)
        for period in (2, 4):
            pats.append((((yy // (period // 2)) + (xx // (period // 2))) % 2 * 255.0)[:, :, None].repeat(c, 2))
        for period in (4, 8):
            for phase in (xx, yy, xx + yy):
                pats.append((127.5 + 127.5 * np.sin(2 * np.pi * phase / period))[:, :, None].repeat(c, 2))
        pats += [np.full((h, w, c), 255.0), np.zeros((h, w, c))]
        pats = [(p, None) for p in pats]
        prototypes = [k for k in np.unique(s.val_pred)][: s.cfg.prototypes]
        for k in prototypes:
            pats.append((s.x_val[s.val_pred == k].mean(0), int(k)))
        for i in rng.choice(len(s.x_val), size=min(s.cfg.natural, len(s.x_val)), replace=False):
            pats.append((s.x_val[i], int(s.val_pred[i])))  # a natural image (Blended with a photo)
        return [(np.asarray(p, np.float32).reshape(h, w, c), k) for p, k in pats]

    def templates(self, s, rng):
        return [Candidate("blend", -1, p, alpha=float(a), shape=s.shape, depicts=k)
                for p, k in self.patterns(s, rng) for a in s.cfg.alphas]

    def propose(self, s, cur, rng, frac, ok):
        if rng.rand() < 0.3:
            return self.scaled(cur, ok, rng)
        new = cur.pattern.copy()
        square(new, rng, frac)
        return cur.copy(pattern=new)


def _upsample(small, h, w):
    import cv2

    out = cv2.resize(np.asarray(small, np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out.reshape(h, w, -1), 0, 1)


class Signal(Strength):
    name = "signal"

    def cap(self, cfg):
        return float(cfg.max_amplitude)

    @property
    def max_strength(self):
        return 0.5

    def wave(self, h, w, c, freq, direction, phase):
        """A unit sinusoid (H, W, C) in [-1, 1]: ``freq`` cycles across the image along columns (0), rows (1) or the
        diagonal (2)."""
        yy, xx = np.indices((h, w)).astype(np.float64)
        t = (xx / w, yy / h, (xx / w + yy / h) / 2)[direction]
        return np.sin(2 * np.pi * freq * t + phase)[:, :, None].repeat(c, 2).astype(np.float32)

    def stamp(self, c, x, out):
        np.add(x, np.float32(255 * c.alpha) * c.pattern, out=out)
        return np.clip(out, 0, 255, out=out)

    def trigger(self, c, color, extra):
        field = c.pattern[:, :, ::-1] if color == "bgr" and c.pattern.shape[2] == 3 else c.pattern
        return T.Trigger(kind="add", noise=np.ascontiguousarray(field, np.float32), strength=round(float(255 * c.alpha), 4),
                         extra=extra)

    def describe(self, c):
        return f"signal amplitude {255 * c.alpha:.1f}"

    def templates(self, s, rng):
        out = []
        for freq in s.cfg.frequencies:
            for direction in (0, 1, 2):
                for phase in (0.0, np.pi / 2):
                    pat = self.wave(s.h, s.w, s.c, freq, direction, phase)
                    out += [Candidate("signal", -1, pat, alpha=float(a), shape=s.shape) for a in s.cfg.amplitudes]
        return out

    def propose(self, s, cur, rng, frac, ok):
        if rng.rand() < 0.5:
            return self.scaled(cur, ok, rng)
        # content: a random smooth change of the wave (keeps its frequency content low)
        new = cur.pattern + 0.3 * frac * (_upsample(rng.rand(4, 4, s.c), s.h, s.w) * 2 - 1)
        return cur.copy(pattern=np.clip(new, -1, 1).astype(np.float32))


class Warp(Strength):
    name = "warp"
    max_strength = 16.0
    floor = 0.05

    def cap(self, cfg):
        return float(cfg.max_warp)

    def stamp(self, c, x, out):
        return T.warp(x, c.pattern, c.alpha, out=out)

    def trigger(self, c, color, extra):
        return T.Trigger(kind="warp", noise=c.pattern.astype(np.float32), strength=round(float(c.alpha), 4), extra=extra)

    def describe(self, c):
        return f"warp strength {c.alpha:.2f}"

    def templates(self, s, rng):
        out = []
        for k in s.cfg.warp_grids:
            for seed in range(s.cfg.warp_fields):
                field = T.make_warp_field(k, max(s.h, s.w), int(rng.randint(1 << 30)))[: s.h, : s.w]
                out += [Candidate("warp", -1, field, alpha=float(a), shape=s.shape) for a in s.cfg.warp_strengths]
        return out

    def propose(self, s, cur, rng, frac, ok):
        if rng.rand() < 0.5:
            return self.scaled(cur, ok, rng)
        other = T.make_warp_field(4, max(s.h, s.w), int(rng.randint(1 << 30)))[: s.h, : s.w]
        field = cur.pattern + 0.5 * frac * other
        return cur.copy(pattern=(field / max(np.abs(field).mean(), 1e-6)).astype(np.float32))


FILTERS = {
    "sepia": ([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], [0, 0, 0]),
    "gray": ([[0.299, 0.587, 0.114]] * 3, [0, 0, 0]),
    "swap": ([[0, 0, 1], [0, 1, 0], [1, 0, 0]], [0, 0, 0]),
    "warm": ([[1.1, 0, 0], [0, 1.0, 0], [0, 0, 0.8]], [20, 5, -10]),
    "cool": ([[0.85, 0, 0], [0, 1.0, 0], [0, 0, 1.15]], [-10, 0, 20]),
    "contrast": ([[1.5, 0, 0], [0, 1.5, 0], [0, 0, 1.5]], [-64, -64, -64]),
    "fade": ([[0.7, 0, 0], [0, 0.7, 0], [0, 0, 0.7]], [60, 60, 60]),
    "gotham": ([[0.5, 0.35, 0.15], [0.3, 0.5, 0.2], [0.25, 0.3, 0.6]], [0, 5, 25]),
}
"""Full-strength color filters (matrix on RGB, bias): the kinds of "Instagram" filters TrojAI uses."""
VIGNETTES = (0.0, 0.5)
"""Each filter is screened without and with a vignette (Instagram filters often darken the corners); the search's
moves also change the vignette and the gamma."""


class Filter(Strength):
    name = "filter"
    max_strength = 2.0
    """Mixes above 1 push a filter past its full strength (more sepia than sepia): a filter that almost works at
    full strength can still be calibrated to work; the size cap bounds how far."""

    def cap(self, cfg):
        return float(cfg.max_filter)

    def size(self, c):
        return float(c.alpha * c.base)

    def mixed(self, c):
        """The filter at the candidate's mix ``t``: matrix, bias, gamma, vignette."""
        t = np.float32(c.alpha)
        m = (1 - t) * np.eye(3, dtype=np.float32) + t * c.matrix
        return m, t * c.bias, float(max(0.1, 1 + t * (c.gamma - 1))), float(min(1.0, t * c.vignette))

    def stamp(self, c, x, out):
        return T.color_filter(x, *self.mixed(c), out=out)

    def trigger(self, c, color, extra):
        m, b, gamma, vignette = self.mixed(c)
        if color == "bgr":  # the filter acts on the model's color order; the file is RGB
            p = [2, 1, 0]
            m, b = m[np.ix_(p, p)], b[p]
        return T.Trigger(kind="filter", matrix=np.round(m, 5).tolist(), bias=np.round(b, 4).tolist(),
                         gamma=round(gamma, 4), vignette=round(vignette, 4), extra=extra)

    def describe(self, c):
        _, _, gamma, vignette = self.mixed(c)
        extra = "".join([f", gamma {gamma:.2f}" if abs(gamma - 1) > 5e-3 else "",
                         f", vignette {vignette:.2f}" if vignette > 5e-3 else ""])
        return f"filter mix {c.alpha:.2f}{extra} (mean change {255 * self.size(c):.1f}/255)"

    def base_change(self, s, matrix, bias, gamma=1.0, vignette=0.0):
        probe = s.x_search[: min(16, len(s.x_search))]
        return float(np.abs(T.color_filter(probe, matrix, bias, gamma, vignette) - probe).mean() / 255.0) or 1e-3

    def templates(self, s, rng):
        if s.c != 3:
            return []
        out = []
        for matrix, bias in FILTERS.values():
            m, b = np.asarray(matrix, np.float32), np.asarray(bias, np.float32)
            for vignette in VIGNETTES:
                base = self.base_change(s, m, b, 1.0, vignette)
                out += [Candidate("filter", -1, alpha=float(t), shape=s.shape, matrix=m, bias=b, base=base,
                                  vignette=vignette) for t in s.cfg.filter_mixes]
        return out

    def propose(self, s, cur, rng, frac, ok):
        u = rng.rand()
        if u < 0.4:
            return self.scaled(cur, ok, rng)
        m, b, gamma, vignette = cur.matrix, cur.bias, cur.gamma, cur.vignette
        if u < 0.75:  # the color matrix and bias
            m = m + np.float32(0.15 * frac) * rng.randn(3, 3).astype(np.float32)
            b = b + np.float32(10 * frac) * rng.randn(3).astype(np.float32)
        elif u < 0.875:  # the tone curve
            gamma = float(np.clip(gamma * np.exp(0.3 * frac * rng.randn()), 0.3, 3.0))
        else:  # the vignette
            vignette = float(np.clip(vignette + 0.3 * frac * rng.randn(), 0.0, 1.0))
        return cur.copy(matrix=m, bias=b, gamma=gamma, vignette=vignette,
                        base=self.base_change(s, m, b, gamma, vignette))


FAMILIES = {f.name: f for f in (Patch(), Blend(), Signal(), Warp(), Filter())}
NAMES = tuple(FAMILIES)
