"""SARIF 2.1.0 logs from gate, sanitize and scan reports (for code-scanning dashboards).

One result per finding, the model file as the artifact location (a URI relative to ``%SRCROOT%``, the
current directory, when the model lies under it), stable rule ids:

======  ============================  ==========================================================
id      name                          a result per
======  ============================  ==========================================================
SCN001  backdoor-detected             suspected target class of a model with verdict backdoored
SCN002  suspicious-model              suspected target class of a model with verdict suspicious
SCN003  analysis-error                model that could not be read or analysed
SCN004  lipschitz-outlier-channels    conv layer with CLP outlier channels, in a flagged model
SCN005  nothing-to-analyse            model without a supported layer
SCN006  probe-outlier-channels        layer whose channels a probe drives far above clean (scan)
SCN007  policy-violation              other gate policy reasons (min_images, thresholds, time budget)
SCN008  backdoor-not-removed          sanitize / prune report whose repair left the backdoor working
SCN009  graph-backdoor                graph audit finding: logic on the input-to-scores path a classifier
                                      does not need (a branch past the head, control flow, a switch)
======  ============================  ==========================================================

Levels: in a gate report a finding that fails the policy is ``error``, one that warns is ``warning``,
anything else ``note``; outside the gate, backdoored is ``error``, suspicious ``warning``, the rest ``note``.
"""

import hashlib
import os
from pathlib import Path

from scanner import __version__

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
INFORMATION_URI = "https://arxiv.org/abs/2002.12162"
"""Where to read about the method (the paper); replace with the project's home page when it has one."""

RULES = [
    ("SCN001", "backdoor-detected", "error", 9.0, "A backdoor was detected",
     "Trigger synthesis found a far smaller trigger for this class than for the others (size anomaly), that sends most "
     "clean images to it and drives last-layer channels far above their clean peak (l-inf): the model answers to a "
     "hidden trigger. Do not deploy it; sanitize it (`scanner sanitize`) or retrain from trusted data."),
    ("SCN002", "suspicious-model", "warning", 5.0, "The model looks suspicious",
     "A class needs a smaller trigger than the others, but the evidence is weaker than for a detected backdoor. "
     "Review the synthesized trigger and the evidence in the HTML audit (`--html`)."),
    ("SCN003", "analysis-error", "error", 7.0, "The model could not be analysed",
     "The model file could not be read, validated or run, or the clean data did not fit it. The gate could not check it."),
    ("SCN004", "lipschitz-outlier-channels", "note", 2.0, "Convolution channels with an outlying Lipschitz bound",
     "Weights-only signal (CLP): channels whose upper Lipschitz bound is above mean + u * std of their layer. "
     "Clean models have some too; it is evidence, not a verdict."),
    ("SCN005", "nothing-to-analyse", "warning", 4.0, "The model has no layer the scanner supports",
     "No Conv, ConvTranspose, Gemm or MatMul layer with constant weights was found: nothing could be analysed."),
    ("SCN006", "probe-outlier-channels", "warning", 5.0, "A probe drives channels far above their clean peak",
     "Channels whose l-inf rise under the probe is an outlier in their layer (robust z-score above 3.5): the paper's "
     "fingerprint of a backdoor trigger."),
    ("SCN007", "policy-violation", "error", 6.0, "The gate policy was violated",
     "A gate policy check other than the verdict failed (minimum clean images, score thresholds, time budget)."),
    ("SCN008", "backdoor-not-removed", "error", 9.0, "A backdoor was found but NOT removed",
     "The repair ran, but measured again on held-out clean images through the repaired model, a trigger that led to "
     "the verdict still works, or the repaired model no longer agrees with the original on clean images. No sanitized "
     "model was written (unless --always). Do not deploy the model."),
    ("SCN009", "graph-backdoor", "error", 9.0, "The graph holds logic a classifier does not need",
     "The graph audit found operators on the path from the image to the scores that a classifier has no use for: "
     "a branch that reaches the scores without passing through the head, control flow or a switch on the image's "
     "values, a crop of the raw input, or unusual operators. Published graph-level backdoors look like this; they "
     "are invisible to weight and activation scans. Inspect the named nodes (`scanner inspect`)."),
]
RULE_INDEX = {rid: i for i, (rid, *_rest) in enumerate(RULES)}
LEVEL_OF = {"backdoored": "error", "suspicious": "warning", "clean": "note"}


