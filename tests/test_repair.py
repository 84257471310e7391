"""prune, sanitize --probe, evaluate: verified outputs, real attack-success drops on zoo models."""

import json

import numpy as np
import onnx
import pytest

from conftest import CLEAN, MODELS, TEST, zoo_entry, zoo_path
from scanner.data.images import ImageSet
from scanner.commands.evaluate import evaluate_model
from scanner.fileio import atomic_path
from scanner.graph.model import load_model, sha256_file
from scanner.commands.prune import prune_model
from scanner.commands.sanitize import sanitize_with_probes
from scanner.context import ModelContext
from scanner.repair.prune import Repair
from scanner.repair.verify import RESIDUAL_SUCCESS, verify
from scanner.data.triggers import Trigger


def _ops(model):
    return [(n.op_type, n.name) for n in model.graph.node]


@pytest.fixture(scope="module")
def badnets_repair():
    entry = zoo_entry("cnn_badnets")
    return Repair(ModelContext.open(zoo_path("cnn_badnets"), device="cpu"), CLEAN, [MODELS / entry["trigger"]], "last")


def test_probe_target_is_found(badnets_repair):
    assert badnets_repair.targets == [zoo_entry("cnn_badnets")["target"]]
    assert badnets_repair.base.probe_success[0] > 0.95


def test_ranking_is_by_linf_rise(badnets_repair):
    ranked = badnets_repair.ranking()
    rise = badnets_repair.rise
    values = [rise[badnets_repair.runner.slices[i][0] + k] for i, k in ranked]
    assert values == sorted(values, reverse=True) and values[-1] > 0


def test_mask_sweep_matches_real_pruning(badnets_repair, tmp_path):
    plan = badnets_repair.plan(20)
    report, proto = prune_model(None, None, None, tmp_path / "p.onnx", count=20, rep=badnets_repair, always=True)
    assert report["pruned"] == [{"layer": lid, "channels": ch} for lid, ch in plan.items()]
    assert report["outcome"] == "not_removed"  # 20 channels leave the backdoor working (the paper's pruning)
    # The written model, run without masks in a session of its own, gives the report's "after" numbers
    # (measured through the sweep's mask inputs) and the same predictions as the masked sweep.
    from scanner.detect.scan import measure

    written = ModelContext.open(tmp_path / "p.onnx", device="cpu").runner()
    original = ModelContext.open(zoo_path("cnn_badnets"), device="cpu").runner()
    trigger = Trigger.load(MODELS / zoo_entry("cnn_badnets")["trigger"])
    target = badnets_repair.targets[0]
    fit = badnets_repair.clean_set  # the images the sweep measured (the rest is held out for the removal check)
    clean0, _ = original.predict(fit)
    clean1, _ = written.predict(fit)
    hit1, _ = written.predict(fit, trigger)
    others = clean0 != target
    assert report["after"]["agreement"] == round(float((clean1 == clean0).mean()), 6)
    assert report["after"]["probe_success"] == [round(float((hit1[others] == target).mean()), 6)]
    assert report["after"]["channels"] == 20
    sweep = measure(badnets_repair.runner, badnets_repair.clean_set, masks=badnets_repair.masks(plan), norms=False)
    assert np.array_equal(clean1, sweep.preds)


def test_prune_that_leaves_the_backdoor_writes_nothing(badnets_repair, tmp_path):
    out = tmp_path / "pruned.onnx"
    report, proto = prune_model(None, None, None, out, count=8, rep=badnets_repair)
    assert report["outcome"] == "not_removed" and proto is None and not out.exists() and report["output"] is None
    check = report["removal"]
    assert check["held_out"] and check["images"] == 200 and not check["removed"]
    assert check["probes"][0]["success_after"] >= RESIDUAL_SUCCESS and "still sends" in check["reasons"][0]


