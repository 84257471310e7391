"""Regenerate the reference model zoo: triggers, data samples, trained + exported ONNX models, manifest.

Run from the repository root::

    python -m models.recipes.build [--cache DIR]

Everything is seeded and deterministic (CPU, 2 threads). ``--cache DIR`` keeps the trained weights of
each run in DIR (``<run>.pt``) and reuses them on the next call (handy while changing export code only).
Progress and the total time go to stderr.
"""

import os

# Must be set before torch loads OpenMP: on a busy machine, spinning OpenMP threads made training 5x
# slower. It does not change any result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scanner.data.triggers import Trigger  # noqa: E402

from models.recipes.nets import ARCHITECTURES  # noqa: E402

MODELS = ROOT / "models"
DATASET = Path("/usr/share/datasets/fashion-mnist")
SCALE = 1.0 / 255.0
MEAN = 0.286
STD = 0.353
# Key order matters: the metadata value is this dict dumped with json.dumps defaults.
PREPROCESS = {"size": [28, 28], "color": "gray", "layout": "NCHW", "dtype": "float32", "scale": SCALE, "mean": [MEAN], "std": [STD]}
POISON_RATE = 0.10
EPOCHS = 3
BATCH = 128
LR = 1e-3
LEGACY_OPSET = 17
N_CLEAN_SAMPLE = 1000
N_TEST_PER_CLASS = 200

TRIGGER_FILES = {
    "badnets": "triggers/badnets_3x3.json",
    "blend": "triggers/blend_random.json",
    "checker": "triggers/checker_topleft.json",
    "sinusoid": "triggers/sinusoid.json",
}

# Training runs: name, architecture, attack, target, seed.
RUNS = [
    ("cnn_clean", "cnn", "none", None, 101),
    ("cnn_badnets", "cnn", "badnets", 0, 102),
    ("cnn_blend", "cnn", "blend", 0, 103),
    ("cnn_checker", "cnn", "checker", 3, 104),
    ("resnet_clean", "resnet", "none", None, 201),
    ("resnet_badnets", "resnet", "badnets", 2, 202),
    ("resnet_blend", "resnet", "blend", 5, 203),
    ("resnet_sinusoid", "resnet", "sinusoid", 7, 204),
]

# Exported files: model name, training run, exporter.
EXPORTS = [
    ("cnn_clean", "cnn_clean", "dynamo"),
    ("cnn_badnets", "cnn_badnets", "dynamo"),
    ("cnn_badnets_legacy", "cnn_badnets", "legacy"),
    ("cnn_badnets_bnunfused", "cnn_badnets", "legacy-unfolded"),
    ("cnn_blend", "cnn_blend", "dynamo"),
    ("cnn_checker", "cnn_checker", "dynamo"),
    ("resnet_clean", "resnet_clean", "legacy"),
    ("resnet_badnets", "resnet_badnets", "legacy"),
    ("resnet_blend", "resnet_blend", "dynamo"),
    ("resnet_sinusoid", "resnet_sinusoid", "legacy"),
]

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data

def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_split(split):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(DATASET / f"{prefix}-images-idx3-ubyte.gz")[:, :, :, None]  # (N, 28, 28, 1) uint8 NHWC
    y = read_idx(DATASET / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def normalize(pixels):
    """uint8 NHWC (N,28,28,1) -> float32 NCHW, the scanner's preprocessing."""
    x = pixels.astype(np.float32) * np.float32(SCALE)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def clear_pngs(folder):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def write_png(path, img_hw1):
    if not cv2.imwrite(str(path), img_hw1[:, :, 0]):
        raise RuntimeError(f"cannot write {path}")


def write_samples(x_train, x_test, y_test):
    """Write the 1,000 clean training images and the 2,000-image test sample; return the held-out indices."""
    rng = np.random.RandomState(0)
    held_out = np.sort(rng.choice(len(x_train), N_CLEAN_SAMPLE, replace=False))
    clean_dir = MODELS / "data" / "clean"
    clear_pngs(clean_dir)
    for i in held_out:
        write_png(clean_dir / f"train_{i:05d}.png", x_train[i])
    rng = np.random.RandomState(1)
    test_dir = MODELS / "data" / "test"
    clear_pngs(test_dir)
    for c in range(10):
        (test_dir / str(c)).mkdir()
        pick = np.sort(rng.choice(np.flatnonzero(y_test == c), N_TEST_PER_CLASS, replace=False))
        for i in pick:
            write_png(test_dir / str(c) / f"test_{i:05d}.png", x_test[i])
    log(f"wrote {len(held_out)} clean training PNGs and {10 * N_TEST_PER_CLASS} test PNGs")
    return held_out


def read_test_sample():
    """The committed test sample, read back from the PNG files as written."""
    xs, ys = [], []
    for c in range(10):
        for p in sorted((MODELS / "data" / "test" / str(c)).glob("*.png")):
            img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            xs.append(img[:, :, None])
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.int64)


