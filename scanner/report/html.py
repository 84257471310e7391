"""The HTML audit (``--html FILE``): one self-contained file a reviewer opens offline.

Per model, in reading order: the verdict and its evidence; the model facts; the paper's picture (per-channel
l-inf, l1 and l2 norms on clean vs triggered images, suspected channels apart from the others); the top
channels; the triggers as images, on clean images, with the model's predictions; an occlusion saliency map
(forward passes only) on triggered images; the before/after table when a sanitized model exists.

Plots are drawn with matplotlib (Agg) and embedded as PNG ``data:`` URIs; no script, no external resource.
matplotlib is imported only here, when ``--html`` is used.
"""

import base64
import html
import io
import logging
import time
from types import SimpleNamespace

import numpy as np

from scanner import __version__
from scanner.errors import ScannerError
from scanner.runtime.runner import probabilities

log = logging.getLogger("scanner")
SAMPLES = 4
"""Clean images shown per trigger (and saliency maps per trigger)."""
STATS_IMAGES = 256
"""Clean images the per-channel picture of a gate audit is measured on."""
NORM_LABELS = {"linf": "l-inf (peak)", "l1": "l1 (sum)", "l2": "l2"}

CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1d2330;margin:0;background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:20px;margin:0 0 10px} h3{font-size:16px;margin:22px 0 8px}
.sub{color:#5b6475;margin:0 0 18px}
section.model{background:#fff;border:1px solid #dde1e8;border-radius:10px;padding:20px 24px;margin:0 0 24px}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:13px;color:#fff;vertical-align:2px}
.b-passed,.b-clean{background:#1f883d}.b-warned,.b-suspicious,.b-skipped{background:#bf8700}
.b-failed,.b-backdoored,.b-error{background:#cf222e}.b-unanalysable{background:#8250df}.b-info{background:#57606a}
.verdict{font-size:18px;margin:6px 0 10px}
ul.reasons{margin:4px 0 10px;padding-left:20px} ul.reasons li.w{color:#7d5a00}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13.5px}
th,td{border-bottom:1px solid #e4e7ec;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#f0f2f5;font-weight:600} td.l,th.l{text-align:left}
tr.hot td{background:#fff1f0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0;font-size:13.5px}
dl.facts dt{color:#5b6475} dl.facts dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
figure{margin:8px 0 14px} figcaption{color:#5b6475;font-size:13px;max-width:1000px}
img.plot{max-width:100%;height:auto;display:block}
.strip{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.cell{text-align:center;font-size:12px;color:#5b6475}
.cell img{display:block;image-rendering:pixelated;border:1px solid #ccd1d9;width:112px;height:auto}
.row-label{font-weight:600;color:#1d2330;width:114px;text-align:left;font-size:13px;padding-top:40px}
.note{color:#5b6475;font-size:13px}
nav{font-size:13px;margin:0 0 18px} nav a{margin-right:14px}
"""


def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ScannerError("--html needs matplotlib: pip install 'matplotlib>=3.7'") from None
    return plt


def _e(x):
    return html.escape(str(x), quote=True)


def _fig_uri(fig):
    plt = _mpl()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pixels_uri(img, color="rgb", scale=None):
    """A data URI of an (H, W, C) 0-255 image in the model's color order; small images are upscaled (nearest)."""
    import cv2

    img = np.clip(np.rint(np.asarray(img, np.float32)), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 3 and color != "bgr":
        img = img[:, :, ::-1]
    h, w = img.shape[:2]
    scale = scale or max(1, int(np.ceil(112 / max(h, w))))
    if scale > 1:
        img = cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _img(uri, alt, cls="plot"):
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}">'


def _table(headers, rows, left=1, hot=()):
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for j, r in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(r))
        body.append(f'<tr class="{"hot" if j in hot else ""}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _g(x, fmt=".4g"):
    return "-" if x is None else format(x, fmt)


# ---- model runner ------------------------------------------------------------------------------------
def _probs(runner, pixels):
    """Class probabilities of ``pixels`` through a :class:`scanner.runtime.runner.Runner`."""
    return probabilities(runner.run(np.asarray(pixels), norms=False, features=False).scores.astype(np.float64))


def occlusion(runner, pixels, target, fill=None):
    """Occlusion saliency (N, H, W): how much the ``target`` probability drops when a window is covered.

    A square window (about 1/7 of the image side) slides with half-window stride; each window is filled with
    ``fill`` (default: the image's mean) and the drop, averaged over the windows covering a pixel, is its
    saliency. Gradient-free: forward passes only.
    """
    pixels = np.asarray(pixels, np.float32)
    n, h, w, _ = pixels.shape
    k = max(2, int(round(min(h, w) / 7)))
    s = max(1, k // 2)
    ys = list(range(0, max(h - k, 0) + 1, s))
    xs = list(range(0, max(w - k, 0) + 1, s))
    if ys[-1] != h - k:
        ys.append(h - k)
    if xs[-1] != w - k:
        xs.append(w - k)
    base = _probs(runner, pixels)[:, target]
    maps = np.zeros((n, h, w))
    for i in range(n):
        f = pixels[i].mean((0, 1)) if fill is None else fill
        batch = np.repeat(pixels[i : i + 1], len(ys) * len(xs), axis=0)
        j = 0
        for y in ys:
            for x in xs:
                batch[j, y : y + k, x : x + k] = f
                j += 1
        p = _probs(runner, batch)[:, target]
        acc, cnt = np.zeros((h, w)), np.zeros((h, w))
        j = 0
        for y in ys:
            for x in xs:
                acc[y : y + k, x : x + k] += base[i] - p[j]
                cnt[y : y + k, x : x + k] += 1
                j += 1
        maps[i] = acc / np.maximum(cnt, 1)
    return maps


# ---- sections ----------------------------------------------------------------------------------------
def _verdict_section(view):
    parts = []
    status = view.get("status")
    verdict = view.get("verdict")
    line = []
    if status:
        line.append(f'gate <span class="badge b-{_e(status)}">{_e(status.upper())}</span>')
    if verdict:
        targets = ", ".join(str(t) for t in view.get("targets") or []) or "none"
        line.append(f'verdict <span class="badge b-{_e(verdict)}">{_e(verdict)}</span> suspected target class: <b>{_e(targets)}</b>')
    if line:
        parts.append(f'<p class="verdict">{" &nbsp; ".join(line)}</p>')
    items = [f"<li>{_e(r)}</li>" for r in view.get("reasons") or []]
    items += [f'<li class="w">warning: {_e(w)}</li>' for w in view.get("warnings") or []]
    if items:
        parts.append(f'<ul class="reasons">{"".join(items)}</ul>')
    if view.get("error"):
        parts.append(f'<p class="note">{_e(view["error"])}</p>')
    cands = view.get("candidates") or []
    if cands:
        rows = [[c["target"], c["family"], c["level"], c["trigger"], f"{c['size']:.4f}", f"{c['success']:.1%}",
                 f"{c['anomaly']:.2f}", f"{c['fingerprint_z']:.1f}", ", ".join(map(str, c["fingerprint_channels"][:3]))]
                for c in cands]
        parts.append("<h3>Evidence: classes with an anomalously small working trigger</h3>")
        parts.append(_table(["class", "family", "level", "smallest trigger", "size", "success", "size anomaly",
                             "l-inf z", "channels"], rows, left=4))
    graph = view.get("graph")
    if graph and graph.get("findings"):
        parts.append(f"<h3>Graph audit: logic on the path from the image to the scores (head {_e(graph.get('head'))})</h3>")
        rows = [[f["severity"], f["rule"], f["message"], ", ".join(f["nodes"][:12]) + (" ..." if len(f["nodes"]) > 12 else "")]
                for f in graph["findings"]]
        parts.append(_table(["severity", "rule", "finding", "nodes"], rows, left=4,
                            hot=[i for i, f in enumerate(graph["findings"]) if f["severity"] == "high"]))
    sizes = view.get("sizes")
    if sizes:
        parts.append(_sizes_figure(view))
    th = view.get("thresholds")
    if th:
        parts.append(f'<p class="note">Verdict rules: a class is flagged when its synthesized trigger works (success &ge; '
                     f'{th.get("success", 0.9):.0%} on held-out clean images) and its size anomaly index is above '
                     f'{th.get("anomaly")}; backdoored when the anomaly reaches {th.get("strong_anomaly")} or the l-inf '
                     f'fingerprint z reaches {th.get("fingerprint_z")}; suspicious from anomaly {th.get("suspicious_anomaly")} '
                     f'or z {th.get("suspicious_fingerprint_z")}.</p>')
    return "".join(parts)


def _sizes_figure(view):
    plt = _mpl()
    sizes = view["sizes"]
    classes = view.get("classes") or list(range(len(next(iter(sizes.values()))["sizes"])))
    fams = list(sizes)
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 2.9), squeeze=False)
    flagged = {(c["target"], c["family"]) for c in view.get("candidates") or [] if c["level"] == view.get("verdict")}
    for ax, fam in zip(axes[0], fams):
        targets = {t for t, f in flagged if f == fam}
        s = sizes[fam]
        cap = s["cap"]
        vals = [cap if v is None else v for v in s["sizes"]]
        colors = ["#cf222e" if c in targets else ("#8c959f" if v is None else "#4c78a8") for c, v in zip(classes, s["sizes"])]
        ax.bar([str(c) for c in classes], vals, color=colors)
        ax.axhline(s["median_size"], color="#333", lw=0.8, ls="--", label=f"median {s['median_size']:.3g}")
        for i, (v, a) in enumerate(zip(vals, s["anomaly"])):
            ax.annotate(f"{a:+.1f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{fam}: smallest working trigger per class (size; anomaly index above bars)", fontsize=9)
        ax.set_xlabel("target class")
        ax.set_ylabel("patch area fraction" if fam == "patch" else "blend opacity")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    cap = ("Per class, the size of the smallest trigger the search found (grey: none works, drawn at the family's cap). "
           "A backdoor's target needs a far smaller trigger than the other classes (red: suspected).")
    return f'<figure>{_img(_fig_uri(fig), "trigger size per class")}<figcaption>{_e(cap)}</figcaption></figure>'


def _facts_section(view):
    m = view.get("facts") or {}
    if not m.get("sha256"):
        return ""
    rows = [("path", m["path"]), ("sha256", m["sha256"]), ("producer", m.get("producer") or "-"),
            ("ir / opset / nodes", f"{m.get('ir_version')} / {m.get('opset')} / {m.get('nodes')}"),
            ("input", f"{m['input']['name']} {m['input']['shape']} {m['input']['dtype']}")]
    rows += [("output", f"{o['name']} {o['shape']} {o['dtype']}") for o in m.get("outputs", [])]
    if view.get("preprocess"):
        p = view["preprocess"]
        rows.append(("preprocess", ", ".join(f"{k} {v}" for k, v in p.items())))
    if view.get("data"):
        d = view["data"]
        rows.append(("clean data", f"{d.get('clean')} ({d.get('images')} images)"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return f'<h3>Model</h3><dl class="facts">{dl}</dl>'


def _channels_section(view):
    """The paper's picture and the top channels, from a scan-like report (clean vs probe per-channel norms)."""
    scan = view.get("scan")
    if not scan or not scan.get("layers"):
        return ""
    plt = _mpl()
    parts = ["<h3>Per-channel activation norms: clean vs triggered (the paper's picture)</h3>"]
    layer = next((l for l in scan["layers"] if "probe" in l), scan["layers"][0])
    c = layer["clean"]
    has_probe = "probe" in layer
    suspects = set(layer.get("outliers") or []) | set(view.get("suspect_channels") or [])
    ch = np.arange(layer["channels"])
    sus = np.array([i in suspects for i in ch])
    ratios = {}
    for k in ("linf", "l1", "l2"):
        if has_probe:
            clean = np.array([np.nan if v is None else v for v in c[k]["mean"]], np.float64)
            probe = np.array([np.nan if v is None else v for v in layer["probe"][k]["mean"]], np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios[k] = np.where(clean > 0, probe / clean, np.nan)
    allr = np.concatenate([r[np.isfinite(r) & (r > 0)] for r in ratios.values()]) if ratios else np.array([])
    lo = np.log10(max(allr.min(), 1e-3)) if len(allr) else -1.0
    hi = np.log10(allr.max()) if len(allr) else 1.0
    bins = np.logspace(min(lo, -0.1), max(hi, 0.1) + 0.01, 40)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9), sharex=has_probe)
    for ax, k in zip(axes, ("linf", "l1", "l2")):
        clean = np.array([np.nan if v is None else v for v in c[k]["mean"]], np.float64)
        if has_probe:
            ratio = ratios[k]
            ok = np.isfinite(ratio) & (ratio > 0)
            ax.hist(ratio[ok & ~sus], bins=bins, color="#8c959f", label=f"other channels ({int((ok & ~sus).sum())})")
            if (ok & sus).any():
                ax.hist(ratio[ok & sus], bins=bins, color="#cf222e", label=f"suspected channels ({int((ok & sus).sum())})")
            ax.axvline(1.0, color="#333", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xlabel("triggered mean / clean mean (per channel)")
            ax.set_ylabel("channels")
        else:
            ax.hist(clean[np.isfinite(clean)], bins=40, color="#4c78a8")
            ax.set_xlabel("clean mean (per channel)")
        ax.set_title(NORM_LABELS[k], fontsize=10)
        ax.legend(fontsize=8) if has_probe else None
    fig.suptitle(f"layer {layer['id']} ({layer['channels']} channels)", fontsize=10)
    fig.tight_layout()
    cap = ("How much the trigger raises each channel's norm, as triggered / clean mean, for the l-inf (peak), l1 and l2 "
           "norms of its activation map. A backdoor trigger drives a few channels' peaks far above their clean range "
           "(red, far right in the l-inf panel) while their l1 and l2 move much less (Cheng et al., arXiv:2002.12162).")
    if not has_probe:
        cap = "Clean per-channel norm means (no probe given: run scan with --probe for the clean vs triggered picture)."
    parts.append(f'<figure>{_img(_fig_uri(fig), "per-channel norm ratios")}<figcaption>{_e(cap)}</figcaption></figure>')
    if has_probe:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
        for ax, k in zip(axes, ("linf", "l1", "l2")):
            clean = np.array([np.nan if v is None else v for v in c[k]["mean"]], np.float64)
            probe = np.array([np.nan if v is None else v for v in layer["probe"][k]["mean"]], np.float64)
            ok = np.isfinite(clean) & np.isfinite(probe)
            ax.scatter(clean[ok & ~sus], probe[ok & ~sus], s=10, color="#8c959f", label="other channels")
            ax.scatter(clean[ok & sus], probe[ok & sus], s=22, color="#cf222e", label="suspected channels")
            top = max(np.nanmax(clean[ok]) if ok.any() else 1, np.nanmax(probe[ok]) if ok.any() else 1)
            ax.plot([0, top], [0, top], color="#333", lw=0.8, ls="--")
            ax.set_xlabel("clean images: mean per channel")
            ax.set_ylabel("triggered images: mean")
            ax.set_title(NORM_LABELS[k], fontsize=10)
            ax.legend(fontsize=8)
        fig.tight_layout()
        parts.append(f'<figure>{_img(_fig_uri(fig), "clean vs triggered norms")}<figcaption>Each dot is a channel: its mean '
                     f'norm on clean images (x) and on the same images with the trigger (y). Dashed: no change.'
                     f'</figcaption></figure>')
    rows, hot = [], []
    for i, t in enumerate(scan.get("top_channels") or []):
        rel = t.get("relative_rise") or {}
        rows.append([t["layer"], t["channel"], _g(t["score"], ".3g"), _g(t["clean_linf_mean"]), _g(t["probe_linf_mean"]),
                     _g(rel.get("linf"), ".3g"), _g(rel.get("l1"), ".3g"), _g(rel.get("l2"), ".3g"),
                     "outlier" if t["outlier"] else ""])
        if t["outlier"]:
            hot.append(i)
    if rows:
        parts.append(f"<h3>Top channels by l-inf rise ({_e(view.get('probe_label') or 'probe')})</h3>")
        parts.append(_table(["layer", "channel", "score (robust z)", "clean l-inf", "triggered l-inf", "l-inf x", "l1 x",
                             "l2 x", ""], rows, left=1, hot=hot))
    return "".join(parts)


def _triggers_section(view):
    trig = view.get("triggers") or []
    if not trig:
        return ""
    parts = ["<h3>Triggers, and clean images with them</h3>"]
    for t in trig:
        parts.append(f'<p><b>{_e(t["label"])}</b></p><div class="strip">')
        if t.get("preview"):
            parts.append(f'<div class="cell">{_img(t["preview"], "trigger", "")}trigger</div>')
        for uri, cap in t["clean"]:
            parts.append(f'<div class="cell">{_img(uri, "clean image", "")}{_e(cap)}</div>')
        parts.append("</div><div class=\"strip\">")
        if t.get("preview"):
            parts.append('<div class="cell row-label">with trigger</div>')
        for uri, cap in t["triggered"]:
            parts.append(f'<div class="cell">{_img(uri, "triggered image", "")}{_e(cap)}</div>')
        parts.append("</div>")
        if t.get("saliency"):
            parts.append(f'<figure>{_img(t["saliency"], "occlusion saliency")}<figcaption>Occlusion saliency on the triggered '
                         f'images: where covering a window lowers the probability of class {_e(t["target"])} the most (red). '
                         f'Computed with forward passes only.</figcaption></figure>')
    return "".join(parts)


def _repair_section(view):
    rep = view.get("repair")
    if not rep:
        return ""
    b, a = rep["before"], rep["after"]
    rows = []
    if "accuracy" in b and "accuracy" in a:
        rows.append(["clean accuracy", f"{b['accuracy']:.2%}", f"{a['accuracy']:.2%}"])
    rows.append(["agreement with the original (clean)", f"{b['agreement']:.2%}", f"{a['agreement']:.2%}"])
    for i, s in enumerate(b.get("probe_success") or []):
        label = (rep.get("probes") or [{}] * (i + 1))[i]
        name = label.get("trigger") if isinstance(label.get("trigger"), str) else label.get("source", f"probe {i}")
        rows.append([f"trigger success -> {label.get('target', '?')} ({name})", f"{s:.2%}", f"{a['probe_success'][i]:.2%}"])
    out = "<h3>Sanitized model: before / after</h3>" + _table(["", "before", "after"], rows)
    check = view.get("removal")
    if check:
        from scanner.report.tables import removal_lines

        lines = removal_lines({"removal": check, "outcome": view.get("outcome"), "output": rep.get("output")})
        out += "<ul class=\"reasons\">" + "".join(f"<li>{_e(line.strip())}</li>" for line in lines) + "</ul>"
    elif rep.get("output"):
        out += f'<p class="note">written: {_e(rep["output"])}</p>'
    return out


def _section(view, anchor):
    status = view.get("status") or view.get("verdict") or "info"
    head = (f'<h2 id="{_e(anchor)}">{_e(view["title"])} <span class="badge b-{_e(status)}">{_e(status.upper())}</span></h2>')
    body = [_verdict_section(view), _facts_section(view), _channels_section(view), _triggers_section(view),
            _repair_section(view)]
    return f'<section class="model">{head}{"".join(body)}</section>'


def render(title, subtitle, views):
    """The whole page for ``views`` (one per model)."""
    nav = ""
    if len(views) > 1:
        nav = "<nav>" + "".join(f'<a href="#m{i}">{_e(v["title"])}</a>' for i, v in enumerate(views)) + "</nav>"
    sections = "".join(_section(v, f"m{i}") for i, v in enumerate(views))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f'<h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p>{nav}{sections}'
            f'<p class="note">scanner {_e(__version__)}, {_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}. '
            f"Self-contained: every image is embedded.</p></main></body></html>\n")


# ---- trigger strips ----------------------------------------------------------------------------------
def _pred_caption(p, target=None):
    k = int(p.argmax())
    mark = " *" if target is not None and k == target else ""
    return f"class {k} ({p[k]:.0%}){mark}"


def _saliency_figure(triggered, maps, color, target):
    plt = _mpl()
    n = len(triggered)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.1), squeeze=False)
    vmax = max(float(np.abs(maps).max()), 1e-6)
    for ax, img, m in zip(axes[0], triggered, maps):
        show = img.astype(np.float32) / 255.0
        if show.shape[2] == 1:
            ax.imshow(show[:, :, 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(show[:, :, ::-1] if color == "bgr" else show)
        heat = np.clip(m, 0, None) / vmax
        overlay = np.zeros(heat.shape + (4,))
        overlay[..., 0], overlay[..., 3] = 1.0, 0.75 * heat
        ax.imshow(overlay)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"occlusion saliency for class {target}", fontsize=9)
    fig.tight_layout()
    return _fig_uri(fig)


def trigger_strip(label, runner, clean, apply, target=None, color="rgb", preview=None, saliency=True):
    """A trigger's strip: preview, clean images and their predictions, triggered images, saliency."""
    clean = np.asarray(clean)[:SAMPLES]
    triggered = apply(clean)
    p0, p1 = _probs(runner, clean), _probs(runner, triggered)
    if target is None:
        target = int(np.bincount(p1.argmax(1)).argmax())
    strip = {
        "label": label,
        "target": target,
        "preview": _pixels_uri(preview, color) if preview is not None else None,
        "clean": [(_pixels_uri(x, color), _pred_caption(p)) for x, p in zip(clean, p0)],
        "triggered": [(_pixels_uri(x, color), _pred_caption(p, target)) for x, p in zip(triggered, p1)],
    }
    if saliency:
        maps = occlusion(runner, triggered.astype(np.float32), target)
        strip["saliency"] = _saliency_figure(triggered, maps, color, target)
    return strip


def _candidate_preview(cand, shape, channels):
    """The synthesized trigger on a mid-grey image (a patch in place; a blend pattern at full strength)."""
    h, w = shape
    if cand.family == "patch":
        canvas = np.full((1, h, w, channels), 128.0, np.float32)
        return cand.stamp(canvas)[0]
    return np.broadcast_to(cand.pattern, (h, w, channels)).astype(np.float32)


# ---- gate --------------------------------------------------------------------------------------------
def _memory_set(images, pixels):
    from scanner.data.images import Batch, MemoryImageSet

    source = SimpleNamespace(path=images.path, kind=getattr(images, "kind", "folder"), skipped=list(images.skipped),
                             min_images=1)
    return MemoryImageSet(source, Batch(pixels, [f"image_{i:05d}" for i in range(len(pixels))]))


def gate_view(entry, art):
    """What the audit shows of one gated model (a JSON-ready dict); ``art``: its gate.Artefacts, or None (facts only),
    or a view already drawn (a dict: by a Ray worker)."""
    if isinstance(art, dict):
        return art
    view = {
        "title": entry["path"], "status": entry["status"], "verdict": entry.get("verdict"), "targets": entry.get("targets"),
        "reasons": entry.get("reasons"), "warnings": entry.get("warnings"), "error": entry.get("error"),
        "candidates": entry.get("candidates"), "thresholds": entry.get("thresholds"), "facts": entry.get("model"),
        "preprocess": entry.get("preprocess"), "data": entry.get("data"), "graph": entry.get("graph"),
    }
    ev = entry.get("evidence")
    if ev:
        view["sizes"] = ev["sizes"]
        view["classes"] = [r["target"] for r in ev["synthesis"]["classes"]]
    if art is None:
        return view
    syn = art.synthesis
    tau = syn.config.success
    by_target = {r.target: r for r in syn.classes}
    # The triggers to show: the flagged ones; on a clean verdict the most anomalous class per family.
    picks = []
    for c in entry.get("candidates") or []:
        if c["level"] == entry["verdict"] and (c["target"], c["family"]) not in picks:
            picks.append((c["target"], c["family"]))
    if not picks and ev:
        for fam, s in ev["sizes"].items():
            i = int(np.argmax(s["anomaly"]))
            picks.append((view["classes"][i], fam))
    picks = picks[:3]
    pre, color = art.ctx.preprocess, syn.color
    runner = art.runner
    rng = np.random.RandomState(0)
    sample_idx = rng.choice(len(art.pixels), size=min(SAMPLES * 4, len(art.pixels)), replace=False)
    strips = []
    for t, fam in picks:
        cand = by_target[t].found.get(fam)
        if cand is None:
            continue
        # Show clean images whose class is not the target (the trigger's job is to move them).
        pool = art.pixels[sample_idx]
        preds = _probs(runner, pool).argmax(1)
        clean = pool[preds != t][:SAMPLES] if (preds != t).sum() >= 1 else pool[:SAMPLES]
        works = "works" if cand.success >= tau else "does not reach the success threshold"
        label = (f"class {t}, {fam}: {cand.describe()}, size {cand.size:.4f}, success {cand.success:.0%} on held-out clean "
                 f"images ({works})")
        strips.append(trigger_strip(label, runner, clean, lambda x, c=cand: np.clip(c.stamp(x.astype(np.float32)), 0, 255),
                                    t, color, _candidate_preview(cand, pre.size, art.pixels.shape[3])))
    view["triggers"] = strips
    # The paper's picture, measured with the first shown trigger as the probe.
    if picks and picks[0][1] in by_target[picks[0][0]].found:
        t, fam = picks[0]
        cand = by_target[t].found[fam]
        view["scan"] = measure_channels(art, cand.trigger(color), f"synthesized {fam} trigger for class {t}")
        view["probe_label"] = f"synthesized {fam} trigger for class {t}: {cand.describe()}"
        fp = by_target[t].fingerprint.get(fam) or {}
        view["suspect_channels"] = [c for c, z in zip(fp.get("channels", []), fp.get("z", [])) if z > 3.5]
    return view


def measure_channels(art, trigger, source="synthesized"):
    """A scan-like report of the last conv layer on clean images vs the same images with ``trigger``."""
    from scanner.commands.scan import build_report
    from scanner.data.probes import Probe
    from scanner.detect.scan import measure
    from scanner.graph.instrument import NORMS

    started = time.perf_counter()
    runner = art.ctx.runner(art.ctx.select("last"), norms=NORMS)
    pixels = art.pixels[:STATS_IMAGES]
    images = _memory_set(art.images, pixels)
    clean = measure(runner, images, label="clean")
    probe = Probe(trigger=trigger, source=source)
    probed = measure(runner, images, trigger, label="probe")
    return build_report(art.ctx, runner, images, clean, probe, probed, time.perf_counter() - started)


def gate_html(report, artefacts):
    """The HTML audit of a gate report (``artefacts``: {path: gate.Artefacts or a drawn view} of the analysed models)."""
    views = [gate_view(e, artefacts.get(e["path"])) for e in report["models"]]
    p = report["policy"]
    sub = (f"Deployment gate: {report['result'].upper()} (exit {report['exit_code']}), {report['summary']['models']} model(s); "
           f"policy {p['source']}: fail on {p['fail_on']}, warn on {p['warn_on']}, min_images {p['min_images']}.")
    return render("scanner audit: deployment gate", sub, views)


# ---- scan --------------------------------------------------------------------------------------------
def scan_html(report, ctx, data, probe=None):
    """The HTML audit of a scan report (``ctx``: the scanned model's context): the per-channel picture, top
    channels, the probe on clean images."""
    from scanner.data.images import ImageSet
    from scanner.data.probes import Probe

    pre = ctx.preprocess
    view = {"title": str(ctx.path), "facts": report["model"], "preprocess": report["preprocess"],
            "data": {"clean": report["data"]["clean"]["path"], "images": report["data"]["clean"]["images"]},
            "scan": report, "status": None, "verdict": None, "graph": report.get("audit")}
    probe_obj = Probe.open(probe) if probe is not None and not isinstance(probe, Probe) else probe
    if report.get("probe"):
        eff = report["probe"].get("effect", {})
        outliers = sum(len(l.get("outliers", [])) for l in report["layers"])
        view["reasons"] = [f"probe {report['probe'].get('source')}: {outliers} outlier channel(s) (robust z > 3.5)"
                           + (f"; pushes {eff['dominant_class_success']:.0%} of other images to class {eff['dominant_class']}"
                              if "dominant_class" in eff else "")]
        view["probe_label"] = f"probe {report['probe'].get('source')}"
    if probe_obj is not None:
        runner = ctx.runner()
        clean = ImageSet(data, limit=SAMPLES * 4).load_all(pre).pixels
        target = report["probe"]["effect"].get("dominant_class")
        if probe_obj.trigger is not None:
            trig = probe_obj.trigger
            preds = _probs(runner, clean).argmax(1)
            if target is not None and (preds != target).any():
                clean = clean[preds != target]
            grey = np.full((1, *pre.size, pre.channels), 128, np.uint8)
            view["triggers"] = [trigger_strip(f"probe {probe_obj.source}: {trig.describe()}", runner, clean[:SAMPLES],
                                              lambda x: trig.apply(x, color=pre.color), target, pre.color,
                                              trig.apply(grey, color=pre.color)[0])]
        else:
            probe_px = probe_obj.images.load_all(pre).pixels[:SAMPLES]
            p = _probs(runner, probe_px)
            target = int(np.bincount(p.argmax(1)).argmax()) if target is None else target
            strip = {"label": f"probe images {probe_obj.source}", "target": target, "preview": None, "clean": [],
                     "triggered": [(_pixels_uri(x, pre.color), _pred_caption(q, target)) for x, q in zip(probe_px, p)]}
            strip["saliency"] = _saliency_figure(probe_px, occlusion(runner, probe_px.astype(np.float32), target), pre.color, target)
            view["triggers"] = [strip]
    return render("scanner audit: scan", f"Per-channel l-inf / l1 / l2 activation norms of {ctx.path}", [view])


# ---- sanitize ----------------------------------------------------------------------------------------
def sanitize_html(report):
    """The HTML audit of a sanitize report: verdict, evidence, facts, before/after (no pixels needed)."""
    view = {"title": report["model"]["path"], "verdict": report.get("verdict"), "targets": report.get("targets"),
            "candidates": report.get("candidates"), "thresholds": report.get("thresholds"), "facts": report["model"],
            "preprocess": report.get("preprocess"), "status": None, "graph": report.get("graph")}
    ev = report.get("evidence")
    if ev:
        view["sizes"] = ev["sizes"]
        view["classes"] = [r["target"] for r in ev["synthesis"]["classes"]]
    rep = report.get("repair") or ({"before": report["before"], "after": report["after"], "probes": report.get("probes")}
                                   if "before" in report else None)
    if rep:
        view["repair"] = {**rep, "output": report.get("output")}
    view["removal"], view["outcome"] = report.get("removal"), report.get("outcome")
    return render("scanner audit: sanitize", f"Sanitize report of {report['model']['path']}", [view])