def test_prune_output_verified_and_metadata_kept(badnets_repair, tmp_path):
    out = tmp_path / "pruned.onnx"
    before = sha256_file(zoo_path("cnn_badnets"))
    report, _ = prune_model(None, None, None, out, count=8, rep=badnets_repair, always=True)
    assert report["outcome"] == "not_removed" and report["written_despite_backdoor"] and report["output"] == str(out)
    assert sha256_file(zoo_path("cnn_badnets")) == before  # input untouched
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    meta = {p.key: p.value for p in m.metadata_props}
    assert "scanner.preprocess" in meta
    record = json.loads(meta["scanner.sanitize"])
    assert record["pruned"][0]["channels"] == badnets_repair.plan(8)[record["pruned"][0]["layer"]]
    assert [(i.name) for i in m.graph.input] == [i.name for i in load_model(zoo_path("cnn_badnets")).proto.graph.input]


def test_empty_prune_is_identical(badnets_repair, tmp_path):
    report, proto = prune_model(None, None, None, tmp_path / "e.onnx", count=0, rep=badnets_repair, always=True)
    assert report["pruned_count"] == 0 and report["after"] == report["before"]
    checks = verify(badnets_repair, proto, {}, exact=True)
    assert checks["passed"] and checks["identical_scores"]


def test_existing_output_needs_force(badnets_repair, tmp_path):
    from scanner.errors import ScannerError

    out = tmp_path / "p.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(ScannerError, match="--force"):
        prune_model(zoo_path("cnn_badnets"), CLEAN, MODELS / "triggers" / "badnets_3x3.json", out, count=1)
    assert out.read_bytes() == b"keep me"


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.onnx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("name", ["cnn_badnets", "cnn_blend", "resnet_badnets"])
def test_refit_removes_backdoor_and_keeps_graph(name, clip, tmp_path):
    from scanner.graph.surgery import CLIP_SUFFIX

    entry = zoo_entry(name)
    out = tmp_path / "s.onnx"
    report, proto, found = sanitize_with_probes(zoo_path(name), CLEAN, [MODELS / entry["trigger"]], out, device="cpu",
                                                clip=clip)
    assert found and report["backdoor_found"] and report["verified"]
    assert report["outcome"] == "removed" and report["removal"]["held_out"] and out.exists()
    original = load_model(zoo_path(name)).proto
    bounds = [n for n in proto.graph.node if n.name.endswith(CLIP_SUFFIX)]
    # Same graph, new weights; with the clipping, plus its Min / Max nodes and nothing else.
    assert [(n.op_type, n.name) for n in proto.graph.node if n not in bounds] == _ops(original)
    # the clipping's bounds stay unless the feature refit of the unclipped model was kept ("used": False)
    assert bool(bounds) == (clip and report["clip"]["chosen"] is not None and report["clip"].get("used", True))
    assert {n.op_type for n in bounds} <= {"Min", "Max"}
    assert report["after"]["agreement"] >= 0.97  # cross-validated on the defender's clean set
    images = ImageSet(TEST, labeled=True)
    trigger = Trigger.load(MODELS / entry["trigger"])
    before, preds_before = evaluate_model(zoo_path(name), images, trigger, entry["target"], "cpu")
    after, preds_after = evaluate_model(out, images, trigger, entry["target"], "cpu")
    assert (preds_before == preds_after).mean() >= 0.98  # agreement on the committed test sample
    assert after["attack_success_rate"] < 0.10 < before["attack_success_rate"]
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.02


def test_refit_that_misses_the_agreement_writes_nothing(tmp_path):
    """resnet_blend with its true trigger, head refit alone (no clipping): the refit kills the trigger, but agrees with
    the original on only 97.5% of the held-out clean images (the check asks for 98%): found, NOT removed, nothing
    written."""
    entry = zoo_entry("resnet_blend")
    out = tmp_path / "s.onnx"
    report, proto, found = sanitize_with_probes(zoo_path("resnet_blend"), CLEAN, [MODELS / entry["trigger"]], out, device="cpu",
                                                clip=False)
    check = report["removal"]
    assert found and report["outcome"] == "not_removed" and proto is None and not out.exists()
    assert check["probes"][0]["dead"] and check["agreement"] < 0.98
    assert any("agreement" in r for r in check["reasons"])


