"""Efficacy of `scanner sanitize` without --probe (synthesized triggers, blind) on the zoo models.

Grayscale zoo (``--zoo gray``, the default): each model of models/manifest.json is sanitized by the CLI with
only models/data/clean (the defender's 1,000 unlabeled images), timed, then measured on the FULL Fashion-MNIST
10k test set (IDX files read directly): clean accuracy and the real trigger's attack success rate, before and
after. Section "Trigger synthesis" of benchmarks/RESULTS.md.

RGB zoo (``--zoo rgb``): each model of models/rgb/manifest.json is sanitized with only
models/rgb/data/<dataset>_clean.npz (1,000 unlabeled images), then measured on the committed 2,000-image test
sample models/rgb/data/<dataset>_test.npz with the definitions of tests/test_zoo_rgb.py: one row per (model,
trigger). Section between ``<!-- efficacy-rgb: begin -->`` and ``<!-- efficacy-rgb: end -->``.

The search runs on the model's default query budget (``--queries`` not passed) with no time cap
(``--budget 0``), unless --queries / --budget say otherwise. Tables go to stdout, progress to stderr; each
section of benchmarks/RESULTS.md is replaced between its markers (other sections are kept) unless --no-write.

    python benchmarks/efficacy_synthesis.py [--zoo gray|rgb|all] [--models NAME ...] [--queries N] [--budget 0]
                                            [--seed 0] [--no-write]
"""

import argparse
import datetime
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import metrics  # noqa: E402
from results import write_section  # noqa: E402
from scanner.context import ModelContext  # noqa: E402
from scanner.data.triggers import Trigger  # noqa: E402
from scanner.graph.model import load_model  # noqa: E402
from scanner.repair.verify import RESIDUAL_SUCCESS  # noqa: E402

DATASET = Path("/usr/share/datasets/fashion-mnist")
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- efficacy_synthesis: begin -->"
END = "<!-- efficacy_synthesis: end -->"
RGB = ROOT / "models" / "rgb"
RGB_BEGIN = "<!-- efficacy-rgb: begin -->"
RGB_END = "<!-- efficacy-rgb: end -->"
RGB_MAX_ASR = 0.10  # the looser RGB goal of the earlier tables: ASR after <= 10% ...
RGB_MAX_DROP = 0.03  # ... and clean accuracy down by at most 3 points
ISSUE_MAX_ASR = {"patch": 0.02}  # issue 14's targets: patch-type ASR after <= 2%, every other kind <= 10% ...
ISSUE_OTHER_ASR = 0.10
ISSUE_MAX_DROP = 0.02  # ... clean accuracy down by at most 2 points ...
ISSUE_SECONDS = 60.0  # ... and at most 60 s for a 10-class 32x32 model on 2 cores
THREADS = 2


def read_idx(path):
    """An IDX (gzip) file as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_set():
    x = read_idx(DATASET / "t10k-images-idx3-ubyte.gz")[:, :, :, None]
    y = read_idx(DATASET / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def predict(path, pixels):
    """Predicted classes of the model at ``path`` on uint8 pixels (N, H, W, C), with its own preprocessing."""
    return ModelContext.open(path, device="cpu", threads=THREADS).runner(batch_size=1000).run(pixels).preds


def gray_metrics(path, x, y, trigger, target):
    """(clean accuracy, ASR, natural rate): the natural rate is the ASR without the trigger, its floor."""
    pred = predict(path, x)
    acc = float((pred == y).mean())
    if trigger is None:
        return acc, None, None
    keep = y != target
    asr = float((predict(path, trigger.apply(x[keep])) == target).mean())
    return acc, asr, float((pred[keep] == target).mean())


def search_flags(args):
    """The CLI's search-budget flags: ``--queries`` only when given (else the model's default), ``--budget``
    seconds as the safety cap (0: none)."""
    flags = ["--budget", f"{args.budget:g}"]
    if args.queries is not None:
        flags += ["--queries", str(args.queries)]
    return flags


def sanitize(model, data, name, args, workdir):
    """Run ``scanner sanitize`` without a probe; return (exit code, report or None, seconds, sanitized path,
    stderr tail)."""
    out = Path(workdir) / f"{name}.sanitized.onnx"
    report_path = Path(workdir) / f"{name}.report.json"
    cmd = [sys.executable, "-m", "scanner", "-q", "sanitize", str(model), "--data", str(data), "-o", str(out),
           "--report", str(report_path), *search_flags(args), "--seed", str(args.seed), "--threads", str(THREADS),
           "--force"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    report = json.loads(report_path.read_text()) if proc.returncode in (0, 1, 4) and report_path.exists() else None
    return proc.returncode, report, seconds, out, proc.stderr[-800:]


def removal_residual(report):
    """The removal check's worst synthesized trigger on the repaired model (held-out images) and its agreement, or
    None when nothing was repaired."""
    removal = report.get("removal") or {}
    probes = removal.get("probes") or []
    if not probes:
        return None
    return {"success": max(p["success_after"] for p in probes), "agreement": removal.get("agreement")}


def search_facts(report):
    """The trigger search's queries used, planned, and whether the time cap cut it short."""
    synth = report["evidence"]["synthesis"]
    return {"queries": synth["queries"], "queries_planned": (synth.get("plan") or {}).get("queries"),
            "truncated": bool(synth["truncated"])}


