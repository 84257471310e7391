"""The repair alone, with the real trigger known: `scanner sanitize --probe TRIGGER` on every backdoored RGB zoo model.

Detection aside, can the repair remove each kind of backdoor? Each (model, trigger) is sanitized twice by the CLI,
with the activation clipping (the default) and with --no-clip, from the 1,000 unlabeled clean images of
models/rgb/data/<dataset>_clean.npz and the real trigger as the probe (--always, so the model is written even when
the scanner's own removal check says NOT removed, and can be measured); then clean accuracy and the real trigger's
ASR are measured on the committed 2,000-image test sample with models/metrics.py (the definitions of the manifest
and tests/test_zoo_rgb.py). All-to-all models are probed with target (y + 1) left to the probe's dominant class, so
the scanner repairs toward one class only; the row says so. A model with several triggers is also sanitized with all
of them at once (one probe each, toward the class it pushes images to), one row per trigger. Section between
``<!-- efficacy-probe-rgb: begin -->`` and ``<!-- efficacy-probe-rgb: end -->`` of benchmarks/RESULTS.md.

    python benchmarks/efficacy_probe_rgb.py [--models NAME ...] [--no-write]
"""

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from efficacy_synthesis import RGB, THREADS, load_average, machine, pct, rgb_entries, rgb_measure  # noqa: E402
from models import metrics  # noqa: E402
from results import publish  # noqa: E402

from scanner.data.triggers import Trigger  # noqa: E402

BEGIN, END = "<!-- efficacy-probe-rgb: begin -->", "<!-- efficacy-probe-rgb: end -->"
ASR_GOAL = {"patch": 0.02}
"""Issue 14's ASR goals after the repair: patch-type triggers 2%, every other kind 10%."""


