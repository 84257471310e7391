"""Efficacy with the true trigger as probe (issue 4): pruning curves, the --max-accuracy-drop operating point,
and `sanitize --probe` with each method, on every backdoored zoo model, measured on the full 10k test set.

The defender's data is models/data/clean (1,000 unlabeled training images); the 10k test set is used only
to measure. Run from the repository root:  python benchmarks/efficacy_probe.py [--models a,b] [--out FILE]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fashion import test_npz  # noqa: E402
from scanner.commands.evaluate import attack_success  # noqa: E402
from scanner.commands.sanitize import METHODS, sanitize_with_probes  # noqa: E402
from scanner.context import ModelContext  # noqa: E402
from scanner.data.images import ImageSet, cached  # noqa: E402
from scanner.data.triggers import Trigger  # noqa: E402
from scanner.detect.scan import measure  # noqa: E402
from scanner.repair.prune import Repair  # noqa: E402


def metrics(preds, tpreds, labels, target):
    return float((preds == labels).mean()), attack_success(tpreds, labels, target)


def curve(rep, test, trigger, target, counts):
    rows = []
    for c in counts:
        plan = rep.plan(c)
        masks = rep.masks(plan)
        p = measure(rep.runner, test, None, masks, norms=False, label="curve")
        t = measure(rep.runner, test, trigger, masks, norms=False, label="curve")
        acc, asr = metrics(p.preds, t.preds, p.labels, target)
        rows.append({"channels": c, "accuracy": round(acc, 4), "asr": round(asr, 4)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "efficacy_probe.json"))
    args = ap.parse_args()
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    wanted = args.models.split(",") if args.models else None
    test_path = test_npz("/tmp/fashion_test.npz")
    results = []
    for entry in manifest["models"]:
        if entry["attack"] == "none" or (wanted and entry["name"] not in wanted):
            continue
        model = ROOT / "models" / entry["file"]
        trigger = Trigger.load(ROOT / "models" / entry["trigger"])
        target = entry["target"]
        row = {"model": entry["name"], "attack": entry["attack"], "target": target}
        ctx = ModelContext.open(model, device="cpu", batch_size=256)
        for layers in ("last", "all"):
            rep = Repair(ctx, ROOT / "models" / "data" / "clean", [str(ROOT / "models" / entry["trigger"])], layers, targets=[target])
            test = cached(ImageSet(test_path), rep.pre)
            total = len(rep.ranking())
            counts = sorted({0, 1, 2, 4, 8, 16, 32, 64, 128, 256, total} & set(range(total + 1)))
            row[f"curve_{layers}"] = curve(rep, test, trigger, target, counts)
            k, _ = rep.choose_count(max_drop=0.02)
            op = curve(rep, test, trigger, target, [k])[0]
            row[f"operating_point_{layers}"] = op
        base = ctx.runner()
        base_p, labels = base.predict(test)
        base_t, _ = base.predict(test, trigger)
        row["before"] = dict(zip(("accuracy", "asr"), [round(v, 4) for v in metrics(base_p, base_t, labels, target)]))
        for method in METHODS:
            start = time.perf_counter()
            rep = Repair(ctx, ROOT / "models" / "data" / "clean", [str(ROOT / "models" / entry["trigger"])], "last", targets=[target])
            report, proto, found = sanitize_with_probes(ctx, None, None, method=method, rep=rep, always=True)
            seconds = time.perf_counter() - start
            s = ctx.derived(proto).runner()
            p, _ = s.predict(test)
            t, _ = s.predict(test, trigger)
            acc, asr = metrics(p, t, labels, target)
            row[f"sanitize_{method}"] = {"accuracy": round(acc, 4), "asr": round(asr, 4), "pruned": report["pruned_count"], "seconds": round(seconds, 2)}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip(),
           "command": "python benchmarks/efficacy_probe.py", "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
