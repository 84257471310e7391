"""Reports for people (terminal tables) and machines (JSON)."""

import json
import os
import sys


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
