"""Preprocessing: how 0-255 pixels become the model's input tensor, and where that recipe comes from.

Pixels travel as ``uint8`` arrays (N, H, W, C) at the model's size and color order; triggers are stamped on
them, then :meth:`Preprocess.to_tensor` makes the model's input. The recipe comes from the model input
(shape, dtype), then the model's ``scanner.preprocess`` metadata, then ``--preprocess FILE.json``.
"""

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scanner.errors import ScannerError
from scanner.graph.model import MAX_INPUT_ELEMENTS

log = logging.getLogger("scanner")
COLORS = ("gray", "rgb", "bgr")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16", "float64", "uint8", "int8")


@dataclass
class Preprocess:
    """How pixels become the model's input: resize, color, scale, normalize, layout, dtype."""

    size: tuple
    color: str = "rgb"
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    sources: list = field(default_factory=list, compare=False)

    KEYS = ("size", "color", "layout", "dtype", "scale", "mean", "std")

    @property
    def assumed(self):
        """Whether nothing stated this preprocessing (a guess from the input's dtype alone)."""
        return ASSUMED in self.sources

    @property
    def channels(self):
        """Number of image channels the model reads."""
        return 1 if self.color == "gray" else 3

    def to_dict(self):
        """The JSON form (the ``scanner.preprocess`` metadata / ``--preprocess`` file schema)."""
        d = asdict(self)
        d.pop("sources")
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    def updated(self, values, source):
        """Return a copy with ``values`` (a dict of the JSON keys) applied; validates every key."""
        if not isinstance(values, dict):
            raise ScannerError("preprocessing must be a JSON object", source)
        unknown = set(values) - set(self.KEYS)
        if unknown:
            raise ScannerError(f"unknown preprocessing key(s) {sorted(unknown)}; known: {', '.join(self.KEYS)}", source)
        d = {**self.to_dict(), **values}
        try:
            size = tuple(int(v) for v in d["size"])
            mean = tuple(float(v) for v in np.atleast_1d(d["mean"]))
            std = tuple(float(v) for v in np.atleast_1d(d["std"]))
            scale = float(d["scale"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise ScannerError(f"bad preprocessing value ({exc})", source) from None
        if len(size) != 2 or min(size) < 1 or max(size) > 16384:
            raise ScannerError(f"preprocessing 'size' must be [H, W] with 1 <= H, W <= 16384, got {d['size']}", source)
        if size[0] * size[1] * (1 if d["color"] == "gray" else 3) > MAX_INPUT_ELEMENTS:
            raise ScannerError(f"preprocessing 'size' {list(size)} is too large (over {MAX_INPUT_ELEMENTS} values per image)", source)
        if d["color"] not in COLORS:
            raise ScannerError(f"preprocessing 'color' must be one of {', '.join(COLORS)}, got {d['color']!r}", source)
        if d["layout"] not in LAYOUTS:
            raise ScannerError(f"preprocessing 'layout' must be NCHW or NHWC, got {d['layout']!r}", source)
        if d["dtype"] not in DTYPES:
            raise ScannerError(f"preprocessing 'dtype' must be one of {', '.join(DTYPES)}, got {d['dtype']!r}", source)
        channels = 1 if d["color"] == "gray" else 3
        for name, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, channels):
                raise ScannerError(f"preprocessing '{name}' needs 1 or {channels} values, got {len(v)}", source)
        if any(s == 0 for s in std) or not np.all(np.isfinite(mean + std + (scale,))):
            raise ScannerError("preprocessing 'std' must be non-zero and all values finite", source)
        return Preprocess(size, d["color"], d["layout"], d["dtype"], scale, mean, std, self.sources + [str(source)])

    def to_tensor(self, pixels, out=None):
        """(N, H, W, C) pixels 0-255 -> the model's input tensor (written into ``out`` when it fits).

        uint8 pixels for a float32 model go through one 256-entry table per channel, written straight into
        the model's layout: one pass, and the same float32 values as the formula below."""
        pixels = np.asarray(pixels)
        if pixels.dtype == np.uint8 and self.dtype == "float32" and pixels.ndim == 4:
            return self._from_table(pixels, out)
        if pixels.dtype == np.float32 and self.dtype == "float32" and pixels.ndim == 4:
            return self._in_place(pixels, out)
        x = np.asarray(pixels, dtype=np.float32)
        if self.dtype in ("uint8", "int8"):
            x = x * np.float32(self.scale)
        else:
            x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        if self.dtype in ("uint8", "int8"):
            info = np.iinfo(self.dtype)
            x = np.clip(np.rint(x), info.min, info.max)
        return np.ascontiguousarray(x.astype(self.dtype))


    def _in_place(self, pixels, out=None):
        """float32 pixels: the formula's three passes written into one (reused) array in the model's layout."""
        n, h, w, c = pixels.shape
        nchw = self.layout == "NCHW"
        shape = (n, c, h, w) if nchw else (n, h, w, c)
        if out is None or out.shape != shape or out.dtype != np.float32:
            out = np.empty(shape, np.float32)
        view = (lambda v: np.asarray(v, np.float32).reshape(-1, 1, 1)) if nchw else (lambda v: np.asarray(v, np.float32))
        np.multiply(pixels.transpose(0, 3, 1, 2) if nchw else pixels, np.float32(self.scale), out=out)
        out -= view(self.mean)
        out /= view(self.std)
        return out

    def table(self):
        """(C, 256) float32: what each 0-255 value of each channel becomes (the to_tensor formula)."""
        if getattr(self, "_table", None) is None:
            v = np.repeat(np.arange(256, dtype=np.float32)[:, None], self.channels, 1)  # (256, C), channels last
            x = (v * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            self._table = np.ascontiguousarray(x.T, np.float32)
        return self._table

    def _from_table(self, pixels, out=None):
        from scanner.data.images import cv2  # OpenCV's LUT: threaded, exact (a table lookup)

        n, h, w, c = pixels.shape
        shape = (n, c, h, w) if self.layout == "NCHW" else (n, h, w, c)
        if out is None or out.shape != shape or out.dtype != np.float32:
            out = np.empty(shape, np.float32)
        table = self.table()
        if c not in (1, 3) or not n:
            for k in range(c):
                (out[:, k] if self.layout == "NCHW" else out[..., k])[...] = table[k][pixels[..., k]]
            return out
        if self.layout == "NHWC":
            cv2.LUT(np.ascontiguousarray(pixels).reshape(n * h, w, c), np.ascontiguousarray(table.T)[None],
                    dst=out.reshape(n * h, w, c))
            return out
        planes = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # uint8: a quarter of the float copy
        luts = [np.ascontiguousarray(table[k])[None] for k in range(c)]
        for i in range(n):  # one plane at a time, written where the model reads it
            for k in range(c):
                cv2.LUT(planes[i, k], luts[k], dst=out[i, k])
        return out


def default_preprocess(shape, dtype):
    """Guess preprocessing from a model input's shape (N, C, H, W) or (N, H, W, C) and numpy dtype."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(dims) != 4:
        raise ScannerError(f"model input has rank {len(dims)}; an image input needs rank 4")
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        layout, c, h, w = "NCHW", dims[1], dims[2], dims[3]
    elif dims[3] in (1, 3):
        layout, c, h, w = "NHWC", dims[3], dims[1], dims[2]
    else:
        layout, c, h, w = "NCHW", dims[1], dims[2], dims[3]
    dtype = np.dtype(dtype).name
    integer = dtype in ("uint8", "int8")
    return Preprocess(
        size=(h or 224, w or 224),
        color="gray" if c == 1 else "rgb",
        layout=layout,
        dtype=dtype if dtype in DTYPES else "float32",
        scale=1.0 if integer else 1.0 / 255.0,
        sources=["model input"],
    )


PRESETS = {
    "imagenet": {"color": "rgb", "scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "caffe": {"color": "bgr", "scale": 1.0, "mean": [103.939, 116.779, 123.68], "std": [1.0]},
    "inception": {"color": "rgb", "scale": 1.0 / 255.0, "mean": [0.5], "std": [0.5]},
    "raw": {"scale": 1.0 / 255.0, "mean": [0.0], "std": [1.0]},
}
"""Named preprocessing (``--preprocess NAME``): torchvision's ImageNet mean/std on RGB 0-1; Caffe's BGR mean
subtraction on 0-255; Inception's [-1, 1]; raw 0-1. Size, layout and dtype still come from the model input."""
ASSUMED = "assumed"
"""The source name of preprocessing that nothing stated (a float model without metadata or --preprocess)."""


def resolve_preprocess(shape, dtype, metadata=None, override=None, source=None):
    """Preprocessing from the model input, then its ``scanner.preprocess`` metadata, then ``override`` (a preset
    name of :data:`PRESETS` or a JSON file).

    The result must fit the model input's fixed dimensions and dtype; ``source`` (the model file) is named
    in errors about the model's own metadata. A float model with neither metadata nor override gets the
    ``raw`` recipe with a warning, and ``assumed`` among its sources.
    """
    try:
        pre = default_preprocess(shape, dtype)
    except ScannerError as exc:
        raise ScannerError(str(exc), source) from None
    stated = bool(metadata and "scanner.preprocess" in metadata) or override is not None
    if metadata and "scanner.preprocess" in metadata:
        try:
            values = json.loads(metadata["scanner.preprocess"])
        except ValueError as exc:
            raise ScannerError(f"model metadata 'scanner.preprocess' is not valid JSON ({exc})", source) from None
        try:
            pre = pre.updated(values, "model metadata scanner.preprocess")
        except ScannerError as exc:
            raise ScannerError(str(exc), source) from None
    if override is not None and str(override) in PRESETS:
        if pre.channels == 1 and str(override) in ("imagenet", "caffe"):
            raise ScannerError(f"--preprocess {override} is for RGB/BGR models; this model takes 1 channel", source)
        pre = pre.updated(PRESETS[str(override)], f"preset {override}")
        override = None
    elif override is not None:
        path = Path(override)
        if not path.exists() and path.suffix.lower() != ".json":
            raise ScannerError(f"--preprocess must be one of {', '.join(PRESETS)} or a JSON file; {override!r} is neither")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScannerError("preprocessing file not found", path) from None
        except (ValueError, UnicodeDecodeError, OSError, RecursionError) as exc:
            raise ScannerError(f"cannot read preprocessing JSON ({str(exc)[:160]})", path) from None
        pre = pre.updated(values, path)
    if not stated and pre.dtype not in ("uint8", "int8"):
        log.warning("%s: no preprocessing stated (no scanner.preprocess metadata, no --preprocess): assuming %s %s, "
                    "scale %g, mean %s, std %s; pass --preprocess imagenet|caffe|inception|raw|FILE.json if the model "
                    "was trained otherwise", source or "model", pre.color.upper(), list(pre.size), pre.scale,
                    list(pre.mean), list(pre.std))
        pre.sources.append(ASSUMED)
    _check_fits(pre, shape, dtype, path if override is not None else source)
    return pre


def _check_fits(pre, shape, dtype, source):
    """Raise when ``pre`` gives tensors the model input (fixed dims, dtype) cannot take."""
    dims = list(shape)
    if pre.layout == "NCHW":
        want = {"channels": dims[1], "height": dims[2], "width": dims[3]}
    else:
        want = {"height": dims[1], "width": dims[2], "channels": dims[3]}
    got = {"channels": pre.channels, "height": pre.size[0], "width": pre.size[1]}
    for key, value in want.items():
        if isinstance(value, int) and value > 0 and value != got[key]:
            raise ScannerError(
                f"preprocessing ({pre.layout}, {pre.color}, size {list(pre.size)}) gives {key} {got[key]} but the model "
                f"input {dims} needs {value}", source)
    if np.dtype(dtype).name in DTYPES and pre.dtype != np.dtype(dtype).name:
        raise ScannerError(f"preprocessing dtype {pre.dtype} does not match the model input dtype {np.dtype(dtype).name}", source)
