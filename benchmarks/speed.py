"""Issue 15: scanner against a plain onnxruntime loop, whole processes, side by side, interleaved.

For each model (torchvision ResNet-18, ResNet-50, MobileNetV3-Large, ViT-B/16; random weights, legacy export,
opset 17, dynamic batch) and the same folder of 224x224 PNGs, each round runs, one after the other:

- ``plain``: benchmarks/plain_ort.py (OpenCV decode, ImageNet preprocessing, plain onnxruntime), its own process;
- ``last``: ``scanner scan MODEL --data DIR --layers last``;
- ``all``: ``scanner scan MODEL --data DIR --layers all`` (l-inf, l1, l2 of every layer);

each timed whole (wall seconds, from process start to exit) with its peak RSS (GNU time: see results.measure). Ratios are the plain
loop's median wall over the variant's (= throughput ratio) and the variant's median peak over the plain loop's.

``--search`` also measures forward passes per second of the trigger search and of the repair's evaluation in one
process: :mod:`scanner.detect.synthesis` queries and ``Runner.predict`` against ``session.run`` of the same batch
size on one pre-made tensor, interleaved.

    python benchmarks/speed.py [--models resnet18,resnet50,mobilenet_v3_large,vit_b_16] [--images 384]
        [--rounds 3] [--batch 32] [--cache DIR] [--torch-python PY] [--search] [--search-seconds 30]
        [--search-rounds 2] [--device cpu|cuda] [--write-results]

Exports need torch + torchvision (`pip install torch==2.14.1 torchvision==0.29.1`); they are cached in --cache.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import centered_head, measure, publish  # noqa: E402
MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "vit_b_16")


def export(name, cache, python=None):
    """The ONNX file of torchvision model ``name`` (random weights, seed 0), exported once into ``cache``
    (by interpreter ``python`` when given: one with torch and torchvision)."""
    path = Path(cache) / f"{name}.onnx"
    if path.exists():
        return path
    if python:
        subprocess.run([python, __file__, "--export", name, "--cache", str(cache)], check=True)
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp.rename(path)
    return path


def image_folder(cache, n):
    """A folder of ``n`` 224x224 RGB PNGs: Fashion-MNIST images scaled up, tinted and noised (made once)."""
    import cv2

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fashion import load_test

    folder = Path(cache) / f"images{n}"
    if folder.exists() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_test()
    rng = np.random.default_rng(0)
    for i in range(n):
        gray = cv2.resize(images[i], (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
        img = gray[:, :, None] * tint + rng.normal(0, 8, (224, 224, 3)).astype(np.float32) + rng.uniform(0, 60, 3)
        cv2.imwrite(str(folder / f"{i:04d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return folder


def centered(path, folder, device):
    """A copy of ``path`` whose random head is re-drawn around the features of the images (logit spread 3): a
    random network otherwise predicts one class for every image, and the search refuses such a model."""
    import onnx

    from scanner.context import ModelContext
    from scanner.graph import surgery

    out = Path(path).with_suffix(".centered.onnx")
    if out.exists():
        return out
    ctx = ModelContext.open(str(path), "imagenet", device)
    onnx.save(surgery.set_linear(ctx.proto, ctx.head, *centered_head(ctx, folder)), str(out))
    return out


def timed(cmd):
    """(wall seconds, peak RSS MiB) of one process."""
    code, _, seconds, rss = measure(cmd)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {code}); run it alone to see why")
    return seconds, rss


def whole_process(path, folder, rounds, batch, device):
    """Median wall and peak RSS of plain / last / all over ``rounds`` interleaved rounds, and the ratios."""
    py = sys.executable
    scan = [py, "-m", "scanner", "scan", str(path), "--data", str(folder), "--preprocess", "imagenet", "--batch-size",
            str(batch), "--device", device, "--format", "json", "-q", "-o", os.devnull, "--force"]
    variants = {
        "plain": [py, str(ROOT / "benchmarks" / "plain_ort.py"), str(path), str(folder), "--batch", str(batch), "--device", device],
        "last": scan + ["--layers", "last"],
        "all": scan + ["--layers", "all"],
    }
    samples = {k: [] for k in variants}
    for r in range(rounds):
        for k, cmd in variants.items():
            samples[k].append(timed(cmd))
            print(f"  round {r + 1} {k}: {samples[k][-1][0]:.2f} s, {samples[k][-1][1]:.0f} MiB", file=sys.stderr)
    med = {k: (float(np.median([s[0] for s in v])), float(np.median([s[1] for s in v]))) for k, v in samples.items()}
    out = {k: {"wall_s": round(w, 2), "peak_mib": round(m, 1), "walls": [s[0] for s in samples[k]]} for k, (w, m) in med.items()}
    for k in ("last", "all"):
        out[k]["throughput_ratio"] = round(med["plain"][0] / med[k][0], 3)
        out[k]["memory_ratio"] = round(med[k][1] / med["plain"][1], 3)
    return out


def plain_rate(session, x, seconds):
    """Images/s of plain ``session.run`` on the float32 batch ``x``, run over and over for ``seconds``."""
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: x})
        n += len(x)
    return n / (time.perf_counter() - start)


def in_process(path, folder, rounds, seconds, device):
    """Forward passes per second of the trigger search (a search cut at ``seconds``) and of a stamped evaluation
    (``Runner.predict`` with a patch trigger, as the repair's checks run it), each against plain ``session.run``
    of the same batch size on the same model, interleaved."""
    import onnxruntime as ort

    from scanner.context import ModelContext
    from scanner.data.images import ImageSet, cached
    from scanner.data.triggers import Trigger
    from scanner.detect.synthesis import Config, Synthesizer, search_runner

    path = centered(path, folder, device)
    ctx = ModelContext.open(str(path), "imagenet", device)
    images = cached(ImageSet(folder), ctx.preprocess)
    pixels = images.load_all(ctx.preprocess).pixels
    search = search_runner(ctx)
    evaluate = ctx.runner(batch_size=32)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    plain = ort.InferenceSession(str(path), providers=providers)
    h, w = ctx.preprocess.size
    trigger = Trigger(kind="patch", image=np.full((h // 10, w // 10, 3), 255, np.float32), position=[h - h // 10, w - w // 10])
    rng = np.random.RandomState(0)
    x_search = rng.rand(search.batch_size, 3, h, w).astype(np.float32)
    x_eval = rng.rand(32, 3, h, w).astype(np.float32)
    # the images one session call of each gets (the runner splits a batch on CPU: runner.call_images, tap_batch)
    calls = {"search": search.call_size(), "evaluate": evaluate.call_size(norms=False)}
    x_call = {k: rng.rand(n, 3, h, w).astype(np.float32) for k, n in calls.items()}
    samples = {k: [] for k in ("plain_search_batch", "plain_search_call", "search", "plain_batch_32",
                               "plain_evaluate_call", "evaluate")}
    for r in range(rounds):
        samples["plain_search_batch"].append(plain_rate(plain, x_search, seconds))
        samples["plain_search_call"].append(plain_rate(plain, x_call["search"], seconds))
        q0, t0 = search.queries, time.perf_counter()
        Synthesizer(search, pixels, Config(budget=seconds, queries=10**9)).run()
        samples["search"].append((search.queries - q0) / (time.perf_counter() - t0))
        samples["plain_batch_32"].append(plain_rate(plain, x_eval, seconds))
        samples["plain_evaluate_call"].append(plain_rate(plain, x_call["evaluate"], seconds))
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            n += len(evaluate.predict(images, trigger)[0])
        samples["evaluate"].append(n / (time.perf_counter() - t0))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in samples.items()), file=sys.stderr)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    return {**{k: round(v, 2) for k, v in med.items()}, "search_batch": search.batch_size,
            "search_call": calls["search"], "evaluate_call": calls["evaluate"],
            "search_ratio": round(med["search"] / med["plain_search_batch"], 3),
            "search_call_ratio": round(med["search"] / med["plain_search_call"], 3),
            "evaluate_ratio": round(med["evaluate"] / med["plain_batch_32"], 3),
            "evaluate_call_ratio": round(med["evaluate"] / med["plain_evaluate_call"], 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "scanner-speed"))
    ap.add_argument("--search", action="store_true")
    ap.add_argument("--search-seconds", type=float, default=30.0, help="seconds per timed search / evaluation")
    ap.add_argument("--search-rounds", type=int, default=2)
    ap.add_argument("--prepare", action="store_true", help="only export the models and write the images")
    ap.add_argument("--torch-python", help="an interpreter with torch + torchvision for the exports")
    ap.add_argument("--export", help=argparse.SUPPRESS)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.export:
        export(args.export, args.cache)
        return
    counts = {m.split(":")[0]: int(m.split(":")[1]) if ":" in m else args.images for m in args.models.split(",")}
    folders = {n: image_folder(args.cache, n) for n in set(counts.values())}
    paths = {name: export(name, args.cache, args.torch_python) for name in counts}
    if args.prepare:
        return
    import onnxruntime

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}", "onnxruntime": onnxruntime.__version__, "device": args.device,
               "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]), "images": args.images,
               "batch": args.batch, "rounds": args.rounds, "search_rounds": args.search_rounds,
               "search_seconds": args.search_seconds, "models": {}}
    for name, path in paths.items():
        print(name, file=sys.stderr)
        folder = folders[counts[name]]
        results["models"][name] = {"images": counts[name],
                                   "process": whole_process(path, folder, args.rounds, args.batch, args.device)}
        if args.search:
            results["models"][name]["search"] = in_process(path, folder, args.search_rounds, args.search_seconds,
                                                           args.device)
        print(name, json.dumps(results["models"][name]), file=sys.stderr)
    text = section(results)
    print(json.dumps(results, indent=1), file=sys.stderr)
    publish(text, BEGIN, END, args.write_results)


BEGIN, END = "<!-- speed: begin -->", "<!-- speed: end -->"
TARGETS = {"all": 0.9, "last": 0.97, "memory": 1.2, "search": 0.9}


def _mark(value, goal, higher=True):
    ok = value >= goal if higher else value <= goal
    return f"{value:.2f} ({'met' if ok else 'missed'})"


def section(results):
    """The RESULTS.md section: whole-process ratios per model, then the search / evaluation ratios."""
    rows = ["| model | images | plain s (img/s) | `--layers last` s | last / plain | `--layers all` s | all / plain | plain MiB "
            "| last MiB (x plain) | all MiB (x plain) |", "|---" * 10 + "|"]
    for name, r in results["models"].items():
        p, last, every, n = r["process"]["plain"], r["process"]["last"], r["process"]["all"], r["images"]
        rows.append(f"| {name} | {n} | {p['wall_s']} ({n / p['wall_s']:.1f}) | {last['wall_s']} | "
                    f"{_mark(last['throughput_ratio'], TARGETS['last'])} | {every['wall_s']} | "
                    f"{_mark(every['throughput_ratio'], TARGETS['all'])} | {p['peak_mib']:.0f} | "
                    f"{last['peak_mib']:.0f} ({_mark(last['memory_ratio'], TARGETS['memory'], False)}) | "
                    f"{every['peak_mib']:.0f} ({_mark(every['memory_ratio'], TARGETS['memory'], False)}) |")
    search = [(name, r["search"]) for name, r in results["models"].items() if "search" in r]
    if search:
        rows += ["", "| model | search batch (per session call) | plain img/s at that batch (at the call size) | "
                 "search queries/s | search / plain at its batch | search / plain at the call size | plain img/s, "
                 "batch 32 (at the call size) | stamped evaluation img/s | evaluation / plain at batch 32 | evaluation "
                 "/ plain at the call size |", "|---" * 10 + "|"]
        for name, r in search:
            rows.append(f"| {name} | {r['search_batch']} ({r.get('search_call', '-')}) | {r['plain_search_batch']} "
                        f"({r.get('plain_search_call', '-')}) | {r['search']} | "
                        f"{_mark(r['search_ratio'], TARGETS['search'])} | "
                        f"{_mark(r['search_call_ratio'], TARGETS['search'])} | {r['plain_batch_32']} "
                        f"({r.get('plain_evaluate_call', '-')}) | {r['evaluate']} | "
                        f"{_mark(r['evaluate_ratio'], TARGETS['search'])} | "
                        f"{_mark(r['evaluate_call_ratio'], TARGETS['search'])} |")
    return "\n".join([
        BEGIN, "## Scan, search and evaluation against plain onnxruntime (issue 15)", "",
        f"Measured {results['date']} on {results['machine']}, onnxruntime {results['onnxruntime']}, device "
        f"{results['device']}. Command: `{results['command']}`. PNG images of 224x224 (Fashion-MNIST scaled up "
        f"and tinted; a model:N entry uses N of them), batch {results['batch']}, torchvision models with random weights (legacy export, opset 17). "
        "Whole processes, one after the other in each of "
        f"{results['rounds']} interleaved rounds, medians: `plain` is benchmarks/plain_ort.py (OpenCV decode, "
        "ImageNet preprocessing, plain onnxruntime with its defaults); `last` / `all` are `scanner scan --layers "
        "last|all` (l-inf, l1 and l2 of the chosen layers) with its JSON report. Ratios are plain wall / scanner wall "
        "(throughput) and scanner peak RSS / plain peak RSS (GNU time). Targets: all >= 0.9, last >= 0.97, memory "
        "<= 1.2; search and stamped evaluation >= 0.9 of plain `session.run` at the same batch size (in one process, "
        "against both the batch the caller gives and the smaller session calls the runner makes of it on CPU, "
        f"interleaved, {results['search_rounds']} rounds of {results['search_seconds']:g} s each; the search is the real "
        "`Synthesizer` on a copy of the model with its random head re-centered on the images' features, cut by its "
        "time cap, setup included).", "", *rows, "", END])


if __name__ == "__main__":
    main()
