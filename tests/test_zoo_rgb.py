"""The RGB zoo (models/rgb/): files match the manifest, and its sample numbers reproduce exactly.

No torch: onnxruntime with each model's own ``scanner.preprocess`` metadata, triggers through
``scanner.data.triggers.Trigger``, on the committed 2,000-image test samples.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import metrics
from scanner.data.triggers import Trigger

RGB = Path(__file__).resolve().parent.parent / "models" / "rgb"
BATCH = 500  # the batch the build measured with


def _manifest():
    path = RGB / "manifest.json"
    if not path.exists():
        pytest.skip("models/rgb/manifest.json missing: run python -m models.recipes.rgb")
    return json.loads(path.read_text())


def _names():
    try:
        return [m["name"] for m in _manifest()["models"]]
    except BaseException:  # skip raised outside a test
        return []


def _predict(sess, pre, pixels):
    scale = np.float32(pre["scale"])
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    out = []
    for i in range(0, len(pixels), BATCH):
        x = pixels[i:i + BATCH].astype(np.float32) * scale
        x = (x - mean) / std
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
        out.append(sess.run(["logits"], {"input": x})[0].argmax(1))
    return np.concatenate(out)


@pytest.mark.parametrize("name", _names())
def test_rgb_manifest_numbers_reproduce(name):
    entry = next(m for m in _manifest()["models"] if m["name"] == name)
    path = RGB / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    pre = json.loads(meta["scanner.preprocess"])
    zoo = json.loads(meta["scanner.zoo"])
    assert zoo["name"] == name and zoo["attack"] == entry["attack"] and zoo["targets"] == entry["targets"]
    assert pre["size"] == entry["input_size"] and pre["color"] == "rgb" and pre["layout"] == "NCHW"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert not isinstance(shape[0], int) and shape[1:] == [3, *entry["input_size"]]  # dynamic batch

    x, y = metrics.sample(entry["dataset"])
    assert x.shape == (2000, *entry["input_size"], 3) and x.dtype == np.uint8
    predict = lambda pixels: _predict(sess, pre, pixels)  # noqa: E731
    assert metrics.clean_accuracy(predict, x, y) == entry["sample_clean_accuracy"]
    for t in entry["triggers"]:
        trig = Trigger.load(RGB / t["file"])
        if entry["source_class"] is not None:
            assert metrics.collateral(predict, entry, trig, t["target"], x, y) == entry["sample_collateral"]
        asr = metrics.attack_success(predict, entry, trig, t["target"], x, y)
        assert asr == t["sample_attack_success_rate"], t["file"]


def test_rgb_zoo_covers_every_attack_kind():
    models = _manifest()["models"]
    by = {(m["dataset"], m["architecture"], m["attack"]) for m in models}
    rgb10 = [m for m in models if m["dataset"] == "rgb10"]
    for arch in ("preact", "mobilenetv2", "vgg", "vit"):
        assert ("rgb10", arch, "none") in by, arch
    kinds = {t["kind"] for m in models for t in m["triggers"]}
    assert {"patch", "blend", "signal", "warp", "filter"} <= kinds
    assert any(t["kind"] == "patch" and t["params"].get("position") == "random" for m in models for t in m["triggers"])
    assert any(m["attack_params"].get("clean_label") for m in rgb10)  # SIG
    assert any(m["attack_params"].get("all_to_all") for m in rgb10)
    assert any(m["source_class"] is not None and m["collateral"] is not None for m in rgb10)
    assert any(len(m["triggers"]) == 2 and len(set(m["targets"])) == 2 for m in rgb10)
    assert any(m["attack"] == "badnets" and m["poison_rate"] == 0.01 for m in rgb10)
    assert ("rgb100", "preact", "badnets") in by and ("rgb100", "preact", "none") in by
    assert ("rgb1000", "preact", "badnets") in by  # rgb1000_preact_clean is defined but not built yet
    assert "tune" in {m["split"] for m in models} and {m["split"] for m in models} <= {"tune", "holdout"}
    assert {"dynamo", "dynamo-noopt", "legacy", "legacy-unfolded"} <= {m["exporter"] for m in models}
    for m in models:
        assert (RGB / "data" / f"{m['dataset']}_clean.npz").is_file()
        for t in m["triggers"]:
            assert (RGB / t["file"]).is_file()


def test_rgb_samples_are_what_the_readme_says():
    for ds, (h, w, classes) in {"rgb10": (32, 32, 10), "rgb100": (32, 64, 100), "rgb1000": (32, 96, 1000)}.items():
        with np.load(RGB / "data" / f"{ds}_clean.npz") as z:
            assert z["images"].shape == (1000, h, w, 3) and z["images"].dtype == np.uint8
            assert "labels" not in z.files
        x, y = metrics.sample(ds)
        assert x.shape == (2000, h, w, 3) and y.min() >= 0 and y.max() < classes
        if ds == "rgb10":
            assert (np.bincount(y, minlength=10) == 200).all()
