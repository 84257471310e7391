"""Choose what to prune, refit the head, verify the result, write it: ``scanner prune`` and ``sanitize --probe``.

The prune sweep never rebuilds a session per level: the instrumented model carries one channel-mask input
per layer (pruning channel k makes the activation where the layer is read exactly 0, which is what a
zero in the mask does), and the final model gets real zeroed weights and no mask.
"""

import json
import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import onnx

from scanner import __version__
from scanner.data.images import ImageSet, cached
from scanner.errors import ScannerError
from scanner.fileio import atomic_path, check_output
from scanner.instrument import instrument
from scanner.layers import discover
from scanner.model import ModelFile, load_model, tensor_info
from scanner.data.probes import Probe
from scanner.runtime import Session
from scanner.scan import Instrument, dominant_class
from scanner.stats import OUTLIER_Z, probe_scores
from scanner import surgery

log = logging.getLogger("scanner")

METHODS = ("prune", "refit", "both")
DEFAULT_METHOD = "refit"
PROBE_EFFECT = 0.5
"""A probe that sends at least this fraction of other-class images to one class moves the model."""
RIDGES = (0.003, 0.03, 0.3, 3.0)
"""Ridge strengths tried by the refit's cross-validation (relative to the mean feature energy)."""
PROBE_WEIGHTS = (0.25, 0.5, 1.0)
"""Weights of the probe rows against the clean rows tried by the refit's cross-validation."""
MAX_PRUNE_FRACTION = 0.5


@dataclass
class Level:
    """One prune level of the sweep: how many channels, and what it does on clean and probe images."""

    count: int
    agreement: float
    accuracy: float = None
    probe_success: list = field(default_factory=list)

    def drop(self, base):
        """Clean-accuracy drop against the unpruned level (agreement stands in without labels)."""
        if self.accuracy is not None and base.accuracy is not None:
            return base.accuracy - self.accuracy
        return 1.0 - self.agreement

    def to_dict(self):
        d = {"channels": self.count, "agreement": round(self.agreement, 6)}
        if self.accuracy is not None:
            d["accuracy"] = round(self.accuracy, 6)
        d["probe_success"] = [round(s, 6) for s in self.probe_success]
        return d


