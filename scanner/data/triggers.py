"""Trigger files and how a trigger is stamped onto a batch of images.

A trigger is a JSON file; image paths in it are relative to the JSON file::

    {"kind": "patch", "image": "white3x3.png", "position": "bottom-right", "margin": 1}
    {"kind": "blend", "image": "pattern.png", "alpha": 0.2}
    {"kind": "mask",  "image": "pattern.png", "mask": "mask.png"}
    {"kind": "patch", "image": "sticker.png", "position": "random", "seed": 1, "margin": 0}
    {"kind": "warp", "field": "noise.npy", "strength": 0.5}
    {"kind": "filter", "matrix": [[...], [...], [...]], "bias": [0, 0, 0], "gamma": 1.0, "vignette": 0.0}
    {"kind": "signal", "delta": 20, "frequency": 6}
    {"kind": "add", "field": "wave.npy", "strength": 25.5}

- ``patch``: the image is pasted at ``position`` (``top-left``, ``top-right``, ``bottom-left``,
  ``bottom-right``, ``center`` or ``[y, x]`` of its top-left corner), ``margin`` pixels from the edges.
  An alpha channel in the image is used as its opacity.
- ``blend``: ``x' = (1 - alpha) * x + alpha * pattern``, the pattern resized to the image.
- ``mask``: ``x' = (1 - m) * x + m * pattern`` with ``m`` the mask image scaled to [0, 1] (the general
  form that synthesized triggers take); both are resized to the image.
- ``patch`` with ``"position": "random"``: a location-invariant sticker, pasted at a random position per
  image, a pure function of ``seed`` and the image's index in the batch (:func:`random_positions`).
- ``warp`` (WaNet, Nguyen & Tran 2021, as BackdoorBench applies it): the (H, W, 2) noise field (x then y
  offsets, ``.npy`` beside the JSON, resized to the image when sizes differ) moves the sampling grid:
  ``grid = clamp(identity + strength * field / H, -1, 1)``, sampled bilinearly with align_corners=True.
- ``filter``: a global color transform (TrojAI's "Instagram" filters): ``y = x M^T + bias`` on RGB 0-255,
  clipped, then ``255 (y / 255) ** gamma``, then a vignette ``y (1 - vignette r^2)`` (r = 1 at the corners).
- ``signal`` (SIG, Barni et al. 2019): ``x + delta * sin(2 pi j frequency / W)`` along columns j, clipped.
- ``add``: ``x + strength * field``, clipped: an additive (H, W, C) pattern in [-1, 1] (``.npy`` beside the JSON,
  in RGB order for color images, resized to the image): the general form of synthesized signal triggers.

Each kind is a vectorized pure function on float32 NHWC batches (``stamp_patch``, ``patch_random``,
``blend``, ``warp``, ``color_filter``, ``signal``); :meth:`Trigger.apply` dispatches to them.

Triggers apply to pixels (0-255, layout NHWC, the model's color order and size), before normalization.
The zoo recipes and the scanner use this same code.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from scanner.errors import ScannerError

KINDS = ("patch", "blend", "mask", "warp", "filter", "signal", "add")
IMAGE_KINDS = ("patch", "blend", "mask")  # kinds that need an "image"
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
RANDOM = "random"
MAX_FIELD = 8192  # largest side of a warp field


def read_image(path, what="image"):
    """Read an image file as float32 HxWxC RGB(A) or HxWx1 gray, 0-255."""
    path = Path(path)
    if not path.is_file():
        raise ScannerError(f"{what} file not found", path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ScannerError(f"cannot decode {what} (not an image OpenCV can read)", path)
    if img.dtype == np.uint16:
        img = (img / 257.0).round()
    img = img.astype(np.float32)
    if img.ndim == 2:
        return img[:, :, None]
    if img.shape[2] == 3:
        return img[:, :, ::-1].copy()
    if img.shape[2] == 4:
        return img[:, :, [2, 1, 0, 3]].copy()
    return img[:, :, :1].copy()


def match_channels(img, channels, color="rgb"):
    """Convert an RGB/gray float image (HxWxk) to ``channels`` channels in ``color`` order."""
    k = img.shape[2]
    if channels == 1:
        if k == 1:
            return img
        rgb = img[:, :, :3]
        gray = 0.299 * rgb[:, :, 0] + 0.587 * rgb[:, :, 1] + 0.114 * rgb[:, :, 2]
        return gray[:, :, None].astype(np.float32)
    if k == 1:
        return np.repeat(img, channels, axis=2)
    out = img[:, :, :channels]
    return out[:, :, ::-1] if color == "bgr" and channels == 3 else out


def _resize(img, h, w):
    if img.shape[:2] == (h, w):
        return img
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


# ---------------------------------------------------------------- the trigger functions
# Pure functions on float32 NHWC batches of pixels (0-255); each returns a new float32 array.


def stamp_patch(pixels, patch, y0, x0, alpha=None):
    """Paste ``patch`` (h, w, C) with its top-left corner at (y0, x0) (cropped at the borders); ``alpha`` (h, w, 1) in [0, 1]."""
    x = np.array(pixels, dtype=np.float32, copy=True)
    n, h, w, c = x.shape
    ph, pw = patch.shape[:2]
    ys, xs = slice(max(y0, 0), min(y0 + ph, h)), slice(max(x0, 0), min(x0 + pw, w))
    if ys.stop <= ys.start or xs.stop <= xs.start:
        raise ValueError(f"a {ph}x{pw} patch at [{y0}, {x0}] does not fit a {h}x{w} image")
    py, px = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    if alpha is None:
        x[:, ys, xs, :] = patch[py, px]
    else:
        a = alpha[py, px]
        x[:, ys, xs, :] = (1 - a) * x[:, ys, xs, :] + a * patch[py, px]
    return x


def _mix64(z):
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_positions(n, h, w, ph, pw, seed=0, margin=0, start=0):
    """Top-left corners (ys, xs) of a ph x pw patch for images ``start .. start+n-1``: a hash of (seed, index).

    Positions are uniform over ``[margin, h - ph - margin]`` x ``[margin, w - pw - margin]``; image i's position
    depends only on ``seed`` and ``i``, not on the batch around it.
    """
    hy, hx = h - ph - 2 * margin + 1, w - pw - 2 * margin + 1
    if hy < 1 or hx < 1:
        raise ValueError(f"a {ph}x{pw} patch with margin {margin} does not fit a {h}x{w} image")
    with np.errstate(over="ignore"):
        idx = np.arange(start, start + n, dtype=np.uint64)
        key = _mix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
        z1 = _mix64(idx * np.uint64(0x9E3779B97F4A7C15) + key)
        z2 = _mix64(z1 + np.uint64(0x632BE59BD9B4E019))
    ys = (z1 % np.uint64(hy)).astype(np.int64) + margin
    xs = (z2 % np.uint64(hx)).astype(np.int64) + margin
    return ys, xs


def patch_random(pixels, patch, seed=0, margin=0, alpha=None, start=0):
    """Paste ``patch`` (h, w, C) at a random position per image (:func:`random_positions`)."""
    x = np.array(pixels, dtype=np.float32, copy=True)
    n, h, w, c = x.shape
    ph, pw = patch.shape[:2]
    ys, xs = random_positions(n, h, w, ph, pw, seed, margin, start)
    rows = ys[:, None, None] + np.arange(ph)[None, :, None]  # (n, ph, 1)
    cols = xs[:, None, None] + np.arange(pw)[None, None, :]  # (n, 1, pw)
    nn_ = np.arange(n)[:, None, None]
    if alpha is None:
        x[nn_, rows, cols] = patch
    else:
        x[nn_, rows, cols] = (1 - alpha) * x[nn_, rows, cols] + alpha * patch
    return x


def blend(pixels, pattern, alpha):
    """``(1 - alpha) x + alpha pattern``; ``alpha`` a number or an (H, W, 1) mask, ``pattern`` (H, W, C)."""
    x = np.asarray(pixels, dtype=np.float32)
    m = np.asarray(alpha, dtype=np.float32)
    return ((1 - m) * x + m * np.asarray(pattern, np.float32)).astype(np.float32)


def make_warp_field(k=4, size=32, seed=0):
    """A WaNet noise field as BackdoorBench draws it: uniform [-1, 1] (k, k, 2), divided by its mean |value|,
    upsampled bicubically (align_corners=True) to (size, size, 2). numpy only; the draw is numpy's, not torch's."""
    rng = np.random.default_rng(seed)
    ins = rng.uniform(-1, 1, size=(k, k, 2))
    ins = ins / np.mean(np.abs(ins))
    return _bicubic_align_corners(ins, size, size).astype(np.float32)


def _cubic_weights(t, a=-0.75):
    """The 4 cubic convolution weights (torch's, a = -0.75) for fractional offset t."""
    t = np.asarray(t, np.float64)

    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_align_corners(img, h, w):
    """Bicubic resize of (h0, w0, C) to (h, w, C) with align_corners=True and border replication (as torch's)."""
    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        src = np.linspace(0, n_in - 1, n_out) if n_out > 1 else np.zeros(1)
        for i, s in enumerate(src):
            f = int(np.floor(s))
            wts = _cubic_weights(s - f)
            for j, wt in zip(range(f - 1, f + 3), wts):
                m[i, min(max(j, 0), n_in - 1)] += wt
        return m

    my, mx = matrix(img.shape[0], h), matrix(img.shape[1], w)
    return np.einsum("hi,ijc,wj->hwc", my, img, mx)


def _field_to(field, h, w):
    field = np.asarray(field, np.float32)
    if field.shape[:2] == (h, w):
        return field
    return cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, 2)


