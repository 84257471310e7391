"""What the synthesized triggers change: the all-to-all rule's calibration (detect/verdict.py ALL_TO_ALL_CHANGED).

For every zoo model (RGB and grayscale), the blind search as `scanner sanitize` runs it (its clean images less the
held-out part, the default query budget, seed 0), then every class's synthesized trigger of every family measured
on the held-out images: the largest "changed - success" among the triggers that do not work for their class (success
under 0.5), per family. An all-to-all trigger changes most predictions without sending them to one class. Section
between ``<!-- all-to-all: begin -->`` and ``<!-- all-to-all: end -->`` of benchmarks/RESULTS.md.

    python benchmarks/all_to_all.py [--no-write]
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from efficacy_synthesis import load_average, machine  # noqa: E402
from results import publish  # noqa: E402

from scanner.context import ModelContext  # noqa: E402
from scanner.data.images import ImageSet, cached, holdout_split  # noqa: E402
from scanner.detect.synthesis import Config, Synthesizer, queries_for, search_runner  # noqa: E402
from scanner.detect.verdict import ALL_TO_ALL_CHANGED, decide  # noqa: E402

BEGIN, END = "<!-- all-to-all: begin -->", "<!-- all-to-all: end -->"


def jobs():
    models = ROOT / "models"
    rgb = json.loads((models / "rgb" / "manifest.json").read_text())["models"]
    gray = json.loads((models / "manifest.json").read_text())["models"]
    for e in rgb:
        yield models / "rgb" / e["file"], models / "rgb" / "data" / f"{e['dataset']}_clean.npz", e["name"], e["attack"]
    for e in gray:
        yield models / e["file"], models / "data" / "clean", e["name"], e.get("attack", "none")


def measure(path, data):
    ctx = ModelContext.open(path, threads=2)
    images, _, _ = holdout_split(cached(ImageSet(data), ctx.preprocess))
    cfg = Config(budget=None, seed=0)
    synth = Synthesizer(search_runner(ctx, cfg.batch_size), images.load_all(ctx.preprocess).pixels, cfg, queries_for(ctx))
    result = synth.run()
    verdict = decide(result, ctx)
    cands = synth.measure([c for r in result.classes for c in r.found.values()])
    weak = [c for c in cands if c.success < 0.5]
    per = {f: max([c.changed - c.success for c in weak if c.family == f] or [0.0]) for f in result.families}
    return verdict, per


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    started, rows, families = time.perf_counter(), [], []
    for path, data, name, attack in jobs():
        verdict, per = measure(path, data)
        families += [f for f in per if f not in families]  # grayscale models have no filter family
        kinds = sorted({c.get("kind") for c in verdict["candidates"] if c["level"] == verdict["verdict"]} - {None})
        rows.append((name, attack, verdict["verdict"], ", ".join(kinds) or "-", per))
        print(f"{name}: {verdict['verdict']} {per}", file=sys.stderr)
    clean = [r for r in rows if r[1] == "none"]
    lines = [BEGIN, "## What synthesized triggers change: the all-to-all rule (issue 14)", "",
             f"Measured {datetime.date.today()} on {machine()}, onnxruntime CPU; {time.perf_counter() - started:.0f} s; "
             f"load average at the end {load_average()}. Command: `python benchmarks/all_to_all.py`.",
             "Per model: the blind search (default budget, seed 0, the clean images less the held-out part), then each "
             "class's trigger of each family on the held-out images; the cell is the largest `changed - success` among "
             "the triggers that do not work for their class (success < 50%): how many predictions a trigger changes "
             f"beyond those it sends to its class. The rule: a patch at {ALL_TO_ALL_CHANGED:g} or more is all-to-all. "
             "Every model here is a tune model (the rule was set after these numbers).", "",
             "| model | attack | verdict | kind | " + " | ".join(families) + " |",
             "|---|---|---|---|" + "---|" * len(families)]
    for name, attack, v, kind, per in rows:
        lines.append(f"| {name} | {attack} | {v} | {kind} | "
                     + " | ".join(f"{per[f]:.3f}" if f in per else "-" for f in families) + " |")
    lines += ["", "Largest over the clean models: " + ", ".join(
        f"{f} {max(r[4][f] for r in clean if f in r[4]):.3f}" for f in families) + ".", END]
    publish("\n".join(lines), BEGIN, END, write=not args.no_write)


if __name__ == "__main__":
    main()
