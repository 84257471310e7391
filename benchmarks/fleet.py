"""The gate over a fleet of models: sequentially in one process vs one Ray task per model on a local Ray.

    python benchmarks/fleet.py [--write-results] [--queries N]

Every model of the grayscale zoo (models/manifest.json) through `scanner gate` twice, each a fresh process: in
process (`--threads 2`), then `--ray --ray-cpus 1` (a local Ray started by the run, two tasks at a time on these
2 cores, one onnxruntime thread each), inside a network namespace holding only the loopback device (as root: Ray
binds to the interface address otherwise). The verdicts must be the same model by model; wall time includes
Ray's start. Per model: overhead = (Ray wall - sum of the Ray tasks' own seconds / 2 tasks at a time) / models.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from results import publish  # noqa: E402

BEGIN, END = "<!-- fleet: begin -->", "<!-- fleet: end -->"


def gate(models, extra, namespace=False):
    cmd = [sys.executable, "-m", "scanner", "gate", *map(str, models), "--data", str(ROOT / "models/data/clean"),
           "--budget", "0", "--format", "json", *extra]
    if namespace:
        cmd = ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + " ".join(f"'{c}'" for c in cmd)]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if p.returncode not in (0, 1):
        raise SystemExit(f"gate failed (exit {p.returncode}): {p.stderr[-600:]}")
    return json.loads(p.stdout), wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--queries", type=int, default=None)
    args = ap.parse_args()
    q = ["--queries", str(args.queries)] if args.queries else []
    manifest = json.loads((ROOT / "models/manifest.json").read_text())["models"]
    models = [ROOT / "models" / m["file"] for m in manifest]
    seq, seq_wall = gate(models, [*q, "--threads", "2"])
    on_ray, ray_wall = gate(models, [*q, "--ray", "--ray-cpus", "1"], namespace=True)
    same = [(a["verdict"], a["targets"], a["status"]) == (b["verdict"], b["targets"], b["status"])
            for a, b in zip(seq["models"], on_ray["models"])]
    task_seconds = sum(m.get("seconds") or 0 for m in on_ray["models"])
    overhead = (ray_wall - task_seconds / 2) / len(models)
    rows = [f"| {Path(a['path']).name} | {a['verdict']} {a['targets']} | {b['verdict']} {b['targets']} | "
            f"{a.get('seconds')} | {b.get('seconds')} |" for a, b in zip(seq["models"], on_ray["models"])]
    text = "\n".join([
        BEGIN, "## The gate over a fleet: in process vs a local Ray (issue 16)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, ray "
        f"{__import__('ray').__version__}. Command: `python benchmarks/fleet.py --write-results`"
        + (f" --queries {args.queries}" if args.queries else "") + ". "
        f"{len(models)} zoo models, default query budget unless given, `--budget 0`.", "",
        "| run | wall (s) | models | same verdicts as in process |", "|---|---|---|---|",
        f"| in process, --threads 2 | {seq_wall:.1f} | {len(models)} | - |",
        f"| --ray --ray-cpus 1 (local Ray, 2 tasks at a time) | {ray_wall:.1f} | {len(models)} | {sum(same)} of {len(same)} |",
        "", f"Ray over in process: {ray_wall / seq_wall:.2f}x the wall time; overhead per model (Ray start, "
        f"shipping, scheduling, results): {overhead:.1f} s.", "",
        "| model | verdict in process | verdict on Ray | seconds in process | seconds in its Ray task |",
        "|---|---|---|---|---|", *rows, "", END])
    publish(text, BEGIN, END, args.write_results)


if __name__ == "__main__":
    main()
