"""Issue 15: where `--layers all` spends its time, per operator, against the plain model (one process, CPU).

For each model (the torchvision exports of benchmarks/speed.py) and each norm formulation of
:mod:`scanner.graph.instrument` (``reduce``, the CPU default, and ``pool``), one onnxruntime session of the
instrumented model (l-inf, l1 and l2 of every layer) and one of the plain model run the same random batch,
with onnxruntime's profiler on. Printed per session: wall ms per batch (median of ``--runs`` after one warm-up),
the ms of the nodes the instrument added, and the ms per operator type over all nodes (profiled runs are a
little slower than unprofiled ones; the wall ratio is what counts).

    python benchmarks/norm_kernels.py [--models resnet18,resnet50,mobilenet_v3_large] [--cache DIR]
        [--batch 32] [--runs 3] [--threads 2]

Needs the models in --cache (`python benchmarks/speed.py --prepare --cache DIR`).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.context import ModelContext  # noqa: E402
from scanner.graph.instrument import KERNELS, NORMS, PREFIX, instrument  # noqa: E402


def profile(data, x, outputs, runs, threads, prefix):
    """(median wall ms per run, {op type: ms per run}, ms per run of the instrument's own nodes)."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.enable_profiling, o.profile_file_prefix = True, prefix
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    s.run(outputs, {name: x})
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(outputs, {name: x})
        walls.append(1e3 * (time.perf_counter() - t))
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    by_op, ours = defaultdict(float), 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms = e["dur"] / 1e3 / (runs + 1)
            by_op[e["args"].get("op_name", "?")] += ms
            ours += ms if e["name"].startswith(PREFIX + "/") else 0.0
    return float(np.median(walls)), dict(by_op), ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v3_large")
    ap.add_argument("--cache", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "scanner-speed"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; python benchmarks/norm_kernels.py {' '.join(sys.argv[1:])}")
    print("| model | session | wall ms / batch | x plain wall | instrument's nodes ms | top operators (ms) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            report(name, args, tmp)


def report(name, args, tmp):
    """The table rows of one model: its plain session and the instrumented one in each norm formulation."""
    path = Path(args.cache) / f"{name}.onnx"
    ctx = ModelContext.open(str(path), "imagenet", "cpu")
    layers = ctx.select("all")
    x = np.random.RandomState(0).rand(args.batch, 3, 224, 224).astype(np.float32)
    plain, ops, _ = profile(path.read_bytes(), x, None, args.runs, args.threads, f"{tmp}/plain")
    rows = [("plain", plain, ops, 0.0)]
    for kernels in KERNELS:
        inst = instrument(ctx.proto, layers, norms=NORMS, kernels=kernels)
        outs = [ctx.scores] + [inst.norm_outputs[k] for k in NORMS]
        wall, ops, ours = profile(inst.model.SerializeToString(), x, outs, args.runs, args.threads, f"{tmp}/{kernels}")
        rows.append((f"all, {kernels}", wall, ops, ours))
    for session, wall, ops, ours in rows:
        top = ", ".join(f"{k} {v:.0f}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
        print(f"| {name} ({len(layers)} layers) | {session} | {wall:.0f} | {wall / plain:.2f} | {ours:.0f} | {top} |",
              flush=True)


if __name__ == "__main__":
    main()
