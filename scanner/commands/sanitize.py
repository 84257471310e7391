"""``scanner sanitize``: find and remove a backdoor, write a verified model.

With probes (``--probe``): measure them, then prune and/or refit the head (:func:`sanitize_with_probes`).
Without (:func:`sanitize_blind`): synthesize the smallest trigger per class, decide, and repair with the
synthesized triggers of the suspected target(s), searching the repaired model again between refit rounds.
"""

import logging
import time
from dataclasses import replace
from pathlib import Path

from scanner.commands.prune import repair_report
from scanner.context import ModelContext
from scanner.data.images import ImageSet, cached
from scanner.data.probes import Probe
from scanner.detect.synthesis import Config, Synthesizer, search_runner, variants
from scanner.detect.verdict import ANOMALY, anomaly_against, decide
from scanner.errors import ScannerError
from scanner.fileio import check_output
from scanner.repair.prune import DEFAULT_MAX_DROP, PROBE_EFFECT, Repair
from scanner.repair.refit import RIDGES, refit
from scanner.repair.verify import apply_plan, verify, write_model

log = logging.getLogger("scanner")

METHODS = ("prune", "refit", "both")
DEFAULT_METHOD = "refit"
MIN_AGREEMENT = 0.98
VARIANT_SUCCESS = 0.5
"""A variant of a synthesized trigger joins the probes when it still sends this fraction to the target."""
BLIND_RIDGES = RIDGES[1:]
"""Refit ridges the blind repair steps through, from RIDGE_START down while agreement holds, else up."""
RIDGE_START = 0.1
MAX_VARIANTS = {"patch": 2, "blend": 1}
BUDGET = 55.0
SYNTHESIS_SHARE = 0.6
POLISH_STEPS = 40


def _context(model, preprocess, device, threads, batch_size):
    return model if isinstance(model, ModelContext) else ModelContext.open(model, preprocess, device, threads, batch_size)


def sanitize_with_probes(model, data, probes, output=None, method=DEFAULT_METHOD, layers="last", max_drop=DEFAULT_MAX_DROP,
                         force=False, always=False, device="auto", threads=None, batch_size=64, limit=None,
                         preprocess=None, targets=None, ridge=None, rep=None, min_images=1):
    """``scanner sanitize --probe``: repair with known probes. Returns (report, proto or None, found).

    ``model`` is a path or a ModelContext; ``rep`` an already measured :class:`Repair` (then ``model``, ``data``
    and ``probes`` are not used)."""
    if method not in METHODS:
        raise ScannerError(f"--method must be one of {', '.join(METHODS)}")
    if output is not None:
        check_output(output, force, [rep.model.path if rep is not None else getattr(model, "path", model)])
    if rep is None:
        ctx = _context(model, preprocess, device, threads, batch_size)
        rep = Repair(ctx, data, probes, layers, batch_size, limit, targets, min_images=min_images)
    found = rep.found
    fallbacks = []
    if method != "prune" and not any(rep.paired(i) for i in range(len(rep.probes))):
        fallbacks.append("probe images are not paired with the clean images (different file names): the refit needs "
                         "pairs; falling back to --method prune")
        method = "prune"
    if method != "prune" and rep.head is None:
        fallbacks.append("no final Gemm/MatMul head to refit; falling back to --method prune")
        method = "prune"
    for msg in fallbacks:
        log.warning("%s", msg)
    plan, levels, weight, bias, fit = {}, None, None, None, None
    if method in ("prune", "both"):
        k, levels = rep.choose_count(max_drop=max_drop)
        plan = rep.plan(k)
    if method in ("refit", "both"):
        weight, bias, after, fit = refit(rep, plan, ridge)
    else:
        after = rep.evaluate_plan(plan) if plan else rep.base
    rule = {"method": method, "layers": layers, "max_accuracy_drop": max_drop, "refit": fit}
    report = repair_report("sanitize", rep, plan, rep.base, after, levels, rule)
    report["fallbacks"] = fallbacks
    report["backdoor_found"] = found
    proto = None
    if found or always:
        proto = apply_plan(rep, plan, weight, bias, rule)
        checks = verify(rep, proto, plan, exact=not plan and weight is None)
        report["verification"] = checks
        report["verified"] = checks["passed"]
        if output is not None:
            write_model(proto, output, force, rep.model.path)
            report["output"] = str(output)
    else:
        report["output"] = None
        log.info("the probe does not move the model (success %.1f%% < %.0f%%): no model written (use --always)",
                 100 * max(rep.base.probe_success), 100 * PROBE_EFFECT)
    return report, proto, found


