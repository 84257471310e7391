"""`scanner gate`: exit codes, the policy (file + flags), several models, JSON / SARIF on stdout alone.

The detection of each zoo model runs for real once (tests/gatecache.py) with `--budget 0` (no time limit:
the query budget decides the work, so the verdict is reproducible on a loaded machine).
"""

import json
import shutil

import jsonschema
import numpy as np
import onnx
import pytest
from conftest import CLEAN, MODELS, ROOT
from gatecache import _cache_analyses  # noqa: F401  (autouse fixture)
from onnx import TensorProto, helper, numpy_helper

from scanner.commands.gate import worst
from scanner.policy import DEFAULT_POLICY, load_policy

CLEAN_MODEL = MODELS / "cnn_clean.onnx"
BADNETS = MODELS / "cnn_badnets.onnx"
SARIF_SCHEMA = json.loads((ROOT / "tests" / "data" / "sarif-2.1.0.json").read_text())
REPORT_SCHEMA = json.loads((ROOT / "scanner" / "report" / "schemas" / "report.schema.json").read_text())
FAST = ("--budget", "0", "--threads", "2")


def no_layer_model(path):
    """An image classifier (1x28x28 in, 10 logits out) with no Conv / Gemm / MatMul: nothing to analyse."""
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 10).astype(np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Mul", ["flat", "scale"], ["logits"])],
        "no_layers",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def gate(run_cli, *args):
    return run_cli("gate", *args, "--data", CLEAN, *FAST)


def test_clean_model_passes_exit_0(run_cli):
    code, out, err = gate(run_cli, CLEAN_MODEL)
    assert code == 0, err
    assert "PASSED" in out and "clean" in out and "gate: PASSED (exit 0)" in out


def test_backdoored_model_fails_exit_1_json_alone_on_stdout_with_vv(run_cli):
    code, out, err = gate(run_cli, "-vv", BADNETS, "--format", "json")
    assert code == 1, err
    report = json.loads(out)  # stdout holds exactly one JSON document
    assert out.endswith("}\n") and out.lstrip().startswith("{")
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)
    (m,) = report["models"]
    assert m["verdict"] == "backdoored" and 0 in m["targets"] and m["status"] == "failed" and m["exit_code"] == 1
    assert report["result"] == "failed" and report["exit_code"] == 1
    assert "scanner:" in err and "FAILED" in err  # logs and the summary table went to stderr


def test_json_alone_with_v_and_quiet(run_cli):
    code, out, err = gate(run_cli, "-v", CLEAN_MODEL, "--format", "json")
    assert code == 0 and json.loads(out)["models"][0]["status"] == "passed"
    code, out, err = gate(run_cli, "-q", CLEAN_MODEL, "--format", "json")
    assert code == 0 and json.loads(out)["result"] == "passed" and err == ""


def test_bad_model_exit_2_and_recorded(run_cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    code, out, err = gate(run_cli, bad, "--format", "json")
    assert code == 2
    (m,) = json.loads(out)["models"]
    assert m["status"] == "error" and "not a valid ONNX model" in m["error"]


@pytest.mark.parametrize("args, message", [
    (("--no-such-flag",), "no such option"),
    ((), "missing argument"),
    (("x.onnx", "--fail-on", "maybe"), "invalid value"),
    (("x.onnx",), "missing option"),  # no --data
])
def test_usage_errors_exit_2(run_cli, args, message):
    code, out, err = run_cli("gate", *args)
    assert code == 2 and out == "" and message in err.lower() and err.count("\n") == 1


def test_bad_data_is_one_line_exit_2(run_cli, tmp_path):
    code, out, err = run_cli("gate", CLEAN_MODEL, "--data", tmp_path / "nope")
    assert code == 2 and out == "" and err.startswith("scanner: error:") and err.count("\n") == 1


def test_nothing_to_analyse_exit_3(run_cli, tmp_path):
    model = no_layer_model(tmp_path / "gap.onnx")
    code, out, err = gate(run_cli, model, "--format", "json")
    assert code == 3, err
    report = json.loads(out)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)
    assert report["result"] == "unanalysable" and report["models"][0]["status"] == "unanalysable"
    code, out, _ = gate(run_cli, model, "--allow-unanalysable", "--format", "json")
    assert code == 0 and json.loads(out)["models"][0]["status"] == "skipped"