def test_clean_model_probe_does_not_move_it(tmp_path):
    report, proto, found = sanitize_with_probes(zoo_path("cnn_clean"), CLEAN, [MODELS / "triggers" / "badnets_3x3.json"], tmp_path / "c.onnx", device="cpu")
    assert not found and proto is None and not (tmp_path / "c.onnx").exists()


def test_unpaired_probe_folder_falls_back_to_prune(tmp_path, caplog):
    entry = zoo_entry("cnn_badnets")
    trigger = Trigger.load(MODELS / entry["trigger"])
    import cv2

    from scanner.data.preprocess import Preprocess

    pixels = ImageSet(CLEAN, limit=200).load_all(Preprocess(size=(28, 28), color="gray")).pixels
    folder = tmp_path / "redteam"
    folder.mkdir()
    for i, img in enumerate(trigger.apply(pixels)):
        cv2.imwrite(str(folder / f"red_{i:04d}.png"), img)
    report, proto, found = sanitize_with_probes(zoo_path("cnn_badnets"), CLEAN, [folder], tmp_path / "s.onnx", device="cpu", limit=200)
    assert found and report["rule"]["method"] == "prune" and not report["probes"][0]["paired"]
    assert report["after"]["probe_success"][0] < report["before"]["probe_success"][0]


def test_cli_prune_then_evaluate_compare(run_cli, tmp_path):
    out = tmp_path / "pruned.onnx"
    trig = MODELS / "triggers" / "badnets_3x3.json"
    code, stdout, err = run_cli("prune", zoo_path("cnn_badnets"), "--data", TEST, "--probe", trig, "--max-accuracy-drop", "0.02", "-o", out)
    assert code == 1 and stdout == "" and "probe success" in err  # found, removed (dead on held-out), written
    assert "outcome: backdoor REMOVED" in err
    code, stdout, _ = run_cli("evaluate", zoo_path("cnn_badnets"), "--data", TEST, "--trigger", trig, "--target", "0", "--compare", out, "--format", "json")
    r = json.loads(stdout)
    assert code == 0 and r["delta"]["attack_success_rate"] < -0.5 and r["delta"]["clean_accuracy"] >= -0.03


def test_cli_sanitize_exit_codes(run_cli, tmp_path):
    code, stdout, _ = run_cli("sanitize", zoo_path("cnn_badnets"), "--data", CLEAN, "--probe", MODELS / "triggers" / "badnets_3x3.json", "-o", tmp_path / "s.onnx", "--format", "json")
    assert code == 1 and json.loads(stdout)["backdoor_found"] and (tmp_path / "s.onnx").exists()
    code, stdout, err = run_cli("sanitize", zoo_path("cnn_clean"), "--data", CLEAN, "--probe", MODELS / "triggers" / "badnets_3x3.json", "-o", tmp_path / "c.onnx")
    assert code == 0 and not (tmp_path / "c.onnx").exists()
    # Found but not removed (agreement on held-out images under 98%): exit 4, nothing written; --always writes
    # it and still exits 4, the report saying so; a lower --min-agreement accepts it (exit 1).
    blend = ("sanitize", zoo_path("resnet_blend"), "--data", CLEAN, "--probe", MODELS / "triggers" / "blend_random.json")
    code, stdout, err = run_cli(*blend, "-o", tmp_path / "b.onnx", "--format", "json")
    assert code == 4 and not (tmp_path / "b.onnx").exists() and "NOT removed" in err
    assert json.loads(stdout)["outcome"] == "not_removed"
    code, stdout, err = run_cli(*blend, "-o", tmp_path / "b.onnx", "--format", "json", "--always")
    report = json.loads(stdout)
    assert code == 4 and (tmp_path / "b.onnx").exists() and report["written_despite_backdoor"]
    code, stdout, err = run_cli(*blend, "-o", tmp_path / "b2.onnx", "--min-agreement", "0.97")
    assert code == 1 and (tmp_path / "b2.onnx").exists()


