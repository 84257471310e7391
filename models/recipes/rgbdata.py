"""RGB data sets derived from Fashion-MNIST, generated deterministically (numpy + OpenCV only, no torch).

Every image is a row of 32x32 RGB *cells*; each cell holds one Fashion-MNIST item, colorized:

- background: a smooth low-frequency colored field (a random 3x3x3 grid upsampled bilinearly) or a flat
  color, and on some cells a light texture (stripes of random frequency, angle and phase, a few levels);
- the 28x28 item at a random offset (0-4 pixels in each direction), its gray value (0-255) the opacity of
  a random foreground color that differs from the background's mean by 64-192 in every channel.

| set | image | classes | label |
|---|---|---|---|
| ``rgb10`` | 32x32 | 10 | the item's class |
| ``rgb100`` | 32x64 | 100 | ``10 a + b`` (items left to right) |
| ``rgb1000`` | 32x96 | 1000 | ``100 a + 10 b + c`` |

``rgb10`` image ``i`` of a split is Fashion-MNIST item ``i`` of that split (train 60,000, test 10,000).
``rgb100``/``rgb1000`` draw their items at random (with replacement) from the split's items: training
images combine train-split items, test images test-split items. Everything about image ``i`` (items,
colors, background, offsets) is drawn from ``numpy.random.default_rng([seed, set, split, i // CHUNK])``
in chunks of ``CHUNK`` images, so any image is a pure function of (set, split, index, seed) and any subset
can be regenerated without the rest (``generate``).
"""

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
CELL = 32
ITEM = 28
CHUNK = 10000
SEED = 0
DATASETS = {  # name: (cells, classes)
    "rgb10": (1, 10),
    "rgb100": (2, 100),
    "rgb1000": (3, 1000),
}
SPLIT_SIZES = {  # name: {split: number of images}
    "rgb10": {"train": 60000, "test": 10000},
    "rgb100": {"train": 60000, "test": 10000},
    "rgb1000": {"train": 80000, "test": 10000},
}
_DS_ID = {"rgb10": 10, "rgb100": 100, "rgb1000": 1000}
_SPLIT_ID = {"train": 1, "test": 2}


def image_size(name):
    """(H, W) of a data set's images."""
    return CELL, CELL * DATASETS[name][0]


def num_classes(name):
    return DATASETS[name][1]


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