class Repair:
    """A model, clean images and one or more probes, with everything measured once at the start.

    ``probes`` are :class:`Probe` objects; each gets a target class (given, or the class it pushes
    the most images to).
    """

    def __init__(self, model, data, probes, layers="last", device="auto", threads=None, batch_size=64, limit=None,
                 preprocess=None, targets=None, labeled=None):
        self.model = model if isinstance(model, ModelFile) else load_model(model)
        self.clean_set = data if isinstance(data, ImageSet) else ImageSet(data, limit=limit, labeled=labeled)
        self.probes = [p if isinstance(p, Probe) else Probe.open(p, limit=limit) for p in probes]
        self.batch_size = batch_size
        found = discover(self.model.proto)
        heads = [l for l in found if l.is_head]
        self.head = heads[-1] if heads else None
        features = ()
        if self.head is not None:
            self.head_input = self.head.input
            features = (self.head_input, self.head.read)
        self.inst = Instrument(self.model, layers, device, threads, preprocess, masks=True, features=features,
                               discovered=found)
        self.pre = self.inst.preprocess
        started = time.perf_counter()
        self.clean_set = cached(self.clean_set, self.pre)
        for p in self.probes:
            if p.images is not None:
                p.images = cached(p.images, self.pre)
        self.clean = self.inst.measure(self.clean_set, batch_size=batch_size, label="clean", keep=self._keep())
        self.labels = self.clean.labels
        self.probed = [self._measure_probe(p) for p in self.probes]
        self.targets = list(targets) if targets is not None else [self._dominant(m) for m in self.probed]
        scores = [probe_scores(self.clean.stats, m.stats, self.inst.slices) for m in self.probed]
        self.rise = np.max([r for r, _ in scores], axis=0)
        self.score = np.max([s for _, s in scores], axis=0)
        self.base = self._level(0, self.clean.preds, [m.preds for m in self.probed])
        self.seconds = {"measure": time.perf_counter() - started}

    def _keep(self):
        return (self.head_input, self.head.read) if self.head is not None else ()

    def _measure_probe(self, probe, masks=None, norms=True, keep=None):
        keep = self._keep() if keep is None else keep
        if probe.trigger is not None:
            return self.inst.measure(self.clean_set, probe.trigger, self.batch_size, "probe", masks, keep, norms)
        return self.inst.measure(probe.images, None, self.batch_size, "probe", masks, keep, norms)

    def _dominant(self, m):
        """The class the probe pushes images to (among moved pairs), else its most common prediction."""
        k = dominant_class(self.clean.preds, m.preds) if len(m.preds) == len(self.clean.preds) else None
        return k if k is not None else int(np.bincount(m.preds).argmax())

    def paired(self, i):
        """Whether probe ``i`` gives the same images as the clean set with the trigger (pairs)."""
        return self.probes[i].paired_with(self.clean_set)

    def success(self, i, preds):
        """Probe ``i``'s success: the fraction of its images sent to its target (over images not already there)."""
        target = self.targets[i]
        if self.paired(i):
            others = self.clean.preds != target
            return float((preds[others] == target).mean()) if others.any() else 0.0
        return float((preds == target).mean())

    def _level(self, count, clean_preds, probe_preds):
        acc = float((clean_preds == self.labels).mean()) if self.labels is not None else None
        agree = float((clean_preds == self.clean.preds).mean())
        return Level(count, agree, acc, [self.success(i, p) for i, p in enumerate(probe_preds)])

    # ---- which channels -------------------------------------------------------------------------
    def ranking(self):
        """(layer index, channel) pairs, highest probe score first; only channels the probe drives up."""
        order = np.argsort(-self.score, kind="stable")
        owner = np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(self.inst.slices)])
        out = []
        for j in order:
            if self.rise[j] <= 0:
                continue
            i = int(owner[j])
            layer = self.inst.layers[i]
            if not layer.zero_preserving:
                continue
            out.append((i, int(j - self.inst.slices[i][0])))
        return out

    def plan(self, count):
        """The prune plan ``{layer id: [channels]}`` of the top ``count`` ranked channels."""
        plan = {}
        for i, k in self.ranking()[:count]:
            plan.setdefault(self.inst.layers[i].id, []).append(k)
        return {lid: sorted(ch) for lid, ch in plan.items()}

    def masks(self, plan):
        masks = {}
        for layer in self.inst.layers:
            if layer.id in plan:
                m = np.ones(layer.channels, np.float32)
                m[plan[layer.id]] = 0
                masks[layer.id] = m
        return masks

    def evaluate_plan(self, plan, keep=False):
        """Level for a prune plan, measured through the mask inputs (no new session)."""
        masks = self.masks(plan)
        k = self._keep() if keep else ()
        clean = self.inst.measure(self.clean_set, None, self.batch_size, "sweep", masks, k, norms=False)
        probed = [self._measure_probe(p, masks, norms=False, keep=k) for p in self.probes]
        level = self._level(sum(len(v) for v in plan.values()), clean.preds, [m.preds for m in probed])
        return (level, clean, probed) if keep else level

    def sweep(self, max_count=None):
        """Levels for a grid of prune counts up to ``max_count`` ranked channels."""
        ranked = len(self.ranking())
        limit = min(ranked, max_count if max_count is not None else int(MAX_PRUNE_FRACTION * self.inst.channels))
        grid = sorted({c for c in list(range(0, min(limit, 8) + 1)) + [int(round(x)) for x in np.geomspace(1, max(limit, 1), 16)] if c <= limit})
        levels = []
        for c in grid:
            levels.append(self.base if c == 0 else self.evaluate_plan(self.plan(c)))
            log.debug("sweep %d channels: %s", c, levels[-1].to_dict())
        return levels

    def choose_count(self, count=None, ratio=None, max_drop=None):
        """Channels to prune: ``count``, ``ratio`` of the measured channels, or the largest within ``max_drop``."""
        given = sum(v is not None for v in (count, ratio, max_drop))
        if given > 1:
            raise ScannerError("give only one of --count, --ratio, --max-accuracy-drop")
        if count is not None:
            return min(int(count), len(self.ranking())), None
        if ratio is not None:
            if not 0 <= ratio <= 1:
                raise ScannerError(f"--ratio must be in [0, 1], got {ratio}")
            return min(int(round(ratio * self.inst.channels)), len(self.ranking())), None
        max_drop = 0.02 if max_drop is None else max_drop
        levels = self.sweep()
        ok = [lv for lv in levels if lv.drop(self.base) <= max_drop + 1e-12]
        return (max(lv.count for lv in ok) if ok else 0), levels

    # ---- head refit -----------------------------------------------------------------------------
    def refit(self, plan, ridge=None, folds=3):
        """Closed-form ridge refit of the head on clean and paired probe features (targets: original logits).

        ``ridge`` (relative to the mean feature energy) is chosen from :data:`RIDGES` by ``folds``-fold
        cross-validation when not given: the value with the fewest disagreements on clean images plus
        probe successes, each image predicted by a head fitted without it. Returns (weight, bias, level,
        ridge): weights fitted on every image in the (out, in) convention of :func:`surgery.linear_weights`,
        and the cross-validated level (so the reported numbers are not in-sample).
        """
        if self.head is None:
            raise ScannerError("the model has no final Gemm/MatMul head to refit; use --method prune")
        pairs = [i for i in range(len(self.probes)) if self.paired(i)]
        if not pairs:
            raise ScannerError("the refit needs pairs (a trigger file, or a probe folder with the clean folder's file names)")
        if plan:
            _, clean, probed = self.evaluate_plan(plan, keep=True)
        else:
            clean, probed = self.clean, self.probed
        feats = [clean.kept[self.head_input]] + [probed[i].kept[self.head_input] for i in pairs]
        target = self.clean.kept[self.head.read].astype(np.float64)
        w0, b0 = surgery.linear_weights(self.model.proto, self.head)
        theta0 = np.vstack([w0.T, b0[None, :]]).astype(np.float64)
        n = len(target)
        fold = np.arange(n) % max(2, folds)
        ones = np.ones((n, 1))
        a1 = [np.hstack([a.astype(np.float64), ones]) for a in feats]

        def parts(rows):
            """(clean gram, probe gram, clean rhs, probe rhs) over ``rows``."""
            return (a1[0][rows].T @ a1[0][rows], sum(a[rows].T @ a[rows] for a in a1[1:]),
                    a1[0][rows].T @ target[rows], sum(a[rows].T @ target[rows] for a in a1[1:]))

        every = parts(slice(None))
        held = [(fold == f, parts(fold == f)) for f in range(max(2, folds))]
        best = None
        for weight in PROBE_WEIGHTS:
            for lam in [ridge] if ridge is not None else RIDGES:
                cv = [np.zeros(n, np.int64) for _ in feats]
                for out, part in held:
                    g = (every[0] - part[0]) + weight * (every[1] - part[1])
                    r = (every[2] - part[2]) + weight * (every[3] - part[3])
                    rows = int((~out).sum()) * (1 + weight * (len(feats) - 1))
                    theta = _ridge(g, r, rows, theta0, lam, np.float32)
                    for j, a in enumerate(a1):
                        cv[j][out] = (a[out] @ theta).argmax(1)
                probe_preds = [probed[i].preds.copy() for i in range(len(self.probes))]
                for j, i in enumerate(pairs):
                    probe_preds[i] = cv[j + 1]
                level = self._level(sum(len(v) for v in plan.values()), cv[0], probe_preds)
                cost = (1 - level.agreement) + float(np.mean(level.probe_success))
                log.debug("refit ridge %g, probe weight %g: %s", lam, weight, level.to_dict())
                if best is None or cost < best[0] - 1e-12:
                    best = (cost, lam, weight, level)
        _, lam, weight, level = best
        g, r = every[0] + weight * every[1], every[2] + weight * every[3]
        theta = _ridge(g, r, n * (1 + weight * (len(feats) - 1)), theta0, lam)
        return theta[:-1].T.astype(w0.dtype), theta[-1].astype(w0.dtype), level, {"ridge": lam, "probe_weight": weight}


