"""Before a repaired model is written: build it, verify it, record what was done, write it atomically."""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from scanner import __version__
from scanner.errors import ScannerError
from scanner.fileio import atomic_path, check_output
from scanner.graph import surgery
from scanner.graph.model import over_2gb, saved_by_path, tensor_info

log = logging.getLogger("scanner")
SAMPLE_IMAGES = 32
"""Clean images (and the same with each trigger probe) the checks run the repaired model on."""
RESIDUAL_SUCCESS = 0.10
"""A probe is dead on the repaired model when it sends fewer than this fraction of held-out other-class images to
its target: the attack success a sanitized model may keep (issue 14's goal for every trigger kind but patches, which
ask for 2%). At 0.25, rgb10_preact_badnets_1pct was called removed with its synthesized patch at 15.3% and the real
one at 15.5% (benchmarks/RESULTS.md)."""
NO_EFFECT = 0.02
"""A trigger that sends at most this fraction of other-class images to its target has no effect left to repair
(about what a stamp does to a clean model's classes)."""
MIN_AGREEMENT = 0.98
"""A repaired model must agree with the original on at least this fraction of held-out clean images."""
OUTCOMES = ("nothing_found", "removed", "not_removed")


def apply_plan(rep, plan, weight=None, bias=None, rule=None, base=None):
    """The repaired ModelProto: zeroed channels, an optional new head, and provenance metadata. ``base``: the model
    to start from instead of ``rep``'s (one the feature refit already corrected, same graph)."""
    base = rep.ctx.proto if base is None else base
    proto = surgery.prune(base, plan, rep.ctx.layers) if plan else base
    if weight is not None:
        proto = surgery.set_linear(proto, rep.head, weight, bias)
    record = {
        "tool": f"scanner {__version__}",
        "rule": rule or {},
        "pruned": [{"layer": lid, "channels": ch} for lid, ch in sorted(plan.items())],
        "refit": None if weight is None else {"layer": rep.head.id},
        "feature_refit": None if not (rule or {}).get("feature_refit") else {"layer": rule["feature_refit"]["layer"]},
        "probes": [p.describe() for p in rep.probes],
        "targets": rep.targets,
        "source_sha256": rep.model.sha256,
    }
    return surgery.record(proto, {"scanner.sanitize": json.dumps(record, sort_keys=True)})


def _check_model(proto):
    try:
        if over_2gb(proto):
            with saved_by_path(proto) as path:
                onnx.checker.check_model(path)
        else:
            onnx.checker.check_model(proto)
    except Exception as exc:
        raise ScannerError(f"verification failed: checker rejects the output ({str(exc).splitlines()[0][:160]})") from None


def verify(rep, proto, plan, exact=False):
    """Check a repaired model before it is written; raise ScannerError on any failure, else return the checks.

    onnx.checker passes, onnxruntime loads and runs it, inputs/outputs keep names, shapes and dtypes, the
    operators are unchanged (apart from the Min / Max nodes of activation clipping), pruned channels read exactly 0 on sample inputs, and (``exact``) the scores are
    bitwise identical to the original's. The returned dict says what was checked (``passed`` is True).
    """
    original = rep.ctx.proto
    _check_model(proto)
    for kind in ("input", "output"):
        before = [tensor_info(v).to_dict() for v in getattr(original.graph, kind)]
        after = [tensor_info(v).to_dict() for v in getattr(proto.graph, kind)]
        if before != after:
            raise ScannerError(f"verification failed: graph {kind}s changed")
    clip = [n for n in proto.graph.node if n.name.endswith(surgery.CLIP_SUFFIX)]
    ops = lambda m: sorted(n.op_type for n in m.graph.node if not n.name.endswith(surgery.CLIP_SUFFIX))  # noqa: E731
    if ops(original) != ops(proto) or any(n.op_type not in ("Min", "Max") for n in clip):
        raise ScannerError("verification failed: the graph's operators changed (beyond the clipping's Min / Max)")
    sample = next(rep.clean_set.batches(rep.pre, SAMPLE_IMAGES)).pixels
    trig = next((p.trigger for p in rep.probes if p.trigger is not None), None)
    if trig is not None:
        sample = np.concatenate([sample, trig.apply(sample, color=rep.pre.color)])
    layers = [l for l in rep.ctx.layers if l.id in plan]
    repaired = rep.ctx.derived(proto).runner(features=[l.read for l in layers], device="cpu")
    out = repaired.run(sample, flatten=False)
    for layer in layers:
        read = out.features[layer.read]
        chans = np.moveaxis(read, layer.channel_axis, 0)[plan[layer.id]]
        if np.any(chans != 0):
            raise ScannerError(f"verification failed: pruned channels of {layer.id} do not read 0")
    checks = {"passed": True, "checker": True, "onnxruntime": True, "interface": True, "operators": True,
              "pruned_channels_read_zero": sum(len(plan[l.id]) for l in layers), "clip_nodes": len(clip), "sample_images": int(len(sample)),
              "identical_scores": None}
    if exact:
        ref = rep.ctx.runner(device="cpu").run(sample)
        if not np.array_equal(ref.scores, out.scores):
            raise ScannerError("verification failed: an empty prune changed the scores")
        checks["identical_scores"] = True
    return checks