def run_model(entry, x, y, args, workdir):
    model = ROOT / "models" / entry["file"]
    rc, report, seconds, out, err = sanitize(model, ROOT / "models/data/clean", entry["name"], args, workdir)
    if report is None:
        raise RuntimeError(f"{entry['name']}: exit {rc}: {err}")
    trigger = Trigger.load(ROOT / "models" / entry["trigger"]) if entry.get("trigger") else None
    target = entry.get("target")
    acc0, asr0, _ = gray_metrics(model, x, y, trigger, target)
    removed = report.get("outcome") == "removed" and out.exists()
    # nothing found / not removed: no model is written, the model in use stays the original one
    acc1, asr1, natural = gray_metrics(out, x, y, trigger, target) if removed else (acc0, asr0, None)
    repair = report.get("repair", {})
    return {
        "name": entry["name"],
        "attack": entry["attack"],
        "target": target,
        "exit": rc,
        "outcome": report.get("outcome"),
        "verdict": report["verdict"],
        "found": report["targets"],
        "acc_before": acc0,
        "acc_after": acc1,
        "asr_before": asr0,
        "asr_after": asr1,
        "natural": natural,
        "agreement": repair.get("after", {}).get("agreement"),
        "seconds": seconds,
        **search_facts(report),
        "flagged": [f"{c['family']} {c['trigger']} ({c['success']:.0%})" for c in report["candidates"] if c["level"] == report["verdict"]][:2],
    }


def zoo_entries():
    """The manifest's models; while the zoo is being built, the models present (from their ``scanner.zoo`` metadata,
    the trigger file found by the attack's name)."""
    path = ROOT / "models" / "manifest.json"
    if path.exists():
        return json.loads(path.read_text())["models"]
    entries = []
    for onnx_path in sorted((ROOT / "models").glob("*.onnx")):
        info = json.loads(load_model(onnx_path).metadata.get("scanner.zoo", "null") or "null")
        if not info:
            continue
        triggers = sorted((ROOT / "models" / "triggers").glob(f"{info['attack']}*.json"))
        trigger = str(triggers[0].relative_to(ROOT / "models")) if info["attack"] != "none" and triggers else None
        entries.append({**info, "file": onnx_path.name, "trigger": trigger})
    print(f"models/manifest.json missing: using the {len(entries)} models present", file=sys.stderr)
    return entries


def goal(row):
    """Whether a row meets the issue's targets (None where it does not apply)."""
    checks = [row["seconds"] <= 60]
    if row["attack"] == "none":
        checks.append(row["verdict"] == "clean")
    else:
        checks.append(row["verdict"] != "clean" and row["target"] in row["found"])
        limit = 0.10 if row["attack"] in ("blend", "sinusoid") else 0.02
        checks.append(row["asr_after"] is not None and row["asr_after"] <= limit)
        checks.append(row["acc_before"] - row["acc_after"] <= 0.02)
    return all(checks)


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def queries_cell(r):
    if r.get("queries") is None:
        return "-"
    planned = r.get("queries_planned")
    return f"{r['queries']:,}" + (f" / {planned:,}" if planned is not None else "")


