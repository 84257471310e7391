"""What the blind search costs against class count and input size: forward passes, seconds, peak memory.

    python benchmarks/cost.py [--write-results] [--only NAME,...]

Each model goes through `scanner gate MODEL --data DATA --budget 0 --threads 2 --format json` in a fresh process
(the default query budget of the model; no time cap), its peak resident memory from wait4. Beside it, the model's
own memory: a fresh process that only opens the model's onnxruntime session and runs one forward batch of the
search's size (what any inference of the model costs). "Above the session" is the difference.

Models: the zoo's 28x28 CNN, the RGB zoo's 10-, 100- and 1000-class pre-act ResNets (32x32, 32x64, 32x96), and
at 224x224 the ONNX Model Zoo ResNet-50 graph (1000 classes, IR 3, static batch 1) with seeded random weights
(tests/thirdparty.py) whose head is re-drawn and centered on the clean images' features, so that its predictions
spread over the classes and the search runs (random weights otherwise stop at the degenerate-predictions check).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import thirdparty as tp  # noqa: E402
from results import centered_head, measure, publish  # noqa: E402

MODELS = ROOT / "models"
RGB = MODELS / "rgb"
BEGIN, END = "<!-- cost: begin -->", "<!-- cost: end -->"


def resnet50_224(path, seed=0):
    """The classic ResNet-50 graph with random weights and a centered random head (see the module docstring)."""
    from scanner.context import ModelContext

    model = tp.classic("resnet50", seed)
    _, gemm = tp._head(model)
    onnx.save(model, str(path))
    ctx = ModelContext.open(path, "caffe", threads=2)
    assert ctx.head.input == gemm.input[0]
    w, b = centered_head(ctx, MODELS / "data" / "clean", seed)
    inits = {t.name: t for t in model.graph.initializer}
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(w, gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(b, gemm.input[2]))
    onnx.save(model, str(path))
    return path


SESSION = """
import sys, numpy as np
from scanner.context import ModelContext
from scanner.detect.synthesis import chunk_images
ctx = ModelContext.open(sys.argv[1], sys.argv[2] if sys.argv[2] != "-" else None, threads=2)
h, w = ctx.preprocess.size
n = chunk_images(h, w, ctx.preprocess.channels)
ctx.runner().run(np.random.RandomState(0).randint(0, 256, (n, h, w, ctx.preprocess.channels)).astype(np.uint8))
"""


def models(tmp):
    """(label, path, data, preprocess or None, classes, input)"""
    yield "zoo cnn_badnets", MODELS / "cnn_badnets.onnx", MODELS / "data" / "clean", None, 10, "28x28x1"
    for k, size in ((10, "32x32x3"), (100, "32x64x3"), (1000, "32x96x3")):
        for attack in ("badnets", "clean"):
            name = f"rgb{k}_preact_{attack}"
            yield name, RGB / f"{name}.onnx", RGB / "data" / f"rgb{k}_clean.npz", None, k, size
    yield "resnet50 (random weights)", resnet50_224(Path(tmp) / "resnet50.onnx"), MODELS / "data" / "clean", "caffe", 1000, "224x224x3"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = [o for o in args.only.split(",") if o]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, data, pre, classes, size in models(tmp):
            if only and not any(o in label for o in only):
                continue
            pre_args = ["--preprocess", pre] if pre else []
            code, out, seconds, rss = measure([sys.executable, "-m", "scanner", "gate", str(path), "--data", str(data),
                                               *pre_args, "--budget", "0", "--threads", "2", "--format", "json"])
            _, _, _, session = measure([sys.executable, "-c", SESSION, str(path), pre or "-"])
            entry = json.loads(out)["models"][0] if out.strip() else {}
            syn = (entry.get("evidence") or {}).get("synthesis") or {}
            row = {"model": label, "classes": classes, "input": size, "exit": code, "verdict": entry.get("verdict"),
                   "targets": entry.get("targets"), "queries": syn.get("queries"), "budget": (syn.get("plan") or {}).get("queries"),
                   "search_seconds": syn.get("seconds"), "seconds": round(seconds, 1), "peak_mib": round(rss),
                   "session_mib": round(session), "above_session_mib": round(rss - session),
                   "truncated": syn.get("truncated")}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    heads = ["model", "classes", "input", "verdict", "targets", "queries", "budget", "search_seconds", "seconds",
             "peak_mib", "session_mib", "above_session_mib"]
    table = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    table += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
    text = "\n".join([
        BEGIN, "## What the blind search costs (issue 13)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}. Command: `python benchmarks/cost.py "
        "--write-results`. `scanner gate` with the default query budget and no time cap (`--budget 0`), one fresh "
        "process per model; seconds are the whole process, search_seconds the search alone; peak_mib is the "
        "process's peak RSS, session_mib a process that only runs the model's session on one search-sized batch.",
        "", *table, "", END])
    publish(text, BEGIN, END, args.write_results)


if __name__ == "__main__":
    main()
