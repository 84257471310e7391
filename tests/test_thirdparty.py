"""Third-party ONNX files as they come: folded constants, QDQ weights, IR 3 surgery, other heads, the scores
output chosen on purpose, preprocessing never guessed silently, degenerate predictions stopped."""

import json

import numpy as np
import onnx
import pytest
from conftest import CLEAN, MODELS, ROOT, TEST, zoo_entry, zoo_path

import thirdparty as tp
from scanner.context import ModelContext
from scanner.data.images import ImageSet
from scanner.data.triggers import Trigger
from scanner.graph import surgery

DATA = ROOT / "tests" / "data" / "thirdparty"
TRIGGER = MODELS / "triggers" / "badnets_3x3.json"
CLASSICS_CI = ["squeezenet", "resnet50", "densenet121", "inception_v1", "shufflenet"]
"""The Model Zoo classics small enough for CI (AlexNet, VGG-19 and ZFNet carry 0.2-0.5 GB of dense weights)."""


def _ops(model):
    """The model's operators, without the activation clipping's Min / Max bounds (checked to be only those)."""
    from scanner.graph.surgery import CLIP_SUFFIX

    bounds = {n.op_type for n in model.graph.node if n.name.endswith(CLIP_SUFFIX)}
    assert bounds <= {"Min", "Max"}, bounds
    return sorted(n.op_type for n in model.graph.node if not n.name.endswith(CLIP_SUFFIX))


# ---- folding -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn_bn_dynamo_noopt", "resnet_tiny_dynamo_noopt", "mobilenet_v3_small_dynamo_noopt",
                                  "vit_tiny_dynamo_noopt", "resnet_tiny_fp16_weights", "cnn_reshape_weights"])
def test_weights_computed_in_the_graph_are_folded(name):
    ctx = ModelContext.open(DATA / f"{name}.onnx")
    assert ctx.folded and ctx.folded["tensors"] > 0
    built = [n.op_type for n in ctx.proto.graph.node if n.op_type in ("Expand", "CastLike", "ConstantOfShape")]
    if "vit" not in name:  # the ViT keeps its attention scale arithmetic on activations
        assert not built
    # every Conv / Gemm weight (and Conv bias) is a constant the surgery can edit
    for layer in ctx.layers:
        node = next(n for n in ctx.proto.graph.node if (n.name or "") == layer.node)
        assert surgery._Editor(ctx.proto).read(node, 1) is not None
    assert not [s for s in ctx.skipped if "computed in the graph" in s["reason"]]


def test_identity_copies_of_initializers_fold_exactly_without_running(monkeypatch):
    """torch's legacy exporter shares weights through Identity: folding them is a rename, so nothing is run or
    checked (the check ran the model twice: seconds on a 224x224 model); in place when asked."""
    import graphs

    from scanner.graph import fold

    monkeypatch.setattr(fold, "_evaluate", lambda *a: pytest.fail("an exact fold needs no onnxruntime run"))
    monkeypatch.setattr(fold, "_same_outputs", lambda *a, **k: pytest.fail("an exact fold needs no check"))
    model = graphs.identity_weight()
    before = model.SerializeToString()
    folded, record = fold.fold_constants(model)
    assert record == {"tensors": 1, "nodes": 1} and model.SerializeToString() == before
    assert "Identity" not in [n.op_type for n in folded.graph.node if n.name != "/logits/Identity"]
    x = graphs.inputs(model)
    np.testing.assert_array_equal(graphs.run(folded, x)["logits"], graphs.run(model, x)["logits"])
    same, record = fold.fold_constants(model, inplace=True)
    assert same is model and record["tensors"] == 1
    np.testing.assert_array_equal(graphs.run(model, x)["logits"], graphs.run(folded, x)["logits"])