def _ridge(gram, rhs, rows, theta0, ridge, dtype=np.float64):
    """Solve min (1/rows)||[F 1] theta - Y||^2 + lam ||W - W0||^2 from gram = A^T A and rhs = A^T Y.

    ``lam`` is ``ridge`` times the mean feature energy (the mean of the gram's diagonal / rows).
    The cross-validation solves in float32 (3x faster); the final weights in float64.
    """
    g = gram / rows
    lam = ridge * float(np.mean(np.diag(g)[:-1]) or 1.0)
    reg = np.eye(len(g)) * lam
    reg[-1, -1] = 0.0
    theta = np.linalg.solve((g + reg).astype(dtype), (rhs / rows + reg @ theta0).astype(dtype))
    return theta.astype(np.float64)


# ---- verification and writing -------------------------------------------------------------------
def verify(original, proto, rep, plan, exact=False):
    """Check a repaired model before it is written; raise ScannerError on any failure.

    checker passes, onnxruntime loads it, inputs/outputs keep names, shapes, dtypes, the op types are
    unchanged, pruned channels read exactly 0 on sample inputs, and (``exact``) logits are identical.
    """
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ScannerError(f"verification failed: checker rejects the output ({str(exc).splitlines()[0][:160]})") from None
    for kind in ("input", "output"):
        before = [tensor_info(v).to_dict() for v in getattr(original.proto.graph, kind)]
        after = [tensor_info(v).to_dict() for v in getattr(proto.graph, kind)]
        if before != after:
            raise ScannerError(f"verification failed: graph {kind}s changed")
    ops = lambda m: sorted(n.op_type for n in m.graph.node)  # noqa: E731
    if ops(original.proto) != ops(proto):
        raise ScannerError("verification failed: the graph's operators changed")
    sample = next(rep.clean_set.batches(rep.pre, 32)).pixels
    trig = next((p.trigger for p in rep.probes if p.trigger is not None), None)
    if trig is not None:
        sample = np.concatenate([sample, trig.apply(sample, color=rep.pre.color)])
    x = rep.pre.to_tensor(sample)
    layers = [l for l in rep.inst.all_layers if l.id in plan]
    inst = instrument(proto, layers, norms=False, expose=True) if layers else None
    session = Session(inst.model if inst else proto, device="cpu")
    out = session.run(x)
    for layer in layers:
        read = out[inst.taps[layer.id]]
        chans = np.moveaxis(read, layer.channel_axis, 0)[plan[layer.id]]
        if np.any(chans != 0):
            raise ScannerError(f"verification failed: pruned channels of {layer.id} do not read 0")
    if exact:
        ref = Session(original.proto, device="cpu").run(x)
        name = original.outputs[0].name
        if not np.array_equal(ref[name], out[name]):
            raise ScannerError("verification failed: an empty prune changed the logits")
    return True


