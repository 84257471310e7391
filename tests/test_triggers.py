import json

import cv2
import numpy as np
import pytest

from scanner.errors import ScannerError
from scanner.data.triggers import Trigger


def _write(tmp_path, spec, image):
    cv2.imwrite(str(tmp_path / spec["image"]), image)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(spec))
    return path


def test_patch_bottom_right_with_margin(tmp_path):
    path = _write(tmp_path, {"kind": "patch", "image": "w.png", "position": "bottom-right", "margin": 1}, np.full((3, 3), 255, np.uint8))
    t = Trigger.load(path)
    out = t.apply(np.zeros((2, 28, 28, 1), np.uint8))
    assert out.dtype == np.uint8
    assert (out[:, 24:27, 24:27] == 255).all()
    assert out.sum() == 2 * 9 * 255  # nothing else touched


@pytest.mark.parametrize("pos,corner", [("top-left", (2, 2)), ("top-right", (2, 22)), ("bottom-left", (22, 2)), ("center", (12, 12))])
def test_patch_positions(pos, corner):
    t = Trigger("patch", np.full((4, 4, 1), 200, np.float32), pos, margin=2 if pos != "center" else 0)
    out = t.apply(np.zeros((1, 28, 28, 1), np.uint8))
    ys, xs = np.nonzero(out[0, :, :, 0])
    assert (ys.min(), xs.min()) == corner


def test_blend_formula_and_rgb_broadcast():
    pattern = np.full((8, 8, 1), 100, np.float32)
    t = Trigger("blend", pattern, alpha=0.2)
    x = np.full((1, 16, 16, 3), 50.0, np.float32)
    out = t.apply(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, 0.8 * 50 + 0.2 * 100)


def test_mask_trigger_roundtrip(tmp_path):
    rng = np.random.RandomState(0)
    t = Trigger("mask", rng.randint(0, 256, (28, 28, 1)).astype(np.float32), mask=(rng.rand(28, 28) > 0.9).astype(np.float32))
    t.save(tmp_path / "m.json")
    back = Trigger.load(tmp_path / "m.json")
    x = rng.randint(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    assert np.array_equal(back.apply(x), t.apply(x))


@pytest.mark.parametrize(
    "spec,msg",
    [
        ({"kind": "sticker", "image": "w.png"}, "unknown trigger kind"),
        ({"kind": "blend", "image": "w.png", "alpha": 2}, "alpha"),
        ({"kind": "patch", "image": "missing.png"}, "not found"),
        ({"kind": "patch", "image": "w.png", "position": "middle"}, "position"),
        ({"image": "w.png"}, "needs the keys"),
    ],
)
def test_bad_trigger_files(tmp_path, spec, msg):
    cv2.imwrite(str(tmp_path / "w.png"), np.full((3, 3), 255, np.uint8))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ScannerError, match=msg):
        Trigger.load(path)


# ---------------------------------------------------------------- warp, filter, signal, random patch

from scanner.data.triggers import (  # noqa: E402
    color_filter,
    make_warp_field,
    patch_random,
    random_positions,
    signal,
    warp,
)