def _still_backdoored(sizes, cand, tau):
    """Whether ``cand`` (found on the repaired model) still stands out against the original class sizes."""
    if cand.success < tau:
        return False
    s = sizes[cand.family]
    return anomaly_against(s["sizes"], s["cap"], cand.size) > ANOMALY


def sanitize_blind(model, data, output=None, force=False, always=False, device="auto", threads=None, batch_size=64,
                   limit=None, preprocess=None, config=None, rounds=3, triggers_dir=None, budget=BUDGET, min_images=1):
    """``scanner sanitize`` without ``--probe``: synthesize, decide, repair with the synthesized triggers.

    Returns (report, proto or None, found). The repair is the head refit of :func:`sanitize_with_probes` on the
    synthesized triggers of the suspected target(s) and their variants; after each refit the triggers are
    synthesized again on the repaired model, and any that still stands out joins the probes, for up to
    ``rounds`` refits, while agreement with the original on clean images stays >= MIN_AGREEMENT. ``budget``
    (seconds) bounds the whole job: the synthesis gets SYNTHESIS_SHARE of it, and no refit round starts that
    would likely end after it.
    """
    started = time.perf_counter()
    cfg = config or Config()
    if budget:
        cfg = replace(cfg, budget=min(cfg.budget or budget, SYNTHESIS_SHARE * budget))
    else:
        budget = float("inf")
    ctx = _context(model, preprocess, device, threads, batch_size)
    if output is not None:
        check_output(output, force, [ctx.path])
    images = data if not isinstance(data, (str, Path)) else ImageSet(data, limit=limit, min_images=min_images)
    images = cached(images, ctx.preprocess)
    pixels = images.load_all(ctx.preprocess).pixels
    synth = Synthesizer(search_runner(ctx, cfg.batch_size), pixels, cfg)
    log.info("synthesizing triggers for every class (%s; budget %.0fs)", ", ".join(cfg.families), cfg.budget or 0)
    result = synth.run()
    verdict = decide(result, ctx)
    log.info("verdict: %s %s", verdict["verdict"], verdict["targets"])
    found = verdict["verdict"] != "clean"
    report = {
        "schema": "scanner.sanitize/1",
        "mode": "synthesized",
        "model": ctx.model.facts(),
        "preprocess": ctx.preprocess.to_dict(),
        "data": {"clean": str(images.path), "images": int(len(pixels))},
        "verdict": verdict["verdict"],
        "targets": verdict["targets"],
        "candidates": verdict["candidates"],
        "thresholds": verdict["thresholds"],
        "evidence": verdict["evidence"],
        "backdoor_found": found,
        "output": None,
    }
    if not found and not always:
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report, None, False
    # Probes: the flagged triggers (with --always on a clean verdict: the most anomalous class's), and variants.
    flagged = [c for c in verdict["candidates"] if c["level"] == verdict["verdict"]] if found else []
    if not flagged:
        sizes = verdict["evidence"]["sizes"]
        fam, i = max(((f, i) for f in sizes for i in range(len(result.classes))), key=lambda p: sizes[p[0]]["anomaly"][p[1]])
        flagged = [{"target": result.classes[i].target, "family": fam}]
    by_target = {r.target: r for r in result.classes}
    probes = [by_target[c["target"]].found[c["family"]] for c in flagged]
    n_flagged = len(probes)
    for cand in list(probes):
        probes += _best_variants(synth, cand)
    rounds_log, best = [], None
    targets = sorted({c.target for c in probes})
    for r in range(max(1, rounds)):
        round_started = time.perf_counter()
        rep = Repair(ctx, images, [Probe(trigger=c.trigger(result.color), source=f"synthesized:{c.describe()}") for c in probes],
                     "last", batch_size, limit, [c.target for c in probes])
        fits = []
        for ridge in _ridges(fits):
            fit_started = time.perf_counter()
            rep_report, proto, _ = sanitize_with_probes(ctx, images, None, None, "refit", force=force, always=True,
                                                        ridge=ridge, rep=rep)
            fits.append((rep_report, proto, ridge))
            log.info("refit round %d, ridge %g: agreement %.2f%%, synthesized trigger success %.2f%%", r + 1, ridge,
                     100 * rep_report["after"]["agreement"], 100 * max(rep_report["after"]["probe_success"]))
            if time.perf_counter() - started + (time.perf_counter() - fit_started) > budget:
                log.warning("time budget reached while looking for the smallest ridge with %.0f%% agreement",
                            100 * MIN_AGREEMENT)
                break
        # The smallest ridge that keeps agreement (it removes the most); else the one closest to it.
        rep_report, proto, ridge = max(fits, key=lambda f: (f[0]["after"]["agreement"] >= MIN_AGREEMENT, -f[2])
                                       if f[0]["after"]["agreement"] >= MIN_AGREEMENT else (False, f[0]["after"]["agreement"]))
        best = (rep_report, proto, ridge)
        entry = {"round": r + 1, "probes": len(probes), "ridge": ridge, "agreement": rep_report["after"]["agreement"],
                 "probe_success_after": max(rep_report["after"]["probe_success"])}
        rounds_log.append(entry)
        round_seconds = time.perf_counter() - round_started
        if r + 1 >= rounds or time.perf_counter() - started + 2 * round_seconds > budget:
            break
        # Search the repaired model again (from the same triggers, and afresh): does the target still stand out?
        left = max(1.0, min(cfg.budget, budget - (time.perf_counter() - started) - 2 * round_seconds))
        again = Synthesizer(search_runner(ctx.derived(proto), cfg.batch_size), pixels,
                            replace(cfg, seed=cfg.seed + r + 1, budget=left))
        fresh = [c for res in again.run(targets).classes for c in res.found.values()]
        new = [c for c in again.polish(probes[:n_flagged], POLISH_STEPS) + fresh
               if _still_backdoored(verdict["evidence"]["sizes"], c, cfg.success)]
        entry["still_working"] = [{"target": c.target, "trigger": c.describe(), "size": round(c.size, 6),
                                   "success": round(c.success, 6)} for c in new]
        if not new:
            break
        for cand in new:
            probes += [cand] + _best_variants(synth, cand)
    rep_report, proto, ridge = best
    report["repair"] = {
        **{k: rep_report[k] for k in ("rule", "pruned", "pruned_count", "refit", "fallbacks", "before", "after",
                                      "verification", "verified")},
        "method": rep_report["rule"]["method"],
        "ridge": ridge,
        "rounds": rounds_log,
        "probes": [{"target": c.target, "trigger": c.describe(), "size": round(c.size, 6), "success": round(c.success, 6)}
                   for c in probes],
    }
    if rep_report["after"]["agreement"] < MIN_AGREEMENT:
        log.warning("agreement with the original model on clean images is %.2f%% (< %.0f%%)",
                    100 * rep_report["after"]["agreement"], 100 * MIN_AGREEMENT)
    if triggers_dir is not None:
        report["triggers"] = save_triggers(result, flagged, triggers_dir)
    if output is not None:
        write_model(proto, output, force, ctx.path)
        report["output"] = str(output)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report, proto, found