def write_model(proto, path, force=False, source=None):
    """Write ``proto`` to ``path`` atomically (temp + rename); never over the input."""
    path = check_output(path, force, [source])
    if not _over_2gb(proto):
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
    else:  # weights go to PATH.data beside it; both are written in a temp folder, then renamed
        import shutil
        import tempfile

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


def _over_2gb(proto):
    try:
        return proto.ByteSize() > 2**31 - 1 - (1 << 20)
    except Exception:  # protobuf refuses to size messages over 2 GB
        return True


def apply_plan(rep, plan, weight=None, bias=None, rule=None):
    """The repaired ModelProto: zeroed channels, an optional new head, and provenance metadata."""
    proto = surgery.prune(rep.model.proto, plan, rep.inst.all_layers) if plan else rep.model.proto
    if weight is not None:
        proto = surgery.set_linear(proto, rep.head, weight, bias)
    record = {
        "tool": f"scanner {__version__}",
        "rule": rule or {},
        "pruned": [{"layer": lid, "channels": ch} for lid, ch in sorted(plan.items())],
        "refit": None if weight is None else {"layer": rep.head.id},
        "probes": [p.describe() for p in rep.probes],
        "targets": rep.targets,
        "source_sha256": rep.model.sha256,
    }
    return surgery.record(proto, {"scanner.sanitize": json.dumps(record, sort_keys=True)})