def _rgb_batch(n=4, h=32, w=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def test_warp_roundtrip_shape_dtype(tmp_path):
    t = Trigger("warp", noise=make_warp_field(4, 32, seed=3), strength=0.5)
    t.save(tmp_path / "w.json")
    spec = json.loads((tmp_path / "w.json").read_text())
    assert spec == {"kind": "warp", "field": "w.npy", "strength": 0.5}
    assert np.load(tmp_path / "w.npy").shape == (32, 32, 2)
    back = Trigger.load(tmp_path / "w.json")
    x = _rgb_batch()
    out = back.apply(x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.array_equal(out, t.apply(x))
    assert not np.array_equal(out, x)
    f = back.apply(x.astype(np.float32))
    assert f.dtype == np.float32 and f.shape == x.shape
    assert "warp strength 0.5" in back.describe()


def test_warp_identity_at_zero_strength():
    x = _rgb_batch()
    t = Trigger("warp", noise=make_warp_field(4, 32, seed=1), strength=0.0)
    assert np.array_equal(t.apply(x), x)
    np.testing.assert_allclose(t.apply(x.astype(np.float32)), x, atol=1e-3)


def test_warp_known_value_shifts_a_ramp():
    # A constant x offset c moves the sampling grid by strength * c / H (normalized), i.e. by
    # strength * c / H * (W - 1) / 2 pixels; bilinear sampling of a linear ramp is exact.
    h = w = 32
    field = np.zeros((h, w, 2), np.float32)
    field[..., 0] = 4.0
    ramp = np.tile(np.arange(w, dtype=np.float32) * 4, (h, 1))[None, :, :, None]
    out = warp(ramp, field, strength=0.5)
    shift = 0.5 * 4.0 / h * (w - 1) / 2
    expected = np.minimum(np.arange(w) + shift, w - 1) * 4
    np.testing.assert_allclose(out[0, 5, :, 0], expected, atol=1e-3)


def test_warp_field_resized_to_image_and_matches_bicubic_draw():
    field = make_warp_field(4, 32, seed=0)
    assert field.shape == (32, 32, 2) and field.dtype == np.float32
    assert abs(np.abs(field).mean() - 1.0) < 0.3  # normalized by its mean |value| before upsampling
    t = Trigger("warp", noise=field, strength=0.5)
    out = t.apply(_rgb_batch(h=32, w=64))
    assert out.shape == (4, 32, 64, 3)


def _bilinear_warp(x, field, strength):
    """WaNet's warp as the textbook formula: four gathers, ``top * (1 - wy) + bottom * wy`` (the definition the fast
    warp must give bit for bit)."""
    from scanner.data.triggers import warp_grid

    n, h, w, c = x.shape
    py, px = warp_grid(field, strength, h, w)
    y0 = np.clip(np.floor(py).astype(np.int64), 0, h - 1)
    x0 = np.clip(np.floor(px).astype(np.int64), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (py - y0).astype(np.float32)[None, :, :, None], (px - x0).astype(np.float32)[None, :, :, None]
    at = lambda yy, xx: x[:, yy, xx]  # noqa: E731
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


@pytest.mark.parametrize("n,h,w,c", [(3, 224, 224, 3), (70, 32, 32, 3), (37, 28, 28, 1), (5, 17, 40, 3), (2, 9, 9, 5)])
def test_warp_gives_the_bilinear_formula_bit_for_bit(n, h, w, c):
    # images in groups (70 of 32x32 is two groups), gray, odd sizes, more channels than OpenCV's remap takes
    x = (np.random.RandomState(n).rand(n, h, w, c) * 255).astype(np.float32)
    field = make_warp_field(4, max(h, w), seed=n)[:h, :w]
    for strength in (0.5, 3.0, 9.0):
        want = _bilinear_warp(x, field, strength)
        assert np.array_equal(warp(x, field, strength), want)
        out = np.full_like(x, -1.0)
        assert warp(x, field, strength, out=out) is out and np.array_equal(out, want)
    assert warp(x[:0], field, 1.0).shape == (0, h, w, c)


def test_filter_in_place_steps_give_the_formula():
    x = (np.random.RandomState(1).rand(6, 20, 24, 3) * 255).astype(np.float32)
    m = np.array([[0.39, 0.77, 0.19], [0.35, 0.69, 0.17], [0.27, 0.53, 0.13]], np.float32)
    bias, gamma, v = np.array([12.0, -4.0, 3.0], np.float32), 1.3, 0.4
    y = np.clip(x @ m.T + bias, 0, 255)
    y = np.float32(255) * (y / np.float32(255)) ** np.float32(gamma)
    yy, xx = np.meshgrid(np.linspace(-1, 1, 20), np.linspace(-1, 1, 24), indexing="ij")
    want = np.clip(y * (1 - v * (yy**2 + xx**2) / 2)[None, :, :, None], 0, 255)
    np.testing.assert_allclose(color_filter(x, m, bias, gamma, v), want, rtol=1e-5, atol=1e-3)
    out = np.zeros_like(x)
    assert color_filter(x, m, bias, gamma, v, out=out) is out
    assert np.array_equal(out, color_filter(x, m, bias, gamma, v))


def test_filter_identity_known_value_and_roundtrip(tmp_path):
    x = _rgb_batch()
    eye = Trigger("filter", matrix=np.eye(3).tolist(), bias=[0, 0, 0])
    assert np.array_equal(eye.apply(x), x)
    xf = np.full((1, 5, 5, 3), [100.0, 50.0, 10.0], np.float32)
    m = [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    out = color_filter(xf, m, bias=[10, 0, -5])
    np.testing.assert_allclose(out[0, 2, 2], [85.0, 50.0, 15.0], atol=1e-4)
    gam = color_filter(np.full((1, 1, 1, 3), 64.0, np.float32), np.eye(3), gamma=2.0)
    np.testing.assert_allclose(gam[0, 0, 0], 255 * (64 / 255) ** 2, rtol=1e-5)
    vig = color_filter(np.full((1, 5, 5, 3), 200.0, np.float32), np.eye(3), vignette=0.5)
    assert vig[0, 2, 2, 0] == pytest.approx(200.0) and vig[0, 0, 0, 0] == pytest.approx(100.0)
    t = Trigger("filter", matrix=m, bias=[10, 0, -5], gamma=1.2, vignette=0.3)
    t.save(tmp_path / "f.json")
    back = Trigger.load(tmp_path / "f.json")
    assert back.gamma == 1.2 and back.vignette == 0.3 and back.extra == {}
    assert np.array_equal(back.apply(x), t.apply(x))
    assert back.apply(x.astype(np.float32)).dtype == np.float32
    assert "gamma 1.2" in back.describe()


def test_signal_known_value_identity_and_roundtrip(tmp_path):
    x = np.full((2, 4, 12, 3), 100, np.uint8)
    out = Trigger("signal", delta=20, frequency=3).apply(x.astype(np.float32))
    expected = 100 + 20 * np.sin(2 * np.pi * np.arange(12) * 3 / 12)
    np.testing.assert_allclose(out[1, 3, :, 2], expected, atol=1e-4)
    assert np.array_equal(Trigger("signal", delta=0).apply(x), x)
    clipped = signal(np.full((1, 1, 8, 1), 250.0, np.float32), delta=20, frequency=2)
    assert clipped.max() == 255.0
    t = Trigger("signal", delta=20, frequency=6)
    t.save(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"kind": "signal", "delta": 20.0, "frequency": 6.0}
    back = Trigger.load(tmp_path / "s.json")
    y = _rgb_batch()
    assert back.apply(y).dtype == np.uint8 and np.array_equal(back.apply(y), t.apply(y))
    assert back.describe() == "signal delta 20 frequency 6"


def test_patch_random_positions_deterministic_per_index(tmp_path):
    patch = np.full((3, 3, 3), 255.0, np.float32)
    t = Trigger("patch", patch, "random", margin=1, seed=5)
    x = np.zeros((50, 32, 32, 3), np.uint8)
    out = t.apply(x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert (out.reshape(50, -1).sum(1) == 27 * 255).all()  # one whole patch per image, inside the image
    ys, xs = random_positions(50, 32, 32, 3, 3, seed=5, margin=1)
    assert ys.min() >= 1 and ys.max() <= 28 and xs.min() >= 1 and xs.max() <= 28
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 30  # positions vary
    for i in (0, 17, 49):
        assert (out[i, ys[i]:ys[i] + 3, xs[i]:xs[i] + 3] == 255).all()
    # image i's position depends on the seed and i only, not on the rest of the batch
    assert np.array_equal(t.apply(x[:7]), out[:7])
    assert np.array_equal(t.apply(x[20:30], start=20), out[20:30])
    assert not np.array_equal(Trigger("patch", patch, "random", seed=6).apply(x), out)
    np.testing.assert_array_equal(patch_random(x.astype(np.float32), patch, seed=5, margin=1), out.astype(np.float32))
    t.save(tmp_path / "r.json")
    spec = json.loads((tmp_path / "r.json").read_text())
    assert spec["position"] == "random" and spec["seed"] == 5
    back = Trigger.load(tmp_path / "r.json")
    assert back.seed == 5 and back.extra == {}
    assert np.array_equal(back.apply(x), out)
    assert "random positions" in back.describe()


def test_new_kinds_are_fast_enough():
    import time

    x = np.random.RandomState(0).rand(10000, 32, 32, 3).astype(np.float32) * 255
    kinds = [
        Trigger("warp", noise=make_warp_field(4, 32, seed=0), strength=0.5),
        Trigger("filter", matrix=np.eye(3).tolist(), gamma=1.2, vignette=0.3),
        Trigger("signal", delta=20, frequency=6),
        Trigger("patch", np.full((3, 3, 3), 255.0, np.float32), "random", seed=1),
    ]
    for t in kinds:
        t0 = time.perf_counter()
        t.apply(x)
        assert time.perf_counter() - t0 < 6.0, t.kind  # about a second on an idle core; slack for a busy CI


@pytest.mark.parametrize(
    "spec,msg",
    [
        ({"kind": "warp", "strength": 0.5}, "field"),
        ({"kind": "warp", "field": "missing.npy"}, "not found"),
        ({"kind": "filter", "matrix": [[1, 0], [0, 1]]}, "3x3"),
        ({"kind": "filter"}, "3x3"),
        ({"kind": "filter", "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "gamma": -1}, "gamma"),
        ({"kind": "signal", "delta": "big"}, "bad trigger value"),
        ({"kind": "blend", "alpha": 0.2}, "needs the keys"),
    ],
)
def test_bad_new_trigger_files(tmp_path, spec, msg):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ScannerError, match=msg):
        Trigger.load(path)


def test_bad_warp_field_shape(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((8, 8, 3), np.float32))
    (tmp_path / "w.json").write_text(json.dumps({"kind": "warp", "field": "f.npy"}))
    with pytest.raises(ScannerError, match="noise field"):
        Trigger.load(tmp_path / "w.json")
