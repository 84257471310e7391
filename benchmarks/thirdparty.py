"""Third-party files as they come: every command on every ONNX Model Zoo classic, torch's dynamo exporter with
optimize=False, weights behind Cast/Reshape, TF-style heads, a bias-free MatMul head and a QDQ model.

    python benchmarks/thirdparty.py [--write-results] [--only NAME,...]

Each file goes through `scanner inspect`, `scan`, `prune --count 2 --always`, `sanitize --probe` and `gate` (CLI, a
fresh process each), on the zoo's clean images (`--limit 24`, caffe preprocessing for the classics, raw for the
others). A cell is `exit N` with the command's outcome; a traceback (or an exit code other than 0-4) fails the cell.
The classics get seeded random weights (tests/thirdparty.py), so their predictions are degenerate and the gate says
so (exit 3): what counts here is that every command ends with a verified model or one clear line.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

import thirdparty as tp  # noqa: E402
from results import publish  # noqa: E402

CLEAN = ROOT / "models" / "data" / "clean"
TRIGGER = ROOT / "models" / "triggers" / "badnets_3x3.json"
DATA = ROOT / "tests" / "data" / "thirdparty"
BEGIN, END = "<!-- thirdparty: begin -->", "<!-- thirdparty: end -->"


def run(args, timeout=1800):
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "scanner", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - start


def cell(code, out, err, seconds):
    lines = [line for line in err.strip().splitlines() if line]
    if "Traceback" in err or code not in (0, 1, 2, 3, 4):
        return f"FAIL (exit {code}: {lines[-1][:80] if lines else ''})"
    try:
        report = json.loads(out) if out.strip() else {}
    except ValueError:
        report = {}
    what = report.get("outcome") or (report.get("models") or [{}])[0].get("status") or ""
    if code == 2:
        errors = [m.get("error") for m in report.get("models", []) if m.get("error")]
        what = errors[0] if errors else lines[-1].split(": error: ")[-1] if lines else ""
        what = what.split(".onnx: ", 1)[-1][:70]
    return f"exit {code} {what} ({seconds:.0f}s)".replace("  ", " ")


def files(tmp, only):
    out = []
    for name in tp.classic_names():
        path = Path(tmp) / f"classic_{name}.onnx"
        onnx.save(tp.classic(name), str(path))
        out.append((f"classic {name}", path, "caffe"))
    for path in sorted(DATA.glob("*.onnx")):
        out.append((path.stem, path, "raw"))
    return [f for f in out if not only or any(o in f[0] for o in only)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = [o for o in args.only.split(",") if o]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, pre in files(tmp, only):
            common = ["--data", CLEAN, "--limit", 24, "--preprocess", pre, "--threads", os.cpu_count()]
            cells = {}
            cells["inspect"] = cell(*run(["inspect", path, "--preprocess", pre, "--format", "json"]))
            cells["scan"] = cell(*run(["scan", path, *common, "--format", "json"]))
            cells["prune"] = cell(*run(["prune", path, *common, "--probe", TRIGGER, "--count", 2, "--always",
                                        "-o", Path(tmp) / "p.onnx", "--force", "--format", "json"]))
            cells["sanitize --probe"] = cell(*run(["sanitize", path, *common, "--probe", TRIGGER, "-o", Path(tmp) / "s.onnx",
                                                   "--force", "--format", "json"]))
            cells["gate"] = cell(*run(["gate", path, *common, "--min-images", 20, "--format", "json"]))
            rows.append((label, cells))
            print(label, json.dumps(cells), file=sys.stderr, flush=True)
    heads = ["inspect", "scan", "prune", "sanitize --probe", "gate"]
    table = ["| file | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    table += [f"| {label} | " + " | ".join(c[h] for h in heads) + " |" for label, c in rows]
    text = "\n".join([
        BEGIN, "## Third-party files (issue 12)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores (shared with other jobs: "
        "the seconds are upper bounds). Command: `python benchmarks/thirdparty.py --write-results`.",
        "Each cell: the exit code, the outcome or gate status, the wall time of the whole process. Exit 2 is one line "
        "naming the problem (the binary and label-only files are refused by design); exit 3 at the gate is "
        "'degenerate predictions' (random weights).", "", *table, "", END])
    publish(text, BEGIN, END, args.write_results)


if __name__ == "__main__":
    main()