def prune_model(model, data, probe, output=None, layers="last", count=None, ratio=None, max_drop=None, force=False,
                device="auto", threads=None, batch_size=64, limit=None, preprocess=None, target=None, rep=None):
    """``scanner prune``: the paper's defense. Returns (report, proto)."""
    if output is not None:
        check_output(output, force, [model])
    rep = rep or Repair(model, data, [probe], layers, device, threads, batch_size, limit, preprocess,
                        None if target is None else [target])
    k, levels = rep.choose_count(count, ratio, max_drop)
    plan = rep.plan(k)
    after = rep.evaluate_plan(plan) if k else rep.base
    rule = {"layers": layers, "count": count, "ratio": ratio, "max_accuracy_drop": max_drop if levels else None}
    proto = apply_plan(rep, plan, rule={"method": "prune", **rule})
    verify(rep.model, proto, rep, plan, exact=not plan)
    report = _report("prune", rep, plan, rep.base, after, levels, rule)
    if output is not None:
        write_model(proto, output, force, rep.model.path)
        report["output"] = str(output)
    return report, proto


def sanitize_with_probes(model, data, probes, output=None, method=DEFAULT_METHOD, layers="last", max_drop=0.02,
                         force=False, always=False, device="auto", threads=None, batch_size=64, limit=None,
                         preprocess=None, targets=None, ridge=None, rep=None):
    """``scanner sanitize --probe``: repair with known probes. Returns (report, proto or None, found)."""
    if method not in METHODS:
        raise ScannerError(f"--method must be one of {', '.join(METHODS)}")
    if output is not None:
        check_output(output, force, [model])
    rep = rep or Repair(model, data, probes, layers, device, threads, batch_size, limit, preprocess, targets)
    found = any(s >= PROBE_EFFECT for s in rep.base.probe_success)
    if method != "prune" and not any(rep.paired(i) for i in range(len(rep.probes))):
        log.warning("probe images are not paired with the clean images (different file names): the refit needs pairs; falling back to --method prune")
        method = "prune"
    if method != "prune" and rep.head is None:
        log.warning("no final Gemm/MatMul head to refit; falling back to --method prune")
        method = "prune"
    plan, levels, weight, bias, fit = {}, None, None, None, None
    if method in ("prune", "both"):
        k, levels = rep.choose_count(max_drop=max_drop)
        plan = rep.plan(k)
    if method in ("refit", "both"):
        weight, bias, after, fit = rep.refit(plan, ridge)
    else:
        after = rep.evaluate_plan(plan) if plan else rep.base
    rule = {"method": method, "layers": layers, "max_accuracy_drop": max_drop, "refit": fit}
    report = _report("sanitize", rep, plan, rep.base, after, levels, rule)
    report["backdoor_found"] = found
    proto = None
    if found or always:
        proto = apply_plan(rep, plan, weight, bias, rule)
        verify(rep.model, proto, rep, plan, exact=not plan and weight is None)
        report["verified"] = True
        if output is not None:
            write_model(proto, output, force, rep.model.path)
            report["output"] = str(output)
    else:
        report["output"] = None
        log.info("the probe does not move the model (success %.1f%% < %.0f%%): no model written (use --always)",
                 100 * max(rep.base.probe_success), 100 * PROBE_EFFECT)
    return report, proto, found


def _report(command, rep, plan, before, after, levels, rule):
    return {
        "schema": f"scanner.{command}/1",
        "tool": {"name": "scanner", "version": __version__},
        "model": rep.model.facts(),
        "preprocess": rep.pre.to_dict(),
        "runtime": {"provider": rep.inst.session.provider},
        "data": {"clean": str(rep.clean_set.path), "images": rep.clean.images, "labeled": rep.labels is not None},
        "probes": [dict(p.describe(), target=t, paired=rep.paired(i)) for i, (p, t) in enumerate(zip(rep.probes, rep.targets))],
        "rule": rule,
        "pruned": [{"layer": lid, "channels": ch} for lid, ch in sorted(plan.items())],
        "pruned_count": sum(len(v) for v in plan.values()),
        "refit": rule.get("method") in ("refit", "both"),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "sweep": [lv.to_dict() for lv in levels] if levels else None,
        "outlier_channels": int((rep.score > OUTLIER_Z).sum()),
    }
