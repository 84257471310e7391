"""The graph audit: silent on clean exports of every architecture we cover, loud on graph backdoors, and
`sanitize` either cuts them (the trigger measured dead) or refuses with "found, not removed"."""

import glob
import json
import os

import numpy as np
import onnx
import pytest
from conftest import CLEAN, MODELS, ROOT, TEST

import graphbackdoors as gb
from scanner.graph.audit import audit

CLASSICS = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/*.onnx")))
CLEAN_FILES = sorted(glob.glob(str(MODELS / "*.onnx"))) + sorted(glob.glob(str(MODELS / "rgb" / "*.onnx"))) + sorted(
    glob.glob(str(ROOT / "tests/data/coverage/*.onnx"))) + CLASSICS
TARGET = 7


@pytest.mark.parametrize("path", CLEAN_FILES, ids=os.path.basename)
def test_no_findings_on_clean_exports(path):
    report = audit(onnx.load(path))
    assert report["findings"] == [] and report["head"] is not None


def test_no_findings_on_a_static_qdq_model(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from scanner.context import ModelContext
    from scanner.data.images import ImageSet

    ctx = ModelContext.open(MODELS / "cnn_clean.onnx")
    pixels = ImageSet(CLEAN, limit=16).load_all(ctx.preprocess).pixels

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": ctx.preprocess.to_tensor(pixels[i : i + 4])} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.batches, None)

    out = tmp_path / "qdq.onnx"
    quantize_static(str(MODELS / "cnn_clean.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ)
    model = onnx.load(str(out))
    assert "DequantizeLinear" in {n.op_type for n in model.graph.node}
    assert audit(model)["findings"] == []


@pytest.fixture(scope="module")
def backdoors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph_backdoors")
    base = onnx.load(str(MODELS / "cnn_clean.onnx"))
    out = {}
    for name, build, box in (("corner", gb.corner_adder, (24, 24, 3, 3)), ("where", gb.where_switch, (0, 0, 2, 2)),
                             ("if", gb.if_swap, (0, 0, 4, 4))):
        path = folder / f"{name}.onnx"
        onnx.save(build(base, TARGET, box=box), str(path))
        out[name] = (path, gb.square_trigger(box, folder / f"{name}_trigger.json"))
    return out


def test_the_backdoors_work(backdoors):
    """Sanity: each hand-built model keeps the clean model's predictions and obeys its trigger."""
    from scanner.context import ModelContext
    from scanner.data.images import ImageSet
    from scanner.data.triggers import Trigger

    for name, (path, trigger) in backdoors.items():
        runner = ModelContext.open(path).runner()
        clean = ModelContext.open(MODELS / "cnn_clean.onnx").runner()
        images = ImageSet(CLEAN, limit=200)
        assert np.array_equal(runner.predict(images)[0], clean.predict(images)[0]), name
        hit, _ = runner.predict(images, Trigger.load(trigger))
        assert (hit == TARGET).mean() == 1.0, name


@pytest.mark.parametrize("name,rules,cuttable", [("corner", {"side-branch"}, True), ("where", {"side-branch"}, True),
                                                 ("if", {"side-branch", "control-flow"}, False)])
def test_audit_finds_each_shape(backdoors, name, rules, cuttable):
    report = audit(onnx.load(str(backdoors[name][0])))
    assert report["severity"] == "high" and {f["rule"] for f in report["findings"]} == rules
    branch = next(f for f in report["findings"] if f["rule"] == "side-branch")
    assert bool((branch.get("join") or {}).get("cuttable")) == cuttable
    assert any(f.get("target") == TARGET for f in report["findings"])
    assert any(n.endswith("Slice") for n in branch["nodes"]) and any(n.endswith("Greater") for n in branch["nodes"])


def test_inspect_shows_the_finding(run_cli, backdoors):
    code, out, err = run_cli("inspect", backdoors["corner"][0])
    assert code == 0, err
    assert "[high] side-branch" in out and "bd/Add" in out
    code, out, _ = run_cli("inspect", MODELS / "cnn_clean.onnx")
    assert "graph audit: no findings" in out


def _asr(run_cli, model, trigger):
    code, out, err = run_cli("evaluate", model, "--data", TEST, "--trigger", trigger, "--target", TARGET, "--format", "json")
    assert code == 0, err
    return json.loads(out)["models"][0]


@pytest.mark.parametrize("name", ["corner", "where"])
def test_sanitize_cuts_a_side_branch_and_measures_the_trigger_dead(run_cli, backdoors, tmp_path, name):
    path, trigger = backdoors[name]
    out, report_file = tmp_path / "s.onnx", tmp_path / "r.json"
    code, _, err = run_cli("sanitize", path, "--data", CLEAN, "--limit", 400, "-o", out, "--report", report_file,
                           "--threads", 2)
    report = json.loads(report_file.read_text())
    assert code == 1, err
    assert report["verdict"] == "backdoored" and TARGET in report["targets"]
    assert report["graph"]["findings"][0]["rule"] == "side-branch"
    assert report["repair"]["graph_cut"]["joins"][0]["node"] in ("bd/Add", "ws/Where")
    assert report["outcome"] == "removed" and report["removal"]["agreement"] >= 0.98
    assert audit(onnx.load(str(out)))["findings"] == []  # the branch is gone from the written model
    before, after = _asr(run_cli, path, trigger), _asr(run_cli, out, trigger)
    assert before["attack_success_rate"] == 1.0 and after["attack_success_rate"] < 0.05  # the real trigger, measured dead
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.005


def test_sanitize_refuses_control_flow_and_writes_nothing(run_cli, backdoors, tmp_path):
    out, report_file = tmp_path / "s.onnx", tmp_path / "r.json"
    code, _, err = run_cli("sanitize", backdoors["if"][0], "--data", CLEAN, "--limit", 400, "-o", out,
                           "--report", report_file, "--threads", 2, "--always")
    report = json.loads(report_file.read_text())
    assert code == 4 and not out.exists()  # not even with --always: there is no repaired model to write
    assert report["verdict"] == "backdoored" and report["outcome"] == "not_removed"
    assert "cannot be cut" in report["removal"]["reasons"][0] and "control-flow" in report["removal"]["reasons"][0]
    assert "NOT removed" in err


def test_sanitize_probe_cuts_the_branch(run_cli, backdoors, tmp_path):
    path, trigger = backdoors["corner"]
    out = tmp_path / "s.onnx"
    code, stdout, err = run_cli("sanitize", path, "--data", CLEAN, "--probe", trigger, "-o", out, "--format", "json")
    report = json.loads(stdout)
    assert code == 1, err
    assert report["rule"]["graph_cut"]["joins"][0]["node"] == "bd/Add" and report["rule"]["method"] == "none"
    assert report["removal"]["probes"][0]["success_before"] == 1.0 and report["removal"]["probes"][0]["dead"]
    assert _asr(run_cli, out, trigger)["attack_success_rate"] < 0.05


def test_gate_fails_a_graph_backdoor_with_sarif(run_cli, backdoors, tmp_path):
    sarif = tmp_path / "g.sarif"
    code, _, err = run_cli("gate", backdoors["corner"][0], "--data", CLEAN, "--limit", 200, "--min-images", 100,
                           "--format", "sarif", "-o", sarif, "--threads", 2)
    assert code == 1, err
    results = json.loads(sarif.read_text())["runs"][0]["results"]
    graph = [r for r in results if r["ruleId"] == "SCN009"]
    assert graph and graph[0]["level"] == "error" and "side-branch" in graph[0]["message"]["text"]
