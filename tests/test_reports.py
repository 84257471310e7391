"""Reports: the shipped JSON Schema checks real reports of every command; SARIF of scan / sanitize; one JSON
document on stdout whatever the log level."""

import json
from importlib import resources

import jsonschema
import pytest
from conftest import CLEAN, MODELS, ROOT, TEST
from gatecache import _cache_analyses  # noqa: F401  (autouse fixture)

BADNETS = MODELS / "cnn_badnets.onnx"
TRIGGER = MODELS / "triggers" / "badnets_3x3.json"
SARIF = jsonschema.Draft4Validator(json.loads((ROOT / "tests" / "data" / "sarif-2.1.0.json").read_text()))


@pytest.fixture(scope="module")
def schema():
    text = resources.files("scanner.report").joinpath("schemas/report.schema.json").read_text(encoding="utf-8")
    s = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


def json_of(run_cli, *args, code=0):
    """Run a command with --format json at log level -vv; stdout must be exactly one JSON document."""
    rc, out, err = run_cli("-vv", *args, "--format", "json")
    assert rc == code, err
    return json.loads(out)


def test_schema_is_shipped_in_the_package():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "schemas/*.json" in cfg["options.package_data"]["scanner.report"]
    assert resources.files("scanner.report").joinpath("schemas/report.schema.json").is_file()


def test_inspect_report(run_cli, schema):
    schema.validate(json_of(run_cli, "inspect", BADNETS))


def test_scan_reports_and_sarif(run_cli, schema):
    plain = json_of(run_cli, "scan", BADNETS, "--data", CLEAN, "--limit", "64")
    schema.validate(plain)
    probed = json_of(run_cli, "scan", BADNETS, "--data", CLEAN, "--probe", TRIGGER, "--limit", "64")
    schema.validate(probed)
    from scanner.report.sarif import to_sarif

    log = to_sarif(probed)
    SARIF.validate(log)
    assert [r["ruleId"] for r in log["runs"][0]["results"]] == ["SCN006"]
    assert not to_sarif(plain)["runs"][0]["results"]


def test_prune_and_sanitize_probe_reports(run_cli, schema, tmp_path):
    pruned = json_of(run_cli, "prune", BADNETS, "--data", TEST, "--probe", TRIGGER, "--limit", "100", "--count", "2",
                     "-o", tmp_path / "p.onnx", code=4)  # two channels leave the backdoor working: not removed
    schema.validate(pruned)
    assert pruned["outcome"] == "not_removed" and pruned["output"] is None and not (tmp_path / "p.onnx").exists()
    from scanner.report.sarif import to_sarif

    log = to_sarif(pruned, exit_code=4)
    SARIF.validate(log)
    not_removed = [r for r in log["runs"][0]["results"] if r["ruleId"] == "SCN008"]
    assert len(not_removed) == 1 and not_removed[0]["level"] == "error" and "NOT removed" in not_removed[0]["message"]["text"]
    sanitized = json_of(run_cli, "sanitize", BADNETS, "--data", CLEAN, "--probe", TRIGGER, "--limit", "100",
                        "-o", tmp_path / "s.onnx", code=1)
    schema.validate(sanitized)
    from scanner.report.sarif import to_sarif

    log = to_sarif(sanitized)
    SARIF.validate(log)
    assert log["runs"][0]["results"][0]["ruleId"] == "SCN001"
    from scanner.report.html import sanitize_html

    page = sanitize_html(sanitized)
    assert "before / after" in page and "<script" not in page


def test_sanitize_synthesized_report(run_cli, schema, tmp_path):
    # A fixed query budget: the same work on any machine, so the outcome has one right answer.
    rc, out, err = run_cli("-vv", "sanitize", BADNETS, "--data", CLEAN, "--limit", "200", "--queries", "20000",
                           "-o", tmp_path / "s.onnx", "--threads", "2", "--format", "json")
    assert rc == 1, err
    report = json.loads(out)
    assert report.get("mode") == "synthesized" and report["outcome"] == "removed" and report["targets"] == [0]
    syn = report["evidence"]["synthesis"]
    assert syn["plan"]["queries"] == 20000 and syn["queries"] <= 20000 and not syn["truncated"]
    schema.validate(report)
    from scanner.report.sarif import to_sarif

    SARIF.validate(to_sarif(report))
    from scanner.report.html import sanitize_html

    page = sanitize_html(report)
    assert "data:image/png;base64," in page and "<script" not in page


def test_time_capped_search_says_so_and_the_gate_fails_it(run_cli, schema, tmp_path):
    # A one-second safety cap under a budget far beyond it: the search is cut, the report says so, and the
    # default policy (partial = "fail") does not pass the model.
    report = json_of(run_cli, "gate", BADNETS, "--data", CLEAN, "--limit", "200", "--queries", "200000",
                     "--budget", "1", "--threads", "2", code=1)
    schema.validate(report)
    entry = report["models"][0]
    assert entry["evidence"]["synthesis"]["truncated"] is True and entry["status"] == "failed"
    assert any("cut short by its time cap" in r for r in entry["reasons"])


def test_evaluate_report(run_cli, schema, tmp_path):
    schema.validate(json_of(run_cli, "evaluate", BADNETS, "--data", TEST, "--trigger", TRIGGER, "--target", "0",
                            "--limit", "300"))


def test_gate_report(run_cli, schema, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    report = json_of(run_cli, "gate", BADNETS, bad, "--data", CLEAN, "--budget", "0", "--threads", "2", code=2)
    schema.validate(report)


@pytest.mark.parametrize("mutate, where", [
    (lambda r: r.update(schema="scanner.scan/9"), "schema"),
    (lambda r: r["models"][0].update(verdict="maybe"), "verdict"),
    (lambda r: r["models"][0].update(exit_code=0), "exit_code"),
    (lambda r: r.pop("policy"), "policy"),
])
def test_schema_rejects_broken_reports(schema, mutate, where):
    report = {
        "schema": "scanner.gate/1", "tool": {"name": "scanner", "version": "0"},
        "policy": {"fail_on": "backdoored", "warn_on": "suspicious", "min_images": 1, "unanalysable": "fail",
                   "partial": "warn", "analysis": {}, "source": "default"},
        "result": "error", "exit_code": 2, "summary": {"models": 1},
        "models": [{"path": "x.onnx", "status": "error", "exit_code": 2, "verdict": None, "reasons": ["r"], "warnings": [],
                    "error": "x.onnx: bad", "model": {"path": "x.onnx"}}],
    }
    schema.validate(report)
    mutate(report)
    errors = list(schema.iter_errors(report))
    assert errors and any(where in (e.json_path + e.message) for e in errors), [e.message for e in errors]
