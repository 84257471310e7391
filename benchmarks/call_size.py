"""Plain onnxruntime throughput by batch size, and the session call size the runner picks on CPU.

For each model, one process: plain ``session.run`` (CPU, default session options, ``--threads`` intra-op threads)
on one random float32 batch, for each batch size in turn, ``--rounds`` interleaved rounds of ``--seconds`` each
(medians). Beside it, the images per session call :func:`scanner.runtime.runner.call_images` gives at the search's
batch (:func:`scanner.detect.synthesis.chunk_images`), from the model's largest map of one image
(:func:`scanner.graph.cost.largest_map`), and the throughput ratio of that call size to the search batch.

    python benchmarks/call_size.py [--models PATH ...] [--cache DIR] [--batches 4,8,...] [--rounds 2]
        [--seconds 2] [--write-results]

Default models: the RGB zoo's clean models of each architecture, two grayscale zoo models, and the torchvision
models of benchmarks/speed.py found in --cache (ResNet-18, ResNet-50, MobileNetV3-Large, ViT-B/16).
"""

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import publish  # noqa: E402
from speed import MODELS, plain_rate  # noqa: E402

ZOO = ["models/rgb/rgb10_preact_clean.onnx", "models/rgb/rgb10_mobilenetv2_clean.onnx", "models/rgb/rgb10_vgg_clean.onnx",
       "models/rgb/rgb10_vit_clean.onnx", "models/rgb/rgb1000_preact_clean.onnx", "models/cnn_clean.onnx",
       "models/resnet_clean.onnx"]
BEGIN, END = "<!-- call-size: begin -->", "<!-- call-size: end -->"


def curve(path, batches, rounds, seconds, threads):
    """(row facts, {batch: median images/s}) of one model."""
    import onnx

    from scanner.detect.synthesis import chunk_images
    from scanner.graph.cost import largest_map
    from scanner.runtime.runner import call_images

    model = onnx.load(str(path), load_external_data=False)
    map_bytes = largest_map(model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    c, h, w = dims[1:]
    search = chunk_images(h, w, c)
    call = call_images(map_bytes, search)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sizes = sorted({b for b in batches if b <= search} | {search, call})  # no batch past what the search runs
    rng = np.random.RandomState(0)
    x = {b: rng.rand(b, c, h, w).astype(np.float32) for b in sizes}
    samples = {b: [] for b in sizes}
    for r in range(rounds):
        for b in sizes:
            samples[b].append(plain_rate(session, x[b], seconds))
        print(f"{Path(path).name} round {r + 1}: " + ", ".join(f"{b}: {v[-1]:.0f}/s" for b, v in samples.items()),
              file=sys.stderr)
    rates = {b: float(np.median(v)) for b, v in samples.items()}
    return {"model": Path(path).stem, "input": f"{c}x{h}x{w}", "map_kib": (map_bytes or 0) / 1024, "search": search,
            "call": call}, rates


def section(rows, batches, argv):
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = " | ".join(f"batch {b}" for b in batches)
    lines = [BEGIN, "## Session calls sized by the largest map (issue 15)", "",
             f"Measured {now} on {platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python "
             f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, CPU. Command: "
             f"`python benchmarks/call_size.py {' '.join(argv)}`. Plain `session.run` on one random batch, images/s, "
             "medians of interleaved rounds. \"largest map\": the largest tensor one image fills (float32); \"search "
             "batch\": the images the search stamps per forward pass; \"call\": the images per session call the runner "
             "gives that batch on CPU (`call_images`: CALL_BYTES of the largest map, at least CALL_MIN); \"call / "
             "search batch\": the throughput of the one over the other; \"-\": a batch past the search's, not run.", "",
             f"| model | input | largest map KiB | {head} | search batch | call | call / search batch |",
             "|---|---|---|" + "---|" * len(batches) + "---|---|---|"]
    for facts, rates in rows:
        cells = " | ".join(f"{rates[b]:.0f}" if b in rates else "-" for b in batches)
        ratio = rates[facts["call"]] / rates[facts["search"]]
        lines.append(f"| {facts['model']} | {facts['input']} | {facts['map_kib']:.0f} | {cells} | {facts['search']} "
                     f"({rates[facts['search']]:.0f}/s) | {facts['call']} ({rates[facts['call']]:.0f}/s) | {ratio:.2f} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="ONNX files (default: see the module docstring)")
    ap.add_argument("--cache", default=None, help="benchmarks/speed.py's export folder (its models join the default)")
    ap.add_argument("--batches", default="4,16,64,128,512")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.models] if args.models else [ROOT / p for p in ZOO]
    if not args.models and args.cache:
        paths += [p for p in (Path(args.cache) / f"{m}.onnx" for m in MODELS) if p.exists()]
    batches = [int(b) for b in args.batches.split(",")]
    rows = [curve(p, batches, args.rounds, args.seconds, args.threads) for p in paths]
    publish(section(rows, batches, argv), BEGIN, END, args.write_results)


if __name__ == "__main__":
    main()
