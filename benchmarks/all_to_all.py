"""What the synthesized triggers change: the calibration of the all-to-all and the specificity rules
(detect/verdict.py ALL_TO_ALL_CHANGED, SPECIFIC).

For every zoo model (RGB and grayscale), the blind search as `scanner sanitize` runs it (its clean images less the
held-out part, the default query budget, seed 0), then every class's synthesized trigger of every family measured
on the held-out images: the largest "changed - success" among the triggers that do not work for their class (success
under 0.5), per family. An all-to-all trigger changes most predictions without sending them to one class. And the
largest specificity (verdict.specificity) of a working trigger, per family: how far it beats what the other classes'
triggers of its family change at its size or larger. Section
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
from scanner.detect.synthesis import Config, Synthesizer  # noqa: E402
from scanner.detect.verdict import ALL_TO_ALL_CHANGED, SPECIFIC, decide, specificities  # noqa: E402

BEGIN, END = "<!-- all-to-all: begin -->", "<!-- all-to-all: end -->"


def jobs():
    models = ROOT / "models"
    rgb = json.loads((models / "rgb" / "manifest.json").read_text())["models"]
    gray = json.loads((models / "manifest.json").read_text())["models"]
    for e in rgb:
        yield (models / "rgb" / e["file"], models / "rgb" / "data" / f"{e['dataset']}_clean.npz", e["name"], e["attack"],
               e.get("split", "tune"))
    for e in gray:
        yield models / e["file"], models / "data" / "clean", e["name"], e.get("attack", "none"), e.get("split", "tune")


def measure(path, data):
    ctx = ModelContext.open(path, threads=2)
    images, _, _ = holdout_split(cached(ImageSet(data), ctx.preprocess))
    cfg = Config(budget=None, seed=0)
    synth = Synthesizer.for_model(ctx, images.load_all(ctx.preprocess).pixels, cfg)
    result = synth.run()
    verdict = decide(result, ctx)
    cands = synth.measure([c for r in result.classes for c in r.found.values()])
    weak = [c for c in cands if c.success < 0.5]
    per = {f: max([c.changed - c.success for c in weak if c.family == f] or [0.0]) for f in result.families}
    spec = {}
    for f in result.families:
        values = [v for v in specificities(result, f) if v is not None]
        spec[f] = max(values) if values else None
    return verdict, per, spec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    started, rows, families = time.perf_counter(), [], []
    for path, data, name, attack, split in jobs():
        verdict, per, spec = measure(path, data)
        families += [f for f in per if f not in families]  # grayscale models have no filter family
        kinds = sorted({c.get("kind") for c in verdict["candidates"] if c["level"] == verdict["verdict"]} - {None})
        targets = ", ".join(str(t) for t in verdict["targets"]) or "-"
        rows.append((name, split, attack, verdict["verdict"], targets, ", ".join(kinds) or "-", per, spec))
        print(f"{name}: {verdict['verdict']} {per} {spec}", file=sys.stderr)
    clean = [r for r in rows if r[2] == "none"]
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [BEGIN, "## What synthesized triggers change: the all-to-all and specificity rules (issue 14)", "",
             f"Measured {datetime.date.today()} on {machine()}, onnxruntime CPU; {time.perf_counter() - started:.0f} s; "
             f"load average at the end {load_average()}. Command: `python benchmarks/all_to_all.py`.",
             "Per model: the blind search (default budget, seed 0, the clean images less the held-out part), then each "
             "class's trigger of each family on the held-out images. \"changed - success\": the largest among the "
             "triggers that do not work for their class (success < 50%), how many predictions a trigger changes "
             f"beyond those it sends to its class; the rule: a patch at {ALL_TO_ALL_CHANGED:g} or more is all-to-all. "
             "\"specificity\": the largest of a working trigger (lower end of its success's 95% interval minus the "
             "median of what the other classes' non-working triggers of its family at its size or larger change; - "
             f"where none works or fewer than 3 compare); the rule: {SPECIFIC:g} or more, with a size anomaly, is "
             "backdoored, in the families with a strength (not patches, whose column is for comparison). Split: tune models set the rules; holdout models were not looked at before.", "",
             "| model | split | attack | verdict | targets | kind | " + " | ".join(f"{f}: changed - success" for f in families)
             + " | " + " | ".join(f"{f}: specificity" for f in families) + " |",
             "|---|---|---|---|---|---|" + "---|" * (2 * len(families))]
    for name, split, attack, v, targets, kind, per, spec in rows:
        lines.append(f"| {name} | {split} | {attack} | {v} | {targets} | {kind} | "
                     + " | ".join(f"{per[f]:.3f}" if f in per else "-" for f in families) + " | "
                     + " | ".join(cell(spec.get(f)) for f in families) + " |")
    def top(f, i):
        vals = [r[i][f] for r in clean if r[i].get(f) is not None]
        return f"{f} {max(vals):.3f}" if vals else f"{f} -"
    lines += ["", "Largest over the clean models: changed - success " + ", ".join(top(f, 6) for f in families)
              + "; specificity " + ", ".join(top(f, 7) for f in families) + ".", END]
    publish("\n".join(lines), BEGIN, END, write=not args.no_write)


if __name__ == "__main__":
    main()