def table(rows):
    lines = [
        "| model | attack | true target | verdict | target(s) found | ASR before | ASR after | no-trigger rate after | clean acc before | clean acc after | agreement (clean set, CV) | queries (used / planned) | time (s) | meets targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        found = ", ".join(str(t) for t in r["found"]) or "-"
        tgt = "-" if r["target"] is None else str(r["target"])
        lines.append(
            f"| {r['name']} | {r['attack']} | {tgt} | {r['verdict']} | {found} | {pct(r['asr_before'])} | {pct(r['asr_after'])} | {pct(r['natural'])} | "
            f"{pct(r['acc_before'])} | {pct(r['acc_after'])} | {pct(r['agreement'])} | {queries_cell(r)} | {r['seconds']:.1f}"
            f"{' (time cap hit)' if r['truncated'] else ''} | {'yes' if goal(r) else 'NO'} |"
        )
    return "\n".join(lines)


def machine():
    """'N CPU cores (model), platform' of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.platform()}"


def load_average():
    return ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def budget_text(args):
    queries = f"--queries {args.queries}" if args.queries is not None else "the model's default query budget (no --queries)"
    cap = "no time cap (--budget 0)" if args.budget == 0 else f"time cap --budget {args.budget:g} s"
    return f"{queries}, {cap}"


def command_text(argv):
    return "python benchmarks/efficacy_synthesis.py" + (" " + shlex.join(argv) if argv else "")


def cli_text(data, args):
    return (f"scanner sanitize MODEL --data {data} -o OUT --report R {shlex.join(search_flags(args))} --seed {args.seed} "
            f"--threads {THREADS}")


def section(rows, args, total, argv):
    misses = [r["name"] for r in rows if not goal(r)]
    return "\n".join(
        [
            BEGIN,
            "## Trigger synthesis: `scanner sanitize` without a probe (issue 5)",
            "",
            (f"Measured {datetime.date.today().isoformat()} on {machine()}, onnxruntime CPU, "
             f"Python {platform.python_version()}; {budget_text(args)}, seed {args.seed}; total {total:.0f} s; "
             f"load average at the end {load_average()} (other jobs shared the cores: times are upper bounds)."),
            (f"Command: `{command_text(argv)}` (each model: `{cli_text('models/data/clean', args)}`, timed end to end "
             "including start-up)."),
            ("The scanner sees only the 1,000 unlabeled clean images; ASR (images whose true class is not the target, real "
             "trigger stamped with `Trigger.apply`) and clean accuracy are on the full 10k Fashion-MNIST test set."),
            ("Targets (issue 5): every backdoored model flagged with its true target, no clean model flagged, ASR after <= 2% "
             "(patch) / <= 10% (blend, sinusoid), clean-accuracy loss <= 2 points, <= 60 s per model. \"no-trigger rate "
             "after\": the sanitized model's rate of predicting the target for clean non-target images (the floor any ASR "
             "measurement has). \"agreement\": the repair's cross-validated agreement with the original model on the "
             "clean set. \"queries\": forward passes the trigger search used / its plan; \"time cap hit\": the search was "
             "cut short by --budget."),
            "",
            table(rows),
            "",
            f"Misses: {', '.join(misses) if misses else 'none'}.",
            END,
        ]
    )


# ---------------------------------------------------------------------------------------------- the RGB zoo


def rgb_entries():
    path = RGB / "manifest.json"
    if not path.exists():
        raise SystemExit("models/rgb/manifest.json missing: build the RGB zoo (python -m models.recipes.rgb)")
    return json.loads(path.read_text())["models"]


def rgb_measure(path, entry, triggers, x, y):
    """(clean accuracy, [ASR per trigger]) of the model at ``path`` on the test sample (models/metrics.py: the
    definitions the manifest and tests/test_zoo_rgb.py use)."""
    run = lambda pixels: predict(path, pixels)  # noqa: E731
    return metrics.clean_accuracy(run, x, y), [metrics.attack_success(run, entry, trig, t["target"], x, y)
                                               for trig, t in triggers]


def rgb_run_model(entry, args, workdir):
    """Sanitize one RGB zoo model blind; return its rows (one per trigger, one for a clean model)."""
    model = RGB / entry["file"]
    data = RGB / "data" / f"{entry['dataset']}_clean.npz"
    x, y = metrics.sample(entry["dataset"])
    triggers = [(Trigger.load(RGB / t["file"]), t) for t in entry["triggers"]]
    base = {"name": entry["name"], "split": entry["split"], "attack": entry["attack"], "dataset": entry["dataset"],
            "classes": entry["classes"], "input_size": list(entry["input_size"]), "all_to_all": bool(entry.get("attack_params", {}).get("all_to_all")),
            "source": entry.get("source_class"), "true_targets": list(entry.get("targets") or [])}
    rc, report, seconds, out, err = sanitize(model, data, entry["name"], args, workdir)
    acc0, asr0 = rgb_measure(model, entry, triggers, x, y)
    if abs(acc0 - entry["sample_clean_accuracy"]) > 1e-9:
        print(f"{entry['name']}: clean accuracy {acc0:.4%} here, {entry['sample_clean_accuracy']:.4%} in the manifest",
              file=sys.stderr)
    for a, (_, t) in zip(asr0, triggers):
        if abs(a - t["sample_attack_success_rate"]) > 1e-9:
            print(f"{entry['name']}: {t['file']} ASR {a:.4%} here, {t['sample_attack_success_rate']:.4%} in the manifest",
                  file=sys.stderr)
    common = {**base, "exit": rc, "seconds": seconds, "acc_before": acc0}
    if report is None:  # the command failed: a row that says so, the measurements before only
        common.update(error=f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else 'no message'}",
                      verdict="error", found=[], outcome="error", queries=None, queries_planned=None, truncated=False,
                      acc_after=None)
    else:
        common.update(error=None, verdict=report["verdict"], found=list(report["targets"]), outcome=report.get("outcome"),
                      check_residual=removal_residual(report), **search_facts(report))
    removed = report is not None and common["outcome"] == "removed" and out.exists()
    if removed:
        acc1, asr1 = rgb_measure(out, entry, triggers, x, y)
    elif report is not None:  # nothing found / not removed: no model written, the original model stays in use
        acc1, asr1 = acc0, asr0
    else:
        acc1, asr1 = None, [None] * len(triggers)
    common["acc_after"] = acc1
    if not triggers:
        return [{**common, "trigger": None, "target": None, "kind": None, "asr_before": None, "asr_after": None}]
    return [{**common, "trigger": t["file"], "target": t["target"], "kind": t["kind"], "asr_before": a0, "asr_after": a1}
            for (_, t), a0, a1 in zip(triggers, asr0, asr1)]


def rgb_right_target(r):
    """Whether the row's target was flagged (None for a clean model). All-to-all has every class as a target
    (y -> y + 1): any flagged class is one of them."""
    if r["attack"] == "none":
        return None
    if r["verdict"] in ("clean", "error"):
        return False
    return bool(r["found"]) if r["all_to_all"] else r["target"] in r["found"]


def _meets(r, max_asr, max_drop, seconds=None):
    """Whether a row meets a goal: a clean model's row not flagged; a backdoored one's flagged with the right target,
    ASR after <= ``max_asr``, clean accuracy down by <= ``max_drop``, and (unless None) at most ``seconds``."""
    if r["attack"] == "none":
        return r["verdict"] == "clean"
    return bool(rgb_right_target(r) and r["asr_after"] is not None and r["asr_after"] <= max_asr + 1e-12
                and r["acc_after"] is not None and r["acc_before"] - r["acc_after"] <= max_drop + 1e-12
                and (seconds is None or r["seconds"] <= seconds))


def rgb_goal(r):
    """The looser RGB goal of the earlier tables: ASR after <= 10% for every kind, clean accuracy down by <= 3 points."""
    return _meets(r, RGB_MAX_ASR, RGB_MAX_DROP)


def issue_goal(r):
    """Issue 14's targets: ASR after <= 2% for a patch-type trigger and <= 10% for every other kind, clean accuracy
    down by <= 2 points, and (a 10-class 32x32 model) <= 60 s."""
    small = r["classes"] == 10 and tuple(r["input_size"]) == (32, 32)
    return _meets(r, ISSUE_MAX_ASR.get(r["kind"], ISSUE_OTHER_ASR), ISSUE_MAX_DROP, ISSUE_SECONDS if small else None)


def rgb_true_target(r):
    if r["attack"] == "none":
        return "-"
    if r["all_to_all"]:
        return "all (y -> y+1)"
    if r["source"] is not None:
        return f"{r['source']} -> {r['target']}"
    return str(r["target"])


def yes_no(v):
    return "-" if v is None else ("yes" if v else "NO")


def rgb_table(rows):
    lines = [
        "| model | split | attack | trigger | true target | verdict | flagged targets | right target | clean acc before | clean acc after | ASR before | ASR after | outcome | check: worst synthesized trigger after / agreement | queries (used / planned) | time (s) | time cap hit | meets issue 14's targets | meets the looser goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        found = ", ".join(str(t) for t in r["found"]) or "-"
        trig = "-" if r["trigger"] is None else f"{Path(r['trigger']).stem} ({r['kind']})"
        if r["attack"] == "none":
            meets = loose = "not flagged" if r["verdict"] == "clean" else ("ERROR" if r["verdict"] == "error" else "FLAGGED (wrongly)")
        else:
            meets, loose = ("yes" if issue_goal(r) else "NO"), ("yes" if rgb_goal(r) else "NO")
        check = r.get("check_residual")
        check = "-" if check is None else f"{pct(check['success'])} / {pct(check['agreement'])}"
        outcome = r["outcome"] if not r.get("error") else f"error ({r['error'][:120]})"
        lines.append(
            f"| {r['name']} | {r['split']} | {r['attack']} | {trig} | {rgb_true_target(r)} | {r['verdict']} | {found} | "
            f"{yes_no(rgb_right_target(r))} | {pct(r['acc_before'])} | {pct(r['acc_after'])} | {pct(r['asr_before'])} | "
            f"{pct(r['asr_after'])} | {outcome} | {check} | {queries_cell(r)} | {r['seconds']:.1f} | "
            f"{'yes' if r['truncated'] else 'no'} | {meets} | {loose} |"
        )
    return "\n".join(lines)


def rgb_totals(rows):
    """(backdoored models meeting the goal, backdoored models, clean models flagged, clean models, missed names); a
    model whose command failed is a miss (backdoored) or not counted as flagged (clean: it is listed as an error)."""
    by = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    bad = {n: rs for n, rs in by.items() if rs[0]["attack"] != "none"}
    clean = {n: rs for n, rs in by.items() if rs[0]["attack"] == "none"}
    met = [n for n, rs in bad.items() if all(issue_goal(r) for r in rs)]
    loose = [n for n, rs in bad.items() if all(rgb_goal(r) for r in rs)]
    flagged = [n for n, rs in clean.items() if rs[0]["verdict"] not in ("clean", "error")]
    misses = [n for n in bad if n not in met]
    return met, loose, bad, flagged, clean, misses


def rgb_section(rows, args, total, argv):
    met, loose, bad, flagged, clean, misses = rgb_totals(rows)
    datasets = sorted({r["dataset"] for r in rows})
    data = "models/rgb/data/<dataset>_clean.npz" if len(datasets) != 1 else f"models/rgb/data/{datasets[0]}_clean.npz"
    errors = sorted({r["name"] for r in rows if r.get("error")})
    return "\n".join(
        [
            RGB_BEGIN,
            "## Trigger synthesis on the RGB zoo: `scanner sanitize` without a probe",
            "",
            (f"Measured {datetime.date.today().isoformat()} on {machine()}, onnxruntime CPU, "
             f"Python {platform.python_version()}; {budget_text(args)}, seed {args.seed}; total {total:.0f} s; "
             f"load average at the end {load_average()} (other jobs may have shared the cores: times are upper bounds)."),
            f"Command: `{command_text(argv)}` (each model: `{cli_text(data, args)}`, timed end to end including start-up).",
            ("The scanner sees only the 1,000 unlabeled clean images of `models/rgb/data/<dataset>_clean.npz`, no trigger; "
             "clean accuracy and ASR are on the committed 2,000-image test sample `models/rgb/data/<dataset>_test.npz` "
             "(the real trigger stamped with `Trigger.apply`), with the definitions of `tests/test_zoo_rgb.py`: ASR over the "
             "images whose label is not the target; all-to-all over all images, success = predicted `(y + 1) mod classes`; "
             "source-specific (`S -> T`) over the images of the source class only. One row per (model, trigger)."),
            (f"Issue 14's targets (a backdoored model meets them when every one of its rows does): flagged with the right "
             f"target (all-to-all: flagged at all, every class is a target), ASR after <= {ISSUE_MAX_ASR['patch']:.0%} for a "
             f"patch-type trigger and <= {ISSUE_OTHER_ASR:.0%} for every other kind, clean accuracy down by at most "
             f"{100 * ISSUE_MAX_DROP:.0f} points, and at most {ISSUE_SECONDS:.0f} s for a 10-class 32x32 model; a clean model "
             f"must not be flagged. \"The looser goal\" is the one of the tables before 2026-12-06: ASR after <= "
             f"{RGB_MAX_ASR:.0%} for every kind, clean accuracy down by at most {100 * RGB_MAX_DROP:.0f} points, no time "
             "limit. \"check\": the scanner's own removal check on its held-out clean images, the worst of the synthesized "
             f"triggers it repaired on the repaired model (a trigger counts as dead there under {RESIDUAL_SUCCESS:.0%}) and its "
             "agreement with the original. \"outcome\": the report's (removed: the "
             "sanitized model was written and is the one measured after; not_removed / nothing_found: no model written, so "
             "\"after\" is the original model). \"queries\": forward passes the trigger search used / its plan; \"time cap "
             "hit\": the search was cut short by --budget."),
            "",
            rgb_table(rows),
            "",
            (f"Totals: {len(met)} of {len(bad)} backdoored models meet issue 14's targets ({len(loose)} the looser goal); "
             f"{len(flagged)} of {len(clean)} clean models flagged{' (' + ', '.join(flagged) + ')' if flagged else ''}."),
            f"Misses (issue 14's targets): {', '.join(misses) if misses else 'none'}."
            + (f" Errors (the command failed): {', '.join(errors)}." if errors else ""),
            RGB_END,
        ]
    )


def run_gray(args, argv, tmp):
    entries = [e for e in zoo_entries() if not args.models or e["name"] in args.models]
    if not entries:
        return None
    x, y = test_set()
    rows = []
    started = time.perf_counter()
    for e in entries:
        row = run_model(e, x, y, args, tmp)
        rows.append(row)
        print(f"{row['name']}: {row['verdict']} {row['found']} ASR {pct(row['asr_before'])} -> {pct(row['asr_after'])}, "
              f"acc {pct(row['acc_before'])} -> {pct(row['acc_after'])}, {row['seconds']:.1f}s, {queries_cell(row)} queries"
              f"{' (time cap hit)' if row['truncated'] else ''} {row['flagged']}", file=sys.stderr, flush=True)
    return section(rows, args, time.perf_counter() - started, argv)


def run_rgb(args, argv, tmp):
    entries = [e for e in rgb_entries() if not args.models or e["name"] in args.models]
    if not entries:
        return None
    rows = []
    started = time.perf_counter()
    for e in entries:
        for row in rgb_run_model(e, args, tmp):
            rows.append(row)
            print(f"{row['name']} [{row['trigger'] or '-'}]: {row['verdict']} {row['found']} ({row['outcome']}) "
                  f"ASR {pct(row['asr_before'])} -> {pct(row['asr_after'])}, acc {pct(row['acc_before'])} -> "
                  f"{pct(row['acc_after'])}, {row['seconds']:.1f}s, {queries_cell(row)} queries"
                  f"{' (time cap hit)' if row['truncated'] else ''}" + (f" {row['error']}" if row.get("error") else ""),
                  file=sys.stderr, flush=True)
    if args.rows:  # the measured rows, to read or render again without measuring
        Path(args.rows).write_text(json.dumps(rows, indent=1) + "\n")
    return rgb_section(rows, args, time.perf_counter() - started, argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", choices=("gray", "rgb", "all"), default="gray",
                    help="gray: models/manifest.json (Fashion-MNIST); rgb: models/rgb/manifest.json; all: both [gray]")
    ap.add_argument("--models", nargs="*", help="zoo model names (default: all in the manifest(s))")
    ap.add_argument("--queries", type=int, default=None,
                    help="passed to the CLI as --queries N (forward passes of the search) [default: not passed, the "
                         "model's default]")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="passed to the CLI as --budget S: seconds, a safety cap on each search (0: none) [0]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print the table(s) only; leave RESULTS.md alone")
    ap.add_argument("--rows", help="RGB zoo: also write the measured rows (JSON) to this file")
    args = ap.parse_args(argv)
    if args.queries is not None and args.queries < 100:
        ap.error("--queries must be at least 100 (the CLI's minimum)")
    if args.budget < 0:
        ap.error("--budget must be >= 0")
    if args.models:
        known = set()
        if args.zoo in ("gray", "all"):
            known |= {e["name"] for e in zoo_entries()}
        if args.zoo in ("rgb", "all"):
            known |= {e["name"] for e in rgb_entries()}
        unknown = [m for m in args.models if m not in known]
        if unknown:
            ap.error(f"not in the {args.zoo} zoo manifest(s): {', '.join(unknown)}")
    texts = []
    with tempfile.TemporaryDirectory(prefix="efficacy-") as tmp:
        if args.zoo in ("gray", "all"):
            text = run_gray(args, argv, tmp)
            if text is not None:
                texts.append((text, BEGIN, END))
        if args.zoo in ("rgb", "all"):
            text = run_rgb(args, argv, tmp)
            if text is not None:
                texts.append((text, RGB_BEGIN, RGB_END))
    print("\n\n".join(t for t, _, _ in texts))
    if not args.no_write:
        for text, begin, end in texts:
            write_section(text, begin, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
