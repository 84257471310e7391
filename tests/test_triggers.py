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