def _ridges(fits):
    """Ridges to try, given the fits so far: down from RIDGE_START while agreement holds, else up until it does."""
    i = BLIND_RIDGES.index(RIDGE_START)
    yield BLIND_RIDGES[i]
    step = -1 if fits[-1][0]["after"]["agreement"] >= MIN_AGREEMENT else 1
    j = i + step
    while 0 <= j < len(BLIND_RIDGES):
        yield BLIND_RIDGES[j]
        ok = fits[-1][0]["after"]["agreement"] >= MIN_AGREEMENT
        if (step < 0 and not ok) or (step > 0 and ok):
            return
        j += step


def _best_variants(synth, cand, count=None):
    """The variants of ``cand`` that work best on the original model (at least VARIANT_SUCCESS; the smallest
    first among equals): MAX_VARIANTS[family] of them."""
    found = [v for v in synth.measure(variants(cand, (synth.h, synth.w))) if v.success >= VARIANT_SUCCESS]
    count = MAX_VARIANTS[cand.family] if count is None else count
    return sorted(found, key=lambda v: (-round(v.success, 2), v.size))[:count]


def save_triggers(result, flagged, folder):
    """Write each class's best synthesized trigger per family (JSON + PNG) into ``folder``; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flagged_keys = {(c["target"], c["family"]) for c in flagged}
    out = []
    for res in result.classes:
        for fam, cand in res.found.items():
            path = cand.trigger(result.color).save(folder / f"class{res.target}_{fam}.json")
            out.append({"target": res.target, "family": fam, "file": str(path), "flagged": (res.target, fam) in flagged_keys,
                        "success": round(cand.success, 6), "size": round(cand.size, 6)})
    return out