def test_folded_bias_model_pruned_with_exact_zeros_elsewhere_unchanged(tmp_path):
    """dynamo optimize=False: BN kept, bias-free conv biases built with Shape/Expand; `scanner prune` used to fail
    with 'input 2 is not a constant weight'."""
    from scanner.commands.prune import prune_model

    ctx = ModelContext.open(DATA / "cnn_bn_dynamo_noopt.onnx", preprocess="raw")
    out = tmp_path / "p.onnx"
    report, proto = prune_model(ctx, CLEAN, TRIGGER, out, layers="all", count=6, limit=64, always=True)
    assert report["verified"] and report["verification"]["pruned_channels_read_zero"] == 6 and out.exists()
    plan = {p["layer"]: p["channels"] for p in report["pruned"]}
    reads = [l.read for l in ctx.layers]
    pixels = ImageSet(CLEAN, limit=16).load_all(ctx.preprocess).pixels
    before = ctx.runner(features=reads).run(pixels, flatten=False)
    after = ModelContext.open(out, preprocess="raw").runner(features=reads).run(pixels, flatten=False)
    first = min(i for i, l in enumerate(ctx.layers) if l.id in plan)
    for i, layer in enumerate(ctx.layers):
        a, b = before.features[layer.read], after.features[layer.read]
        if layer.id in plan:
            assert np.all(np.moveaxis(b, 1, 0)[plan[layer.id]] == 0)
            keep = [k for k in range(layer.channels) if k not in plan[layer.id]]
            if i == first:  # the first pruned layer's other channels are untouched
                np.testing.assert_array_equal(np.moveaxis(a, 1, 0)[keep], np.moveaxis(b, 1, 0)[keep])
        elif i < first:
            np.testing.assert_array_equal(a, b)  # upstream of the first pruned layer: bitwise identical


# ---- IR 3 and the ONNX Model Zoo classics --------------------------------------------------------------------
def test_ir3_shared_weight_pruned_and_accepted(tmp_path):
    model = tp.share_weight(tp.classic("squeezenet"), "fire2/expand1x1_w_0", "fire3/expand1x1_w_0")
    assert model.ir_version == 3
    path = tmp_path / "squeezenet_shared.onnx"
    onnx.save(model, str(path))
    ctx = ModelContext.open(path)
    users = [n for n in ctx.proto.graph.node if "fire2/expand1x1_w_0" in n.input]
    assert len(users) == 2
    layer = next(l for l in ctx.layers if l.node == (users[0].name or l.node) and l.output == users[0].output[0])
    pruned = surgery.prune(ctx.proto, {layer.id: [0, 3]}, ctx.layers)
    onnx.checker.check_model(pruned)  # the weight's copy is an initializer AND a graph input (IR 3)
    inits = {t.name for t in pruned.graph.initializer}
    assert inits <= {vi.name for vi in pruned.graph.input}
    other = next(n for n in pruned.graph.node if n.output[0] == users[1].output[0])
    assert other.input[1] == "fire2/expand1x1_w_0"  # the other user keeps the original weight
    from scanner.runtime.session import Session

    Session(pruned, device="cpu").run(np.zeros((1, 3, 224, 224), np.float32))


