"""The verdict and `scanner sanitize` without --probe, on zoo models."""

import json

import numpy as np
import pytest
from conftest import CLEAN, MODELS, RGB as rgb, TEST, rgb_entry, zoo_entry, zoo_path

from scanner.context import ModelContext
from scanner.detect.verdict import anomaly_index
from scanner.detect.weights import channel_lipschitz


def test_anomaly_index_small_side():
    sizes = np.log([0.01, 0.2, 0.25, 0.3, 0.2, 0.22, 0.28, 0.3, 0.25, 0.24])
    index, _, _ = anomaly_index(sizes)
    assert index[0] > 2 and (index[1:] < 2).all()
    flat = anomaly_index(np.log([0.3] * 10))[0]
    assert (flat == 0).all()  # the spread floor: equal sizes are not anomalies


def test_specificity_compares_with_the_other_classes_at_its_size_or_larger():
    from scanner.detect.families import Candidate
    from scanner.detect.verdict import SPECIFIC, specificity

    def filt(success, changed, alpha):
        c = Candidate("filter", 0, alpha=alpha, shape=(8, 8), base=0.2, success=success)
        c.changed = changed
        return c

    cand = filt(0.95, 0.85, 0.8)
    robust = [filt(0.05, 0.2, 1.0), filt(0.1, 0.25, 1.0), filt(0.0, 0.3, 0.9)]
    assert specificity(cand, robust, 200) >= SPECIFIC  # the model shrugs the family off, except for one class
    fragile = [filt(0.3, 0.8, 1.0), filt(0.2, 0.75, 1.0), filt(0.4, 0.85, 0.9)]
    assert specificity(cand, fragile, 200) < SPECIFIC  # any filter of that size changes most predictions
    smaller = [filt(0.05, 0.05, 0.1)] * 3  # weaker filters say nothing about this one's size
    assert specificity(cand, robust[:2] + smaller, 200) is None
    assert specificity(cand, robust, 10) < specificity(cand, robust, 200)  # few checked images, less evidence


def test_clp_same_for_folded_and_unfused_batchnorm():
    rows = [channel_lipschitz(ctx.proto, ctx.layers)["layers"] for ctx in (ModelContext.open(zoo_path(n)) for n in
            ("cnn_badnets", "cnn_badnets_legacy", "cnn_badnets_bnunfused"))]
    for layer in zip(*rows):
        assert len({r["channels"] for r in layer}) == 1
        assert max(r["max_z"] for r in layer) - min(r["max_z"] for r in layer) < 1e-2
    assert rows[2][0]["batchnorm"] == "unfused BatchNormalization"


def _evaluate(path, trigger, target):
    from scanner.commands.evaluate import evaluate

    report = evaluate(path, TEST, trigger, target, threads=2)
    m = report["models"][0]
    return m["clean_accuracy"], m["attack_success_rate"]


def _sanitize(run_cli, tmp_path, name):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, err = run_cli("sanitize", zoo_path(name), "--data", CLEAN, "-o", out, "--report", report,
                           "--triggers-dir", tmp_path / "triggers", "--threads", "2")
    return code, out, json.loads(report.read_text()), err


def test_clean_model_not_flagged(run_cli, tmp_path):
    code, out, report, err = _sanitize(run_cli, tmp_path, "cnn_clean")
    assert code == 0, err
    assert report["verdict"] == "clean" and report["targets"] == []
    assert not out.exists() and report["output"] is None
    assert "no model written" in err


@pytest.mark.parametrize("name", ["cnn_badnets", "cnn_blend"])
def test_backdoor_flagged_and_removed(run_cli, tmp_path, name):
    entry = zoo_entry(name)
    code, out, report, err = _sanitize(run_cli, tmp_path, name)
    assert code == 1, err
    assert report["verdict"] == "backdoored"
    assert entry["target"] in report["targets"]
    assert out.exists() and report["output"] == str(out)
    assert report["repair"]["after"]["agreement"] >= 0.97
    assert max(report["repair"]["after"]["probe_success"]) < 0.1  # the synthesized triggers stop working
    saved = [t for t in report["triggers"] if t["flagged"]]
    assert saved and all((tmp_path / "triggers" / f"class{t['target']}_{t['family']}.png").exists() for t in saved)
    trigger = MODELS / entry["trigger"]
    acc0, asr0 = _evaluate(zoo_path(name), trigger, entry["target"])
    acc1, asr1 = _evaluate(out, trigger, entry["target"])
    assert asr0 > 0.9
    assert asr1 < 0.25  # the real trigger, never seen by the scanner
    assert acc0 - acc1 <= 0.02


def test_repair_rounds_take_triggers_of_every_family(run_cli, tmp_path):
    """The RGB sticker backdoor (random-position 3x3 patch, target 5): after the first refit a warp trigger still
    works, and it joins the probes with its variants (this crashed while only patch and blend had variants). The
    refit leaves it at 42%: found, NOT removed, nothing written; exit 4. Without the activation clipping and the
    feature refit: with either, no trigger works after the first refit at this budget (the model is removed)."""
    from scanner.commands.sanitize import MAX_VARIANTS
    from scanner.detect.families import FAMILIES

    assert set(MAX_VARIANTS) == set(FAMILIES)
    out = tmp_path / "s.onnx"
    rc, stdout, err = run_cli("sanitize", rgb / "rgb10_vgg_sticker.onnx", "--data", rgb / "data" / "rgb10_clean.npz",
                              "--queries", "40000", "--budget", "0", "--threads", "2", "--no-clip", "--no-feature-refit", "-o", out,
                              "--format", "json")
    assert rc == 4, err
    report = json.loads(stdout)
    assert report["targets"] == [5] and report["outcome"] == "not_removed" and not out.exists()
    again = [w["trigger"] for r in report["repair"]["rounds"] for w in r.get("still_working", [])]
    assert any(t.startswith("warp") for t in again)
    assert report["repair"]["clip"] is None