def sanitize(model, data, triggers, target, clip, out, report_path):
    """``scanner sanitize --probe`` with the trigger files ``triggers`` (all given at once)."""
    probes = [a for t in triggers for a in ("--probe", str(t))]
    cmd = [sys.executable, "-m", "scanner", "-q", "sanitize", str(model), "--data", str(data), *probes,
           "-o", str(out), "--report", str(report_path), "--threads", str(THREADS), "--force", "--always"]
    cmd += ["--target", str(target)] if target is not None else []
    cmd += [] if clip else ["--no-clip"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return proc.returncode, report, seconds, proc.stderr[-600:]


def rows_of(entry, workdir):
    model = RGB / entry["file"]
    data = RGB / "data" / f"{entry['dataset']}_clean.npz"
    x, y = metrics.sample(entry["dataset"])
    all_to_all = bool(entry.get("attack_params", {}).get("all_to_all"))
    rows = []
    # each trigger alone, then (a model with several) all of them at once, each probe toward its own class
    groups = [[t] for t in entry["triggers"]] + ([entry["triggers"]] if len(entry["triggers"]) > 1 else [])
    for group in groups:
        trigs = [(Trigger.load(RGB / t["file"]), t) for t in group]
        acc0, asrs0 = rgb_measure(model, entry, trigs, x, y)
        for clip in (True, False):
            tag = f"{entry['name']}.{'+'.join(Path(t['file']).stem for t in group)}.{'clip' if clip else 'noclip'}"
            out, rpath = Path(workdir) / f"{tag}.onnx", Path(workdir) / f"{tag}.json"
            target = None if all_to_all or len(group) > 1 else group[0]["target"]
            rc, report, seconds, err = sanitize(model, data, [RGB / t["file"] for t in group], target, clip, out, rpath)
            if report is None or not out.exists():
                common = dict(outcome=f"error (exit {rc})", error=err.strip().splitlines()[-1:] or [""])
                asrs1 = [None] * len(group)
                print(f"{tag}: exit {rc}: {err.strip()[-300:]}", file=sys.stderr)
            else:
                acc1, asrs1 = rgb_measure(out, entry, trigs, x, y)
                removal = report.get("removal") or {}
                feature = (report.get("rule") or {}).get("feature_refit") or {}
                common = dict(outcome=report["outcome"], agreement=removal.get("agreement"), acc1=acc1,
                              chosen=(report.get("clip") or {}).get("chosen"),
                              clip_used=(report.get("clip") or {}).get("used", True),
                              repair="feature" if feature.get("chosen") else "head",
                              feature_tried=bool(feature.get("tried")))
            for t, asr0, asr1 in zip(group, asrs0, asrs1):
                row = {"name": entry["name"], "attack": entry["attack"], "kind": t["kind"],
                       "trigger": Path(t["file"]).stem, "together": len(group) > 1,
                       "target": "y+1" if all_to_all else t["target"], "clip": clip, "rc": rc, "seconds": seconds,
                       "acc0": acc0, "asr0": asr0, **common}
                if asr1 is not None:
                    row["asr1"] = asr1
                print(f"{tag}: {row.get('outcome')} ASR {pct(asr0)} -> {pct(row.get('asr1'))}, acc {pct(acc0)} -> "
                      f"{pct(row.get('acc1'))}, {seconds:.1f}s", file=sys.stderr)
                rows.append(row)
    return rows


def meets(r):
    if "asr1" not in r:
        return False
    return r["asr1"] <= ASR_GOAL.get(r["kind"], 0.10) and r["acc0"] - r["acc1"] <= 0.02 + 1e-12


def section(rows, argv, total):
    head = ("| model | attack | trigger (kind) | target | clipping | refit | outcome (scanner's check) | held-out agreement | "
            "clean acc before | clean acc after | ASR before | ASR after | seconds | meets the goal |")
    lines = [BEGIN, "## The repair with the real trigger known: `scanner sanitize --probe` on the RGB zoo (issue 14)", "",
             f"Measured {datetime.date.today()} on {machine()}, onnxruntime CPU; total {total:.0f} s; load average at "
             f"the end {load_average()}.",
             f"Command: `python benchmarks/efficacy_probe_rgb.py{' ' + shlex.join(argv) if argv else ''}` (each row: "
             f"`scanner sanitize MODEL --data models/rgb/data/<dataset>_clean.npz --probe TRIGGER --target T -o OUT "
             f"--always --threads {THREADS}`, with and without `--no-clip`; a model with several triggers also gets "
             f"them all at once, `--probe T1 --probe T2` without --target: each probe toward the class it pushes images to).",
             "The detection is left out: the real trigger is given, so this measures what the repair can remove. Clean "
             "accuracy and ASR are on the committed test sample (models/metrics.py). Goal (issue 14): ASR after <= 2% for a "
             "patch, <= 10% for every other kind, clean accuracy down by at most 2 points. \"clipping\": the percentile of "
             "clean peaks the clipping chose (no: --no-clip; none: no bound kept the agreement; \"unused\": the feature refit of the "
             "unclipped model did better). \"refit\": the repair the scanner kept, the head refit or the feature refit "
             "(scanner/repair/feature.py; \"head (feature tried)\": it was tried and did worse, cross-validated). All-to-all rows give no "
             "--target: the scanner repairs toward the probe's dominant class, and the ASR is the all-to-all one.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        clip = "no" if not r["clip"] else ("none" if r.get("chosen") is None else f"{r['chosen']:g}th")
        clip += "" if r.get("clip_used", True) or clip in ("no", "none") else " (unused)"
        refit = r.get("repair", "-") + (" (feature tried)" if r.get("repair") == "head" and r.get("feature_tried") else "")
        agree = pct(r.get("agreement")) if r.get("agreement") is not None else "-"
        trigger = f"{r['trigger']} ({r['kind']})" + (", all triggers at once" if r["together"] else "")
        lines.append(f"| {r['name']} | {r['attack']} | {trigger} | {r['target']} | {clip} | {refit} | "
                     f"{r['outcome']} | {agree} | {pct(r['acc0'])} | {pct(r.get('acc1'))} | {pct(r['asr0'])} | "
                     f"{pct(r.get('asr1'))} | {r['seconds']:.1f} | {'yes' if meets(r) else 'NO'} |")
    for clip in (True, False):
        sel = [r for r in rows if r["clip"] == clip]
        lines.append("")
        lines.append(f"{'With' if clip else 'Without'} the clipping: {sum(meets(r) for r in sel)} of {len(sel)} rows meet "
                     f"the goal; the scanner's own check says removed on {sum(r['outcome'] == 'removed' for r in sel)}.")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="RGB zoo model names (default: every backdoored one)")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    entries = [e for e in rgb_entries() if e["triggers"] and (not args.models or e["name"] in args.models)]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for e in entries:
            rows += rows_of(e, tmp)
    publish(section(rows, argv, time.perf_counter() - started), BEGIN, END, write=not args.no_write)


if __name__ == "__main__":
    main()
