"""Trigger synthesis on zoo models: the trigger it finds works, and the same seed gives the same result."""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import CLEAN, rgb_entry, without_timings, zoo_entry, zoo_path

from scanner.context import ModelContext
from scanner.data.images import ImageSet
from scanner.detect.synthesis import QUERIES_MIN, Config, Synthesizer, search_runner, variants
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


def test_filter_candidate_saves_as_the_trigger_it_stamps(tmp_path):
    """A synthesized filter with a gamma and a vignette (the search moves both) is saved as a filter trigger that
    stamps the same pixels, in RGB and in a BGR model's color order."""
    from scanner.detect.families import FILTERS, Candidate

    matrix, bias = (np.asarray(v, np.float32) for v in FILTERS["sepia"])
    cand = Candidate("filter", 4, alpha=0.7, shape=(16, 16), matrix=matrix, bias=bias, base=0.1, gamma=1.4,
                     vignette=0.5)
    x = np.random.RandomState(0).randint(0, 256, (5, 16, 16, 3)).astype(np.float32)
    stamped = cand.stamp(x)
    corner, centre = np.abs(stamped - x)[:, 0, 0].mean(), np.abs(stamped - x)[:, 7:9, 7:9].mean()
    assert corner > centre  # the vignette darkens the corners more
    assert "gamma 1.28" in cand.describe() and "vignette 0.35" in cand.describe()
    for color in ("rgb", "bgr"):
        path = tmp_path / f"filter_{color}.json"
        cand.trigger(color).save(path)
        reloaded = Trigger.load(path)
        assert reloaded.gamma == pytest.approx(1.28) and reloaded.vignette == pytest.approx(0.35)
        model_order = x if color == "rgb" else x[..., ::-1]
        again = reloaded.apply(model_order, color=color)
        want = stamped if color == "rgb" else cand.stamp(model_order)
        assert np.abs(again - want).max() < 0.05


# ---- the search at scale: a query budget, cost independent of the class count ----------------------------------

RGB = Path(__file__).resolve().parents[1] / "models" / "rgb"


def _rgb_gate(run_cli, name, *extra):
    """`scanner gate` on an RGB zoo model with its data set's clean images; (exit code, the model's entry)."""
    data = RGB / "data" / f"{name.split('_')[0]}_clean.npz"
    rc, out, err = run_cli("gate", RGB / f"{name}.onnx", "--data", data, "--threads", "2", "--format", "json", *extra)
    return rc, json.loads(out)["models"][0], err


def test_100_class_backdoor_flagged_with_its_target_and_its_clean_twin_passes(run_cli):
    entry = rgb_entry("rgb100_preact_badnets")
    rc, bad, err = _rgb_gate(run_cli, "rgb100_preact_badnets")
    assert rc == 1 and bad["verdict"] == "backdoored" and bad["targets"] == entry["targets"], err
    syn = bad["evidence"]["synthesis"]
    # 100 classes: screened together, a bounded number refined, inside the default budget
    assert syn["screening"]["classes"] == 100 and len(syn["classes"]) == 20 and syn["queries"] <= syn["plan"]["queries"]
    assert not syn["truncated"] and bad["thresholds"]["class_shift"] > 0
    rc, clean, err = _rgb_gate(run_cli, "rgb100_preact_clean")
    assert rc == 0 and clean["verdict"] == "clean", err


def test_same_report_under_cpu_load(run_cli):
    """The query budget, not the clock, decides the work: a CPU-burning process beside the scan changes nothing
    in the report but its timings."""
    args = ("gate", zoo_path("cnn_badnets"), "--data", CLEAN, "--limit", "200", "--queries", "15000", "--threads", "2",
            "--format", "json")
    rc, quiet, err = run_cli(*args)
    assert rc == 1, err
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        rc2, loaded, err = run_cli(*args)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert rc2 == rc, err
    assert without_timings(json.loads(loaded)) == without_timings(json.loads(quiet))


@pytest.mark.parametrize("name", ["rgb10_preact_clean", "rgb1000_preact_clean"])
def test_search_memory_does_not_grow_with_the_class_count(name):
    """Peak memory the search allocates (numpy, traced; the session's own arena is not) stays within a bound set
    by the batch of stamped images, at 10 and at 1000 classes alike."""
    ctx = ModelContext.open(RGB / f"{name}.onnx", threads=2)
    pixels = ImageSet(RGB / "data" / f"{name.split('_')[0]}_clean.npz", limit=300).load_all(ctx.preprocess).pixels
    cfg = Config(queries=QUERIES_MIN, budget=None)
    synth = Synthesizer(search_runner(ctx, cfg.batch_size), pixels, cfg)
    tracemalloc.start()
    try:
        result = synth.run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    batch = synth.batch * pixels[0].size * 4  # one chunk of stamped float32 images
    assert result.queries <= QUERIES_MIN and result.screening["classes"] == int(name[3:].split("_")[0])
    # measured: 4.4x (10 classes) and 4.5x (1000 classes) of one chunk; 9.7x at 1000 classes while the screening
    # kept a candidate per class
    assert peak < 6 * batch + 16 * 2**20, f"{peak / 2**20:.0f} MiB traced at {result.screening['classes']} classes"