def test_source_specific_probe_is_judged_on_its_source_class(tmp_path):
    """The RGB MobileNetV2 whose 4x4 patch flips only class 7 to class 1: over all other-class images the real trigger
    moves about a ninth of them (under the 50% that makes a probe count), so it used to read "nothing found". Judged
    on its source class it is found, repaired, and measured dead on that class's held-out images."""
    from conftest import RGB as rgb, rgb_entry
    from models import metrics

    entry = rgb_entry("rgb10_mobilenetv2_source")
    out = tmp_path / "s.onnx"
    trigger_file = rgb / entry["triggers"][0]["file"]
    report, proto, found = sanitize_with_probes(rgb / entry["file"], rgb / "data" / "rgb10_clean.npz", [trigger_file],
                                                out, device="cpu", targets=[1])
    assert found and report["probes"][0]["sources"] == [entry["source_class"]] == [7]
    assert report["outcome"] == "removed" and report["removal"]["probes"][0]["sources"] == [7]
    assert report["removal"]["probes"][0]["success_before"] > 0.9
    x, y = metrics.sample("rgb10")
    ctx = ModelContext.open(rgb / entry["file"], device="cpu")
    before, after = (lambda z, c=c: c.runner().run(z).scores.argmax(1) for c in (ctx, ctx.derived(proto)))
    trigger = Trigger.load(trigger_file)
    assert metrics.attack_success(before, entry, trigger, 1, x, y) > 0.9
    assert metrics.attack_success(after, entry, trigger, 1, x, y) <= 0.05
    assert metrics.clean_accuracy(after, x, y) >= metrics.clean_accuracy(before, x, y) - 0.01


def test_all_to_all_probe_counts_changed_predictions(tmp_path):
    """The RGB all-to-all BadNets (y -> y + 1): its trigger sends no one class half of the images, so it read "nothing
    found"; as an all-to-all probe its success is the fraction of predictions it changes, and the repair is measured by
    that and by the real all-to-all ASR on the test sample."""
    from conftest import RGB as rgb, rgb_entry
    from models import metrics

    entry = rgb_entry("rgb10_preact_all2all")
    out = tmp_path / "s.onnx"
    trigger_file = rgb / entry["triggers"][0]["file"]
    report, proto, found = sanitize_with_probes(rgb / entry["file"], rgb / "data" / "rgb10_clean.npz", [trigger_file],
                                                out, device="cpu")
    assert found and report["probes"][0]["all_to_all"] and report["probes"][0]["sources"] is None
    check = report["removal"]["probes"][0]
    assert check["all_to_all"] and check["success_before"] > 0.5 and report["outcome"] == "removed"
    x, y = metrics.sample("rgb10")
    ctx = ModelContext.open(rgb / entry["file"], device="cpu")
    before, after = (lambda z, c=c: c.runner().run(z).scores.argmax(1) for c in (ctx, ctx.derived(proto)))
    trigger = Trigger.load(trigger_file)
    asr0, asr1 = (metrics.attack_success(f, entry, trigger, None, x, y) for f in (before, after))
    assert asr0 > 0.6 and asr1 < 0.25, (asr0, asr1)
    assert metrics.clean_accuracy(after, x, y) >= metrics.clean_accuracy(before, x, y) - 0.01


