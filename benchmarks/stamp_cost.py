"""What stamping costs the trigger search, per family and image size, this tree against a baseline checkout.

For each family, the search's own templates (a few of each bank) are stamped on 16 search images per candidate,
7 candidates per pass, as the search does it: into its reused buffer (``Synthesizer._stamps``) where the tree has
one, else a new array per stamp joined by ``np.concatenate``. Microseconds per stamped image, medians of
``--rounds`` rounds, each tree in its own process, interleaved; the ratio is baseline / now (> 1: faster now).
The stamped values of the two trees are compared (they must be the same bits).

    git worktree add /tmp/base COMMIT
    python benchmarks/stamp_cost.py --baseline /tmp/base --cache DIR [--rounds 3] [--write-results]

``--cache`` is benchmarks/speed.py's (its resnet18.onnx and 224x224 PNG images give the 224x224 case); the 32x32
case is the RGB zoo's rgb10_vgg_clean on its clean images.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import head, publish  # noqa: E402

BEGIN, END = "<!-- stamp-cost: begin -->", "<!-- stamp-cost: end -->"
FAMILIES = ("patch", "blend", "signal", "warp", "filter")
PER_PASS, IMAGES, REPEATS = 7, 16, 5


def cases(cache):
    return {"224x224": (Path(cache) / "resnet18.onnx", Path(cache) / "images384"),
            "32x32": (ROOT / "models/rgb/rgb10_vgg_clean.onnx", ROOT / "models/rgb/data/rgb10_clean.npz")}


def child(model, data):
    """{family: (microseconds per stamped image, digest of the stamped values)} with the package on sys.path."""
    from scanner.context import ModelContext
    from scanner.data.images import ImageSet
    from scanner.detect.synthesis import Config, Synthesizer

    ctx = ModelContext.open(model, threads=2)
    pixels = ImageSet(data, limit=120).load_all(ctx.preprocess).pixels
    s = Synthesizer.for_model(ctx, pixels, Config(seed=0))
    s._clean()
    x = s.x_search[:IMAGES]
    banks = s._templates()
    out = {}
    for family in FAMILIES:
        bank = banks[family]
        cands = [c.copy(target=0) for c in bank[:: max(1, len(bank) // PER_PASS)][:PER_PASS]]
        stamp = getattr(s, "_stamps", None) or (lambda cs, xs: np.concatenate([c.stamp(xs) for c in cs]))
        digest = hashlib.sha1(np.ascontiguousarray(stamp(cands, x), np.float32).tobytes()).hexdigest()[:12]
        start = time.perf_counter()
        for _ in range(REPEATS):
            stamp(cands, x)
        out[family] = ((time.perf_counter() - start) / REPEATS / (len(cands) * len(x)) * 1e6, digest)
    return out


def run(tree, model, data):
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(model), str(data)], env=env, cwd=str(tree),
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        print(json.dumps(child(Path(argv[1]), Path(argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a checkout of the baseline commit")
    ap.add_argument("--cache", required=True, help="benchmarks/speed.py's cache (resnet18.onnx, images384/)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    trees = {"now": ROOT, "baseline": Path(args.baseline).resolve()}
    got = {}
    for r in range(args.rounds):
        for i, (size, (model, data)) in enumerate(cases(args.cache).items()):
            for tree in (list(trees) if (r + i) % 2 == 0 else list(trees)[::-1]):
                got.setdefault((tree, size), []).append(run(trees[tree], model, data))
                print(f"round {r + 1} {size} {tree}: done", file=sys.stderr)
    lines = [BEGIN, "## What stamping costs the search, per family (issue 15)", "",
             f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, numpy {np.__version__}; this tree at {head(ROOT)} against "
             f"{head(trees['baseline'])}. Command: `python benchmarks/stamp_cost.py {' '.join(argv)}`. Microseconds per "
             f"stamped image of one search pass ({PER_PASS} of the family's own templates x {IMAGES} search images), "
             f"medians of {args.rounds} interleaved rounds, each tree in its own process; 224x224: resnet18 of "
             "benchmarks/speed.py's cache on its PNG images, 32x32: rgb10_vgg_clean on its clean images. \"same "
             "values\": the stamped pixels of the two trees hash the same.", "",
             "| size | family | baseline us/image | now us/image | baseline / now | same values |", "|---|---|---|---|---|---|"]
    for size in cases(args.cache):
        for family in FAMILIES:
            b = float(np.median([g[family][0] for g in got[("baseline", size)]]))
            n = float(np.median([g[family][0] for g in got[("now", size)]]))
            same = got[("baseline", size)][0][family][1] == got[("now", size)][0][family][1]
            lines.append(f"| {size} | {family} | {b:.1f} | {n:.1f} | {b / n:.2f} | {'yes' if same else 'NO'} |")
    lines += ["", END]
    publish("\n".join(lines), BEGIN, END, args.write_results)


if __name__ == "__main__":
    main()