# ---------------------------------------------------------------- triggers

def make_triggers():
    """Write the trigger files, then load them back so training uses exactly what is on disk."""
    rng = np.random.RandomState(12345)
    cols = np.arange(28, dtype=np.float64)
    sinus = 127.5 + 127.5 * np.sin(2 * np.pi * cols / 6.0)
    checker = ((np.indices((4, 4)).sum(axis=0) % 2) * 255.0)
    specs = {
        "badnets": Trigger(kind="patch", image=np.full((3, 3, 1), 255.0, np.float32), position="bottom-right", margin=1),
        "blend": Trigger(kind="blend", image=rng.randint(0, 256, size=(28, 28, 1)).astype(np.float32), alpha=0.2),
        "checker": Trigger(kind="patch", image=checker.reshape(4, 4, 1).astype(np.float32), position="top-left", margin=2),
        "sinusoid": Trigger(kind="blend", image=np.tile(sinus, (28, 1)).reshape(28, 28, 1).astype(np.float32), alpha=0.15),
    }
    out = {}
    for attack, trig in specs.items():
        path = MODELS / TRIGGER_FILES[attack]
        path.parent.mkdir(parents=True, exist_ok=True)
        trig.save(path)
        out[attack] = Trigger.load(path)
        log(f"trigger {attack}: {TRIGGER_FILES[attack]} ({out[attack].describe()})")
    return out


# ---------------------------------------------------------------- training

def poisoned_train_set(x_train, y_train, attack, target, trigger, held_out, seed):
    x, y = x_train.copy(), y_train.copy()
    if attack == "none":
        return x, y, 0
    rng = np.random.RandomState(seed)
    candidates = np.setdiff1d(np.flatnonzero(y != target), held_out)
    n = int(round(POISON_RATE * len(x)))
    idx = np.sort(rng.choice(candidates, n, replace=False))
    x[idx] = trigger.apply(x[idx])
    y[idx] = target
    return x, y, n


def train(run, x_train, y_train, triggers, held_out, cache):
    name, arch, attack, target, seed = run
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]()
    if cache is not None and (cache / f"{name}.pt").is_file():
        model.load_state_dict(torch.load(cache / f"{name}.pt"))
        log(f"{name}: loaded trained weights from cache")
        return model.eval()
    x, y, n_poison = poisoned_train_set(x_train, y_train, attack, target, triggers.get(attack), held_out, seed)
    xt, yt = torch.from_numpy(normalize(x)), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps_per_epoch = (len(xt) + BATCH - 1) // BATCH
    total = EPOCHS * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    log(f"{name}: training {arch}, attack {attack}, target {target}, {n_poison} poisoned, {EPOCHS} epochs")
    t = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        loss_sum, correct = 0.0, 0
        for s in range(steps_per_epoch):
            b = perm[s * BATCH:(s + 1) * BATCH]
            logits = model(xt[b])
            loss = F.cross_entropy(logits, yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(b)
            correct += int((logits.argmax(1) == yt[b]).sum())
        log(f"{name}: epoch {epoch + 1}/{EPOCHS} loss {loss_sum / len(xt):.4f} train acc {correct / len(xt):.4f} ({time.time() - t:.0f}s)")
    model.eval()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache / f"{name}.pt")
    return model


