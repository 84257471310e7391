"""Trigger synthesis on zoo models: the trigger it finds works, and the same seed gives the same result."""

import numpy as np
import pytest
from conftest import CLEAN, zoo_entry, zoo_path

from scanner.context import ModelContext
from scanner.data.images import ImageSet
from scanner.detect.synthesis import Config, Synthesizer, search_runner, variants
from scanner.data.triggers import Trigger

SMALL = dict(steps=40, val_images=160, budget=None)


def _synth(name, families, targets, seed=0, **kw):
    ctx = ModelContext.open(zoo_path(name), threads=2)
    pixels = ImageSet(CLEAN, limit=400).load_all(ctx.preprocess).pixels
    return Synthesizer(search_runner(ctx), pixels, Config(seed=seed, families=families, **{**SMALL, **kw})).run(targets)


def _asr(name, trigger, target, limit=400):
    """Success of ``trigger`` on clean images the model does not already put in ``target``."""
    ctx = ModelContext.open(zoo_path(name), threads=2)
    runner = ctx.runner()
    pixels = ImageSet(CLEAN, limit=limit).load_all(ctx.preprocess).pixels
    clean = runner.run(pixels).preds
    hit = runner.run(trigger.apply(pixels, color=ctx.preprocess.color)).preds
    keep = clean != target
    return float((hit[keep] == target).mean())


def test_badnets_patch_found():
    target = zoo_entry("cnn_badnets")["target"]
    result = _synth("cnn_badnets", ("patch",), [target, (target + 1) % 10])
    found = result.classes[0].found["patch"]
    assert found.success >= 0.9
    assert found.size <= 0.03  # the real trigger is 3x3 (1.1% of the image)
    y, x, h, w = found.box
    assert y + h > 20 and x + w > 20  # near the real trigger's corner (bottom-right)
    other = result.classes[1].found["patch"]
    assert other.success < 0.9 or other.size > 4 * found.size
    assert result.classes[0].fingerprint["patch"]["z"][0] > 5


def test_blend_found_and_saved_trigger_works(tmp_path):
    target = zoo_entry("cnn_blend")["target"]
    result = _synth("cnn_blend", ("blend",), [target])
    found = result.classes[0].found["blend"]
    assert found.success >= 0.9
    assert found.alpha <= 0.2  # the real blend uses alpha 0.2; clean classes need far more
    path = found.trigger(result.color).save(tmp_path / "synth.json")
    reloaded = Trigger.load(path)
    assert reloaded.kind == "blend" and reloaded.extra["target"] == target
    assert _asr("cnn_blend", reloaded, target) >= 0.85


def test_same_seed_same_result():
    runs = [_synth("cnn_badnets", ("patch", "blend"), [0, 3], seed=s, steps=15) for s in (5, 5)]
    a, b = (r.to_dict() for r in runs)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    for ra, rb in zip(runs[0].classes, runs[1].classes):
        for fam in ra.found:
            assert np.array_equal(ra.found[fam].pattern, rb.found[fam].pattern)


def test_variants_stay_in_the_image():
    from scanner.detect.families import Candidate

    cand = Candidate("patch", 0, np.zeros((3, 3, 1), np.float32), (25, 25, 3, 3), shape=(28, 28))
    found = variants(cand, (28, 28))
    assert sum(v.box[2:] != (3, 3) for v in found) == 4  # crops
    for v in found:
        y, x, h, w = v.box
        assert 0 <= y and y + h <= 28 and 0 <= x and x + w <= 28 and v.pattern.shape[:2] == (h, w)
        assert v.box != cand.box
    blend = Candidate("blend", 0, np.zeros((28, 28, 1), np.float32), alpha=0.3, shape=(28, 28))
    assert [v.alpha for v in variants(blend, (28, 28))] == pytest.approx([0.6, 0.45])
