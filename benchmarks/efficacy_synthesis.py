"""Efficacy of `scanner sanitize` without --probe (synthesized triggers) on every zoo model.

For each model in models/manifest.json: run the CLI with only models/data/clean (the defender's 1,000
unlabeled images), time it, then measure on the FULL Fashion-MNIST 10k test set (IDX files read directly):
clean accuracy and the real trigger's attack success rate, before and after. Writes the table to stdout
and replaces the "Trigger synthesis" section of benchmarks/RESULTS.md (other sections are kept).

    python benchmarks/efficacy_synthesis.py [--models NAME ...] [--budget 55] [--seed 0] [--no-write]
"""

import argparse
import datetime
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scanner.context import ModelContext  # noqa: E402
from scanner.data.triggers import Trigger  # noqa: E402
from scanner.graph.model import load_model  # noqa: E402

DATASET = Path("/usr/share/datasets/fashion-mnist")
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- efficacy_synthesis: begin -->"
END = "<!-- efficacy_synthesis: end -->"


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
    return ModelContext.open(path, device="cpu", threads=2).runner(batch_size=1000).run(pixels).preds


def metrics(path, x, y, trigger, target):
    """(clean accuracy, ASR, natural rate): the natural rate is the ASR without the trigger, its floor."""
    pred = predict(path, x)
    acc = float((pred == y).mean())
    if trigger is None:
        return acc, None, None
    keep = y != target
    asr = float((predict(path, trigger.apply(x[keep])) == target).mean())
    return acc, asr, float((pred[keep] == target).mean())


def run_model(entry, x, y, budget, seed, workdir):
    model = ROOT / "models" / entry["file"]
    out = Path(workdir) / f"{entry['name']}.sanitized.onnx"
    report_path = Path(workdir) / f"{entry['name']}.report.json"
    cmd = [sys.executable, "-m", "scanner", "-q", "sanitize", str(model), "--data", str(ROOT / "models/data/clean"),
           "-o", str(out), "--report", str(report_path), "--budget", str(budget), "--seed", str(seed), "--threads", "2",
           "--force"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{entry['name']}: exit {proc.returncode}: {proc.stderr[-800:]}")
    report = json.loads(report_path.read_text())
    trigger = Trigger.load(ROOT / "models" / entry["trigger"]) if entry.get("trigger") else None
    target = entry.get("target")
    acc0, asr0, _ = metrics(model, x, y, trigger, target)
    acc1, asr1, natural = (acc0, asr0, None) if proc.returncode == 0 else metrics(out, x, y, trigger, target)
    repair = report.get("repair", {})
    return {
        "name": entry["name"],
        "attack": entry["attack"],
        "target": target,
        "exit": proc.returncode,
        "verdict": report["verdict"],
        "found": report["targets"],
        "acc_before": acc0,
        "acc_after": acc1,
        "asr_before": asr0,
        "asr_after": asr1,
        "natural": natural,
        "agreement": repair.get("after", {}).get("agreement"),
        "seconds": seconds,
        "truncated": report["evidence"]["synthesis"]["truncated"],
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


def table(rows):
    lines = [
        "| model | attack | true target | verdict | target(s) found | ASR before | ASR after | no-trigger rate after | clean acc before | clean acc after | agreement (clean set, CV) | time (s) | meets targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        found = ", ".join(str(t) for t in r["found"]) or "-"
        tgt = "-" if r["target"] is None else str(r["target"])
        lines.append(
            f"| {r['name']} | {r['attack']} | {tgt} | {r['verdict']} | {found} | {pct(r['asr_before'])} | {pct(r['asr_after'])} | {pct(r['natural'])} | "
            f"{pct(r['acc_before'])} | {pct(r['acc_after'])} | {pct(r['agreement'])} | {r['seconds']:.1f}"
            f"{' (budget hit)' if r['truncated'] else ''} | {'yes' if goal(r) else 'NO'} |"
        )
    return "\n".join(lines)


def section(rows, args, total):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    misses = [r["name"] for r in rows if not goal(r)]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return "\n".join(
        [
            BEGIN,
            "## Trigger synthesis: `scanner sanitize` without a probe (issue 5)",
            "",
            f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPU cores ({cpu}), onnxruntime CPU, "
            f"Python {platform.python_version()}; budget {args.budget:g} s, seed {args.seed}; total {total:.0f} s; "
            f"load average at the end {load} (other jobs shared the cores: times are upper bounds).",
            "Command: `python benchmarks/efficacy_synthesis.py` (each model: `scanner sanitize MODEL --data models/data/clean "
            f"-o OUT --report R --budget {args.budget:g} --seed {args.seed} --threads 2`, timed end to end including start-up).",
            "The scanner sees only the 1,000 unlabeled clean images; ASR (images whose true class is not the target, real "
            "trigger stamped with `Trigger.apply`) and clean accuracy are on the full 10k Fashion-MNIST test set.",
            "Targets (issue 5): every backdoored model flagged with its true target, no clean model flagged, ASR after <= 2% "
            "(patch) / <= 10% (blend, sinusoid), clean-accuracy loss <= 2 points, <= 60 s per model. \"no-trigger rate "
            "after\": the sanitized model's rate of predicting the target for clean non-target images (the floor any ASR "
            "measurement has). \"agreement\": the repair's cross-validated agreement with the original model on the "
            "clean set.",
            "",
            table(rows),
            "",
            f"Misses: {', '.join(misses) if misses else 'none'}.",
            END,
        ]
    )


def write_section(text):
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="zoo model names (default: all in the manifest)")
    ap.add_argument("--budget", type=float, default=55.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    entries = [e for e in zoo_entries() if not args.models or e["name"] in args.models]
    x, y = test_set()
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="efficacy-") as tmp:
        for e in entries:
            row = run_model(e, x, y, args.budget, args.seed, tmp)
            rows.append(row)
            print(f"{row['name']}: {row['verdict']} {row['found']} ASR {pct(row['asr_before'])} -> {pct(row['asr_after'])}, "
                  f"acc {pct(row['acc_before'])} -> {pct(row['acc_after'])}, {row['seconds']:.1f}s {row['flagged']}",
                  file=sys.stderr, flush=True)
    text = section(rows, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