@pytest.mark.parametrize("name", CLASSICS_CI)
def test_classic_every_command_ends_cleanly(run_cli, tmp_path, name):
    """inspect, scan, prune, sanitize --probe and gate each end with a verified, written model or one clear line."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(tp.classic(name), str(path))
    common = ("--data", CLEAN, "--limit", 8, "--preprocess", "caffe", "--threads", 2)
    code, out, err = run_cli("inspect", path, "--preprocess", "caffe", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["model"]["ir_version"] == 3 and json.loads(out)["audit"]["findings"] == []
    code, out, err = run_cli("scan", path, *common, "--format", "json")
    assert code == 0, err
    code, out, err = run_cli("prune", path, *common, "--probe", TRIGGER, "--count", 2, "-o", tmp_path / "p.onnx",
                             "--format", "json", "--always")
    report = json.loads(out)
    assert code in (0, 1, 4) and report["verified"] and (tmp_path / "p.onnx").exists(), err
    onnx.checker.check_model(str(tmp_path / "p.onnx"))
    code, out, err = run_cli("sanitize", path, *common, "--probe", TRIGGER, "-o", tmp_path / "s.onnx", "--format", "json")
    report = json.loads(out)
    assert code == {"nothing_found": 0, "removed": 1, "not_removed": 4}[report["outcome"]], err
    assert report["refit"] == (name != "squeezenet")  # squeezenet's head is a conv before pooling: pruned instead
    code, out, err = run_cli("gate", path, "--data", CLEAN, "--limit", 24, "--preprocess", "caffe", "--threads", 2,
                             "--min-images", 20, "--format", "json")
    entry = json.loads(out)["models"][0]
    # random weights: the predictions on clean images are degenerate, and the gate says so (nothing analysable)
    assert code == 3 and entry["status"] == "unanalysable" and "degenerate" in entry["error"], err


# ---- QDQ -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qdq_badnets(tmp_path_factory):
    ctx = ModelContext.open(zoo_path("cnn_badnets"))
    pixels = ImageSet(CLEAN, limit=64).load_all(ctx.preprocess).pixels
    out = tmp_path_factory.mktemp("qdq") / "cnn_badnets_qdq.onnx"
    tp.qdq(zoo_path("cnn_badnets"), out, pixels, ctx.preprocess)
    m = onnx.load(str(out))
    assert {p.key: p.value for p in m.metadata_props}.get("scanner.preprocess") == ctx.model.metadata["scanner.preprocess"]
    return out


def test_qdq_layers_found_and_pruned_in_quantized_form(qdq_badnets, tmp_path):
    ctx = ModelContext.open(qdq_badnets)
    assert "DequantizeLinear" in {n.op_type for n in ctx.proto.graph.node}
    assert len(ctx.layers) == 4 and ctx.head is not None and not ctx.skipped
    last = next(l for l in ctx.layers if l.is_last_conv)
    pruned = surgery.prune(ctx.proto, {last.id: [1, 5]}, ctx.layers)
    onnx.checker.check_model(pruned)
    assert _ops(pruned) == _ops(ctx.proto)  # still quantized: the int8 weight holds the zero point
    runner = ctx.derived(pruned).runner(features=[last.read])
    out = runner.run(ImageSet(CLEAN, limit=8).load_all(ctx.preprocess).pixels, flatten=False)
    assert np.all(np.moveaxis(out.features[last.read], 1, 0)[[1, 5]] == 0)


def test_qdq_every_command(run_cli, qdq_badnets, tmp_path):
    entry = zoo_entry("cnn_badnets")
    code, out, err = run_cli("inspect", qdq_badnets)
    assert code == 0, err
    code, out, err = run_cli("scan", qdq_badnets, "--data", CLEAN, "--probe", TRIGGER, "--limit", 200, "--format", "json")
    assert code == 0 and json.loads(out)["probe"]["effect"]["dominant_class"] == entry["target"], err
    code, out, err = run_cli("prune", qdq_badnets, "--data", CLEAN, "--probe", TRIGGER, "--count", 4, "--limit", 200,
                             "-o", tmp_path / "p.onnx", "--always")
    assert code == 4 and (tmp_path / "p.onnx").exists(), err  # 4 channels leave the backdoor: written with --always
    code, out, err = run_cli("sanitize", qdq_badnets, "--data", CLEAN, "--probe", TRIGGER, "-o", tmp_path / "s.onnx",
                             "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["refit"] and report["outcome"] == "removed", err
    sanitized = onnx.load(str(tmp_path / "s.onnx"))
    assert _ops(sanitized) == _ops(onnx.load(str(qdq_badnets)))  # the refit head is written back quantized
    code, out, err = run_cli("evaluate", qdq_badnets, "--data", TEST, "--trigger", TRIGGER, "--target", entry["target"],
                             "--compare", tmp_path / "s.onnx", "--format", "json")
    r = json.loads(out)
    assert r["models"][0]["attack_success_rate"] > 0.9 and r["models"][1]["attack_success_rate"] < 0.1
    assert r["delta"]["clean_accuracy"] >= -0.02


# ---- heads ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["matmul", "conv"])
def test_other_heads_refit(tmp_path, variant):
    """A MatMul head without bias is refit without one (no Add inserted); a 1x1 Conv head on pooled features
    is refit like a Gemm. Same graph, new weights, the backdoor gone."""
    from scanner.commands.evaluate import evaluate_model
    from scanner.commands.sanitize import sanitize_with_probes

    base = onnx.load(str(zoo_path("cnn_badnets")))
    model = tp.matmul_head(base) if variant == "matmul" else tp.conv_head(base)
    path, out = tmp_path / f"{variant}.onnx", tmp_path / "s.onnx"
    onnx.save(model, str(path))
    ctx = ModelContext.open(path)
    assert ctx.head is not None and ctx.head.op_type == ("MatMul" if variant == "matmul" else "Conv")
    report, proto, found = sanitize_with_probes(ctx, CLEAN, [TRIGGER], out, device="cpu")
    assert found and report["refit"] and report["refit_layers"] == [ctx.head.id], report["fallbacks"]
    assert report["outcome"] == "removed" and _ops(proto) == _ops(model)
    assert report["rule"]["refit"]["intercept"] == (variant == "conv")
    entry = zoo_entry("cnn_badnets")
    images = ImageSet(TEST, labeled=True)
    trigger = Trigger.load(TRIGGER)
    before, _ = evaluate_model(path, images, trigger, entry["target"], "cpu")
    after, _ = evaluate_model(out, images, trigger, entry["target"], "cpu")
    assert before["attack_success_rate"] > 0.9 and after["attack_success_rate"] < 0.1
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.02


def test_conv_head_before_pooling_falls_back_and_says_so(run_cli, tmp_path):
    path = tmp_path / "squeezenet.onnx"
    onnx.save(tp.classic("squeezenet"), str(path))
    code, out, err = run_cli("sanitize", path, "--data", CLEAN, "--limit", 8, "--probe", TRIGGER, "--preprocess", "caffe",
                             "-o", tmp_path / "s.onnx", "--format", "json", "--always")
    report = json.loads(out)
    assert report["rule"]["method"] == "prune" and not report["refit"]
    assert report["fallbacks"] and "no linear head" in report["fallbacks"][0]


# ---- the scores output ---------------------------------------------------------------------------------------
def test_label_first_model_is_scanned_on_its_logits(run_cli):
    code, out, err = run_cli("scan", DATA / "cnn_label_logits.onnx", "--data", CLEAN, "--limit", 32, "--probe", TRIGGER,
                             "--preprocess", "raw", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["outputs"][0]["dtype"] == "int64" and report["model"]["scores"] == "logits"
    assert len(report["probe"]["effect"]["probe_prediction_counts"]) >= 2


def test_scores_output_errors_name_the_outputs(run_cli):
    code, out, err = run_cli("inspect", DATA / "cnn_binary_one_logit.onnx")
    assert code == 2 and err.count("\n") == 1 and "single score" in err and "cnn_binary_one_logit.onnx" in err
    code, out, err = run_cli("inspect", DATA / "cnn_label_logits.onnx", "--scores", "label")
    assert code == 2 and err.count("\n") == 1 and "int64" in err
    code, out, err = run_cli("inspect", DATA / "cnn_label_logits.onnx", "--scores", "nope")
    assert code == 2 and "no such graph output" in err and "label int64" in err
    code, out, err = run_cli("inspect", DATA / "cnn_label_logits.onnx", "--scores", "logits", "--preprocess", "raw",
                             "--format", "json")
    assert code == 0 and json.loads(out)["model"]["scores"] == "logits"


# ---- preprocessing -------------------------------------------------------------------------------------------
def test_no_preprocessing_is_a_warning_and_a_report_field(run_cli):
    model = DATA / "cnn_bn_dynamo_noopt.onnx"
    code, out, err = run_cli("scan", model, "--data", CLEAN, "--limit", 16, "--format", "json")
    assert code == 0 and "no preprocessing stated" in err and "--preprocess imagenet|caffe|inception|raw" in err
    report = json.loads(out)
    assert report["model"]["preprocess_assumed"] and "assumed" in report["model"]["preprocess_sources"]
    code, out, err = run_cli("scan", model, "--data", CLEAN, "--limit", 16, "--format", "json", "--preprocess", "raw")
    assert code == 0 and "no preprocessing stated" not in err and not json.loads(out)["model"]["preprocess_assumed"]


def test_presets(run_cli, tmp_path):
    from scanner.data.preprocess import PRESETS, resolve_preprocess

    rgb = resolve_preprocess([1, 3, 224, 224], "float32", override="imagenet")
    assert rgb.color == "rgb" and rgb.mean == tuple(PRESETS["imagenet"]["mean"]) and rgb.sources[-1] == "preset imagenet"
    caffe = resolve_preprocess([1, 3, 224, 224], "float32", override="caffe")
    assert caffe.color == "bgr" and caffe.scale == 1.0
    x = caffe.to_tensor(np.full((1, 224, 224, 3), 255, np.uint8))
    assert np.allclose(x[0, :, 0, 0], 255 - np.array(PRESETS["caffe"]["mean"]))
    code, _, err = run_cli("inspect", zoo_path("cnn_badnets"), "--preprocess", "caffe")
    assert code == 2 and "1 channel" in err
    code, _, err = run_cli("inspect", zoo_path("cnn_badnets"), "--preprocess", "imagenett")
    assert code == 2 and "imagenet, caffe, inception, raw" in err


def test_degenerate_predictions_stop_before_any_verdict(run_cli, tmp_path):
    wrong = tmp_path / "wrong.json"  # inverted images (white on black where the model learned black on white)
    wrong.write_text(json.dumps({"scale": -1 / 255, "mean": [-0.714], "std": [0.353]}))
    code, out, err = run_cli("gate", zoo_path("resnet_badnets"), "--data", CLEAN, "--limit", 200, "--preprocess", wrong,
                             "--format", "json")
    entry = json.loads(out)["models"][0]
    assert code == 3 and entry["status"] == "unanalysable" and "degenerate" in entry["error"]
    assert "preprocessing" in entry["error"]
    code, out, err = run_cli("sanitize", zoo_path("resnet_badnets"), "--data", CLEAN, "--limit", 200, "--preprocess", wrong,
                             "-o", tmp_path / "s.onnx")
    assert code == 3 and err.count("\n") == 1 and "degenerate" in err and not (tmp_path / "s.onnx").exists()