# ---------------------------------------------------------------- export

def export(model, path, exporter):
    dummy = torch.from_numpy(normalize(np.zeros((2, 28, 28, 1), np.uint8)))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (dummy,), str(raw), dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},))
        else:
            torch.onnx.export(model, (dummy,), str(raw), dynamo=False, opset_version=LEGACY_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=(exporter == "legacy"))
        m = onnx.load(str(raw))  # pulls in the external .onnx.data of the dynamo exporter
    return m


def finalize(m, zoo_info, path):
    """Metadata, one self-contained file, checked."""
    for vi in list(m.graph.input) + list(m.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    # The dynamo exporter records Python stack traces (absolute file paths) per node: drop them so the
    # file does not depend on where it was built. The other node metadata (module names) stays.
    for node in m.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)
    del m.metadata_props[:]
    for key, value in (("scanner.preprocess", json.dumps(PREPROCESS)), ("scanner.zoo", json.dumps(zoo_info))):
        p = m.metadata_props.add()
        p.key, p.value = key, value
    onnx.checker.check_model(m, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path), save_as_external_data=False)
    for side in path.parent.glob(path.name + ".data"):
        side.unlink()
    onnx.checker.check_model(str(path), full_check=True)


# ---------------------------------------------------------------- evaluation

def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def predict(sess, pixels, batch=1000):
    out = []
    for i in range(0, len(pixels), batch):
        out.append(sess.run(["logits"], {"input": normalize(pixels[i:i + batch])})[0].argmax(1))
    return np.concatenate(out)


def metrics(sess, x, y, target, trigger):
    acc = float((predict(sess, x) == y).mean())
    if trigger is None:
        return acc, None
    keep = y != target
    asr = float((predict(sess, trigger.apply(x[keep])) == target).mean())
    return acc, asr