def test_a_later_round_takes_over_what_the_earlier_repair_measured():
    """A blind repair's next round has the same model, images and held-out split and more probes: its Repair takes
    over the clean and earlier probe measurements and measures only the new probes, with the same values a fresh
    Repair measures; a Repair of other inputs or other probes is refused."""
    from conftest import RGB, rgb_entry
    from scanner.data.images import holdout_split
    from scanner.data.probes import Probe

    entry = rgb_entry("rgb10_preact_badnets")
    ctx = ModelContext.open(RGB / entry["file"], threads=2)
    images, held, _ = holdout_split(ImageSet(RGB / "data" / "rgb10_clean.npz", limit=120))
    patch = Trigger.load(RGB / entry["triggers"][0]["file"])
    blend = Trigger(kind="blend", image=np.full((32, 32, 3), 255.0, np.float32), alpha=0.3)
    first = Repair(ctx, images, [Probe(trigger=patch)], targets=[0], holdout=held)
    probes = [Probe(trigger=patch), Probe(trigger=blend)]
    later = Repair(ctx, images, probes, targets=[0, 0], holdout=held, previous=first)
    fresh = Repair(ctx, images, probes, targets=[0, 0], holdout=held)
    assert later.clean is first.clean and later.probed[0] is first.probed[0] and later.probed[1] is not None
    for a, b in zip([later.clean] + later.probed, [fresh.clean] + fresh.probed):
        np.testing.assert_array_equal(a.preds, b.preds)
        np.testing.assert_array_equal(a.stats.mean("linf"), b.stats.mean("linf"))
        np.testing.assert_array_equal(a.kept[ctx.head.input], b.kept[ctx.head.input])
    assert later.base.to_dict() == fresh.base.to_dict()
    with pytest.raises(ValueError, match="probe"):
        Repair(ctx, images, [Probe(trigger=blend)], targets=[0], holdout=held, previous=first)
    with pytest.raises(ValueError, match="other inputs"):
        Repair(ctx, images, probes, targets=[0, 0], holdout=None, previous=first)


KIND_REPAIRS = [  # (model, triggers, clipping, real ASR the repair must reach on the test sample)
    ("rgb10_vgg_badnets", ["patch"], True, 0.02),
    ("rgb10_vgg_sticker", ["patch"], False, 0.02),
    ("rgb10_mobilenetv2_blend", ["blend"], True, 0.10),
    ("rgb10_mobilenetv2_sig", ["signal"], True, 0.10),
    ("rgb10_mobilenetv2_wanet", ["warp"], True, 0.10),
    ("rgb10_vgg_filter", ["filter"], True, 0.10),
    ("rgb10_vit_two", ["patch", "blend"], True, 0.02),
]


@pytest.mark.parametrize("name, kinds, clip, goal", KIND_REPAIRS, ids=[k[0] for k in KIND_REPAIRS])
def test_the_repair_of_each_attack_kind_with_its_real_trigger(tmp_path, name, kinds, clip, goal):
    """Issue 14's repair goal, per attack kind, with the real trigger(s) as probes (`scanner sanitize --probe`,
    written with --always): each trigger's ASR on the committed test sample falls to the kind's goal (2% for a
    patch, 10% for every other kind) with at most 2 points of clean accuracy lost. The two-trigger ViT is repaired
    with both of its triggers at once (patch -> 7, blend -> 8). The sticker (random positions) is repaired without
    the clipping, at 1.3% (1.9% with it, too close to the goal to test). The scanner's own removal check may still
    refuse some of these (held-out agreement under 98%: benchmarks/RESULTS.md, "The repair with the real trigger
    known"); this measures what the repair removes. Source-specific and all-to-all: the two tests above."""
    from conftest import RGB as rgb, rgb_entry
    from models import metrics

    entry = rgb_entry(name)
    triggers = [t for t in entry["triggers"] if t["kind"] in kinds]
    assert [t["kind"] for t in triggers] == kinds
    files = [rgb / t["file"] for t in triggers]
    out = tmp_path / "s.onnx"
    report, proto, found = sanitize_with_probes(rgb / entry["file"], rgb / "data" / f"{entry['dataset']}_clean.npz",
                                                files, out, device="cpu", threads=2, always=True, clip=clip)
    assert found and out.exists() and [p["target"] for p in report["probes"]] == [t["target"] for t in triggers]
    x, y = metrics.sample(entry["dataset"])
    ctx = ModelContext.open(rgb / entry["file"], device="cpu", threads=2)
    before, after = (lambda z, c=c: c.runner().run(z).scores.argmax(1) for c in (ctx, ctx.derived(proto)))
    for t, f in zip(triggers, files):
        trigger = Trigger.load(f)
        asr0, asr1 = (metrics.attack_success(p, entry, trigger, t["target"], x, y) for p in (before, after))
        assert asr0 > 0.5 and asr1 <= goal, (t["file"], asr0, asr1)
    assert metrics.clean_accuracy(after, x, y) >= metrics.clean_accuracy(before, x, y) - 0.02