def test_multi_model_worst_exit_code(run_cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    gap = no_layer_model(tmp_path / "gap.onnx")
    code, out, _ = gate(run_cli, CLEAN_MODEL, BADNETS, "--format", "json")
    report = json.loads(out)
    assert code == 1 and [m["status"] for m in report["models"]] == ["passed", "failed"]
    assert report["summary"] == {**{k: 0 for k in ("warned", "skipped", "unanalysable", "error")},
                                 "models": 2, "passed": 1, "failed": 1}
    code, out, _ = gate(run_cli, BADNETS, bad, CLEAN_MODEL, "--format", "json")
    assert code == 2 and [m["status"] for m in json.loads(out)["models"]] == ["failed", "error", "passed"]
    code, _, _ = gate(run_cli, BADNETS, gap)
    assert code == 1
    assert worst([0, 3]) == 3 and worst([3, 1]) == 1 and worst([1, 2, 3]) == 2 and worst([]) == 0


def test_folder_of_models(run_cli, tmp_path):
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(CLEAN_MODEL, folder / "a_clean.onnx")
    no_layer_model(folder / "sub" / "b_gap.onnx")
    (folder / "notes.txt").write_text("not a model")
    code, out, err = gate(run_cli, folder, "--format", "json")
    report = json.loads(out)
    assert [m["path"] for m in report["models"]] == [str(folder / "a_clean.onnx"), str(folder / "sub" / "b_gap.onnx")]
    assert code == 3 and report["result"] == "unanalysable"
    code, out, err = gate(run_cli, folder, "--allow-unanalysable")
    assert code == 0 and "SKIPPED" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = gate(run_cli, empty)
    assert code == 2 and "no .onnx file" in err


def test_models_from_globs_and_lists(run_cli, tmp_path):
    """A registry export: a glob, and a .txt list of paths (relative to the list, comments and blanks skipped)."""
    reg = tmp_path / "registry"
    (reg / "team" / "v2").mkdir(parents=True)
    shutil.copy(CLEAN_MODEL, reg / "team" / "a.onnx")
    shutil.copy(BADNETS, reg / "team" / "v2" / "b.onnx")
    from scanner.commands.gate import expand_models

    assert expand_models([str(reg / "**" / "*.onnx")]) == [reg / "team" / "a.onnx", reg / "team" / "v2" / "b.onnx"]
    listing = tmp_path / "models.txt"
    listing.write_text(f"# pushed today\nregistry/team/v2/b.onnx\n\n{reg / 'team' / 'a.onnx'}\n")
    code, out, err = gate(run_cli, listing, "--format", "json")
    assert code == 1, err
    assert [m["path"] for m in json.loads(out)["models"]] == [str(tmp_path / "registry/team/v2/b.onnx"), str(reg / "team" / "a.onnx")]
    code, out, err = gate(run_cli, str(tmp_path / "nothing" / "*.onnx"))
    assert code == 2 and "no file matches" in err
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    code, out, err = gate(run_cli, tmp_path / "empty.txt")
    assert code == 2 and "list of models is empty" in err


def test_ray_flags_without_ray_and_bad_sizes_are_usage_errors(run_cli):
    code, out, err = gate(run_cli, CLEAN_MODEL, "--ray-cpus", "2")
    assert code == 2 and "need --ray" in err and out == ""
    code, out, err = run_cli("gate", "--ray", CLEAN_MODEL, BADNETS, "--data", CLEAN)  # --ray took the first model
    assert code == 2 and "--ray=ADDRESS" in err
    code, out, err = gate(run_cli, CLEAN_MODEL, "--ray", "--ray-memory", "lots")
    assert code == 2 and "--ray-memory" in err


def test_policy_file_and_flag_overrides(run_cli, tmp_path):
    policy = tmp_path / "gate.toml"
    policy.write_text('fail_on = "never"\nwarn_on = "suspicious"\n\n[analysis]\nbudget = 0\nseed = 0\n')
    code, out, err = run_cli("gate", BADNETS, "--data", CLEAN, "--policy", policy, "--threads", "2", "--format", "json")
    m = json.loads(out)["models"][0]
    assert code == 0 and m["status"] == "warned" and m["warnings"][0].startswith("verdict backdoored")
    code, out, _ = run_cli("gate", BADNETS, "--data", CLEAN, "--policy", policy, "--fail-on", "backdoored", "--threads", "2",
                           "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["policy"]["fail_on"] == "backdoored" and report["policy"]["source"] == f"{policy} + flags"
    # Thresholds and the minimum number of clean images fail a model whose verdict is clean.
    code, out, _ = gate(run_cli, CLEAN_MODEL, "--max-anomaly", "-100", "--format", "json")
    m = json.loads(out)["models"][0]
    assert code == 1 and m["verdict"] == "clean" and "max_anomaly" in m["reasons"][0]
    code, out, _ = gate(run_cli, CLEAN_MODEL, "--min-images", "5000", "--format", "json")
    m = json.loads(out)["models"][0]
    assert code == 1 and m["verdict"] is None and "min_images 5000" in m["reasons"][0]


def test_yaml_policy_and_bad_policies(run_cli, tmp_path):
    pytest.importorskip("yaml")
    y = tmp_path / "gate.yaml"
    y.write_text("fail_on: suspicious\nmin_images: 50\nanalysis:\n  budget: 0\n")
    p = load_policy(y)
    assert (p.fail_on, p.min_images, p.analysis.budget, p.warn_on) == ("suspicious", 50, 0, DEFAULT_POLICY.warn_on)
    for text, message in (('fail_on = "sometimes"\n', "fail_on must be one of"),
                          ("min_imagez = 3\n", "unknown policy key(s) ['min_imagez']"),
                          ("[analysis]\nbugdet = 3\n", "unknown [analysis] key(s)"),
                          ("min_images = 0\n", "min_images must be an integer >= 1"),
                          ("fail_on = \n", "not valid TOML")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        code, out, err = run_cli("gate", CLEAN_MODEL, "--data", CLEAN, "--policy", bad)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_sarif_output_validates(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out_file = tmp_path / "gate.sarif"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    code, out, err = run_cli("gate", "models/cnn_badnets.onnx", "models/cnn_clean.onnx", bad, "--data", "models/data/clean",
                             *FAST, "--format", "sarif", "-o", out_file)
    assert code == 2 and out == "" and "FAILED" in err  # the table goes to stderr
    log = json.loads(out_file.read_text())
    jsonschema.Draft4Validator(SARIF_SCHEMA).validate(log)
    run = log["runs"][0]
    ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert ids[:3] == ["SCN001", "SCN002", "SCN003"] and run["tool"]["driver"]["version"]
    by_rule = {}
    for r in run["results"]:
        by_rule.setdefault(r["ruleId"], []).append(r)
        assert ids[r["ruleIndex"]] == r["ruleId"]
    (backdoor,) = by_rule["SCN001"]
    assert backdoor["level"] == "error" and backdoor["properties"]["target"] == 0
    loc = backdoor["locations"][0]["physicalLocation"]["artifactLocation"]
    assert loc == {"uri": "models/cnn_badnets.onnx", "uriBaseId": "%SRCROOT%"}
    (error,) = by_rule["SCN003"]
    assert error["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].startswith("file://")
    assert not any(r["locations"][0]["physicalLocation"]["artifactLocation"].get("uri") == "models/cnn_clean.onnx"
                   for r in run["results"])  # a clean model has no finding
    assert run["invocations"][0]["exitCode"] == 2


def test_help_documents_exit_codes_and_policy(run_cli):
    code, out, _ = run_cli("gate", "--help")
    assert code == 0
    for text in ("Exit codes", "policy violated", "nothing could be analysed", 'fail_on = "backdoored"', "scanner gate"):
        assert text in out


def test_table_no_color_when_not_a_terminal(run_cli, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    code, out, _ = gate(run_cli, CLEAN_MODEL)
    assert code == 0 and "\x1b[" not in out


def test_colored_table():
    from scanner.report.tables import gate_table

    report = {"models": [{"path": "m.onnx", "status": "failed", "verdict": "backdoored", "targets": [3], "reasons": ["r"],
                          "warnings": [], "candidates": []}],
              "summary": {"models": 1, "failed": 1, **{k: 0 for k in ("passed", "warned", "skipped", "unanalysable", "error")}},
              "result": "failed", "exit_code": 1, "policy": {"source": "default"}, "seconds": 1.0}
    plain, colored = gate_table(report), gate_table(report, color=True)
    assert "\x1b[31mFAILED\x1b[0m" in colored and "\x1b[" not in plain
    import re

    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


def test_readme_policy_is_the_default(tmp_path):
    """The policy file shown in README's "Deployment gate" is valid and spells out the defaults."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deployment gate"):]
    block = section[section.index("```toml") + len("```toml"):]
    block = block[: block.index("```")]
    path = tmp_path / "gate.toml"
    path.write_text(block)
    p = load_policy(path)
    defaults = DEFAULT_POLICY.to_dict()
    got = p.to_dict()
    assert got.pop("source") == str(path) and defaults.pop("source") == "default"
    assert got.pop("analysis")["budget"] == 600.0
    defaults.pop("analysis")
    assert got == defaults
