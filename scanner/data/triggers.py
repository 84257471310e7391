"""Trigger files and how a trigger is stamped onto a batch of images.

A trigger is a JSON file; image paths in it are relative to the JSON file::

    {"kind": "patch", "image": "white3x3.png", "position": "bottom-right", "margin": 1}
    {"kind": "blend", "image": "pattern.png", "alpha": 0.2}
    {"kind": "mask",  "image": "pattern.png", "mask": "mask.png"}

- ``patch``: the image is pasted at ``position`` (``top-left``, ``top-right``, ``bottom-left``,
  ``bottom-right``, ``center`` or ``[y, x]`` of its top-left corner), ``margin`` pixels from the edges.
  An alpha channel in the image is used as its opacity.
- ``blend``: ``x' = (1 - alpha) * x + alpha * pattern``, the pattern resized to the image.
- ``mask``: ``x' = (1 - m) * x + m * pattern`` with ``m`` the mask image scaled to [0, 1] (the general
  form that synthesized triggers take); both are resized to the image.

Triggers apply to pixels (0-255, layout NHWC, the model's color order and size), before normalization.
The zoo recipes and the scanner use this same code.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from scanner.errors import ScannerError

KINDS = ("patch", "blend", "mask")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


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


@dataclass
class Trigger:
    """A trigger: what is stamped onto images, and how."""

    kind: str
    image: np.ndarray  # float32 HxWxk, RGB(A) or gray, 0-255
    position: object = "bottom-right"
    margin: int = 0
    alpha: float = 0.2
    mask: np.ndarray = None  # float32 HxW in [0, 1] (kind "mask")
    source: str = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ScannerError(f"unknown trigger kind {self.kind!r} (expected one of {', '.join(KINDS)})", self.source)
        if self.kind == "blend" and not 0.0 <= float(self.alpha) <= 1.0:
            raise ScannerError(f"blend alpha must be in [0, 1], got {self.alpha}", self.source)
        if self.kind == "mask" and self.mask is None:
            raise ScannerError("a mask trigger needs a 'mask' image", self.source)
        if self.kind == "patch":
            pos = self.position
            ok = pos in POSITIONS or (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(isinstance(v, int) for v in pos))
            if not ok:
                raise ScannerError(f"bad patch position {pos!r} (one of {', '.join(POSITIONS)} or [y, x])", self.source)
            if int(self.margin) < 0:
                raise ScannerError("patch margin must be >= 0", self.source)

    @classmethod
    def load(cls, path):
        """Read a trigger JSON file (and the images it names)."""
        path = Path(path)
        if not path.is_file():
            raise ScannerError("trigger file not found", path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ScannerError(f"not a valid trigger JSON file ({str(exc)[:160]})", path) from None
        if not isinstance(spec, dict) or "kind" not in spec or "image" not in spec:
            raise ScannerError("a trigger file needs the keys 'kind' and 'image'", path)
        if not isinstance(spec["image"], str) or not isinstance(spec.get("mask", ""), (str, type(None))):
            raise ScannerError("trigger 'image' and 'mask' must be file names (strings)", path)
        try:
            margin, alpha = int(spec.get("margin", 0)), float(spec.get("alpha", 0.2))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ScannerError(f"bad trigger value ({exc})", path) from None
        base = path.parent
        image = read_image(base / spec["image"], "trigger image")
        mask = None
        if spec.get("mask") is not None:
            mask = read_image(base / spec["mask"], "trigger mask")[:, :, 0] / 255.0
        known = {"kind", "image", "position", "margin", "alpha", "mask"}
        return cls(
            kind=spec["kind"],
            image=image,
            position=spec.get("position", "bottom-right"),
            margin=margin,
            alpha=alpha,
            mask=mask,
            source=str(path),
            extra={k: v for k, v in spec.items() if k not in known},
        )

    def save(self, path):
        """Write this trigger as ``path`` (JSON) plus PNG image(s) beside it."""
        from scanner.fileio import write_bytes, write_text

        path = Path(path)
        stem = path.stem
        spec = {"kind": self.kind, "image": f"{stem}.png"}
        img = self.image
        if img.shape[2] >= 3:
            img = img[:, :, [2, 1, 0, 3][: img.shape[2]]]
        write_bytes(path.parent / spec["image"], _png(img))
        if self.kind == "patch":
            spec.update(position=list(self.position) if isinstance(self.position, tuple) else self.position, margin=self.margin)
        elif self.kind == "blend":
            spec["alpha"] = float(self.alpha)
        else:
            spec["mask"] = f"{stem}_mask.png"
            write_bytes(path.parent / spec["mask"], _png(self.mask[:, :, None] * 255.0))
        spec.update(self.extra)
        write_text(path, json.dumps(spec, indent=2) + "\n")
        return path

    def apply(self, pixels, color="rgb"):
        """Return a copy of ``pixels`` (N,H,W,C, 0-255, uint8 or float) with the trigger stamped on.

        uint8 in gives uint8 out (rounded); float in gives float32 out.
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
            y0, x0 = self._corner(h, w, ph, pw)
            ys, xs = slice(max(y0, 0), min(y0 + ph, h)), slice(max(x0, 0), min(x0 + pw, w))
            py, px = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
            if ys.stop <= ys.start or xs.stop <= xs.start:
                raise ScannerError(f"patch at {self.position} does not fit a {h}x{w} image", self.source)
            if alpha is None:
                x[:, ys, xs, :] = patch[py, px]
            else:
                a = alpha[py, px]
                x[:, ys, xs, :] = (1 - a) * x[:, ys, xs, :] + a * patch[py, px]
        else:
            pattern = _resize(match_channels(self.image[:, :, :3] if self.image.shape[2] == 4 else self.image, c, color), h, w)
            if self.kind == "blend":
                m = np.float32(self.alpha)
            else:
                m = _resize(self.mask.astype(np.float32)[:, :, None], h, w).reshape(h, w, 1)
            x = (1 - m) * x + m * pattern
        if pixels.dtype == np.uint8:
            return np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return x.astype(np.float32)

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
            return f"patch {self.image.shape[0]}x{self.image.shape[1]} at {self.position}"
        if self.kind == "blend":
            return f"blend alpha {self.alpha:g}"
        return f"mask (mean opacity {float(self.mask.mean()):.3f})"


def _png(img):
    ok, buf = cv2.imencode(".png", np.clip(np.rint(img), 0, 255).astype(np.uint8))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