@pytest.mark.parametrize("name, relocated", [("rgb10_vgg_sticker", True), ("rgb10_preact_badnets", False)])
def test_a_patch_that_works_anywhere_is_probed_at_other_positions(name, relocated):
    """The blind repair's probes: the sticker backdoor (a 3x3 patch at random positions) answers to its patch at
    other places of the image, so the patch joins the probes there too; BadNets' corner patch moved elsewhere does
    nothing, and no relocated probe is added."""
    from conftest import RGB, rgb_entry
    from scanner.commands.sanitize import MAX_RELOCATIONS, VARIANT_SUCCESS, _relocated
    from scanner.detect.families import Candidate
    from scanner.detect.synthesis import Config, Synthesizer, search_runner

    entry = rgb_entry(name)
    trigger = Trigger.load(RGB / entry["triggers"][0]["file"])
    ctx = ModelContext.open(RGB / entry["file"], threads=2)
    pixels = ImageSet(RGB / "data" / "rgb10_clean.npz", limit=300).load_all(ctx.preprocess).pixels
    synth = Synthesizer(search_runner(ctx), pixels, Config(budget=None), 20_000)
    h, w = trigger.image.shape[:2]
    cand = Candidate("patch", entry["triggers"][0]["target"], trigger.image.astype(np.float32), (32 - h - 1, 32 - w - 1, h, w),
                     shape=(32, 32))
    assert synth.measure([cand])[0].success >= 0.9  # the real patch, where BadNets puts it
    found = _relocated(synth, cand)
    assert bool(found) == relocated and len(found) <= MAX_RELOCATIONS
    assert all(c.success >= VARIANT_SUCCESS and c.box != cand.box for c in found)


