"""``scanner prune``: the paper's defense. Rank channels by l-inf rise under a probe, zero the top ones, verify, write."""

import logging

from scanner import __version__
from scanner.context import ModelContext
from scanner.detect.stats import OUTLIER_Z
from scanner.fileio import check_output
from scanner.repair.prune import DEFAULT_MAX_DROP, Repair
from scanner.repair.verify import apply_plan, outcome, removal, verify, write_model

log = logging.getLogger("scanner")


def prune_model(model, data, probe, output=None, layers="last", count=None, ratio=None, max_drop=None, force=False,
                device="auto", threads=None, batch_size=64, limit=None, preprocess=None, target=None, rep=None,
                min_images=1, always=False):
    """``scanner prune``. Returns (report, pruned proto or None when it may not be written). ``model`` is a path or
    a ModelContext; ``rep`` a measured Repair.

    When the probe moves the model, the pruned model is written only if the probe is dead on it afterwards
    (measured on held-out images, :func:`scanner.repair.verify.removal`) or with ``always``; the report's
    ``outcome`` says which (``removed``, ``not_removed``, ``nothing_found``)."""
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
    report["backdoor_found"] = rep.found
    drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    check = check_repair(rep, proto, 1 - drop, drop if levels else None) if rep.found else None
    write = finish(report, proto, output, force, always, rep.found, check, rep.model.path, write_unfound=True, ctx=rep.ctx)
    return report, proto if write else None


def check_repair(rep, proto, min_agreement, max_accuracy_drop=None, original=None):
    """The removal check (:func:`scanner.repair.verify.removal`) of ``proto`` repaired from ``rep``'s probes, on its
    held-out images, against ``original`` (default: ``rep``'s own model)."""
    images = rep.holdout_set if rep.holdout_set is not None else rep.clean_set
    probes = list(zip(rep.probes, rep.targets, rep.probe_holdout, rep.sources, rep.untargeted))
    return removal(original or rep.ctx, proto, images, probes, min_agreement, max_accuracy_drop, rep.holdout_set is not None)


def finish(report, proto, output, force, always, found, check, source, write_unfound=False, ctx=None):
    """Set the report's ``removal``, ``outcome`` and ``output`` from the removal ``check`` (None when nothing was
    found), and write the model when the outcome allows it: it was removed, or ``always``, or nothing was found
    and ``write_unfound``. Returns whether the model may be written."""
    report["removal"] = check
    report["outcome"] = outcome(found, check)
    write = always or report["outcome"] == "removed" or (report["outcome"] == "nothing_found" and write_unfound)
    if report["outcome"] == "not_removed":
        for reason in check["reasons"]:
            log.warning("not removed: %s", reason)
        log.warning("the backdoor was found but NOT removed: %s", "writing the model anyway (--always)" if always
                    else "no model written")
    report["written_despite_backdoor"] = bool(report["outcome"] == "not_removed" and always and output is not None)
    report["output"] = None
    if write and output is not None:
        write_model(ctx.for_writing(proto) if ctx is not None else proto, output, force, source)
        report["output"] = str(output)
    return write


def repair_report(command, rep, plan, before, after, levels, rule):
    """The report of a command that repaired a model (``scanner.<command>/1``): what was done, before and after."""
    return {
        "schema": f"scanner.{command}/1",
        "tool": {"name": "scanner", "version": __version__},
        "model": rep.ctx.facts(),
        "preprocess": rep.pre.to_dict(),
        "runtime": {"provider": rep.runner.provider},
        "data": {"clean": str(rep.clean_set.path), "images": rep.clean.images, "labeled": rep.labels is not None},
        "probes": [dict(p.describe(), target=t, paired=rep.paired(i), sources=rep.sources[i], all_to_all=rep.untargeted[i])
                   for i, (p, t) in enumerate(zip(rep.probes, rep.targets))],
        "rule": rule,
        "pruned": [{"layer": lid, "channels": ch} for lid, ch in sorted(plan.items())],
        "pruned_count": sum(len(v) for v in plan.values()),
        "refit": rule.get("method") in ("refit", "both"),
        "refit_layers": [rep.head.id] if rule.get("method") in ("refit", "both") and rep.head is not None else [],
        "before": before.to_dict(),
        "after": after.to_dict(),
        "sweep": [lv.to_dict() for lv in levels] if levels else None,
        "outlier_channels": int((rep.score > OUTLIER_Z).sum()),
    }
