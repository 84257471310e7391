"""Reports for people (terminal tables, on stderr or stdout) and machines (JSON)."""

import json
import os
import sys

from scanner.policy import STATUSES


def to_json(report):
    """One JSON document, stable key order as built, ending with a newline."""
    return json.dumps(report, indent=2, allow_nan=False, default=_default) + "\n"


def _default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def color_enabled(stream=None):
    """Color only on a terminal and when NO_COLOR is unset."""
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def table(headers, rows, align=None):
    """A plain text table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or ["<"] + [">"] * (len(headers) - 1)
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths))
    lines = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)


def _g(x, digits=4):
    return "-" if x is None else f"{x:.{digits}g}"


def scan_table(report, top=10):
    """Terminal summary of a scan report."""
    m = report["model"]
    out = [
        f"model     {m['path']}  (sha256 {m['sha256'][:12]}, opset {m['opset']})",
        f"runtime   {report['runtime']['provider']}",
        f"clean     {report['data']['clean']['images']} images from {report['data']['clean']['path']}"
        + (f"  ({report['data']['clean']['skipped']} skipped)" if report["data"]["clean"]["skipped"] else ""),
    ]
    probe = report.get("probe")
    if probe:
        eff = probe["effect"]
        line = f"probe     {probe['source']} ({probe.get('trigger') or str(probe.get('images')) + ' images'})"
        if "flip_rate" in eff:
            line += f"; flips {eff['flip_rate']:.1%} of predictions"
            if "dominant_class" in eff:
                line += f", toward class {eff['dominant_class']} ({eff['dominant_class_success']:.1%} of others)"
        out.append(line)
    out.append("")
    for layer in report["layers"]:
        c = layer["clean"]
        mark = "  [last conv]" if layer["is_last_conv"] else ""
        out.append(f"layer {layer['id']}  {layer['op_type']}, {layer['channels']} channels, spatial {layer['spatial']}{mark}")
        if "score" in layer:
            idx = sorted(range(layer["channels"]), key=lambda i: -(layer["score"][i] or 0))[:top]
            rows = [
                [
                    i,
                    _g(layer["score"][i], 3),
                    _g(c["linf"]["mean"][i]),
                    _g(layer["probe"]["linf"]["mean"][i]),
                    _g(_ratio(layer["probe"]["l1"]["mean"][i], c["l1"]["mean"][i]), 3),
                    _g(_ratio(layer["probe"]["linf"]["mean"][i], c["linf"]["mean"][i]), 3),
                    "OUTLIER" if i in layer["outliers"] else "",
                ]
                for i in idx
            ]
            out.append(table(["channel", "score", "clean linf", "probe linf", "l1 x", "linf x", ""], rows))
            out.append(f"{len(layer['outliers'])} outlier channel(s) (score > 3.5)")
        else:
            idx = sorted(range(layer["channels"]), key=lambda i: -(c["linf"]["max"][i] or 0))[:top]
            rows = [[i, _g(c["linf"]["mean"][i]), _g(c["linf"]["max"][i]), _g(c["l1"]["mean"][i]), _g(c["l2"]["mean"][i])] for i in idx]
            out.append(table(["channel", "linf mean", "linf max", "l1 mean", "l2 mean"], rows))
        out.append("")
    t = report["timing"]
    out.append(f"time      {t['seconds']:.2f}s ({t['clean_images_per_second']:.0f} img/s clean)")
    return "\n".join(out) + "\n"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def audit_lines(graph):
    """The graph audit's findings as text lines (none for a clean graph)."""
    if not graph or not graph["findings"]:
        return []
    lines = [f"graph audit: {len(graph['findings'])} finding(s) (head {graph['head']})"]
    for f in graph["findings"]:
        nodes = ", ".join(f["nodes"][:6]) + (" ..." if len(f["nodes"]) > 6 else "")
        lines.append(f"  [{f['severity']}] {f['rule']}: {f['message']} (nodes: {nodes})")
    return lines