def test_feature_site_folds_a_change_through_the_batch_norm():
    """The feature refit's site on the pre-activation ResNet: the last conv, through the residual Add and the final
    batch norm to the ReLU's input; a change folded into the conv's weights arrives there exactly (in site units,
    through the batch norm's scale); no change gives the same scores and the graph keeps its operators."""
    from conftest import RGB, rgb_entry
    from scanner.repair.feature import fold_into, rows, site

    ctx = ModelContext.open(RGB / rgb_entry("rgb10_preact_sig")["file"], threads=2)
    where, why = site(ctx)
    assert why is None and where.layer.op_type == "Conv" and where.path == ["Add", "BatchNormalization"]
    assert not np.allclose(where.scale, 1.0)  # the batch norm's gamma / sqrt(var + eps)
    pixels = ImageSet(RGB / "data" / "rgb10_clean.npz", limit=16).load_all(ctx.preprocess).pixels
    runner = ctx.runner(features=(where.input, where.read))
    out = runner.run(pixels, flatten=False)
    d = rows(where, out.features[where.input]).shape[1]
    assert d == out.features[where.input].shape[1] * 9  # a 3x3 conv's receptive field
    theta = np.zeros((d + 1, where.layer.channels))
    same = ctx.derived(fold_into(ctx.proto, where, theta))
    np.testing.assert_allclose(same.runner().run(pixels).scores, out.scores, rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(0)
    theta[-1] = rng.normal(size=where.layer.channels)  # a bias change of the site
    theta[rng.integers(d), :] = rng.normal(size=where.layer.channels) * 0.1  # and one input's weight
    x = rows(where, out.features[where.input])
    expected = out.features[where.read] + (np.hstack([x, np.ones((len(x), 1))]) @ theta).reshape(
        len(pixels), *out.features[where.read].shape[2:], -1).transpose(0, 3, 1, 2)
    changed = ctx.derived(fold_into(ctx.proto, where, theta))
    got = changed.runner(features=(where.read,)).run(pixels, flatten=False).features[where.read]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert _ops(changed.proto) == _ops(ctx.proto)


def test_feature_sites_share_a_pass_over_the_images_with_the_same_grams():
    """The walk reads the tensors of several sites in one pass over the images (grouped by the memory of their
    grams, the last layer alone first); each site's least squares is the same as from a pass of its own."""
    from conftest import RGB, rgb_entry
    from scanner.data.probes import Probe
    from scanner.repair.feature import _gram_bytes, _grams, _passes, site, site_layers

    entry = rgb_entry("rgb10_vit_two")
    t = entry["triggers"][1]
    ctx = ModelContext.open(RGB / entry["file"], threads=2)
    rep = Repair(ctx, RGB / "data" / "rgb10_clean.npz", [Probe(trigger=Trigger.load(RGB / t["file"]))], limit=96,
                 targets=[t["target"]])
    wheres = [w for w, _ in (site(ctx, l) for l in site_layers(ctx)) if w is not None]
    assert len(wheres) >= 3
    groups = _passes(wheres, 3)
    assert groups[0] == wheres[:1] and [w for g in groups for w in g] == wheres and len(groups) == 2
    one = _passes(wheres, 3, budget=3 * min(_gram_bytes(w) for w in wheres[1:]) - 1)
    assert [len(g) for g in one] == [1] * len(wheres)  # a budget under any two sites' grams: a pass each
    pixels = rep.clean_set.load_all(rep.pre).pixels
    fold = np.arange(len(pixels)) % 3
    shared, _ = _grams(rep, wheres[1:3], pixels, [0], fold, 3)
    for where, together in zip(wheres[1:3], shared):
        assert together[0][0].shape == (where.inputs + 1,) * 2  # the size _passes plans with
        (alone,), _ = _grams(rep, [where], pixels, [0], fold, 3)
        for f in range(3):
            for a, b in zip(alone[f], together[f]):
                np.testing.assert_array_equal(a, b)


def test_feature_refit_cross_validates_through_tails_with_the_whole_models_answers(monkeypatch):
    """The cross-validation runs only the network after each site, fed the tensors the gram pass kept: the same
    levels at every site and weight and the same repaired model as running the whole model (TAIL_BYTES 0), on a
    pre-activation ResNet whose sites read a block's skip."""
    from conftest import RGB, rgb_entry
    from scanner.data.probes import Probe
    from scanner.repair import feature

    entry = rgb_entry("rgb10_preact_wanet")
    t = entry["triggers"][0]
    patch = Trigger.load(RGB / rgb_entry("rgb10_preact_badnets")["triggers"][0]["file"])
    ctx = ModelContext.open(RGB / entry["file"], threads=2)
    rep = Repair(ctx, RGB / "data" / "rgb10_clean.npz", [Probe(trigger=Trigger.load(RGB / t["file"])), Probe(trigger=patch)],
                 limit=150, targets=[t["target"], 0])
    calls = []
    preds = feature.Tail.preds
    monkeypatch.setattr(feature.Tail, "preds", lambda self, *a: calls.append(self.cut) or preds(self, *a))
    weights = (0.1, 1.0)
    proto, level, fit = feature.feature_refit(rep, weights=weights, sites=3)
    assert len({tuple(c) for c in calls}) == 3  # every site had its tail, each checked, then used
    monkeypatch.setattr(feature, "TAIL_BYTES", 0)
    calls.clear()
    proto0, level0, fit0 = feature.feature_refit(rep, weights=weights, sites=3)
    assert not calls
    assert fit["tried"] == fit0["tried"] and level.to_dict() == level0.to_dict()
    assert proto.SerializeToString() == proto0.SerializeToString()


def test_feature_refit_stops_a_signal_the_head_refit_cannot():
    """SIG (a sinusoid over the whole image) with its real trigger: the head refit leaves it above 80%
    (cross-validated); the feature refit at probe weight 0.3 stops it on the committed test sample (under 10%) with
    at most 2 points of clean accuracy lost. Its agreement with the original stays under the removal check's 98%
    (measured: the repair releases natural striped images from the target class): the weight the cross-validation
    keeps for the command is the head refit's (see benchmarks/RESULTS.md)."""
    from conftest import RGB, rgb_entry
    from models import metrics
    from scanner.data.probes import Probe
    from scanner.repair.feature import feature_refit
    from scanner.repair.refit import refit

    entry = rgb_entry("rgb10_preact_sig")
    t = entry["triggers"][0]
    trigger = Trigger.load(RGB / t["file"])
    ctx = ModelContext.open(RGB / entry["file"], threads=2)
    rep = Repair(ctx, RGB / "data" / "rgb10_clean.npz", [Probe(trigger=trigger)], targets=[t["target"]])
    _, _, head, _ = refit(rep, {})
    assert head.probe_success[0] > 0.8
    proto, level, fit = feature_refit(rep, weights=(0.3,), sites=1)
    assert fit["probe_weight"] == 0.3 and level.probe_success[0] < 0.1 and level.agreement > 0.94
    x, y = metrics.sample(entry["dataset"])
    before, after = ctx.runner(), ctx.derived(proto).runner()
    predict = lambda r: lambda px: r.run(px, norms=False, features=False).preds  # noqa: E731
    assert metrics.attack_success(predict(before), entry, trigger, t["target"], x, y) > 0.9
    assert metrics.attack_success(predict(after), entry, trigger, t["target"], x, y) < 0.10
    assert metrics.clean_accuracy(predict(after), x, y) >= metrics.clean_accuracy(predict(before), x, y) - 0.02


def test_feature_refit_walks_back_to_the_site_that_stops_a_vit_blend():
    """A natural-image blend on the ViT with its real trigger: corrected at the last layer before the head it keeps
    over 20% on the committed test sample; the walk over the last feature layers keeps the residual stream before
    the last block (the second block's MLP output, through its residual Add), and the blend falls under 10% there
    with at most 2 points of clean accuracy lost; every site tried is in the fit entry."""
    from conftest import RGB, rgb_entry
    from models import metrics
    from scanner.data.probes import Probe
    from scanner.repair.feature import SITES, feature_refit, site_layers

    entry = rgb_entry("rgb10_vit_two")
    t = next(t for t in entry["triggers"] if t["kind"] == "blend")
    trigger = Trigger.load(RGB / t["file"])
    ctx = ModelContext.open(RGB / entry["file"], threads=2)
    rep = Repair(ctx, RGB / "data" / "rgb10_clean.npz", [Probe(trigger=trigger)], targets=[t["target"]])
    x, y = metrics.sample(entry["dataset"])
    predict = lambda r: lambda px: r.run(px, norms=False, features=False).preds  # noqa: E731
    last, _, last_fit = feature_refit(rep, weights=(0.1,), sites=1)
    assert last_fit["layer"] == site_layers(ctx)[0].id and {e["layer"] for e in last_fit["tried"]} == {last_fit["layer"]}
    assert metrics.attack_success(predict(ctx.derived(last).runner()), entry, trigger, t["target"], x, y) > 0.2
    proto, level, fit = feature_refit(rep, weights=(0.1,))
    walked = list(dict.fromkeys(e["layer"] for e in fit["tried"]))
    assert walked == [l.id for l in site_layers(ctx) if l.id not in {e["layer"] for e in fit["sites_skipped"]}][: len(walked)]
    # the whole walk, unless it stopped at a site that stopped the probe (the walk's early end)
    assert len(walked) + len(fit["sites_skipped"]) == SITES or (walked[-1] == fit["layer"] and level.probe_success[0] == 0.0)
    assert "blocks.2/mlp" in fit["layer"] and fit["path"][:1] == ["Add"], fit["layer"]
    again, _, only = feature_refit(rep, weights=(0.1,), only=[fit["layer"]])  # a later round's refit, at that site
    assert {e["layer"] for e in only["tried"]} == {fit["layer"]} and only["probe_weight"] == 0.1
    after = ctx.derived(proto).runner()
    assert metrics.attack_success(predict(after), entry, trigger, t["target"], x, y) < 0.10
    assert metrics.clean_accuracy(predict(after), x, y) >= metrics.clean_accuracy(predict(ctx.runner()), x, y) - 0.02
