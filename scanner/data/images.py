"""Image sets: folders, labeled folders, ``.npz`` files, decoded in streamed batches.

Pixels come out as ``uint8`` arrays (N, H, W, C) at the size and color order of a
:class:`scanner.data.preprocess.Preprocess`. Unreadable files are counted and named, never dropped silently.
"""

import logging
import os
import struct
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MAX_IMAGE_PIXELS = 1 << 26
"""Largest image (width x height) decoded: 8192 x 8192. Beyond it a file is a decompression bomb, not a sample."""
# OpenCV reads its own pixel limit once, at its first decode: set it before anything decodes (backstop for the
# formats whose header :func:`image_dimensions` does not parse). Its warnings would break one-line stderr.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from scanner.errors import ScannerError  # noqa: E402

log = logging.getLogger("scanner")
try:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # pragma: no cover - older OpenCV
    pass

IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .bmp .dib .tif .tiff .webp .pgm .ppm .pbm .pnm .pxm .sr .ras .jp2 .exr .hdr .pic".split()
)
MAX_FILE_BYTES = 256 << 20
MAX_NPZ_BYTES = 2 << 30
"""Largest ``images`` array read from an ``.npz`` (after ``--limit``); it is held in memory."""
MAX_BATCH_BYTES = 1 << 30
"""Batches are cut so that one batch's model input stays under this many bytes."""


def image_dimensions(data):
    """(width, height) from a PNG, JPEG, BMP, GIF or WebP header, or None when not recognized."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"BM" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            kind = data[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                length = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except struct.error:
        return None
    return None


def decode_image(data, pre):
    """Decode encoded image bytes to (H, W, C) uint8 at ``pre``'s size and color; None if undecodable.

    Raises ValueError for an image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels or whose
    channel count is not 1-4 (before anything big is allocated).
    """
    dims = image_dimensions(data)
    if dims is not None and dims[0] * dims[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"image is {dims[0]}x{dims[1]} pixels, over the limit of {MAX_IMAGE_PIXELS} (decompression bomb?)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None
    return conform(img, pre, bgr=True)


def conform(img, pre, bgr=False):
    """An (H, W[, C]) image (BGR order if ``bgr`` else RGB) -> (H, W, C) uint8 at ``pre``'s size and color."""
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 2, 3, 4)) or min(img.shape[:2]) < 1:
        raise ValueError(f"unsupported image shape {img.shape} (expected H x W with 1-4 channels)")
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 2:
        img = img[:, :, 0]
    if img.ndim == 2:
        if pre.color != "gray":
            img = np.repeat(img[:, :, None], 3, axis=2)
    elif pre.color == "gray":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    elif (pre.color == "rgb") == bgr:
        img = img[:, :, ::-1]
    h, w = pre.size
    if img.shape[:2] != (h, w):
        shrink = img.shape[0] > h or img.shape[1] > w
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img)


@dataclass
class Batch:
    """A batch of images: pixels (N, H, W, C) uint8, their names, and labels when known."""

    pixels: np.ndarray
    names: list
    labels: np.ndarray = None