def inspect_table(info):
    """Terminal view of ``scanner inspect``."""
    m = info["model"]
    out = [
        f"model      {m['path']}",
        f"sha256     {m['sha256']}",
        f"producer   {m['producer'] or '-'}   ir {m['ir_version']}   opset {m['opset']}   nodes {m['nodes']}",
        f"input      {m['input']['name']} {m['input']['shape']} {m['input']['dtype']}",
    ]
    for o in m["outputs"]:
        out.append(f"output     {o['name']} {o['shape']} {o['dtype']}")
    p = info["preprocess"]
    out.append(f"preprocess {json.dumps({k: v for k, v in p.items()})}  (from {', '.join(info['preprocess_sources'])})")
    out.append("")
    rows = [
        [
            l["index"],
            l["id"],
            l["op_type"],
            l["channels"],
            "x".join(map(str, l["spatial"])) if l["spatial"] else "-",
            "+".join(l["chain"][1:]) or "-",
            ("last conv" if l["is_last_conv"] else "") + ("head" if l["is_head"] else ""),
        ]
        for l in info["layers"]
    ]
    out.append(table(["#", "layer id", "op", "channels", "spatial", "read after", ""], rows, [">", "<", "<", ">", ">", "<", "<"]))
    out.append(f"{len(info['layers'])} layers")
    graph = info.get("audit")
    out += audit_lines(graph) or ([f"graph audit: no findings ({graph['nodes']} nodes)"] if graph else [])
    return "\n".join(out) + "\n"


def evaluate_table(report):
    """Terminal view of ``scanner evaluate``."""
    models = report["models"]
    headers = ["", *[m["model"] for m in models]] + (["delta"] if "delta" in report else [])
    rows = [["images", *[m["images"] for m in models]] + ([""] if "delta" in report else [])]
    for key, name in (("clean_accuracy", "clean accuracy"), ("attack_success_rate", f"attack success -> {report['target']}")):
        if key in models[0]:
            row = [name, *[f"{m[key]:.2%}" for m in models]]
            if "delta" in report:
                row.append(f"{report['delta'][key] * 100:+.2f} pts")
            rows.append(row)
    if "delta" in report:
        rows.append(["prediction agreement", "", f"{report['delta']['prediction_agreement']:.2%}", ""])
    return table(headers, rows) + "\n"


def repair_table(report):
    """Before/after table of a prune or sanitize report."""
    b, a = report["before"], report["after"]
    rows = [["channels pruned", 0, report["pruned_count"]]]
    if "accuracy" in b:
        rows.append(["clean accuracy", f"{b['accuracy']:.2%}", f"{a['accuracy']:.2%}"])
    rows.append(["clean agreement", f"{b['agreement']:.2%}", f"{a['agreement']:.2%}"])
    for i, p in enumerate(report["probes"]):
        label = "probe changes (all-to-all)" if p.get("all_to_all") else f"probe success -> {p['target']}"
        rows.append([label, f"{b['probe_success'][i]:.2%}", f"{a['probe_success'][i]:.2%}"])
    if report.get("refit"):
        rows.append(["head refit", "-", report["rule"].get("method")])
    lines = []
    clip = report.get("clip")
    if clip:
        chosen = clip["chosen"]
        lines.append(f"activation clipping: {clip['layers']} layers bounded at the {chosen:g}th percentile of clean peaks "
                     "('before' is the clipped model)" if chosen is not None
                     else "activation clipping: no bound kept the clean agreement; not clipped")
    lines.append(table(["", "before", "after"], rows))
    for entry in report["pruned"]:
        lines.append(f"pruned {entry['layer']}: {len(entry['channels'])} channel(s) {entry['channels'][:16]}{' ...' if len(entry['channels']) > 16 else ''}")
    lines += removal_lines(report)
    return "\n".join(lines) + "\n"


OUTCOME_TEXT = {"nothing_found": "nothing found", "removed": "backdoor REMOVED (measured dead on held-out images)",
                "not_removed": "backdoor found, NOT removed"}


def removal_lines(report):
    """The removal check and the outcome of a repair report, as text lines."""
    check, out = report.get("removal"), report.get("outcome")
    lines = []
    if check:
        where = f"{check['images']} held-out" if check["held_out"] else f"{check['images']} (not held out: small data)"
        acc = check.get("accuracy")
        acc_text = f", clean accuracy {acc['before']:.2%} -> {acc['after']:.2%}" if acc else ""
        lines.append(f"removal check on {where} clean images, through the repaired model: agreement "
                     f"{check['agreement']:.2%}{acc_text}")
        for p in check["probes"]:
            src = f" (from class {', '.join(map(str, p['sources']))})" if p.get("sources") else ""
            dest = "any class (all-to-all)" if p.get("all_to_all") else f"class {p['target']}"
            lines.append(f"  -> {dest}{src}: {p['success_before']:.1%} -> {p['success_after']:.1%}"
                         f" {'(dead)' if p['dead'] else '(STILL WORKS)'}")
        lines += [f"  {r}" for r in check["reasons"]]
    if out:
        written = f"; written to {report['output']}" if report.get("output") else "; no model written"
        lines.append(f"outcome: {OUTCOME_TEXT[out]}{written}")
    return lines