def test_stamps_go_into_one_reused_buffer_and_equal_fresh_stamps():
    """Every family stamps into the search's buffer the same values as into a new array, pass after pass in the
    same memory; a buffer of the wrong shape or type is refused."""
    ctx = ModelContext.open(RGB / "rgb10_vgg_clean.onnx", threads=2)
    pixels = ImageSet(RGB / "data" / "rgb10_clean.npz", limit=120).load_all(ctx.preprocess).pixels
    s = Synthesizer.for_model(ctx, pixels, Config(seed=0))
    s._clean()
    x = s.x_search[:16]
    banks = s._templates()
    assert set(banks) == {"patch", "blend", "signal", "warp", "filter"}
    cands = [c.copy(target=1) for f in sorted(banks) for c in banks[f][:: max(1, len(banks[f]) // 3)][:3]]
    first = s._stamps(cands[:7], x)
    assert np.array_equal(first, np.concatenate([c.stamp(x) for c in cands[:7]]))
    second = s._stamps(cands[7:14], x)
    assert np.shares_memory(first, second) and second.dtype == np.float32
    assert np.array_equal(second, np.concatenate([c.stamp(x) for c in cands[7:14]]))
    with pytest.raises(ValueError, match="cannot go into"):
        cands[0].stamp(x, np.empty((15,) + x.shape[1:], np.float32))


def _bisect_every_step(s, cands, x, pred):
    """The calibration as it was before it skipped repeats: every candidate measured at every step."""
    from scanner.detect.families import FAMILIES

    fams = [FAMILIES[c.family] for c in cands]
    lo, hi = np.array([f.floor for f in fams]), np.full(len(cands), np.nan)
    top, trial = np.array([f.top(c) for f, c in zip(fams, cands)]), np.array([c.alpha for c in cands])
    for _ in range(s.cfg.calib_steps):
        tries = [c.copy(alpha=float(a)) for c, a in zip(cands, trial)]
        s._evaluate(tries, x, pred)
        works = np.array([t.success >= s.cfg.success for t in tries])
        hi, lo = np.where(works, trial, hi), np.where(works, lo, trial)
        trial = np.where(np.isnan(hi), np.where(lo >= top, top, np.minimum(trial * 1.6, top)),
                         np.sqrt(lo * np.nan_to_num(hi, nan=1.0)))
    return [float(a) if np.isfinite(a) else c.alpha for c, a in zip(cands, hi)]


def test_calibration_does_not_measure_a_failed_strongest_trigger_again():
    """A strength that failed at its family's strongest is not measured there again: the same strengths come out as
    when every candidate is measured at every step, for fewer queries."""
    from scanner.detect.families import Candidate

    ctx = ModelContext.open(zoo_path("cnn_blend"), threads=2)
    pixels = ImageSet(CLEAN, limit=300).load_all(ctx.preprocess).pixels
    s = Synthesizer(search_runner(ctx), pixels, Config(seed=0, budget=None))
    s._clean()
    x, pred = s.x_val[:64], s.val_pred[:64]
    target = zoo_entry("cnn_blend")["target"]
    real = Trigger.load(zoo_path("cnn_blend").parent / "triggers" / "blend_random.json")
    shape = x.shape[1:3]
    pattern = np.asarray(real.image, np.float32).reshape(shape + (1,))
    flat = np.full(shape + (1,), 127.0, np.float32)
    cands = [Candidate("blend", target, pattern, alpha=0.05, shape=shape)]
    cands += [Candidate("blend", k, flat, alpha=0.3, shape=shape) for k in range(10) if k != target]
    cands += [Candidate("signal", k, np.ones(shape + (1,), np.float32), alpha=0.1, shape=shape) for k in (0, 1)]
    strongest = [c.copy(alpha=1.0 if c.family == "blend" else 0.5) for c in cands]
    s._evaluate(strongest, x, pred)
    failed = sum(c.success < s.cfg.success for c in strongest)
    assert 0 < failed < len(cands), "some, not all, must fail at their family's strongest for this test to mean anything"
    expected = _bisect_every_step(s, [c.copy() for c in cands], x, pred)
    before = s.runner.queries
    s._calibrate(cands, x, pred)
    used = s.runner.queries - before
    assert [c.alpha for c in cands] == expected
    assert cands[0].alpha < 0.3  # the real pattern works at a small opacity
    assert used < s.cfg.calib_steps * len(cands) * len(x)