def warp_grid(field, strength, h, w):
    """Sampling positions (py, px), in pixels, of WaNet's warp for an h x w image."""
    f = _field_to(field, h, w)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None] + np.float32(strength) * f[:, :, 1] / np.float32(h)
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] + np.float32(strength) * f[:, :, 0] / np.float32(h)
    gy, gx = np.clip(gy, -1, 1), np.clip(gx, -1, 1)
    return (gy + 1) / 2 * np.float32(h - 1), (gx + 1) / 2 * np.float32(w - 1)


GROUP_PIXELS = 1 << 16
"""Pixels a stamp works on at a time (images stacked as one tall image): its temporaries stay in the caches, and
they are allocated once per call, not once per operation."""


def _groups(n, h, w):
    """Images per group of a stamp over (n, h, w) images: GROUP_PIXELS of them, at least 1."""
    return int(max(1, min(n, GROUP_PIXELS // max(h * w, 1))))


def warp(pixels, field, strength=0.5, out=None):
    """WaNet: sample every image at the warped grid (bilinear, align_corners=True); ``field`` (H, W, 2), x then y.

    Written into ``out`` (N, H, W, C) float32 when given. The four neighbours are gathered by OpenCV (nearest, at
    integer positions: exact), a group of images at a time; the blend is the same float32 arithmetic as
    ``top * (1 - wy) + bottom * wy`` with ``top = a * (1 - wx) + b * wx``, so the values are the same bits."""
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    n, h, w, c = x.shape
    if out is None:
        out = np.empty((n, h, w, c), np.float32)
    if not n:
        return out
    py, px = warp_grid(field, strength, h, w)
    y0 = np.clip(np.floor(py).astype(np.int64), 0, h - 1)
    x0 = np.clip(np.floor(px).astype(np.int64), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (py - y0).astype(np.float32), (px - x0).astype(np.float32)
    k = _groups(n, h, w)
    rows = (np.arange(k) * h)[:, None, None]  # image i of a group starts at row i * h of the stacked image

    def maps(yy, xx):
        return (np.ascontiguousarray(np.broadcast_to(xx, (k, h, w)), np.float32).reshape(k * h, w),
                (yy[None] + rows).astype(np.float32).reshape(k * h, w))

    corners = [maps(yy, xx) for yy, xx in ((y0, x0), (y0, x1), (y1, x0), (y1, x1))]

    def full(v):  # contiguous (1, H, W, C) weights: numpy's fast loop, broadcast over the images of a group only
        return np.ascontiguousarray(np.broadcast_to(v[:, :, None], (h, w, c)))[None]

    wx1, wx0, wy1, wy0 = full(wx), full(1 - wx), full(wy), full(1 - wy)
    a, b = np.empty((k, h, w, c), np.float32), np.empty((k, h, w, c), np.float32)
    for s in range(0, n, k):
        m = min(k, n - s)
        src, top, bottom, other = x[s : s + m], out[s : s + m], a[:m], b[:m]
        g = [(cx[: m * h], cy[: m * h]) for cx, cy in corners]
        _gather(src, g[0], top)
        top *= wx0
        _gather(src, g[1], other)
        other *= wx1
        top += other
        _gather(src, g[2], bottom)
        bottom *= wx0
        _gather(src, g[3], other)
        other *= wx1
        bottom += other
        top *= wy0
        bottom *= wy1
        top += bottom
    return out


def _gather(src, xy, dst):
    """(M, H, W, C) images ``src`` sampled into ``dst`` at integer-valued float maps ``xy`` (x, y) over the images
    stacked as one (M * H, W) image: OpenCV's nearest remap, exact; numpy's gather past OpenCV's 4 channels."""
    m, h, w, c = src.shape
    if c > 4:
        flat = src.reshape(m * h * w, c)
        dst[...] = flat[(xy[1].astype(np.intp) * w + xy[0].astype(np.intp)).reshape(-1)].reshape(m, h, w, c)
        return
    shape = (m * h, w) if c == 1 else (m * h, w, c)
    d2 = dst.reshape(shape)
    r = cv2.remap(src.reshape(shape), xy[0], xy[1], cv2.INTER_NEAREST, dst=d2)
    if not np.shares_memory(r, d2):
        d2[...] = r.reshape(shape)


def color_filter(pixels, matrix, bias=(0.0, 0.0, 0.0), gamma=1.0, vignette=0.0, out=None):
    """An "Instagram" filter on RGB pixels: ``x M^T + bias``, clipped, gamma, vignette ``1 - v r^2``, clipped.

    Written into ``out`` (N, H, W, 3) float32 when given; every step works in place (one matrix product over all
    pixels, no temporaries the size of the images)."""
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    n, h, w, c = x.shape
    if c != 3:
        raise ValueError(f"a color filter needs 3 channels, got {c}")
    m = np.asarray(matrix, np.float32).reshape(3, 3)
    y = np.empty((n, h, w, c), np.float32) if out is None else out
    np.matmul(x.reshape(-1, 3), m.T, out=y.reshape(-1, 3))
    y += np.asarray(bias, np.float32).reshape(3)
    np.clip(y, 0, 255, out=y)
    if float(gamma) != 1.0:
        y /= np.float32(255)
        y **= np.float32(gamma)
        y *= np.float32(255)
    if float(vignette) != 0.0:
        yy = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / max((h - 1) / 2, 1)
        xx = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / max((w - 1) / 2, 1)
        r2 = (yy[:, None] ** 2 + xx[None, :] ** 2) / 2
        y *= np.ascontiguousarray(np.broadcast_to((1 - np.float32(vignette) * r2)[:, :, None], (h, w, c)))[None]
    np.clip(y, 0, 255, out=y)
    return y


def signal(pixels, delta=20.0, frequency=6.0):
    """SIG: ``x + delta * sin(2 pi j frequency / W)`` on every row and channel (j = column), clipped to 0-255."""
    x = np.asarray(pixels, dtype=np.float32)
    w = x.shape[2]
    wave = np.float32(delta) * np.sin(2 * np.pi * np.arange(w) * float(frequency) / w).astype(np.float32)
    return np.clip(x + wave[None, None, :, None], 0, 255).astype(np.float32)


@dataclass
class Trigger:
    """A trigger: what is stamped onto images, and how."""

    kind: str
    image: np.ndarray = None  # float32 HxWxk, RGB(A) or gray, 0-255 (patch, blend, mask)
    position: object = "bottom-right"
    margin: int = 0
    alpha: float = 0.2
    mask: np.ndarray = None  # float32 HxW in [0, 1] (kind "mask")
    source: str = None
    extra: dict = field(default_factory=dict)
    seed: int = 0  # patch at random positions
    noise: np.ndarray = None  # warp: (H, W, 2) float32 field, x then y; add: (H, W, C) field in [-1, 1]
    strength: float = 0.5  # warp; add: pixels
    matrix: object = None  # filter: 3x3 (RGB)
    bias: object = (0.0, 0.0, 0.0)  # filter
    gamma: float = 1.0  # filter
    vignette: float = 0.0  # filter
    delta: float = 20.0  # signal
    frequency: float = 6.0  # signal

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ScannerError(f"unknown trigger kind {self.kind!r} (expected one of {', '.join(KINDS)})", self.source)
        if self.kind in IMAGE_KINDS and self.image is None:
            raise ScannerError(f"a {self.kind} trigger needs an 'image'", self.source)
        if self.kind == "blend" and not 0.0 <= float(self.alpha) <= 1.0:
            raise ScannerError(f"blend alpha must be in [0, 1], got {self.alpha}", self.source)
        if self.kind == "mask" and self.mask is None:
            raise ScannerError("a mask trigger needs a 'mask' image", self.source)
        if self.kind == "patch":
            pos = self.position
            ok = pos in POSITIONS or pos == RANDOM or (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(isinstance(v, int) for v in pos))
            if not ok:
                raise ScannerError(f"bad patch position {pos!r} (one of {', '.join(POSITIONS)}, {RANDOM} or [y, x])", self.source)
            if int(self.margin) < 0:
                raise ScannerError("patch margin must be >= 0", self.source)
        if self.kind == "warp":
            f = None if self.noise is None else np.asarray(self.noise)
            if f is None or f.ndim != 3 or f.shape[2] != 2 or not 1 <= min(f.shape[:2]) <= max(f.shape[:2]) <= MAX_FIELD:
                raise ScannerError(f"a warp trigger needs an (H, W, 2) noise field, got {None if f is None else f.shape}", self.source)
            if f.dtype.kind != "f" or not np.isfinite(f).all():
                raise ScannerError("the warp field must hold finite floats", self.source)
            self.noise = f.astype(np.float32)
            if not (np.isfinite(float(self.strength)) and float(self.strength) >= 0):
                raise ScannerError(f"warp strength must be >= 0, got {self.strength}", self.source)
        if self.kind == "add":
            f = None if self.noise is None else np.asarray(self.noise)
            if f is None or f.ndim != 3 or f.shape[2] not in (1, 3) or not 1 <= min(f.shape[:2]) <= max(f.shape[:2]) <= MAX_FIELD:
                raise ScannerError(f"an add trigger needs an (H, W, 1 or 3) field, got {None if f is None else f.shape}", self.source)
            if f.dtype.kind != "f" or not np.isfinite(f).all():
                raise ScannerError("the add field must hold finite floats", self.source)
            self.noise = f.astype(np.float32)
            if not np.isfinite(float(self.strength)):
                raise ScannerError(f"add strength must be a finite number, got {self.strength}", self.source)
        if self.kind == "filter":
            m = None if self.matrix is None else np.asarray(self.matrix, dtype=np.float64)
            b = np.asarray(self.bias, dtype=np.float64)
            if m is None or m.shape != (3, 3) or b.shape != (3,) or not (np.isfinite(m).all() and np.isfinite(b).all()):
                raise ScannerError("a filter trigger needs a 3x3 'matrix' and 3 'bias' values (finite numbers)", self.source)
            if not (np.isfinite(float(self.gamma)) and float(self.gamma) > 0 and np.isfinite(float(self.vignette)) and 0 <= float(self.vignette) <= 1):
                raise ScannerError("filter gamma must be > 0 and vignette in [0, 1]", self.source)
        if self.kind == "signal":
            if not (np.isfinite(float(self.delta)) and np.isfinite(float(self.frequency))):
                raise ScannerError("signal delta and frequency must be finite numbers", self.source)

    @classmethod
    def load(cls, path):
        """Read a trigger JSON file (and the images or arrays it names)."""
        path = Path(path)
        if not path.is_file():
            raise ScannerError("trigger file not found", path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ScannerError(f"not a valid trigger JSON file ({str(exc)[:160]})", path) from None
        if not isinstance(spec, dict) or "kind" not in spec:
            raise ScannerError("a trigger file needs the keys 'kind' and 'image'", path)
        kind = spec["kind"]
        if kind in IMAGE_KINDS or kind not in KINDS:
            if "image" not in spec:
                raise ScannerError("a trigger file needs the keys 'kind' and 'image'", path)
            if not isinstance(spec["image"], str) or not isinstance(spec.get("mask", ""), (str, type(None))):
                raise ScannerError("trigger 'image' and 'mask' must be file names (strings)", path)
        base = path.parent
        try:
            margin, alpha = int(spec.get("margin", 0)), float(spec.get("alpha", 0.2))
            seed = int(spec.get("seed", 0))
            strength = float(spec.get("strength", 0.5))
            gamma, vignette = float(spec.get("gamma", 1.0)), float(spec.get("vignette", 0.0))
            delta, frequency = float(spec.get("delta", 20.0)), float(spec.get("frequency", 6.0))
            matrix = spec.get("matrix")
            matrix = None if matrix is None else np.asarray(matrix, dtype=np.float64).tolist()
            bias = np.asarray(spec.get("bias", [0.0, 0.0, 0.0]), dtype=np.float64).tolist()
        except (TypeError, ValueError, OverflowError) as exc:
            raise ScannerError(f"bad trigger value ({exc})", path) from None
        image = read_image(base / spec["image"], "trigger image") if kind in IMAGE_KINDS else None
        mask = None
        if kind == "mask" and spec.get("mask") is not None:
            mask = read_image(base / spec["mask"], "trigger mask")[:, :, 0] / 255.0
        noise = None
        if kind in ("warp", "add"):
            noise = _read_field(base, spec.get("field"), path)
        known = {"kind", "image", "position", "margin", "alpha", "mask"}
        known |= {"patch": {"seed"} if spec.get("position") == RANDOM else set(), "warp": {"field", "strength"}, "add": {"field", "strength"},
                  "filter": {"matrix", "bias", "gamma", "vignette"}, "signal": {"delta", "frequency"}}.get(kind, set())
        return cls(
            kind=kind,
            image=image,
            position=spec.get("position", "bottom-right"),
            margin=margin,
            alpha=alpha,
            mask=mask,
            source=str(path),
            extra={k: v for k, v in spec.items() if k not in known},
            seed=seed,
            noise=noise,
            strength=strength,
            matrix=matrix,
            bias=bias,
            gamma=gamma,
            vignette=vignette,
            delta=delta,
            frequency=frequency,
        )

    def save(self, path):
        """Write this trigger as ``path`` (JSON) plus its PNG image(s) or ``.npy`` field beside it."""
        from scanner.fileio import write_bytes, write_text

        path = Path(path)
        stem = path.stem
        spec = {"kind": self.kind}
        if self.kind in IMAGE_KINDS:
            spec["image"] = f"{stem}.png"
            img = self.image
            if img.shape[2] >= 3:
                img = img[:, :, [2, 1, 0, 3][: img.shape[2]]]
            write_bytes(path.parent / spec["image"], _png(img))
        if self.kind == "patch":
            spec.update(position=list(self.position) if isinstance(self.position, tuple) else self.position, margin=self.margin)
            if self.position == RANDOM:
                spec["seed"] = int(self.seed)
        elif self.kind == "blend":
            spec["alpha"] = float(self.alpha)
        elif self.kind == "mask":
            spec["mask"] = f"{stem}_mask.png"
            write_bytes(path.parent / spec["mask"], _png(self.mask[:, :, None] * 255.0))
        elif self.kind in ("warp", "add"):
            import io

            spec["field"] = f"{stem}.npy"
            spec["strength"] = float(self.strength)
            buf = io.BytesIO()
            np.save(buf, np.asarray(self.noise, np.float32), allow_pickle=False)
            write_bytes(path.parent / spec["field"], buf.getvalue())
        elif self.kind == "filter":
            spec.update(matrix=np.asarray(self.matrix, np.float64).tolist(), bias=[float(v) for v in self.bias],
                        gamma=float(self.gamma), vignette=float(self.vignette))
        elif self.kind == "signal":
            spec.update(delta=float(self.delta), frequency=float(self.frequency))
        spec.update(self.extra)
        write_text(path, json.dumps(spec, indent=2) + "\n")
        return path

    def apply(self, pixels, color="rgb", start=0):
        """Return a copy of ``pixels`` (N,H,W,C, 0-255, uint8 or float) with the trigger stamped on.

        uint8 in gives uint8 out (rounded); float in gives float32 out. ``start``: the index of the first
        image (random patch positions are a function of the seed and the image index).
        """
        pixels = np.asarray(pixels)
        if pixels.ndim != 4:
            raise ValueError(f"expected pixels of shape (N, H, W, C), got {pixels.shape}")
        n, h, w, c = pixels.shape
        x = pixels.astype(np.float32)
        if self.kind == "patch":
            img = self.image
            alpha = img[:, :, 3:4] / 255.0 if img.shape[2] == 4 else None
            patch = match_channels(img[:, :, :3] if img.shape[2] == 4 else img, c, color)
            ph, pw = patch.shape[:2]
            try:
                if self.position == RANDOM:
                    x = patch_random(x, patch, self.seed, int(self.margin), alpha, start)
                else:
                    y0, x0 = self._corner(h, w, ph, pw)
                    x = stamp_patch(x, patch, y0, x0, alpha)
            except ValueError:
                raise ScannerError(f"patch at {self.position} does not fit a {h}x{w} image", self.source) from None
        elif self.kind in ("blend", "mask"):
            pattern = _resize(match_channels(self.image[:, :, :3] if self.image.shape[2] == 4 else self.image, c, color), h, w)
            if self.kind == "blend":
                m = np.float32(self.alpha)
            else:
                m = _resize(self.mask.astype(np.float32)[:, :, None], h, w).reshape(h, w, 1)
            x = blend(x, pattern, m)
        elif self.kind == "warp":
            x = warp(x, self.noise, self.strength)
        elif self.kind == "add":
            f = self.noise
            if f.shape[:2] != (h, w):
                f = cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
            f = f.mean(2, keepdims=True) if c == 1 else (f[:, :, ::-1] if color == "bgr" and f.shape[2] == 3 else f)
            x = np.clip(x + np.float32(self.strength) * f, 0, 255)
        elif self.kind == "filter":
            if c == 1:
                rgb = color_filter(np.repeat(x, 3, axis=3), self.matrix, self.bias, self.gamma, self.vignette)
                x = (0.299 * rgb[..., 0:1] + 0.587 * rgb[..., 1:2] + 0.114 * rgb[..., 2:3]).astype(np.float32)
            elif color == "bgr":
                x = color_filter(x[..., ::-1], self.matrix, self.bias, self.gamma, self.vignette)[..., ::-1]
            else:
                x = color_filter(x, self.matrix, self.bias, self.gamma, self.vignette)
        else:
            x = signal(x, self.delta, self.frequency)
        if pixels.dtype == np.uint8:
            return np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _corner(self, h, w, ph, pw):
        m = int(self.margin)
        pos = self.position
        if isinstance(pos, (list, tuple)):
            return int(pos[0]), int(pos[1])
        return {
            "top-left": (m, m),
            "top-right": (m, w - pw - m),
            "bottom-left": (h - ph - m, m),
            "bottom-right": (h - ph - m, w - pw - m),
            "center": ((h - ph) // 2, (w - pw) // 2),
        }[pos]

    def describe(self):
        """A short human description, e.g. ``patch 3x3 at bottom-right``."""
        if self.kind == "patch":
            if self.position == RANDOM:
                return f"patch {self.image.shape[0]}x{self.image.shape[1]} at random positions (seed {self.seed})"
            return f"patch {self.image.shape[0]}x{self.image.shape[1]} at {self.position}"
        if self.kind == "blend":
            return f"blend alpha {self.alpha:g}"
        if self.kind == "warp":
            return f"warp strength {float(self.strength):g} (field {self.noise.shape[0]}x{self.noise.shape[1]})"
        if self.kind == "filter":
            parts = ["color filter"]
            if float(self.gamma) != 1.0:
                parts.append(f"gamma {float(self.gamma):g}")
            if float(self.vignette) != 0.0:
                parts.append(f"vignette {float(self.vignette):g}")
            return ", ".join(parts)
        if self.kind == "signal":
            return f"signal delta {float(self.delta):g} frequency {float(self.frequency):g}"
        if self.kind == "add":
            return f"additive pattern, strength {float(self.strength):g}"
        return f"mask (mean opacity {float(self.mask.mean()):.3f})"


def _read_field(base, name, path):
    """The field ``name`` (an ``.npy`` file beside the trigger JSON) of a warp or add trigger, checked before it is read."""
    if not isinstance(name, str):
        raise ScannerError("a warp or add trigger needs 'field': the name of an .npy file beside it", path)
    fpath = base / name
    if not fpath.is_file():
        raise ScannerError("warp field file not found", fpath)
    if fpath.stat().st_size > 4 * MAX_FIELD * MAX_FIELD * 2 + 4096:
        raise ScannerError("warp field file too large", fpath)
    try:
        arr = np.load(fpath, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ScannerError(f"cannot read the warp field ({str(exc)[:160]})", fpath) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise ScannerError("the warp field must be a float array", fpath)
    return arr


def _png(img):
    ok, buf = cv2.imencode(".png", np.clip(np.rint(img), 0, 255).astype(np.uint8))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
