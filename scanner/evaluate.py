"""Clean accuracy and attack success rate, measured with onnxruntime."""

import time

import numpy as np

from scanner.data.images import ImageSet, resolve_preprocess
from scanner.errors import ScannerError
from scanner.model import ModelFile, load_model
from scanner.progress import Progress
from scanner.runtime import Session
from scanner.data.triggers import Trigger


def predict(session, pre, images, trigger=None, batch_size=64, label="eval"):
    """Predicted classes (and labels, when the set has them) for ``images``, ``trigger`` stamped on if given."""
    preds, labels = [], []
    with Progress(len(images), label) as bar:
        for batch in images.batches(pre, batch_size):
            pixels = batch.pixels if trigger is None else trigger.apply(batch.pixels, color=pre.color)
            logits = session.run(pre.to_tensor(pixels), [session.output_names[0]])[session.output_names[0]]
            preds.append(logits.reshape(len(pixels), -1).argmax(1))
            if batch.labels is not None:
                labels.append(batch.labels)
            bar.advance(len(pixels))
    return np.concatenate(preds), (np.concatenate(labels) if labels else None)


def attack_success(preds, labels, target):
    """Fraction of images whose true class is not ``target`` that are predicted as ``target``."""
    others = labels != target
    if not others.any():
        raise ScannerError(f"no labeled image outside the target class {target}; cannot measure attack success")
    return float((preds[others] == target).mean())


def evaluate_model(model, images, trigger=None, target=None, device="auto", batch_size=64, threads=None, preprocess=None):
    """Metrics of one model on a labeled ImageSet: clean accuracy, and ASR with a trigger and target."""
    model = model if isinstance(model, ModelFile) else load_model(model)
    pre = resolve_preprocess(model.input.shape, model.input.dtype, model.metadata, preprocess, source=model.path)
    session = Session(model.proto, device, threads, source=model.path)
    start = time.perf_counter()
    preds, labels = predict(session, pre, images, None, batch_size, "clean")
    out = {"model": str(model.path), "sha256": model.sha256, "images": int(len(preds)), "provider": session.provider}
    out["clean_accuracy"] = round(float((preds == labels).mean()), 6)
    if trigger is not None:
        tpreds, _ = predict(session, pre, images, trigger, batch_size, "triggered")
        out["attack_success_rate"] = round(attack_success(tpreds, labels, target), 6)
        out["attack_images"] = int((labels != target).sum())
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out, preds


def evaluate(model, data, trigger=None, target=None, compare=None, device="auto", batch_size=64, threads=None, limit=None, preprocess=None):
    """``scanner evaluate``: metrics of ``model`` (and ``compare``) on labeled data, with deltas."""
    if (trigger is None) != (target is None):
        raise ScannerError("--trigger and --target go together")
    images = ImageSet(data, labeled=True, limit=limit)
    trig = Trigger.load(trigger) if trigger is not None and not isinstance(trigger, Trigger) else trigger
    report = {"schema": "scanner.evaluate/1", "data": str(data), "trigger": str(trigger) if trigger else None, "target": target}
    first, preds = evaluate_model(model, images, trig, target, device, batch_size, threads, preprocess)
    report["models"] = [first]
    if compare is not None:
        second, preds2 = evaluate_model(compare, images, trig, target, device, batch_size, threads, preprocess)
        report["models"].append(second)
        report["delta"] = {
            k: round(second[k] - first[k], 6) for k in ("clean_accuracy", "attack_success_rate") if k in first
        }
        report["delta"]["prediction_agreement"] = round(float((preds == preds2).mean()), 6)
    return report
