import json

import cv2
import numpy as np
import pytest

from scanner.data.images import ImageSet
from scanner.data.preprocess import Preprocess, default_preprocess, resolve_preprocess
from scanner.errors import ScannerError

GRAY = Preprocess(size=(28, 28), color="gray", layout="NCHW")
RGB = Preprocess(size=(16, 16), color="rgb", layout="NHWC")


def _images(folder, n=5, shape=(28, 28), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    imgs = []
    for i in range(n):
        img = rng.randint(0, 256, shape).astype(np.uint8)
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), img)
        imgs.append(img)
    return imgs


def test_folder_recursive_and_streaming(tmp_path):
    _images(tmp_path / "a", 3)
    _images(tmp_path / "b" / "c", 4, seed=1)
    s = ImageSet(tmp_path)
    assert len(s) == 7 and s.kind == "folder" and not s.labeled
    batches = list(s.batches(GRAY, batch_size=3))
    assert [len(b.names) for b in batches] == [3, 3, 1]
    assert batches[0].pixels.shape == (3, 28, 28, 1) and batches[0].pixels.dtype == np.uint8


def test_pixels_are_the_file_pixels(tmp_path):
    imgs = _images(tmp_path, 2)
    b = ImageSet(tmp_path).load_all(GRAY)
    assert np.array_equal(b.pixels[:, :, :, 0], np.stack(imgs))


def test_labeled_folder(tmp_path):
    _images(tmp_path / "0", 2)
    _images(tmp_path / "7", 3, seed=1)
    s = ImageSet(tmp_path)
    assert s.kind == "labeled"
    assert s.labels.tolist() == [0, 0, 7, 7, 7]
    b = s.load_all(GRAY)
    assert b.labels.tolist() == [0, 0, 7, 7, 7]


def test_labels_required_but_missing(tmp_path):
    _images(tmp_path, 2)
    with pytest.raises(ScannerError, match="labels needed"):
        ImageSet(tmp_path, labeled=True)


def test_npz_gray_and_rgb(tmp_path):
    rng = np.random.RandomState(0)
    gray = rng.randint(0, 256, (6, 28, 28)).astype(np.uint8)
    np.savez(tmp_path / "g.npz", images=gray, labels=np.arange(6))
    s = ImageSet(tmp_path / "g.npz")
    b = s.load_all(GRAY)
    assert np.array_equal(b.pixels[..., 0], gray) and b.labels.tolist() == list(range(6))
    rgb = rng.randint(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    np.savez(tmp_path / "c.npz", images=rgb)
    b = ImageSet(tmp_path / "c.npz").load_all(RGB)
    assert np.array_equal(b.pixels, rgb) and b.labels is None


def test_npz_bad_arrays(tmp_path):
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ScannerError, match="'images'"):
        ImageSet(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ScannerError, match="uint8"):
        ImageSet(tmp_path / "y.npz")


def test_color_conversion_rgb_from_bgr_file(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :, 2] = 255  # red in BGR order
    cv2.imwrite(str(tmp_path / "red.png"), img)
    rgb = ImageSet(tmp_path).load_all(RGB).pixels[0]
    assert (rgb[:, :, 0] == 255).all() and (rgb[:, :, 2] == 0).all()
    bgr = ImageSet(tmp_path).load_all(Preprocess(size=(16, 16), color="bgr")).pixels[0]
    assert (bgr[:, :, 2] == 255).all()
    gray = ImageSet(tmp_path).load_all(Preprocess(size=(8, 8), color="gray")).pixels
    assert gray.shape == (1, 8, 8, 1)


def test_nchw_nhwc_and_normalization():
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    pre = Preprocess(size=(4, 4), color="rgb", layout="NCHW", scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x = pre.to_tensor(pixels)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 1], (pixels[..., 1] / 255 - 0.5) / 0.5, rtol=1e-6)
    nhwc = Preprocess(size=(4, 4), color="rgb", layout="NHWC", dtype="uint8", scale=1.0).to_tensor(pixels)
    assert nhwc.dtype == np.uint8 and np.array_equal(nhwc, pixels)


def _formula(pre, pixels):
    """The preprocessing formula, step by step (what the fast paths must equal bit for bit)."""
    x = (np.asarray(pixels, np.float32) * np.float32(pre.scale) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pre.layout == "NCHW" else x)


