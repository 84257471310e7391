"""The scan ranks the channels whose l-inf rises most under the trigger first (checked independently)."""

import numpy as np
import pytest

from conftest import CLEAN, MODELS, zoo_manifest
from scanner.data.images import ImageSet
from scanner.data.preprocess import resolve_preprocess
from scanner.graph.instrument import instrument
from scanner.graph.layers import discover
from scanner.graph.model import load_model
from scanner.runtime.session import Session
from scanner.commands.scan import scan
from scanner.data.triggers import Trigger


def _backdoored():
    try:
        return [m["name"] for m in zoo_manifest()["models"] if m["trigger"]]
    except BaseException:
        return []


def independent_linf_rise(path, trigger, limit):
    """Mean per-image l-inf of each last-conv channel, probe minus clean, from the exposed activation map."""
    model = load_model(path)
    pre = resolve_preprocess(model.input.shape, model.input.dtype, model.metadata)
    last = next(l for l in discover(model.proto) if l.is_last_conv)
    tap = instrument(model.proto, [last], norms=False, expose=True)
    session = Session(tap.model, "cpu")
    pixels = ImageSet(CLEAN, limit=limit).load_all(pre).pixels
    maps = {}
    for name, px in (("clean", pixels), ("probe", trigger.apply(pixels, color=pre.color))):
        a = session.run(pre.to_tensor(px), [tap.taps[last.id]])[tap.taps[last.id]]
        maps[name] = np.abs(a.astype(np.float64)).reshape(len(a), last.channels, -1).max(2).mean(0)
    return last, maps["probe"] - maps["clean"]


@pytest.mark.parametrize("name", _backdoored())
def test_top_channels_are_the_largest_linf_rises(name):
    entry = next(m for m in zoo_manifest()["models"] if m["name"] == name)
    trigger_path = MODELS / entry["trigger"]
    report = scan(MODELS / entry["file"], CLEAN, trigger_path, "last", "cpu", limit=300, top=5)
    last, rise = independent_linf_rise(MODELS / entry["file"], Trigger.load(trigger_path), 300)
    assert report["layers"][0]["id"] == last.id
    got = [row["channel"] for row in report["top_channels"]]
    assert got == list(np.argsort(-rise, kind="stable")[:5])
    np.testing.assert_allclose([row["linf_rise"] for row in report["top_channels"]], np.sort(rise)[::-1][:5], rtol=1e-4)
    assert report["probe"]["effect"]["dominant_class"] == entry["target"]


def test_scan_report_statistics_are_consistent():
    report = scan(MODELS / "cnn_badnets.onnx", CLEAN, None, "all", "cpu", limit=200)
    assert [l["is_last_conv"] for l in report["layers"]].count(True) == 1
    for layer in report["layers"]:
        c = layer["clean"]
        for k in ("linf", "l1", "l2"):
            assert len(c[k]["mean"]) == layer["channels"]
            assert all(lo <= hi + 1e-6 for lo, hi in zip(c[k]["q50"], c[k]["max"]))
            assert all(np.isfinite(v) for v in c[k]["mean"])
        assert all(r <= 1 + 1e-6 for r in c["linf_over_l1"])  # a peak never exceeds the sum
    assert report["data"]["clean"]["images"] == 200 and "probe" not in report