def write_model(proto, path, force=False, source=None):
    """Write ``proto`` to ``path`` atomically (temp + rename); never over the input.

    A model over 2 GB is written with its weights in ``PATH.data`` beside it (both are written in a temp folder,
    then renamed)."""
    path = check_output(path, force, [source])
    if not over_2gb(proto):
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".scanner-", dir=path.parent))
        try:
            data = path.name + ".data"
            onnx.save(proto, str(tmpdir / path.name), save_as_external_data=True, location=data)
            os.replace(tmpdir / data, path.parent / data)
            os.replace(tmpdir / path.name, path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("wrote %s", path)
    return path


def removal(original, proto, images, probes=(), min_agreement=MIN_AGREEMENT, max_accuracy_drop=None, held_out=True):
    """Whether a repair removed what was found, measured through the repaired model on held-out images.

    ``original``: the model's context; ``images``: the held-out clean images; ``probes``: (Probe, target, held-out
    probe images or None[, source classes or None[, all-to-all]]) for every probe that led to the repair (a
    source-specific trigger's success is over its source classes' images; an all-to-all one's is the fraction of
    predictions it changes, on each model against its own clean predictions). For each probe (a trigger stamped on the
    held-out clean images, or the held-out part of a probe folder): its success on the original and on the
    repaired model; and the repaired model's agreement with the original on the held-out clean images.
    ``removed`` when every probe is under RESIDUAL_SUCCESS, agreement reaches ``min_agreement`` (or, with
    ``max_accuracy_drop`` and labeled images, clean accuracy fell by no more than that) and the graph audit of the
    repaired model finds nothing of high severity; ``reasons`` says what failed. ``held_out`` False says that the
    images are the ones the repair was fitted on (small data).
    """
    from scanner.graph.audit import audit

    runner0, runner1 = original.runner(), original.derived(proto).runner()
    p0, labels = runner0.predict(images, label="check")
    p1, _ = runner1.predict(images, label="check")
    agreement = float((p0 == p1).mean())
    accuracy = None
    if max_accuracy_drop is not None and labels is not None:
        accuracy = {"before": round(float((p0 == labels).mean()), 6), "after": round(float((p1 == labels).mean()), 6)}
    rows, reasons = [], []
    for i, (probe, target, probe_held, *rest) in enumerate(probes):
        sources = rest[0] if rest else None
        untargeted = bool(rest[1]) if len(rest) > 1 else False
        if probe.trigger is not None and untargeted:  # all-to-all: how many predictions the trigger changes
            b, _ = runner0.predict(images, probe.trigger, "check")
            a, _ = runner1.predict(images, probe.trigger, "check")
            before, after = float((b != p0).mean()), float((a != p1).mean())
        elif probe.trigger is not None:
            others = (p0 != target) & (np.isin(p0, sources) if sources else True)
            b, _ = runner0.predict(images, probe.trigger, "check")
            a, _ = runner1.predict(images, probe.trigger, "check")
            before, after = (float((x[others] == target).mean()) if others.any() else 0.0 for x in (b, a))
        else:
            held = probe_held if probe_held is not None else probe.images
            b, _ = runner0.predict(held, label="check")
            a, _ = runner1.predict(held, label="check")
            before, after = float((b == target).mean()), float((a == target).mean())
        rows.append({"probe": probe.describe(), "target": int(target), "sources": sources, "all_to_all": untargeted,
                     "success_before": round(before, 6),
                     "success_after": round(after, 6), "dead": after < RESIDUAL_SUCCESS})
        if after >= RESIDUAL_SUCCESS:
            where = "another class (all-to-all)" if untargeted else f"class {target}"
            reasons.append(f"probe {i} ({_label(probe)}) still sends {after:.1%} of held-out images to {where} "
                           f"(dead below {RESIDUAL_SUCCESS:.0%})")
    if accuracy is not None:
        drop = accuracy["before"] - accuracy["after"]
        if drop > max_accuracy_drop + 1e-12:
            reasons.append(f"clean accuracy on held-out images fell by {100 * drop:.2f} points "
                           f"(allowed {100 * max_accuracy_drop:.2f})")
    elif agreement < min_agreement:
        reasons.append(f"agreement with the original model on held-out clean images is {agreement:.2%} "
                       f"(needs {min_agreement:.0%})")
    graph = audit(proto, original.scores)
    for f in graph["findings"]:
        if f["severity"] == "high":
            reasons.append(f"the repaired graph still has a {f['rule']} finding: {f['message']}")
    out = {"held_out": bool(held_out), "images": int(len(p0)), "agreement": round(agreement, 6),
           "min_agreement": None if accuracy is not None else min_agreement, "residual_success": RESIDUAL_SUCCESS,
           "probes": rows, "graph_findings": len(graph["findings"]), "removed": not reasons, "reasons": reasons}
    if accuracy is not None:
        out.update(accuracy=accuracy, max_accuracy_drop=max_accuracy_drop)
    return out


def _label(probe):
    d = probe.describe()
    return d.get("trigger") if isinstance(d.get("trigger"), str) else d.get("source")


def outcome(found, check):
    """``nothing_found`` (no probe moved the model), ``removed`` or ``not_removed`` (from :func:`removal`)."""
    if not found:
        return "nothing_found"
    return "removed" if check is not None and check["removed"] else "not_removed"