def verdict_table(report):
    """Human summary of a synthesized-trigger sanitize report (for stderr)."""
    ev = report["evidence"]
    syn = ev["synthesis"]
    rows = []
    for i, row in enumerate(syn["classes"]):
        cells = [row["target"]]
        for fam in syn["families"]:
            c = row.get(fam)
            if c is None:
                cells += ["-", "-", "-"]
                continue
            size = f"{c['size']:.4f}" if c["works"] else f">{ev['sizes'][fam]['cap']:.2f}"
            cells += [size, f"{c['success']:.0%}", f"{ev['sizes'][fam]['anomaly'][i]:+.1f}"]
        rows.append(cells)
    heads = ["class"] + [h for fam in syn["families"] for h in (f"{fam} size", "success", "anomaly")]
    lines = [table(heads, rows)]
    targets = ", ".join(str(t) for t in report["targets"]) or "-"
    lines.append(f"verdict: {report['verdict']} (target {targets}); {syn['queries']} queries in {syn['seconds']:.1f}s"
                 + (" (time budget reached)" if syn["truncated"] else ""))
    for c in report["candidates"][:4]:
        lines.append(f"  class {c['target']} {c['family']}: {c['trigger']}, size {c['size']:.4f}, success {c['success']:.1%}, "
                     f"anomaly {c['anomaly']:.1f}, l-inf fingerprint z {c['fingerprint_z']:.1f} -> {c['level']}"
                     + (f", specificity {c['specificity']:+.2f}" if c.get("specificity") is not None else "")
                     + (f" (all-to-all: changes {c['changed']:.0%} of held-out predictions)" if c.get("kind") == "all-to-all" else ""))
    lines += audit_lines(report.get("graph"))
    if report["verdict"] == "clean" and report.get("output") is None:
        lines.append("no backdoor found: no model written (use --always to write one anyway)")
    return "\n".join(lines) + "\n"


_COLORS = {"passed": "32", "warned": "33", "skipped": "33", "failed": "31", "unanalysable": "35", "error": "31",
           "clean": "32", "suspicious": "33", "backdoored": "31"}


def _paint(text, key, color):
    return f"\x1b[{_COLORS[key]}m{text}\x1b[0m" if color and key in _COLORS else text


def gate_table(report, color=False):
    """The terminal summary: one row per model (model, verdict, targets, evidence, policy result)."""
    rows, notes = [], []
    for e in report["models"]:
        verdict = e.get("verdict") or "-"
        evidence = "-"
        if e.get("candidates"):
            c = e["candidates"][0]
            evidence = f"{c['trigger']}, success {c['success']:.0%}, anomaly {c['anomaly']:.1f}, l-inf z {c['fingerprint_z']:.1f}"
        elif (e.get("graph") or {}).get("findings"):
            f = e["graph"]["findings"][0]
            evidence = f"graph {f['rule']} ({f['severity']}): {f['message']}"[:90]
        elif e.get("evidence"):
            worst_a = max((max(s["anomaly"]) for s in e["evidence"]["sizes"].values()), default=0.0)
            evidence = f"largest size anomaly {worst_a:.1f}"
        elif e.get("error"):
            msg = e["error"][len(e["path"]) + 2:] if e["error"].startswith(e["path"] + ": ") else e["error"]
            evidence = msg[:60] + ("..." if len(msg) > 60 else "")
        targets = ", ".join(str(t) for t in e.get("targets") or []) or "-"
        rows.append([e["path"], verdict, targets, evidence, e["status"].upper()])
        for r in e["reasons"]:
            notes.append(f"  {e['path']}: {r}")
        for w in e["warnings"]:
            notes.append(f"  {e['path']}: warning: {w}")
    text = table(["model", "verdict", "targets", "evidence", "policy"], rows, ["<", "<", "<", "<", "<"])
    if color:  # color after alignment (escape codes have no width)
        lines = text.split("\n")
        for i, e in enumerate(report["models"]):
            line = lines[i + 2]
            status = e["status"].upper()
            k = line.rfind(status)
            line = line[:k] + _paint(status, e["status"], True) + line[k + len(status):]
            v = e.get("verdict")
            if v:
                k = line.find(" " + v + " ", len(e["path"]))
                if k >= 0:
                    line = line[: k + 1] + _paint(v, v, True) + line[k + 1 + len(v):]
            lines[i + 2] = line
        text = "\n".join(lines)
    out = [text]
    if notes:
        out += [""] + notes
    s = report["summary"]
    parts = [f"{s[k]} {k}" for k in STATUSES if s[k]]
    result = report["result"].upper()
    out.append("")
    out.append(f"gate: {_paint(result, report['result'], color)} (exit {report['exit_code']}): {', '.join(parts)}; "
               f"policy {report['policy']['source']}; {report['seconds']:.1f}s")
    return "\n".join(out) + "\n"
