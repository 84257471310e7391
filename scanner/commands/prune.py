"""``scanner prune``: the paper's defense. Rank channels by l-inf rise under a probe, zero the top ones, verify, write."""

from scanner import __version__
from scanner.context import ModelContext
from scanner.detect.stats import OUTLIER_Z
from scanner.fileio import check_output
from scanner.repair.prune import Repair
from scanner.repair.verify import apply_plan, verify, write_model


def prune_model(model, data, probe, output=None, layers="last", count=None, ratio=None, max_drop=None, force=False,
                device="auto", threads=None, batch_size=64, limit=None, preprocess=None, target=None, rep=None,
                min_images=1):
    """``scanner prune``. Returns (report, proto). ``model`` is a path or a ModelContext; ``rep`` a measured Repair."""
    if output is not None:
        check_output(output, force, [rep.model.path if rep is not None else getattr(model, "path", model)])
    if rep is None:
        ctx = model if isinstance(model, ModelContext) else ModelContext.open(model, preprocess, device, threads, batch_size)
        rep = Repair(ctx, data, [probe], layers, batch_size, limit, None if target is None else [target],
                     min_images=min_images)
    k, levels = rep.choose_count(count, ratio, max_drop)
    plan = rep.plan(k)
    after = rep.evaluate_plan(plan) if k else rep.base
    rule = {"layers": layers, "count": count, "ratio": ratio, "max_accuracy_drop": max_drop if levels else None}
    proto = apply_plan(rep, plan, rule={"method": "prune", **rule})
    checks = verify(rep, proto, plan, exact=not plan)
    report = repair_report("prune", rep, plan, rep.base, after, levels, {"method": "prune", **rule})
    report["verification"] = checks
    report["verified"] = checks["passed"]
    if output is not None:
        write_model(proto, output, force, rep.model.path)
        report["output"] = str(output)
    return report, proto


def repair_report(command, rep, plan, before, after, levels, rule):
    """The report of a command that repaired a model (``scanner.<command>/1``): what was done, before and after."""
    return {
        "schema": f"scanner.{command}/1",
        "tool": {"name": "scanner", "version": __version__},
        "model": rep.model.facts(),
        "preprocess": rep.pre.to_dict(),
        "runtime": {"provider": rep.runner.provider},
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