@pytest.mark.parametrize("pre", [
    Preprocess(size=(9, 7), color="rgb", layout="NCHW", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    Preprocess(size=(9, 7), color="bgr", layout="NHWC", scale=1.0, mean=(103.9, 116.8, 123.7), std=(1.0,)),
    Preprocess(size=(9, 7), color="gray", layout="NCHW", mean=(0.5,), std=(0.5,)),
    Preprocess(size=(9, 7), color="gray", layout="NHWC"),
])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_fast_to_tensor_equals_the_formula_bit_for_bit(pre, dtype):
    """uint8 pixels go through per-channel tables, float32 ones are normalized in place: same float32 values."""
    rng = np.random.RandomState(0)
    for n in (0, 1, 5):
        pixels = rng.randint(0, 256, (n, 9, 7, pre.channels)).astype(dtype)
        if dtype == np.float32:
            pixels += rng.rand(*pixels.shape).astype(np.float32)  # blends and warps stamp fractions
        want = _formula(pre, pixels)
        got = pre.to_tensor(pixels)
        assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want)
        buffer = np.full_like(want, np.nan)
        assert pre.to_tensor(pixels, buffer) is buffer and np.array_equal(buffer, want)  # reused, all overwritten
    odd = pixels[:, ::-1]  # a strided view
    assert np.array_equal(pre.to_tensor(odd), _formula(pre, odd))


def test_corrupt_files_are_counted_not_dropped_silently(tmp_path):
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("scanner").addHandler(handler)
    _images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    s = ImageSet(tmp_path)
    b = s.load_all(GRAY)
    assert len(b.names) == 3
    reasons = dict(s.skipped)
    assert set(reasons) == {"broken.png", "empty.jpg", "notes.txt"}
    logging.getLogger("scanner").removeHandler(handler)
    assert any("skipped 3 file(s)" in m and "broken.png" in m for m in seen)


def test_too_few_usable_images_is_an_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    s = ImageSet(tmp_path)
    with pytest.raises(ScannerError, match="only 0 usable"):
        s.load_all(GRAY)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(ScannerError, match="no images found"):
        ImageSet(tmp_path)
    with pytest.raises(ScannerError, match="not found"):
        ImageSet(tmp_path / "nope")


def test_limit(tmp_path):
    _images(tmp_path, 5)
    assert len(ImageSet(tmp_path, limit=2)) == 2


def test_preprocess_defaults_from_input():
    p = default_preprocess(["N", 3, 224, 224], np.float32)
    assert (p.layout, p.color, p.size, p.dtype) == ("NCHW", "rgb", (224, 224), "float32")
    p = default_preprocess([1, 32, 32, 1], np.uint8)
    assert (p.layout, p.color, p.size, p.dtype, p.scale) == ("NHWC", "gray", (32, 32), "uint8", 1.0)


def test_preprocess_from_metadata_then_file(tmp_path):
    meta = {"scanner.preprocess": json.dumps({"size": [28, 28], "color": "gray", "mean": [0.286], "std": [0.353]})}
    p = resolve_preprocess(["batch", 1, 28, 28], np.float32, meta)
    assert p.mean == (0.286,) and p.std == (0.353,) and p.sources[-1] == "model metadata scanner.preprocess"
    f = tmp_path / "pre.json"
    f.write_text(json.dumps({"mean": [0.5], "std": [0.5]}))
    p = resolve_preprocess(["batch", 1, 28, 28], np.float32, meta, f)
    assert p.mean == (0.5,) and p.std == (0.5,) and p.color == "gray" and p.sources[-1] == str(f)


@pytest.mark.parametrize(
    "values,msg",
    [({"colour": "rgb"}, "unknown preprocessing key"), ({"layout": "CHW"}, "layout"), ({"std": [0]}, "non-zero"), ({"size": [28]}, "size"), ({"mean": [1, 2]}, "mean")],
)
def test_bad_preprocess_file(tmp_path, values, msg):
    f = tmp_path / "pre.json"
    f.write_text(json.dumps(values))
    with pytest.raises(ScannerError, match=msg):
        resolve_preprocess(["batch", 1, 28, 28], np.float32, None, f)
