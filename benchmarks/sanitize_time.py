"""Blind ``scanner sanitize`` wall time of this tree against a baseline checkout, same models, interleaved.

Each round runs, per model, ``python -m scanner sanitize MODEL --data CLEAN -o OUT --report R --budget 0 --seed 0
--threads 2`` once with this tree's package and once with the baseline's (``--baseline DIR``: a checkout of another
commit, put first on PYTHONPATH), alternating which goes first. Whole processes, wall seconds; medians; the ratio
is baseline wall / this tree's wall (> 1: faster now). The two trees' results are compared: the JSON reports but for
their seconds and query counts (a change that only skips repeated work uses fewer queries for the same answers),
and the written models' bytes.

    git worktree add /tmp/base COMMIT
    python benchmarks/sanitize_time.py --baseline /tmp/base [--models NAME ...] [--rounds 2] [--write-results]
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from efficacy_synthesis import rgb_entries  # noqa: E402
from results import head, publish  # noqa: E402

MODELS = ("rgb10_preact_clean", "rgb10_mobilenetv2_clean", "rgb10_vgg_clean", "rgb10_vit_clean",
          "rgb10_preact_badnets", "rgb10_vit_badnets")
BEGIN, END = "<!-- sanitize-time: begin -->", "<!-- sanitize-time: end -->"


def run(src, entry, workdir):
    """(wall seconds, report facts) of one blind sanitize of zoo model ``entry`` (manifest) with the package in
    ``src``."""
    name = entry["name"]
    report = Path(workdir) / f"{name}.json"
    cmd = [sys.executable, "-m", "scanner", "-q", "sanitize", str(ROOT / "models/rgb" / entry["file"]), "--data",
           str(ROOT / "models/rgb/data" / f"{entry['dataset']}_clean.npz"), "-o", str(Path(workdir) / f"{name}.onnx"),
           "--report", str(report), "--budget", "0", "--seed", "0", "--threads", "2", "--force"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(src), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if not report.exists():
        raise SystemExit(f"{name} ({src}): exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    r = json.loads(report.read_text())
    report.unlink()
    out = Path(workdir) / f"{name}.onnx"
    model = hashlib.sha256(out.read_bytes()).hexdigest()[:12] if out.exists() else None
    if out.exists():
        out.unlink()
    text = json.dumps(_results(r), sort_keys=True)
    return seconds, {"verdict": r["verdict"], "targets": r["targets"], "outcome": r["outcome"],
                     "queries": r["evidence"]["synthesis"]["queries"], "model": model,
                     "report": hashlib.sha256(text.encode()).hexdigest()[:12]}


def _results(report):
    """``report`` without what depends on the clock or counts the work done: seconds and query counts."""
    if isinstance(report, dict):
        return {k: _results(v) for k, v in report.items() if k not in ("seconds", "queries", "queries_used")}
    if isinstance(report, list):
        return [_results(v) for v in report]
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a checkout of the baseline commit")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    trees = {"now": ROOT, "baseline": Path(args.baseline).resolve()}
    entries = {e["name"]: e for e in rgb_entries()}
    walls = {(t, m): [] for t in trees for m in args.models}
    facts = {}
    with tempfile.TemporaryDirectory(prefix="sanitize-time-") as tmp:
        for r in range(args.rounds):
            for i, name in enumerate(args.models):
                order = list(trees) if (r + i) % 2 == 0 else list(trees)[::-1]
                for tree in order:
                    seconds, f = run(trees[tree], entries[name], tmp)
                    walls[(tree, name)].append(seconds)
                    facts[(tree, name)] = f
                    print(f"round {r + 1} {name} {tree}: {seconds:.1f}s {f}", file=sys.stderr)
    load = os.getloadavg()
    lines = [BEGIN, "## Blind `scanner sanitize` time against the commit before (issue 15)", "",
             f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; this tree at {head(ROOT)} against {head(trees['baseline'])}; load average at "
             f"the end {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}. Command: `python benchmarks/sanitize_time.py "
             f"{' '.join(argv)}` ({args.rounds} interleaved rounds, medians of whole-process wall seconds; each "
             "`scanner sanitize MODEL --data CLEAN -o OUT --report R --budget 0 --seed 0 --threads 2`). \"same "
             "result\": the verdict, targets and outcome, the whole JSON report but for its seconds and query "
             "counts, and the bytes of the written model (when one is) are equal.", "",
             "| model | baseline s | now s | baseline / now | verdict (now) | outcome (now) | queries (baseline) | "
             "queries (now) | same result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        b, n = float(np.median(walls[("baseline", name)])), float(np.median(walls[("now", name)]))
        f = facts[("now", name)]
        base = facts[("baseline", name)]
        same = {k: f[k] == base[k] for k in ("verdict", "targets", "outcome", "report", "model")}
        same = "yes" if all(same.values()) else "NO: " + ", ".join(k for k, v in same.items() if not v)
        lines.append(f"| {name} | {b:.1f} | {n:.1f} | {b / n:.2f} | {f['verdict']} {f['targets'] or ''} | "
                     f"{f['outcome']} | {base['queries']:,} | {f['queries']:,} | {same} |")
    lines += ["", END]
    publish("\n".join(lines), BEGIN, END, args.write_results)


if __name__ == "__main__":
    main()