def rules():
    """``tool.driver.rules``."""
    out = []
    for rid, name, level, severity, short, full in RULES:
        out.append({
            "id": rid,
            "name": name,
            "shortDescription": {"text": short},
            "fullDescription": {"text": full},
            "helpUri": INFORMATION_URI,
            "defaultConfiguration": {"level": level},
            "properties": {"tags": ["security", "backdoor", "onnx"], "security-severity": f"{severity:.1f}"},
        })
    return out


def artifact_uri(path, base=None):
    """(uri, uriBaseId or None): relative to ``base`` (the cwd) when the file lies under it, else a file URI."""
    base = Path(base or os.getcwd()).resolve()
    p = Path(path)
    full = (p if p.is_absolute() else Path(os.getcwd()) / p).resolve()
    try:
        rel = full.relative_to(base)
        return rel.as_posix(), "%SRCROOT%"
    except ValueError:
        return full.as_uri(), None


def _result(rule, level, message, path, sha256=None, key="", properties=None, base=None):
    uri, base_id = artifact_uri(path, base)
    loc = {"uri": uri}
    if base_id:
        loc["uriBaseId"] = base_id
    fp = hashlib.sha256(f"{rule}|{sha256 or uri}|{key}".encode()).hexdigest()
    res = {
        "ruleId": rule,
        "ruleIndex": RULE_INDEX[rule],
        "level": level,
        "message": {"text": message},
        "locations": [{"physicalLocation": {"artifactLocation": loc}}],
        "partialFingerprints": {"scannerFinding/v1": fp},
    }
    if properties:
        res["properties"] = properties
    return res


def _verdict_results(entry, path, level_for, base):
    """SCN001/SCN002 (one per suspected target) and SCN004 of an analysed model's verdict fields."""
    out = []
    sha = (entry.get("model") or {}).get("sha256")
    verdict = entry.get("verdict")
    if verdict in ("suspicious", "backdoored"):
        rule = "SCN001" if verdict == "backdoored" else "SCN002"
        seen = set()
        for c in entry.get("candidates") or []:
            if c["level"] != verdict or c["target"] in seen:
                continue
            seen.add(c["target"])
            msg = (f"{'Backdoor' if verdict == 'backdoored' else 'Suspicious class'}: target class {c['target']}. A synthesized "
                   f"{c['family']} trigger ({c['trigger']}, size {c['size']:.4f}) sends {c['success']:.0%} of other-class clean "
                   f"images to class {c['target']}; size anomaly index {c['anomaly']:.1f}, l-inf fingerprint z "
                   f"{c['fingerprint_z']:.1f} (channels {c['fingerprint_channels'][:3]}).")
            props = {k: c[k] for k in ("target", "family", "trigger", "size", "success", "anomaly", "fingerprint_z",
                                       "fingerprint_channels")}
            out.append(_result(rule, level_for(verdict), msg, path, sha, f"target {c['target']}", props, base))
    for f in (entry.get("graph") or {}).get("findings", []):
        lvl = {"high": level_for("backdoored"), "medium": level_for("suspicious")}.get(f["severity"], "note")
        msg = f"Graph audit ({f['severity']}): {f['rule']}: {f['message']}. Nodes: {', '.join(f['nodes'][:12])}."
        out.append(_result("SCN009", lvl, msg, path, sha, f"graph {f['rule']} {f['nodes'][:1]}",
                           {k: f[k] for k in ("rule", "severity", "nodes", "target", "join") if k in f}, base))
    clp = (entry.get("evidence") or {}).get("clp") if verdict in ("suspicious", "backdoored") else None
    for layer in (clp or {}).get("layers", []):
        if layer["outliers"]:
            msg = (f"Layer {layer['layer']}: {len(layer['outliers'])} of {layer['channels']} channels have a Lipschitz bound above "
                   f"mean + {clp['u']:g} std (largest z {layer['max_z']:.1f}); channels {layer['outliers'][:16]}.")
            out.append(_result("SCN004", "note", msg, path, sha, f"clp {layer['layer']}",
                               {"layer": layer["layer"], "channels": layer["outliers"]}, base))
    return out