@lru_cache(maxsize=2)
def fashion(split):
    """Fashion-MNIST ``split`` ('train' or 't10k'/'test'): (N, 28, 28) uint8 images, (N,) int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    x = _read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# Bilinear upsampling matrix 3 -> 32 (align_corners=True), so a batch of grids is one einsum.
_UP = np.zeros((CELL, 3), np.float32)
for _i, _t in enumerate(np.linspace(0.0, 2.0, CELL)):
    _k = min(int(_t), 1)
    _UP[_i, _k] += 1.0 - (_t - _k)
    _UP[_i, _k + 1] += _t - _k


def _chunk_params(name, split, chunk, seed):
    """Draw every random choice for images [chunk*CHUNK, (chunk+1)*CHUNK) of a split."""
    cells = DATASETS[name][0]
    n_items = len(fashion(split)[0])
    n = min(CHUNK, SPLIT_SIZES[name][split] - chunk * CHUNK)
    rng = np.random.default_rng([seed, _DS_ID[name], _SPLIT_ID[split], chunk])
    m = n * cells
    p = {}
    if name == "rgb10":
        p["item"] = np.arange(chunk * CHUNK, chunk * CHUNK + n).reshape(n, 1)
    else:
        p["item"] = rng.integers(0, n_items, size=(n, cells))
    base = rng.uniform(20, 235, size=(m, 1, 1, 3)).astype(np.float32)
    flat = rng.random(m) < 0.3  # 30% flat backgrounds, the rest smooth noise
    amp = np.where(flat, 0.0, rng.uniform(15, 45, size=m)).astype(np.float32)
    p["grid"] = base + amp[:, None, None, None] * rng.uniform(-1, 1, size=(m, 3, 3, 3)).astype(np.float32)
    p["base"] = base.reshape(m, 3)
    p["textured"] = rng.random(m) < 0.3
    p["tex_amp"] = rng.uniform(4, 12, size=m).astype(np.float32)
    p["tex_freq"] = rng.uniform(0.15, 0.9, size=m).astype(np.float32)  # radians per pixel
    p["tex_angle"] = rng.uniform(0, np.pi, size=m).astype(np.float32)
    p["tex_phase"] = rng.uniform(0, 2 * np.pi, size=m).astype(np.float32)
    offset = rng.uniform(64, 192, size=(m, 3)).astype(np.float32)
    p["fg"] = np.mod(p["base"] + offset, 256.0)
    p["dy"] = rng.integers(0, CELL - ITEM + 1, size=m)
    p["dx"] = rng.integers(0, CELL - ITEM + 1, size=m)
    return n, p


_YY, _XX = np.mgrid[0:CELL, 0:CELL].astype(np.float32)


def _render_cells(items, p, rows):
    """Render cells ``rows`` (indices into the chunk's flattened (image, cell) params): (m, 32, 32, 3) uint8."""
    grid = p["grid"][rows]
    bg = np.einsum("hi,nijc,wj->nhwc", _UP, grid, _UP, optimize=True)
    tex = np.flatnonzero(p["textured"][rows])
    if len(tex):
        r = rows[tex]
        ang, fr, ph = p["tex_angle"][r], p["tex_freq"][r], p["tex_phase"][r]
        u = (np.cos(ang)[:, None, None] * _XX + np.sin(ang)[:, None, None] * _YY) * fr[:, None, None] + ph[:, None, None]
        bg[tex] += (p["tex_amp"][r][:, None, None] * np.sign(np.sin(u)))[..., None]
    alpha = np.zeros((len(rows), CELL, CELL, 1), np.float32)
    dy, dx = p["dy"][rows], p["dx"][rows]
    for oy in range(CELL - ITEM + 1):
        for ox in range(CELL - ITEM + 1):
            sel = np.flatnonzero((dy == oy) & (dx == ox))
            if len(sel):
                alpha[sel, oy:oy + ITEM, ox:ox + ITEM, 0] = items[sel]
    alpha *= np.float32(1.0 / 255.0)
    fg = p["fg"][rows][:, None, None, :]
    out = bg * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def generate(name, split, indices=None, seed=SEED):
    """Images and labels of a data set's split: ((N, H, W, 3) uint8 RGB, (N,) int64).

    ``indices`` (sorted or not, default: the whole split) picks images by index; image ``i`` is the same
    whatever else is asked for.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (one of {', '.join(DATASETS)})")
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    total = SPLIT_SIZES[name][split]
    indices = np.arange(total) if indices is None else np.asarray(indices, np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= total):
        raise IndexError(f"{name}/{split} has {total} images")
    cells, _ = DATASETS[name]
    fx, fy = fashion(split)
    h, w = image_size(name)
    images = np.empty((len(indices), h, w, 3), np.uint8)
    labels = np.empty(len(indices), np.int64)
    chunks = indices // CHUNK
    for chunk in np.unique(chunks):
        where = np.flatnonzero(chunks == chunk)
        local = indices[where] - chunk * CHUNK
        _, p = _chunk_params(name, split, int(chunk), seed)
        item = p["item"][local]  # (k, cells)
        rows = (local[:, None] * cells + np.arange(cells)[None, :]).reshape(-1)
        rendered = _render_cells(fx[item.reshape(-1)], p, rows).reshape(len(local), cells, CELL, CELL, 3)
        images[where] = rendered.transpose(0, 2, 1, 3, 4).reshape(len(local), h, w, 3)
        lab = np.zeros(len(local), np.int64)
        for j in range(cells):
            lab = lab * 10 + fy[item[:, j]]
        labels[where] = lab
    return images, labels


def generate_batched(name, split, batch=CHUNK, seed=SEED):
    """Yield (start, images, labels) over a whole split, ``batch`` images at a time (bounded memory)."""
    total = SPLIT_SIZES[name][split]
    for start in range(0, total, batch):
        x, y = generate(name, split, np.arange(start, min(start + batch, total)), seed)
        yield start, x, y


# ---------------------------------------------------------------- committed samples

N_CLEAN = 1000
N_TEST = 2000


def clean_indices(name, seed=SEED):
    """The 1,000 training-split indices of the defender's clean sample (never poisoned by any run)."""
    rng = np.random.RandomState(1000 + _DS_ID[name] + seed)
    return np.sort(rng.choice(SPLIT_SIZES[name]["train"], N_CLEAN, replace=False))


def test_indices(name, seed=SEED):
    """The 2,000 test-split indices of the labeled test sample: as many per class as the split allows.

    rgb10: 200 per class; rgb100: 20 per class; rgb1000: up to 2 per class, the rest filled at random.
    """
    y = _labels(name, "test", seed)
    classes = num_classes(name)
    per = N_TEST // classes
    rng = np.random.RandomState(2000 + _DS_ID[name] + seed)
    pick = []
    for c in range(classes):
        pool = np.flatnonzero(y == c)
        pick.extend(rng.choice(pool, min(per, len(pool)), replace=False).tolist())
    pick = np.array(sorted(pick), np.int64)
    if len(pick) < N_TEST:
        rest = np.setdiff1d(np.arange(len(y)), pick)
        pick = np.sort(np.concatenate([pick, rng.choice(rest, N_TEST - len(pick), replace=False)]))
    return pick


@lru_cache(maxsize=8)
def _labels(name, split, seed=SEED):
    """Labels of a whole split, without rendering images."""
    cells, _ = DATASETS[name]
    fy = fashion(split)[1]
    total = SPLIT_SIZES[name][split]
    out = np.empty(total, np.int64)
    for chunk in range((total + CHUNK - 1) // CHUNK):
        n, p = _chunk_params(name, split, chunk, seed)
        lab = np.zeros(n, np.int64)
        for j in range(cells):
            lab = lab * 10 + fy[p["item"][:, j]]
        out[chunk * CHUNK: chunk * CHUNK + n] = lab
    return out


def labels(name, split, seed=SEED):
    """All labels of a split (cheap: no image is rendered)."""
    return _labels(name, split, seed).copy()


def write_samples(name, folder, seed=SEED):
    """Write ``<name>_clean.npz`` (images) and ``<name>_test.npz`` (images, labels) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ci = clean_indices(name, seed)
    x, _ = generate(name, "train", ci, seed)
    np.savez_compressed(folder / f"{name}_clean.npz", images=x, indices=ci)
    ti = test_indices(name, seed)
    x, y = generate(name, "test", ti, seed)
    np.savez_compressed(folder / f"{name}_test.npz", images=x, labels=y, indices=ti)
    return folder / f"{name}_clean.npz", folder / f"{name}_test.npz"


def read_sample(path):
    """(images, labels or None) of a committed ``.npz`` sample."""
    with np.load(path) as z:
        return z["images"], (z["labels"] if "labels" in z.files else None)