class ImageSet:
    """Images from a folder (recursive), a labeled folder ``DIR/<class index>/...`` or an ``.npz``.

    Files are listed up front (names only); pixels are read batch by batch, so memory does not grow with
    the number of images. Unreadable files are counted in :attr:`skipped`, never silently dropped.
    """

    def __init__(self, path, labeled=None, limit=None, min_images=1):
        self.path = Path(path)
        self.min_images = int(min_images)
        if self.min_images < 1:
            raise ScannerError(f"--min-images must be >= 1, got {self.min_images}")
        self.skipped = []  # (name, reason)
        self._warned = False
        self._lock = threading.Lock()
        self._npz = None
        self._blobs = None
        """{name: bytes or why not} when the set was :meth:`packed` (read from memory, not from disk)."""
        if limit is not None and int(limit) < 1:
            raise ScannerError(f"--limit must be >= 1, got {limit}")
        if not self.path.exists():
            raise ScannerError("image folder or file not found", self.path)
        if self.path.is_file():
            if self.path.suffix.lower() != ".npz":
                raise ScannerError("expected a folder of images or an .npz file", self.path)
            self._open_npz(limit)
            self.kind = "npz"
        else:
            self._list_folder(labeled)
        if limit is not None:
            self.names = self.names[: int(limit)]
            if self.labels is not None:
                self.labels = self.labels[: int(limit)]
        if not self.names:
            raise ScannerError("no images found (looked for " + ", ".join(sorted(IMAGE_EXTENSIONS)[:6]) + ", ...)", self.path)
        if len(self.names) < self.min_images:
            raise ScannerError(f"only {len(self.names)} image file(s), at least {self.min_images} needed (--min-images)", self.path)
        if labeled and self.labels is None:
            raise ScannerError("labels needed: use a folder DIR/<class index>/... or an .npz with 'labels'", self.path)

    def _open_npz(self, limit=None):
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = set(zf.namelist())
                if "images.npy" not in members:
                    raise ScannerError("an .npz image set needs an array named 'images'", self.path)
                images = _read_npy(zf, "images.npy", limit, self.path)
                labels = _read_npy(zf, "labels.npy", limit, self.path) if "labels.npy" in members else None
        except ScannerError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
            raise ScannerError(f"cannot read .npz ({type(exc).__name__}: {str(exc)[:160]})", self.path) from None
        if images.ndim not in (3, 4) or images.dtype != np.uint8 or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise ScannerError(f"'images' must be uint8 (N, H, W[, C]) with C in 1/3/4, got {images.dtype} {images.shape}", self.path)
        if labels is not None and (labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu"):
            raise ScannerError(f"'labels' must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}", self.path)
        self._npz = images
        self.labels = labels.astype(np.int64) if labels is not None else None
        self.names = [f"{self.path.name}[{i}]" for i in range(len(images))]
        self._index = np.arange(len(images))

    def _list_folder(self, labeled):
        try:
            top = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            raise ScannerError(f"cannot list folder ({exc.strerror})", self.path) from exc
        subdirs = [e for e in top if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        top_files = [e for e in top if e.is_file() and not e.name.startswith(".")]
        looks_labeled = bool(subdirs) and not top_files and all(e.name.isdigit() for e in subdirs)
        if labeled and not looks_labeled:
            raise ScannerError("labels needed: expected sub-folders named by class index (DIR/<class>/...)", self.path)
        self.kind = "labeled" if looks_labeled and labeled is not False else "folder"
        names, labels = [], []
        for root, dirs, files in os.walk(self.path, onerror=self._walk_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel_root = Path(root).relative_to(self.path)
            for f in sorted(files):
                if f.startswith("."):
                    continue
                rel = (rel_root / f).as_posix()
                if Path(f).suffix.lower() not in IMAGE_EXTENSIONS:
                    self.skipped.append((rel, "not an image file extension"))
                    continue
                names.append(rel)
                if self.kind == "labeled":
                    labels.append(int(rel.split("/", 1)[0]))
        self.names = names
        self.labels = np.asarray(labels, np.int64) if self.kind == "labeled" else None

    def _walk_error(self, exc):
        self.skipped.append((str(getattr(exc, "filename", exc)), f"cannot list ({exc.strerror})"))

    def __len__(self):
        return len(self.names)

    @property
    def labeled(self):
        """Whether every image has a class label."""
        return self.labels is not None

    def read(self, i, pre):
        """Image ``i`` as (H, W, C) uint8 at ``pre``'s size and color, or None (recorded in skipped)."""
        if self._npz is not None:
            return conform(self._npz[self._index[i]], pre)
        name = self.names[i]
        data = self._blobs.get(name) if self._blobs is not None else self._file_bytes(name)
        if not isinstance(data, bytes):
            return self._skip(name, data or "not packed")
        try:
            img = decode_image(data, pre)
        except ValueError as exc:
            return self._skip(name, str(exc))
        except cv2.error as exc:
            reason = "over the pixel limit (decompression bomb?)" if "CV_IO_MAX_IMAGE" in str(exc) else "OpenCV cannot decode it"
            return self._skip(name, reason)
        if img is None:
            return self._skip(name, "not a decodable image (corrupt or truncated)")
        return img

    def _file_bytes(self, name):
        """The bytes of image file ``name``, or why they cannot be read (a str)."""
        path = self.path / name
        try:
            size = path.stat().st_size
            if size == 0:
                return "empty file"
            if size > MAX_FILE_BYTES:
                return f"file larger than {MAX_FILE_BYTES >> 20} MiB"
            return path.read_bytes()
        except OSError as exc:
            return f"cannot read ({exc.strerror})"

    def packed(self):
        """A copy that carries its images with it (the files' bytes, or the .npz array), to be pickled and read on
        another machine: the Ray gate ships it once to the object store. A file that cannot be read here is
        recorded as skipped when the copy reads it, as it would be here."""
        import copy

        out = copy.copy(self)
        out.skipped, out._lock = list(self.skipped), threading.Lock()
        if self._npz is None:
            out._blobs = {name: self._file_bytes(name) for name in self.names}
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _skip(self, name, reason):
        with self._lock:
            self.skipped.append((name, reason))
        return None

    def batches(self, pre, batch_size=64, workers=2):
        """Yield :class:`Batch` objects of at most ``batch_size`` usable images, reading ahead one batch.

        At the end, raises ScannerError when fewer than ``min_images`` images were usable.
        """
        if batch_size < 1:
            raise ScannerError(f"--batch-size must be >= 1, got {batch_size}")
        per_image = pre.size[0] * pre.size[1] * pre.channels * max(4, np.dtype(pre.dtype).itemsize)
        if batch_size * per_image > MAX_BATCH_BYTES:
            batch_size = max(1, MAX_BATCH_BYTES // per_image)
            log.info("%s: batches of %d images keep the model input under %d MiB", self.path, batch_size, MAX_BATCH_BYTES >> 20)
        self.skipped = [s for s in self.skipped if s[1] == "not an image file extension" or s[1].startswith("cannot list")]
        starts = range(0, len(self.names), batch_size)
        usable = 0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

            def load(start):
                idx = range(start, min(start + batch_size, len(self.names)))
                imgs = list(pool.map(lambda i: self.read(i, pre), idx))
                keep = [k for k, im in zip(idx, imgs) if im is not None]
                pixels = np.stack([im for im in imgs if im is not None]) if keep else None
                labels = self.labels[keep] if self.labels is not None and keep else None
                return Batch(pixels, [self.names[k] for k in keep], labels)

            reader = ThreadPoolExecutor(max_workers=1)
            try:
                pending = reader.submit(load, starts[0]) if starts else None
                for j in range(len(starts)):
                    batch = pending.result()
                    pending = reader.submit(load, starts[j + 1]) if j + 1 < len(starts) else None
                    if batch.pixels is None:
                        continue
                    usable += len(batch.names)
                    yield batch
            finally:
                reader.shutdown(wait=True, cancel_futures=True)
        self.check_usable(usable)

    def subset(self, indices):
        """The images at ``indices`` (names, labels; pixels still read from disk batch by batch)."""
        import copy

        idx = np.asarray(indices, np.int64)
        out = copy.copy(self)
        out.names = [self.names[i] for i in idx]
        out.labels = self.labels[idx] if self.labels is not None else None
        if self._npz is not None:
            out._index = self._index[idx]
        out.skipped, out._lock = [], threading.Lock()
        return out

    def check_usable(self, usable):
        """Name skipped files in one warning (once per set); raise when fewer than ``min_images`` were usable.

        The error carries the skip summary itself, so a failed run prints one line.
        """
        first = ", ".join(f"{n} ({r})" for n, r in self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else "")
        if usable < self.min_images:
            detail = f": skipped {len(self.skipped)} file(s): {first}" if self.skipped else ""
            raise ScannerError(f"only {usable} usable image(s), at least {self.min_images} needed{detail}", self.path)
        if self.skipped and not self._warned:
            self._warned = True
            log.warning("%s: skipped %d file(s): %s", self.path, len(self.skipped), first)

    def load_all(self, pre, batch_size=256):
        """All usable images at once (for small sets such as the defender's clean sample)."""
        parts = list(self.batches(pre, batch_size))
        pixels = np.concatenate([b.pixels for b in parts])
        labels = np.concatenate([b.labels for b in parts]) if self.labels is not None else None
        return Batch(pixels, [n for b in parts for n in b.names], labels)


def _read_npy(zf, member, limit, path):
    """The first ``limit`` rows of one array of an ``.npz``, its size checked from the header before reading."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ScannerError(f"{member}: unsupported .npy format version {version}", path)
        if dtype.hasobject or not shape:
            raise ScannerError(f"{member}: expected a numeric array, got {dtype} {shape}", path)
        if fortran and len(shape) > 1:
            raise ScannerError(f"{member}: Fortran-ordered arrays are not supported (save with C order)", path)
        rows = min(shape[0], int(limit)) if limit is not None else shape[0]
        per_row = int(np.prod(shape[1:], dtype=object)) if len(shape) > 1 else 1
        if len(shape) >= 3 and shape[1] * shape[2] > MAX_IMAGE_PIXELS:
            raise ScannerError(f"{member}: images of {shape[1]}x{shape[2]} pixels are over the limit of {MAX_IMAGE_PIXELS}", path)
        nbytes = rows * per_row * dtype.itemsize
        if nbytes > MAX_NPZ_BYTES:
            raise ScannerError(f"{member}: {nbytes >> 20} MiB is over the {MAX_NPZ_BYTES >> 20} MiB limit for an .npz (use --limit, or a folder)", path)
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ScannerError(f"{member}: truncated ({got} of {nbytes} bytes)", path)
            got += n
    return np.frombuffer(buf, dtype).reshape((rows,) + tuple(shape[1:]))


class MemoryImageSet:
    """An ImageSet already decoded into memory (for sets read many times, like a prune sweep)."""

    def __init__(self, source, batch):
        self.path, self.kind, self.skipped = source.path, source.kind, list(source.skipped)
        self.min_images = source.min_images
        self.pixels, self.names, self.labels = batch.pixels, batch.names, batch.labels

    def __len__(self):
        return len(self.names)

    @property
    def labeled(self):
        return self.labels is not None

    def batches(self, pre, batch_size=64, workers=None):
        """Yield batches from memory (``pre`` must be the preprocessing the set was decoded with)."""
        for s in range(0, len(self.names), batch_size):
            labels = self.labels[s : s + batch_size] if self.labels is not None else None
            yield Batch(self.pixels[s : s + batch_size], self.names[s : s + batch_size], labels)

    def load_all(self, pre, batch_size=None):
        return Batch(self.pixels, self.names, self.labels)

    def subset(self, indices):
        """The images at ``indices`` (a new set sharing nothing mutable with this one)."""
        idx = np.asarray(indices, np.int64)
        labels = self.labels[idx] if self.labels is not None else None
        return MemoryImageSet(self, Batch(self.pixels[idx], [self.names[i] for i in idx], labels))


HOLDOUT_FRACTION = 0.2
HOLDOUT_MIN_IMAGES = 100
"""Sets smaller than this are not split: a repair is then checked on the images it was fitted on (and says so)."""


def holdout_split(images, fraction=HOLDOUT_FRACTION, seed=0, minimum=HOLDOUT_MIN_IMAGES):
    """(fit, held-out, indices) of an image set: a seeded ``fraction`` of it held out for checking a repair.

    Sets of fewer than ``minimum`` images are not split: (images, None, None)."""
    n = len(images)
    if n < minimum:
        return images, None, None
    order = np.random.RandomState([seed, 17]).permutation(n)
    held = np.sort(order[: int(round(fraction * n))])
    fit = np.setdiff1d(np.arange(n), held)
    return images.subset(fit), images.subset(held), (fit, held)


def cached(images, pre, max_bytes=512 << 20):
    """Decode ``images`` once into memory when its pixels fit in ``max_bytes``; else return it as is."""
    if isinstance(images, MemoryImageSet):
        return images
    h, w = pre.size
    if len(images) * h * w * pre.channels > max_bytes:
        return images
    return MemoryImageSet(images, images.load_all(pre))