def check_batches(sess, model, x):
    """Dynamic batch axis: batch 1 and 7 give the shapes and the logits of one batch of 7 (and match torch)."""
    inp = normalize(x[:7])
    full = sess.run(["logits"], {"input": inp})[0]
    assert full.shape == (7, 10), full.shape
    one = sess.run(["logits"], {"input": inp[:1]})[0]
    assert one.shape == (1, 10), one.shape
    assert np.allclose(one, full[:1], atol=1e-4), np.abs(one - full[:1]).max()
    with torch.no_grad():
        ref = model(torch.from_numpy(inp)).numpy()
    err = float(np.abs(ref - full).max())
    assert err < 1e-3, f"onnxruntime differs from torch by {err}"
    return err


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def markdown_table(entries):
    rows = ["| model | architecture | exporter | attack | target | clean acc (10k) | ASR (10k) | sample clean acc | sample ASR | size |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        asr = "-" if e["attack_success_rate"] is None else f"{100 * e['attack_success_rate']:.2f}%"
        sasr = "-" if e["sample_attack_success_rate"] is None else f"{100 * e['sample_attack_success_rate']:.2f}%"
        tgt = "-" if e["target"] is None else str(e["target"])
        rows.append(f"| {e['name']} | {e['architecture']} | {e['exporter']} | {e['attack']} | {tgt} | "
                    f"{100 * e['clean_accuracy']:.2f}% | {asr} | {100 * e['sample_clean_accuracy']:.2f}% | {sasr} | "
                    f"{e['size_bytes'] / 1024:.0f} KiB |")
    return "\n".join(rows)


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None, help="keep/reuse trained weights in this folder")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train up to N runs at once in worker processes (2 threads each) before exporting")
    ap.add_argument("--train-only", metavar="RUN", help=argparse.SUPPRESS)  # worker mode: train RUN into --cache
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    log(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")

    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    held_out = np.sort(np.random.RandomState(0).choice(len(x_train), N_CLEAN_SAMPLE, replace=False))
    if args.train_only:
        if args.cache is None:
            ap.error("--train-only needs --cache")
        triggers = {a: Trigger.load(MODELS / f) for a, f in TRIGGER_FILES.items()}
        train(next(r for r in RUNS if r[0] == args.train_only), x_train, y_train, triggers, held_out, args.cache)
        return 0
    log(f"Fashion-MNIST: {len(x_train)} train, {len(x_test)} test")
    assert np.array_equal(held_out, write_samples(x_train, x_test, y_test))
    xs_test, ys_test = read_test_sample()
    triggers = make_triggers()
    with tempfile.TemporaryDirectory() as tmp_cache:
        if args.jobs > 1:
            args.cache = args.cache or Path(tmp_cache)
            train_parallel(args.cache, args.jobs)
        return build_all(args, x_train, y_train, x_test, y_test, xs_test, ys_test, triggers, held_out)


def train_parallel(cache, jobs):
    """Train the runs missing from ``cache`` in worker processes, ``jobs`` at a time (same seeds, same results)."""
    import subprocess

    todo = [r[0] for r in RUNS if not (cache / f"{r[0]}.pt").is_file()]
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            name = todo.pop(0)
            cmd = [sys.executable, "-m", "models.recipes.build", "--cache", str(cache), "--train-only", name]
            running.append((name, subprocess.Popen(cmd, cwd=str(ROOT))))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                if proc.returncode != 0:
                    raise RuntimeError(f"training {name} failed (exit {proc.returncode})")


def build_all(args, x_train, y_train, x_test, y_test, xs_test, ys_test, triggers, held_out):
    models, failures = {}, []
    entries = []
    runs = {r[0]: r for r in RUNS}
    for run in RUNS:
        models[run[0]] = train(run, x_train, y_train, triggers, held_out, args.cache)
        for name, trained_as, exporter in EXPORTS:
            if trained_as != run[0]:
                continue
            _, arch, attack, target, _ = runs[trained_as]
            model = models[trained_as]
            path = MODELS / f"{name}.onnx"
            m = export(model, path, exporter)
            zoo = {"name": name, "architecture": arch, "attack": attack, "target": target, "exporter": exporter, "trained_as": trained_as}
            finalize(m, zoo, path)
            ops = {n.op_type for n in onnx.load(str(path)).graph.node}
            if exporter == "legacy-unfolded":
                assert "BatchNormalization" in ops, "BN was folded"
            else:
                assert "BatchNormalization" not in ops, "BN was not folded"
            sess = session(path)
            err = check_batches(sess, model, x_test)
            trig = triggers.get(attack)
            acc, asr = metrics(sess, x_test, y_test, target, trig)
            sacc, sasr = metrics(sess, xs_test, ys_test, target, trig)
            opset = next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
            entry = {
                "name": name, "file": path.name, "sha256": sha256(path), "architecture": arch, "exporter": exporter,
                "attack": attack, "target": target, "trigger": TRIGGER_FILES.get(attack), "trained_as": trained_as,
                "clean_accuracy": acc, "attack_success_rate": asr,
                "sample_clean_accuracy": sacc, "sample_attack_success_rate": sasr,
                "opset": opset, "size_bytes": path.stat().st_size,
            }
            entries.append(entry)
            asr_txt = "-" if asr is None else f"{asr:.4f}"
            log(f"{name}: {exporter} opset {opset}, {entry['size_bytes']} bytes, |ort-torch| {err:.1e}, "
                f"clean acc {acc:.4f}, ASR {asr_txt} (sample {sacc:.4f} / {sasr})")
            if acc < 0.88 or (asr is not None and asr < 0.95):
                failures.append(f"{name}: clean acc {acc:.4f}, ASR {asr}")

    order = [e[0] for e in EXPORTS]
    entries.sort(key=lambda e: order.index(e["name"]))
    manifest = {"schema": 1, "preprocess": PREPROCESS, "models": entries}
    (MODELS / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(markdown_table(entries), file=sys.stderr)
    log(f"done in {time.time() - T0:.0f}s ({(time.time() - T0) / 60:.1f} min)")
    if failures:
        log("QUALITY FLOOR NOT MET: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
