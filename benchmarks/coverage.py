"""Model coverage matrix (issue 8): torchvision architectures x export paths, checked end to end.

For every architecture (random weights, 224x224) and export path:

* export (cached under ``--cache``; a failing export is recorded as ``n/a (exporter)`` with its reason);
* ``scanner inspect PATH --format json`` (the CLI, in a subprocess) finds the layers: as many Conv layers as the
  torch module has Conv2d modules, at least as many Gemm/MatMul layers as it has Linear modules;
* ``scanner scan PATH --layers all --format json`` (CLI) on a few images returns finite norms for every layer;
* the in-graph l-inf / l1 / l2 of every layer equal numpy norms of the same activations (``expose=True``),
  and the instrumented model's logits equal the original's;
* ``scanner.surgery.prune`` of random channels (10% of a few random zero-preserving layers and of the last conv)
  reads exactly 0 there, leaves every layer upstream of the first pruned one bitwise identical and the pruned
  layers' other channels unchanged; the output (saved like its input, external data included) passes
  ``onnx.checker`` and loads in onnxruntime (and in ``scanner.graph.model.load_model``).

    /work/tvenv/bin/python benchmarks/coverage.py [--models resnet18,...] [--paths dynamo,...] [--cache DIR]
        [--write-results] [--rerun] [--table-only]

Needs torch + torchvision (dev only). Results are cached per combination in ``CACHE/results.json``; ``--rerun``
redoes the checks (exports stay cached); ``--table-only`` runs nothing. ``--write-results`` writes the table into the "## Model coverage"
section of benchmarks/RESULTS.md.
"""

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.errors import ScannerError  # noqa: E402
from scanner.graph.instrument import NORMS, instrument  # noqa: E402
from scanner.graph.layers import CONV_OPS, discover  # noqa: E402
from scanner.graph.model import load_model  # noqa: E402
from scanner.runtime.session import Session  # noqa: E402
from scanner.graph.surgery import prune  # noqa: E402

MODELS = [
    "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vgg11_bn",
    "regnet_y_400mf", "convnext_tiny", "vit_b_16",
]  # fmt: skip
PATHS = {
    "dynamo": "torch.onnx.export(dynamo=True), default opset, dynamic batch",
    "dynamo-op13": "dynamo exporter, opset_version=13",
    "dynamo-op17": "dynamo exporter, opset_version=17",
    "dynamo-op20": "dynamo exporter, opset_version=20",
    "legacy": "legacy exporter (dynamo=False), opset 17, BatchNorm folded",
    "legacy-op13": "legacy exporter, opset 13",
    "legacy-bn": "legacy exporter, opset 17, do_constant_folding=False (BatchNorm kept)",
    "static-b1": "dynamo exporter, static input shape (batch 1)",
    "external": "dynamo exporter, external data (.onnx + .onnx.data)",
    "uint8-nhwc": "dynamo exporter of a wrapper: uint8 NHWC input, /255 and mean/std inside the graph",
}
RTOL = 1e-5
BATCH = 2
SIZE = 224
SECTION = "## Model coverage"


# ---------------------------------------------------------------------------------------------- export


