"""``scanner evaluate``: clean accuracy and attack success rate, measured with onnxruntime."""

import time


from scanner.context import ModelContext
from scanner.data.images import ImageSet
from scanner.data.triggers import Trigger
from scanner.errors import ScannerError


def attack_success(preds, labels, target):
    """Fraction of images whose true class is not ``target`` that are predicted as ``target``."""
    others = labels != target
    if not others.any():
        raise ScannerError(f"no labeled image outside the target class {target}; cannot measure attack success")
    return float((preds[others] == target).mean())


def evaluate_model(model, images, trigger=None, target=None, device="auto", batch_size=64, threads=None, preprocess=None,
                   scores=None):
    """Metrics of one model (a path or a ModelContext) on a labeled image set: clean accuracy, and ASR with a
    trigger and target. Returns (metrics, clean predictions)."""
    ctx = model if isinstance(model, ModelContext) else ModelContext.open(model, preprocess, device, threads, batch_size,
                                                                          scores)
    runner = ctx.runner()
    start = time.perf_counter()
    preds, labels = runner.predict(images, None, "clean")
    out = {"model": str(ctx.path), "sha256": ctx.model.sha256, "images": int(len(preds)), "provider": runner.provider}
    out["clean_accuracy"] = round(float((preds == labels).mean()), 6)
    if trigger is not None:
        tpreds, _ = runner.predict(images, trigger, "triggered")
        out["attack_success_rate"] = round(attack_success(tpreds, labels, target), 6)
        out["attack_images"] = int((labels != target).sum())
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out, preds


def evaluate(model, data, trigger=None, target=None, compare=None, device="auto", batch_size=64, threads=None, limit=None,
             preprocess=None, min_images=1, scores=None):
    """``scanner evaluate``: metrics of ``model`` (and ``compare``) on labeled data, with deltas."""
    if (trigger is None) != (target is None):
        raise ScannerError("--trigger and --target go together")
    images = ImageSet(data, labeled=True, limit=limit, min_images=min_images)
    trig = Trigger.load(trigger) if trigger is not None and not isinstance(trigger, Trigger) else trigger
    report = {"schema": "scanner.evaluate/1", "data": str(data), "trigger": str(trigger) if trigger else None, "target": target}
    first, preds = evaluate_model(model, images, trig, target, device, batch_size, threads, preprocess, scores)
    report["models"] = [first]
    if compare is not None:
        second, preds2 = evaluate_model(compare, images, trig, target, device, batch_size, threads, preprocess, scores)
        report["models"].append(second)
        report["delta"] = {
            k: round(second[k] - first[k], 6) for k in ("clean_accuracy", "attack_success_rate") if k in first
        }
        report["delta"]["prediction_agreement"] = round(float((preds == preds2).mean()), 6)
    return report