def gate_results(report, base=None):
    out = []
    for e in report["models"]:
        path = e["path"]
        failing = e["status"] in ("failed", "unanalysable", "error")
        reasons = list(e.get("reasons", []))

        def level_for(verdict, e=e):
            fail_on, warn_on = report["policy"]["fail_on"], report["policy"]["warn_on"]
            levels = ("clean", "suspicious", "backdoored")
            rank = levels.index(verdict)
            if fail_on != "never" and rank >= levels.index(fail_on):
                return "error"
            if warn_on != "never" and rank >= levels.index(warn_on):
                return "warning"
            return "note"

        if e["status"] == "error":
            out.append(_result("SCN003", "error", f"Could not analyse the model: {e.get('error')}", path, key="error", base=base))
            continue
        if e["status"] in ("unanalysable", "skipped"):
            out.append(_result("SCN005", "error" if failing else "warning", f"Nothing to analyse: {e.get('error')}", path,
                               key="nothing", base=base))
            continue
        out += _verdict_results(e, path, level_for, base)
        other = [r for r in reasons if not r.startswith("verdict ")]
        other += [w for w in e.get("warnings", []) if not w.startswith("verdict ")]
        for r in other:
            lvl = "error" if r in reasons else "warning"
            out.append(_result("SCN007", lvl, f"Gate policy: {r}", (e.get("model") or {}).get("path", path),
                               (e.get("model") or {}).get("sha256"), r, None, base))
    return out


def _outcome_results(report, path, base):
    """SCN008 for a repair report whose outcome is ``not_removed``."""
    if report.get("outcome") != "not_removed":
        return []
    check = report.get("removal") or {}
    why = "; ".join(check.get("reasons") or []) or "the removal check failed"
    written = f" The model was written anyway (--always): {report['output']}." if report.get("output") else " No model was written."
    return [_result("SCN008", "error", f"Backdoor found but NOT removed: {why}.{written}", path, report["model"].get("sha256"),
                    "not removed", {"removal": check}, base)]


def sanitize_results(report, base=None):
    path = report["model"]["path"]
    if "verdict" in report:  # synthesized triggers
        return _verdict_results(report, path, lambda v: LEVEL_OF[v], base) + _outcome_results(report, path, base)
    out = _outcome_results(report, path, base)
    out += _verdict_results({"graph": report.get("graph"), "model": report["model"]}, path, lambda v: LEVEL_OF[v], base)
    if report.get("backdoor_found"):
        for i, p in enumerate(report["probes"]):
            success = report["before"]["probe_success"][i]
            msg = (f"Backdoor: the probe {p.get('source')} sends {success:.0%} of clean images to class {p['target']}"
                   f" ({report['after']['probe_success'][i]:.0%} after sanitizing).")
            out.append(_result("SCN001", "error", msg, path, report["model"]["sha256"], f"probe {p.get('source')}",
                               {"target": p["target"], "probe_success": success}, base))
    return out


def scan_results(report, base=None):
    path, sha = report["model"]["path"], report["model"]["sha256"]
    out = _verdict_results({"graph": report.get("audit"), "model": report["model"]}, path, lambda v: LEVEL_OF[v], base)
    for layer in report["layers"]:
        if layer.get("outliers"):
            top = sorted(layer["outliers"], key=lambda i: -(layer["score"][i] or 0))[:16]
            msg = (f"Layer {layer['id']}: the probe drives {len(layer['outliers'])} channel(s) far above their clean l-inf peak "
                   f"(robust z > 3.5): {top}.")
            out.append(_result("SCN006", "warning", msg, path, sha, f"scan {layer['id']}",
                               {"layer": layer["id"], "channels": layer["outliers"]}, base))
    return out


def to_sarif(report, base=None, exit_code=None):
    """A SARIF 2.1.0 log (a dict) for a gate, sanitize or scan report."""
    schema = report.get("schema", "")
    if schema.startswith("scanner.gate/"):
        results = gate_results(report, base)
        exit_code = report["exit_code"] if exit_code is None else exit_code
    elif schema.startswith(("scanner.sanitize/", "scanner.prune/")):
        results = sanitize_results(report, base)
    elif schema.startswith("scanner.scan/"):
        results = scan_results(report, base)
    else:
        raise ValueError(f"no SARIF form for a {schema or 'unknown'} report")
    base_dir = Path(base or os.getcwd()).resolve()
    invocation = {"executionSuccessful": exit_code in (None, 0, 1, 4)}
    if exit_code is not None:
        invocation["exitCode"] = int(exit_code)
    run = {
        "tool": {"driver": {"name": "scanner", "version": __version__, "semanticVersion": __version__,
                            "informationUri": INFORMATION_URI, "rules": rules()}},
        "originalUriBaseIds": {"%SRCROOT%": {"uri": base_dir.as_uri() + "/"}},
        "invocations": [invocation],
        "results": results,
        "properties": {"report_schema": schema},
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def to_sarif_json(report, base=None, exit_code=None):
    from scanner.report.tables import to_json

    return to_json(to_sarif(report, base, exit_code))
