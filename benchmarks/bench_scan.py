"""Scan speed and memory (issue 3), side by side in one run.

images/s of (a) plain onnxruntime inference, (b) scanner's instrumented model (l-inf, l1, l2 of every layer,
`--layers all`), (c) PyTorch forward hooks reducing the same norms on device and copying only (N, C) (where
torch is installed), for a zoo model and torchvision resnet18 / resnet50 / vit_b_16 (random weights, 224x224); plus
the peak memory of `scanner scan --layers all` on 1,000 vs 10,000 images, and with ``--surgery MODEL`` the time of
``scanner.surgery.prune`` of 10% of the channels of every (zero-preserving) layer plus ``onnx.save``.

    python benchmarks/bench_scan.py [--device cpu|cuda] [--models zoo,resnet18,resnet50,vit_b_16] [--seconds 5]
        [--batch 32] [--images 128] [--surgery resnet50] [--no-memory]

For vit_b_16 the layers are the patch conv, the MLP Gemm/MatMul layers (norms over tokens) and the head; the
torch hooks reduce Linear outputs over tokens the same way.

torchvision models need `pip install torch==2.14.1 torchvision==0.29.1` (dev only).
"""

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.context import ModelContext  # noqa: E402
from scanner.graph.instrument import NORMS  # noqa: E402
from scanner.runtime.session import Session  # noqa: E402


def rate(fn, x, batch, seconds):
    """images/s of fn over batches of x, after one warm-up batch."""
    fn(x[:batch])
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for s in range(0, len(x), batch):
            fn(x[s : s + batch])
            n += len(x[s : s + batch])
    return n / (time.perf_counter() - start)


def torch_hooks(net, device):
    """Forward hooks on every Conv2d / Linear computing the three norms on device, copying (N, C)."""
    import torch

    sink = []

    def hook(_m, _i, out):
        a = out.detach()
        if a.dim() == 4:
            sink.append(torch.stack([a.abs().amax((2, 3)), a.abs().sum((2, 3)), a.pow(2).sum((2, 3)).sqrt()]).cpu())
        elif a.dim() == 3:  # (N, tokens, C)
            sink.append(torch.stack([a.abs().amax(1), a.abs().sum(1), a.pow(2).sum(1).sqrt()]).cpu())
        else:
            sink.append(a.abs().cpu())

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)

    def run(x):
        with torch.no_grad():
            net(torch.from_numpy(x).to(device))
        sink.clear()

    return run


def torch_plain(net, device):
    import torch

    def run(x):
        with torch.no_grad():
            net(torch.from_numpy(x).to(device)).cpu()

    return run


def build(name, tmp):
    """(onnx path, torch module or None, input shape)."""
    if name == "zoo":
        path = ROOT / "models" / "cnn_badnets.onnx"
        net = None
        try:
            import torch

            sys.path.insert(0, str(ROOT))
            from models.recipes.nets import PlainCNN

            net = PlainCNN().eval()
            torch.manual_seed(0)
        except ImportError:
            pass
        return path, net, (1, 28, 28)
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    path = Path(tmp) / f"{name}.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path, net, (3, 224, 224)


def surgery(name, tmp, ratio=0.1):
    """Seconds to discover layers, prune ``ratio`` of the channels of every zero-preserving layer, and save."""
    from scanner.graph.layers import discover
    from scanner.graph.surgery import prune

    path, _, _ = build(name, tmp)
    model = onnx.load(str(path))
    t0 = time.perf_counter()
    layers = discover(model)
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    plan = {l.id: rng.choice(l.channels, max(1, int(l.channels * ratio)), replace=False).tolist()
            for l in layers if l.zero_preserving}  # fmt: skip
    pruned = prune(model, plan, layers)
    t2 = time.perf_counter()
    onnx.save(pruned, str(Path(tmp) / f"{name}.pruned.onnx"))
    t3 = time.perf_counter()
    return {"model": name, "layers_pruned": len(plan), "channels_pruned": sum(len(v) for v in plan.values()),
            "discover_s": round(t1 - t0, 2), "prune_s": round(t2 - t1, 2), "save_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2)}  # fmt: skip


def peak_rss(args):
    """Peak RSS (MiB) of `scanner ARGS` in a child process, from GNU time (ru_maxrss of a child started
    by a big parent process reports the parent's high-water mark on Linux)."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "scanner"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return int(out.stderr.strip().splitlines()[-1]) / 1024


def memory(tmp):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cv2
    from fashion import load_test

    images, _ = load_test()
    folder = Path(tmp) / "fashion10k"
    folder.mkdir()
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:05d}.png"), img)
    base = ["scan", str(ROOT / "models" / "cnn_badnets.onnx"), "--data", str(folder), "--layers", "all", "--format", "json", "-q",
            "--probe", str(ROOT / "models" / "triggers" / "badnets_3x3.json"), "-o", str(Path(tmp) / "r.json"), "--force"]
    return {"1000": round(peak_rss(base + ["--limit", "1000"]), 1), "10000": round(peak_rss(base), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="zoo,resnet18,resnet50")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--batch", type=int, default=32, help="batch size for torchvision models")
    ap.add_argument("--images", type=int, default=0, help="images per timed pass (default 4 batches)")
    ap.add_argument("--surgery", default="", help="also time pruning 10%% of every layer's channels of this model")
    args = ap.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
               "command": "python benchmarks/bench_scan.py " + " ".join(sys.argv[1:]), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [] if args.memory_only else args.models.split(","):
            path, net, shape = build(name, tmp)
            batch = 256 if name == "zoo" else args.batch
            x = np.random.RandomState(0).randn(args.images or batch * 4, *shape).astype(np.float32)
            plain = Session(onnx.load(str(path)), args.device)
            ctx = ModelContext.open(str(path), device=args.device)
            inst = ctx.runner(ctx.select("all"), norms=NORMS)
            outs = [ctx.scores] + [inst.instrumented.norm_outputs[k] for k in NORMS]
            runs = {
                "plain": lambda b: plain.run(b, [plain.output_names[0]]),
                "scanner": lambda b: inst.session.run(b, outs),
            }
            if net is not None:
                import torch

                torch.set_num_threads(os.cpu_count())
                dev = "cuda" if args.device == "cuda" else "cpu"
                runs["torch_plain"] = torch_plain(net.to(dev), dev)
                runs["torch_hooks"] = torch_hooks(copy.deepcopy(net), dev)  # a copy: plain must run without hooks
            samples = {k: [] for k in runs}
            for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
                for k, fn in runs.items():
                    samples[k].append(rate(fn, x, batch, args.seconds / args.rounds))
            med = {k: float(np.median(v)) for k, v in samples.items()}
            r = {k: round(v, 2) for k, v in med.items()}
            r["scanner_over_plain"] = round(med["scanner"] / med["plain"], 3)  # from unrounded rates
            if "torch_hooks" in med:
                r["torch_hooks_over_plain"] = round(med["torch_hooks"] / med["plain"], 3)
            r.update(layers=len(inst.layers), channels=inst.channels, batch=batch, provider=inst.provider)
            results["models"][name] = r
            print(name, json.dumps(r), file=sys.stderr)
            del plain, inst, ctx, runs, net
            gc.collect()
        if args.surgery:
            results["surgery"] = surgery(args.surgery, tmp)
            print("surgery", json.dumps(results["surgery"]), file=sys.stderr)
        if not args.no_memory:
            results["peak_rss_mib_scan_all_layers"] = memory(tmp)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