def torch_net(name):
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def expected_layers(net):
    """(Conv2d modules, Linear modules) of a torch module. Attention projections are not counted: they run on
    (tokens, N, C) maps, where per-image norms cannot be read, and ``discover`` leaves them out."""
    import torch

    attention = {id(m.out_proj) for m in net.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    linears = sum(isinstance(m, torch.nn.Linear) and id(m) not in attention for m in net.modules())
    return convs, linears


def uint8_nhwc(net):
    """``net`` behind a uint8 NHWC input with /255 and ImageNet mean/std inside the graph."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        def forward(self, x):
            x = x.permute(0, 3, 1, 2).float() / 255.0
            return self.inner((x - self.mean) / self.std)

    return Wrapped(net).eval()


def export(net, path_kind, out):
    """Export ``net`` along ``path_kind`` to ``out`` (a .onnx path)."""
    import torch

    warnings.filterwarnings("ignore")
    x = torch.randn(2, 3, SIZE, SIZE)  # batch 2: an example batch of 1 gets specialized by torch.export
    names = dict(input_names=["x"], output_names=["logits"])
    batch = torch.export.Dim("batch", min=1, max=1024)
    dyn = dict(dynamo=True, dynamic_shapes={"x": {0: batch}}, external_data=False)
    if path_kind == "dynamo":
        torch.onnx.export(net, (x,), str(out), **names, **dyn)
    elif path_kind.startswith("dynamo-op"):
        want = int(path_kind[9:])
        torch.onnx.export(net, (x,), str(out), **names, **dyn, opset_version=want)
        got = next(i.version for i in onnx.load(str(out), load_external_data=False).opset_import if i.domain in ("", "ai.onnx"))
        if got != want:  # torch warns and keeps its own opset when onnx's version converter fails
            raise RuntimeError(f"asked for opset {want}, the exporter wrote opset {got} (onnx version converter failed)")
    elif path_kind in ("legacy", "legacy-op13", "legacy-bn"):
        torch.onnx.export(
            net, (x,), str(out), **names, dynamo=False, opset_version=13 if path_kind == "legacy-op13" else 17,
            do_constant_folding=path_kind != "legacy-bn", dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        )  # fmt: skip
    elif path_kind == "static-b1":
        torch.onnx.export(net, (x[:1],), str(out), **names, dynamo=True, external_data=False)
    elif path_kind == "external":
        torch.onnx.export(net, (x,), str(out), **names, **{**dyn, "external_data": True})
        if not Path(str(out) + ".data").exists():
            raise RuntimeError("exporter wrote no external data file")
    elif path_kind == "uint8-nhwc":
        xu = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
        torch.onnx.export(uint8_nhwc(net), (xu,), str(out), **names, **dyn)
    else:
        raise ValueError(path_kind)


def exported(name, path_kind, cache, net_box):
    """The cached export's path; exports on a miss. Raises ``ExportFailed`` when the exporter fails."""
    folder = cache / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{path_kind}.onnx"
    failed = folder / f"{path_kind}.failed"
    if failed.exists():
        raise ExportFailed(failed.read_text())
    if path.exists():
        return path
    if net_box.get("net") is None:
        net_box["net"] = torch_net(name)
    tmp = folder / f"tmp-{path_kind}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        export(net_box["net"], path_kind, tmp / path.name)
    except Exception as exc:  # noqa: BLE001 - the exporter's refusal is a result
        reason = _one_line(exc)
        failed.write_text(reason)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportFailed(reason) from None
    for f in tmp.iterdir():
        f.rename(folder / f.name)
    tmp.rmdir()
    return path


class ExportFailed(Exception):
    pass


class CheckFailed(Exception):
    pass


def _one_line(exc):
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
    text = re.sub(r"/\S+/", "", text)
    return f"{type(exc).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------- checks


def cli(*args):
    """Run the scanner CLI in a subprocess; return parsed JSON stdout."""
    proc = subprocess.run([sys.executable, "-m", "scanner", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return json.loads(proc.stdout)


def make_images(folder, n=BATCH):
    """``n`` random RGB PNGs (SIZE x SIZE)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return folder


def model_input(mf, n=BATCH):
    """A random input batch for the loaded model."""
    rng = np.random.default_rng(1)
    dims = [d if isinstance(d, int) else n for d in mf.input.shape]
    dims[0] = n
    if mf.input.dtype == "uint8":
        return rng.integers(0, 256, dims, dtype=np.uint8)
    return rng.standard_normal(dims).astype(mf.input.dtype)


def numpy_norms(a, layer):
    a = np.abs(a.astype(np.float64))
    if layer.rank == 2:
        return a, a, a
    n = a.shape[0]
    if layer.channel_axis == 1:
        a = a.reshape(n, layer.channels, -1)
    else:
        a = np.moveaxis(a.reshape(n, -1, layer.channels), 1, 2)
    return a.max(2), a.sum(2), np.sqrt((a * a).sum(2))


def check_norms(model, layers, x, logits_name):
    """In-graph norms vs numpy on exposed reads; logits vs the original. Returns (exposed reads, worst rel err)."""
    inst = instrument(model, layers, expose=True)
    out = Session(inst.model, "cpu").run(x)
    plain = Session(model, "cpu").run(x, [logits_name])[logits_name]
    if not np.allclose(out[logits_name], plain, rtol=RTOL, atol=RTOL * max(1.0, np.abs(plain).max())):
        raise CheckFailed("instrumented logits differ from the original's")
    worst = 0.0
    for layer in layers:
        lo, hi = inst.slices[layer.id]
        for k, want in zip(NORMS, numpy_norms(out[inst.taps[layer.id]], layer)):
            got = out[inst.norm_outputs[k]][:, lo:hi]
            if not np.all(np.isfinite(got)):
                raise CheckFailed(f"{layer.id}: non-finite {k}")
            scale = max(1e-30, np.abs(want).max())
            err = float(np.max(np.abs(got - want) / (np.abs(want) + 1e-6 * scale)))  # relative, atol 1e-6 * max
            worst = max(worst, err)
            if err > RTOL:
                raise CheckFailed(f"{layer.id} {k}: in-graph norm differs from numpy by {err:.2e} relative")
    reads = {layer.id: out[inst.taps[layer.id]] for layer in layers}
    return reads, worst


def prune_plan(layers, rng):
    """10% (at least 1) random channels of up to 3 random zero-preserving layers and of the last conv."""
    ok = [l for l in layers if l.zero_preserving]
    picked = list(rng.choice(len(ok), size=min(3, len(ok)), replace=False)) if ok else []
    chosen = {ok[i].id: ok[i] for i in picked}
    for l in ok:
        if l.is_last_conv:
            chosen[l.id] = l
    return {
        lid: sorted(int(c) for c in rng.choice(l.channels, size=max(1, l.channels // 10), replace=False))
        for lid, l in chosen.items()
    }


def save_like(model, src, dst):
    """Save ``model`` to ``dst`` the way ``src`` was stored (external data when it had it)."""
    if Path(str(src) + ".data").exists() or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(src), load_external_data=False).graph.initializer
    ):
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))


def check_prune(mf, layers, x, reads, path, tmp):
    """Prune random channels; zeros, upstream identity, checker, ORT and scanner load of the saved output."""
    rng = np.random.default_rng(0)
    plan = prune_plan(layers, rng)
    if not plan:
        raise CheckFailed("no zero-preserving layer to prune")
    pruned = prune(mf.proto, plan, layers)
    out_path = Path(tmp) / "pruned.onnx"
    save_like(pruned, path, out_path)
    onnx.checker.check_model(str(out_path), full_check=True)
    Session(str(out_path), "cpu")  # onnxruntime loads the file as written
    reloaded = load_model(out_path)
    again = discover(reloaded.proto)
    if [l.id for l in again] != [l.id for l in layers]:
        raise CheckFailed("pruned model's layers differ from the original's")
    inst = instrument(reloaded.proto, again, norms=False, expose=True)
    out = Session(inst.model, "cpu").run(x)
    by_id = {l.id: l for l in layers}
    first = min(by_id[lid].index for lid in plan)
    for lid, channels in plan.items():
        layer = by_id[lid]
        a = np.moveaxis(out[inst.taps[lid]], layer.channel_axis, 0)
        if not np.all(a[channels] == 0):
            raise CheckFailed(f"{lid}: pruned channels do not read exactly 0 (max |a| {np.abs(a[channels]).max():.3g})")
        if layer.index == first:
            ref = np.moveaxis(reads[lid], layer.channel_axis, 0)
            keep = np.setdiff1d(np.arange(layer.channels), channels)
            if not np.allclose(a[keep], ref[keep], rtol=RTOL, atol=RTOL * max(1.0, np.abs(ref).max())):
                raise CheckFailed(f"{lid}: unpruned channels of the first pruned layer changed")
    for layer in layers:
        if layer.index < first and not np.array_equal(out[inst.taps[layer.id]], reads[layer.id]):
            raise CheckFailed(f"{layer.id} (upstream of the pruned layers) changed")
    return {"pruned_layers": len(plan), "pruned_channels": sum(len(v) for v in plan.values()), "upstream_layers": first}


def check_one(name, path_kind, cache, net_box, images):
    """All checks for one model x path; returns a result dict."""
    res = {"model": name, "path": path_kind}
    t0 = time.perf_counter()
    try:
        path = exported(name, path_kind, cache, net_box)
    except ExportFailed as exc:
        return {**res, "status": "n/a", "reason": f"exporter: {exc}"}
    stage = "inspect"
    try:
        info = cli("inspect", path, "--format", "json")
        n_conv = sum(l["op_type"] in CONV_OPS for l in info["layers"])
        n_lin = len(info["layers"]) - n_conv
        want_conv, want_lin = net_box["expected"]
        res.update(opset=info["model"]["opset"], layers=len(info["layers"]), conv_layers=n_conv, linear_layers=n_lin,
                   input=info["model"]["input"])
        mlp = [l for l in info["layers"] if l["op_type"] in ("MatMul", "Gemm") and l["channels"] == 3072]
        if mlp:
            res["mlp_chain"] = ">".join(mlp[0]["chain"])
        if n_conv != want_conv or n_lin < want_lin:
            raise CheckFailed(f"found {n_conv} conv + {n_lin} linear layers, torch has {want_conv} Conv2d + {want_lin} Linear")
        stage = "scan"
        report = cli("scan", path, "--data", images, "--layers", "all", "--format", "json", "-q", "--device", "cpu")
        if len(report["layers"]) != len(info["layers"]):
            raise CheckFailed("scan measured a different number of layers than inspect listed")
        for layer in report["layers"]:
            for k in NORMS:
                vals = np.array(layer["clean"][k]["mean"], dtype=np.float64)
                if vals.shape != (layer["channels"],) or not np.all(np.isfinite(vals)):
                    raise CheckFailed(f"{layer['id']}: {k} not finite or wrong length")
        stage = "norms"
        mf = load_model(path)
        layers = discover(mf.proto)
        x = model_input(mf)
        reads, worst = check_norms(mf.proto, layers, x, mf.outputs[0].name)
        res["worst_rel_err"] = worst
        stage = "prune"
        with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
            res.update(check_prune(mf, layers, x, reads, path, tmp))
        res["status"] = "pass"
    except (CheckFailed, ScannerError, onnx.checker.ValidationError) as exc:
        res.update(status="fail", reason=f"{stage}: {_one_line(exc) if not isinstance(exc, CheckFailed) else exc}")
    except Exception as exc:  # noqa: BLE001 - record and go on
        res.update(status="fail", reason=f"{stage}: {_one_line(exc)}", traceback=traceback.format_exc()[-2000:])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ---------------------------------------------------------------------------------------------- table


def table(results, models, paths):
    by = {(r["model"], r["path"]): r for r in results}
    lines = ["| architecture | " + " | ".join(paths) + " |", "|---" * (len(paths) + 1) + "|"]
    for m in models:
        cells = []
        for p in paths:
            r = by.get((m, p))
            if r is None:
                cells.append("not run yet")
            elif r["status"] == "pass":
                cells.append("pass")
            elif r["status"] == "n/a":
                cells.append(f"n/a ({r['reason']})".replace("|", "/"))
            else:
                cells.append(f"**FAIL** {r['reason']}".replace("|", "/"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results, models):
    """Layer counts and where a 3072-unit MLP hidden layer is read, per architecture (from the dynamo export)."""
    lines = ["| architecture | layers found (conv + linear), dynamo export | MLP hidden layer (3072 units) read at |",
             "|---|---|---|"]
    for m in models:
        r = next((r for r in results if r["model"] == m and r.get("layers")), None)
        if r:
            lines.append(f"| {m} | {r['layers']} ({r['conv_layers']} + {r['linear_layers']}) | {r.get('mlp_chain', '-')} |")
    return "\n".join(lines)


def write_section(text, path=ROOT / "benchmarks" / "RESULTS.md"):
    """Replace (or append) the section of RESULTS.md whose "## " heading is ``text``'s first line, leaving the
    other sections alone."""
    heading = text.splitlines()[0].rstrip()
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text.rstrip("\n") + "\n" + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(new)


def section(results, models, paths, meta):
    legend = "\n".join(f"- `{p}`: {PATHS[p]}" for p in paths)
    return f"""{SECTION}

Generated by `benchmarks/coverage.py` ({meta['date']}, {meta['machine']}; torch {meta['torch']}, onnx {meta['onnx']},
onnxruntime {meta['ort']}). Command: `{meta['command']}`

Random weights, 224x224, {BATCH} images. A cell passes when: `scanner inspect` (CLI) finds as many Conv layers as
the torch model has Conv2d modules and at least as many Gemm/MatMul layers as Linear modules; `scanner scan
--layers all` (CLI) gives finite norms for every layer; the in-graph l-inf / l1 / l2 of every layer equal numpy
norms of the exposed activations (rtol {RTOL}) and the instrumented logits equal the original's; pruning 10% random
channels of 3 random zero-preserving layers and of the last conv reads exactly 0 there, leaves every layer upstream
of the first pruned one bitwise identical, and the saved output (external data kept) passes `onnx.checker`
(full_check) and loads in onnxruntime and in `scanner`. CI runs a small representative subset
(`tests/test_coverage.py` on `tests/data/coverage/`).

{legend}

{table(results, models, paths)}

{details(results, models)}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--cache", default="/tmp/coverage_cache")
    ap.add_argument("--rerun", action="store_true", help="redo the checks of cached results")
    ap.add_argument("--write-results", action="store_true", help="write the section into benchmarks/RESULTS.md")
    ap.add_argument("--table-only", action="store_true", help="run nothing: build the table from the cached results")
    args = ap.parse_args()
    models, paths = args.models.split(","), args.paths.split(",")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    store = cache / "results.json"
    results = json.loads(store.read_text()) if store.exists() else []
    done = {(r["model"], r["path"]): r for r in results}
    images = make_images(cache / "images")
    for name in [] if args.table_only else models:
        net_box = {"net": None}
        for p in paths:
            if (name, p) in done and not args.rerun:
                continue
            if "expected" not in net_box:
                net = torch_net(name)
                net_box.update(net=net, expected=expected_layers(net))
            r = check_one(name, p, cache, net_box, images)
            done[(name, p)] = r
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), file=sys.stderr, flush=True)
            store.write_text(json.dumps(list(done.values()), indent=1))
            gc.collect()
        net_box.clear()
        gc.collect()
    results = list(done.values())
    import onnxruntime
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}",
        "torch": torch.__version__, "onnx": onnx.__version__, "ort": onnxruntime.__version__,
        "command": "/work/tvenv/bin/python benchmarks/coverage.py --write-results",
    }  # fmt: skip
    text = section(results, MODELS, list(PATHS), meta)
    if args.write_results:
        write_section(text)
    print(text)


if __name__ == "__main__":
    main()