def _rgb_verdict(name):
    """The verdict of the blind search on an RGB zoo model, as `scanner sanitize` runs it (its clean images less the
    held-out part, the default query budget, seed 0)."""
    from scanner.data.images import ImageSet, cached, holdout_split
    from scanner.detect.synthesis import Config, Synthesizer
    from scanner.detect.verdict import decide

    ctx = ModelContext.open(rgb / f"{name}.onnx", device="cpu", threads=2)
    data = rgb / "data" / f"{name.split('_')[0]}_clean.npz"
    images, _, _ = holdout_split(cached(ImageSet(data), ctx.preprocess))
    cfg = Config(budget=None, seed=0)
    synth = Synthesizer.for_model(ctx, images.load_all(ctx.preprocess).pixels, cfg)
    return decide(synth.run(), ctx)


@pytest.mark.parametrize("name, flagged", [("rgb10_preact_all2all", True), ("rgb10_preact_clean", False),
                                           ("rgb1000_preact_clean", False)])
def test_all_to_all_found_by_what_a_patch_changes(name, flagged):
    """All-to-all BadNets (y -> y + 1): no class's trigger works (each source goes elsewhere), so no size stands out;
    the synthesized 3x3 patches change most held-out predictions instead. Its clean twin's patches do not; nor does
    the 1,000-class clean model's, whose search checks each trigger on 18 images only (11 of them changed: no
    evidence at that count)."""
    from scanner.detect.verdict import ALL_TO_ALL_CHANGED

    verdict = _rgb_verdict(name)
    spread = [c for c in verdict["candidates"] if c.get("kind") == "all-to-all"]
    assert bool(spread) == flagged and (verdict["verdict"] == "backdoored") == flagged
    assert all(c["family"] == "patch" and c["changed"] - c["success"] >= ALL_TO_ALL_CHANGED for c in spread)


@pytest.mark.parametrize("name", ["rgb10_mobilenetv2_clean", "rgb10_vit_clean"])
def test_a_clean_model_of_each_architecture_is_not_flagged(name):
    """The clean MobileNetV2 (depthwise, BN kept) and the clean ViT of the RGB zoo's tune split pass the blind search
    with no candidate at all: no class's trigger is small, specific or spread enough to be suspicious. The clean
    pre-activation ResNet and VGG are judged in the all-to-all and filter tests of this module."""
    verdict = _rgb_verdict(name)
    assert verdict["verdict"] == "clean" and verdict["targets"] == [] and verdict["candidates"] == []
    assert verdict["evidence"]["synthesis"]["queries"] > 0


@pytest.mark.parametrize("name, target", [("rgb10_vgg_filter", 4), ("rgb10_vgg_clean", None)])
def test_filter_backdoor_found_by_its_specificity(name, target):
    """A sepia + vignette filter backdoor (TrojAI's kind, target 4): the search finds a filter with a vignette that
    sends over 90% of the images to class 4, while the other classes' filters, as strong or stronger, change about a
    quarter of the predictions. No other class's filter works, so its size anomaly is censored (under 4); its
    specificity makes it backdoored. The clean VGG's filters work for no class."""
    from scanner.detect.verdict import SPECIFIC

    verdict = _rgb_verdict(name)
    if target is None:
        assert verdict["verdict"] == "clean" and verdict["targets"] == []
        return
    assert verdict["verdict"] == "backdoored" and verdict["targets"] == [target]
    (cand,) = [c for c in verdict["candidates"] if c["level"] == "backdoored"]
    assert cand["family"] == "filter" and cand["specificity"] >= SPECIFIC and cand["anomaly"] < 4


def test_a_repair_that_leaves_a_synthesized_trigger_at_a_tenth_is_not_called_removed(run_cli, tmp_path):
    """rgb10_preact_badnets_1pct (1% poisoning, patch -> 6): the blind repair leaves its synthesized patch at about 15%
    of the held-out images. That is not removed (dead under RESIDUAL_SUCCESS = 10%): exit 4, and the model written
    with --always still carries the real trigger over the 10% a sanitized model may keep, so the refusal is right."""
    from models import metrics
    from scanner.data.triggers import Trigger
    from scanner.repair.verify import RESIDUAL_SUCCESS

    entry = rgb_entry("rgb10_preact_badnets_1pct")
    out = tmp_path / "s.onnx"
    rc, stdout, err = run_cli("sanitize", rgb / entry["file"], "--data", rgb / "data" / "rgb10_clean.npz", "--budget", "0",
                              "--threads", "2", "--always", "-o", out, "--format", "json")
    assert rc == 4, err
    report = json.loads(stdout)
    assert report["targets"] == [6] and report["outcome"] == "not_removed" and report["written_despite_backdoor"]
    worst = max(p["success_after"] for p in report["removal"]["probes"])
    assert RESIDUAL_SUCCESS <= worst < 0.25 and any("still sends" in r for r in report["removal"]["reasons"])
    runner = ModelContext.open(out, device="cpu", threads=2).runner(batch_size=1000)
    x, y = metrics.sample(entry["dataset"])
    trig = entry["triggers"][0]
    asr = metrics.attack_success(lambda px: runner.run(px).preds, entry, Trigger.load(rgb / trig["file"]), trig["target"], x, y)
    assert asr > RESIDUAL_SUCCESS, asr
