"""``scanner sanitize``: find and remove a backdoor, write a verified model.

With probes (``--probe``): measure them, then prune and/or refit the head (:func:`sanitize_with_probes`).
Without (:func:`sanitize_blind`): synthesize the smallest trigger per class, decide, and repair with the
synthesized triggers of the suspected target(s), searching the repaired model again between refit rounds.
"""

import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from scanner.commands.prune import check_repair, finish, repair_report
from scanner.context import ModelContext
from scanner.data.images import ImageSet, cached, holdout_split
from scanner.data.probes import Probe
from scanner.detect.families import FAMILIES
from scanner.detect.scan import dominant_class
from scanner.detect.synthesis import QUERIES_MIN, Config, Synthesizer, queries_for, variants
from scanner.detect.verdict import anomaly_against, decide, family_cap
from scanner.errors import ScannerError
from scanner.graph import surgery
from scanner.fileio import check_output
from scanner.repair.clip import clip as clip_model
from scanner.repair.prune import DEFAULT_MAX_DROP, PROBE_EFFECT, Repair
from scanner.repair.feature import feature_refit
from scanner.repair.refit import cost, refit
from scanner.repair.verify import MIN_AGREEMENT, NO_EFFECT, apply_plan, verify

log = logging.getLogger("scanner")

METHODS = ("prune", "refit", "both")
"""Repair methods a user chooses; a report's method is also ``none`` when a graph cut alone disarmed the probes."""
DEFAULT_METHOD = "refit"
VARIANT_SUCCESS = 0.5
"""A variant of a synthesized trigger joins the probes when it still sends this fraction to the target."""
MAX_VARIANTS = {"patch": 2, "blend": 1, "signal": 1, "warp": 1, "filter": 1}
"""Variants of a flagged trigger kept as extra probes, per family (every family of detect.families)."""
MAX_RELOCATIONS = 4
"""A flagged patch that also works elsewhere in the image (a sticker backdoor, at random positions) joins the probes
at up to this many other positions, so that the refit removes it wherever it is, not where the search found it."""
RESEARCH_SHARE = 0.3
"""The query budget of each search of a repaired model, as a share of the first search's."""
POLISH_STEPS = 40
CLIP_SET = 2048
"""With --probe, the clipping's bounds come from at most this many of the repair's clean images."""


def _context(model, preprocess, device, threads, batch_size):
    return model if isinstance(model, ModelContext) else ModelContext.open(model, preprocess, device, threads, batch_size)


def graph_repair(ctx):
    """Cut the branches the graph audit found joining the scores past the head. Returns (context to repair,
    what was cut or None, why it cannot be repaired or None).

    Only a side branch that joins through a cuttable op (an Add, Mul, Where, ... after the head, see
    :mod:`scanner.graph.audit`) is cut; any other high-severity finding (image-dependent control flow, a branch
    without such a join) is refused: the model cannot be sanitized."""
    high = [f for f in ctx.audit["findings"] if f["severity"] == "high"]
    if not high:
        return ctx, None, None
    cuttable = [f for f in high if f["rule"] == "side-branch" and (f.get("join") or {}).get("cuttable")]
    refused = [f for f in high if f not in cuttable]
    if refused:
        return ctx, None, "graph backdoor that cannot be cut: " + "; ".join(f"{f['rule']}: {f['message']}" for f in refused)
    proto, removed = ctx.proto, []
    for f in cuttable:
        proto, gone = surgery.cut_branch(proto, f["join"]["node"], f["join"]["head_inputs"][0])
        removed += gone
    log.warning("graph backdoor: cut %s (%d nodes removed)", ", ".join(f["join"]["node"] for f in cuttable), len(removed))
    return ctx.rebuilt(proto), {"joins": [f["join"] for f in cuttable], "removed_nodes": removed}, None


def probe_targets(ctx, data, probes, limit=None, min_images=1):
    """The class each probe pushes images to on ``ctx``'s model (see :meth:`Repair._dominant`)."""
    images = data if hasattr(data, "batches") else ImageSet(data, limit=limit, min_images=min_images)
    runner = ctx.runner()
    clean, _ = runner.predict(images, label="targets")
    out = []
    for p in (q if isinstance(q, Probe) else Probe.open(q, limit=limit, min_images=min_images) for q in probes):
        preds, _ = runner.predict(images, p.trigger, "targets") if p.trigger is not None else runner.predict(p.images, label="targets")
        k = dominant_class(clean, preds) if len(preds) == len(clean) else None
        out.append(k if k is not None else int(np.bincount(preds).argmax()))
    return out


def _refused(report, reason, found=True):
    """Report fields of a repair that could not be done: found, NOT removed, nothing to write."""
    report.update(removal={"held_out": False, "images": 0, "probes": [], "removed": False, "reasons": [reason],
                           "residual_success": None, "agreement": None},
                  outcome="not_removed" if found else "nothing_found", output=None, written_despite_backdoor=False)
    log.warning("not removed: %s", reason)
    log.warning("the backdoor was found but NOT removed: no model written")


def sanitize_with_probes(model, data, probes, output=None, method=DEFAULT_METHOD, layers="last", max_drop=DEFAULT_MAX_DROP,
                         force=False, always=False, device="auto", threads=None, batch_size=64, limit=None,
                         preprocess=None, targets=None, ridge=None, rep=None, min_images=1, check=True,
                         min_agreement=MIN_AGREEMENT, clip=True, deeper=True, unclipped=None, sites=None):
    """``scanner sanitize --probe``: repair with known probes. Returns (report, repaired proto or None, found).

    ``model`` is a path or a ModelContext; ``rep`` an already measured :class:`Repair` (then ``model``, ``data``
    and ``probes`` are not used). With ``check`` (the command), the removal is measured on held-out images and
    the model written (and returned) only when the probes are dead on it (or with ``always``); the report's
    ``outcome`` says which. ``check=False`` only builds and verifies the repaired model (a step of the blind
    repair) and always returns it. ``clip`` (with a refit): bound every layer by its clean peaks first
    (:mod:`scanner.repair.clip`, tried with the trigger probes), then refit to the unclipped model's scores.
    ``deeper`` (with ``--method refit``): where the head refit leaves a probe working or cannot keep the agreement,
    try the feature refit (:mod:`scanner.repair.feature`) of the model before any clipping (``unclipped``: a function
    giving its Repair, when the caller clipped ``rep``'s model; called only then) and keep whichever does better,
    cross-validated; ``sites``: the layer ids the feature refit may be fitted at, default every one it walks)."""
    if method not in METHODS + ("none",):
        raise ScannerError(f"--method must be one of {', '.join(METHODS)}")
    if output is not None:
        check_output(output, force, [rep.model.path if rep is not None else getattr(model, "path", model)])
    ctx, cut, refusal = rep.ctx if rep is not None else None, None, None
    if rep is None:
        ctx = _context(model, preprocess, device, threads, batch_size)
        work, cut, refusal = graph_repair(ctx)
        if cut and targets is None:  # the classes the probes push images to on the model as it came, not the cut one
            targets = probe_targets(ctx, data, probes, limit, min_images)
        rep = Repair(work, data, probes, layers, batch_size, limit, targets, min_images=min_images)
    moved = rep.found  # judged on the model as it is repaired, before any clipping
    clip_entry, plain = None, rep
    if (clip and method in ("refit", "both") and rep.head is not None and moved
            and any(rep.paired(i) for i in range(len(rep.probes)))):
        rep, clip_entry = _clipped_repair(rep, layers, batch_size)
    found = moved or bool(cut or refusal)
    if not moved and cut:  # the cut alone disarmed the probes: nothing more to do
        method = "none"
    fallbacks = []
    if method in ("refit", "both") and not any(rep.paired(i) for i in range(len(rep.probes))):
        fallbacks.append("probe images are not paired with the clean images (different file names): the refit needs "
                         "pairs; falling back to --method prune")
        method = "prune"
    if method in ("refit", "both") and rep.head is None:
        fallbacks.append("no linear head (Gemm, MatMul, or a 1x1 Conv on pooled features) to refit; falling back to "
                         "--method prune")
        method = "prune"
    for msg in fallbacks:
        log.warning("%s", msg)
    plan, levels, weight, bias, fit = {}, None, None, None, None
    if method in ("prune", "both"):
        k, levels = rep.choose_count(max_drop=max_drop)
        plan = rep.plan(k)
    base, feature = None, None
    if method in ("refit", "both"):
        weight, bias, after, fit = refit(rep, plan, ridge)
        if method == "refit" and deeper and _wants_deeper(after):
            # on the model before any clipping: the clipping's Min / Max would stop the correction's path
            plain = unclipped() if unclipped is not None else plain
            base, feature, after, weight, bias = _feature_refit(plain, after, weight, bias, sites)
            if feature["chosen"]:
                fit = None  # the head refit's settings only where it is the repair
                if plain is not rep and clip_entry is not None:
                    clip_entry = {**clip_entry, "used": False}
                rep = plain
    else:
        after = rep.evaluate_plan(plan) if plan else rep.base
    rule = {"method": method, "layers": layers, "max_accuracy_drop": max_drop, "refit": fit, "graph_cut": cut,
            "feature_refit": feature}
    if clip_entry is not None:
        rule["clip"] = clip_entry["chosen"] if clip_entry.get("used", True) else None
    report = repair_report("sanitize", rep, plan, rep.base, after, levels, rule)
    report["fallbacks"] = fallbacks
    report["clip"] = clip_entry
    report["backdoor_found"] = found
    report["graph"] = ctx.audit
    if refusal:
        _refused(report, refusal)
        return report, None, found
    proto = apply_plan(rep, plan, weight, bias, rule, base=base)
    checks = verify(rep, proto, plan, exact=not plan and weight is None and base is None and not cut)
    report["verification"] = checks
    report["verified"] = checks["passed"]
    if check:
        result = None
        if found:
            result = check_repair(rep, proto, min_agreement, max_drop if method == "prune" else None, original=ctx)
        if not finish(report, proto, output, force, always, found, result, rep.model.path, ctx=rep.ctx):
            proto = None
    if not found:
        log.info("the probe does not move the model (success %.1f%% < %.0f%%): %s",
                 100 * max(rep.base.probe_success), 100 * PROBE_EFFECT,
                 "writing the model anyway (--always)" if always and check else "no model written (use --always)")
    return report, proto, found


def _wants_deeper(level):
    """Whether the head refit's cross-validated ``level`` leaves work for the feature refit: a probe with an effect
    left, or agreement under the refit's target."""
    return cost(level)[0] == 1 or max(level.probe_success or [0.0]) > NO_EFFECT


def _feature_refit(rep, head_level, weight, bias, sites=None):
    """(base proto or None, report entry, level, head weight, head bias): the feature refit's model (at one of
    ``sites``, default any) when it does better than the head refit (:func:`scanner.repair.refit.cost`, both
    cross-validated), else the head refit's."""
    try:
        proto, level, fit = feature_refit(rep, only=sites)
    except ScannerError as exc:
        log.warning("feature refit not tried: %s", exc)
        return None, {"chosen": False, "reason": str(exc)}, head_level, weight, bias
    better = cost(level) < cost(head_level)
    log.info("feature refit (%s): agreement %.2f%%, worst probe %.2f%%, against the head refit's %.2f%%, %.2f%%: %s",
             fit["layer"], 100 * level.agreement, 100 * max(level.probe_success), 100 * head_level.agreement,
             100 * max(head_level.probe_success), "kept" if better else "not kept")
    entry = {**fit, "chosen": better, "cross_validated": level.to_dict()}
    return (proto, entry, level, None, None) if better else (None, entry, head_level, weight, bias)


def _clipped_repair(rep, layers, batch_size):
    """(the Repair of ``rep``'s model clipped by its clean peaks, on the same images, probes, targets and held-out
    split, measured against the unclipped model; the clipping's report entry); ``rep`` itself when no bound keeps
    the agreement."""
    some = rep.clean_set if len(rep.clean_set) <= CLIP_SET else rep.clean_set.subset(np.arange(CLIP_SET))
    pixels = some.load_all(rep.pre).pixels
    triggers = [(p.trigger, t) for p, t in zip(rep.probes, rep.targets) if p.trigger is not None]
    proto, entry = clip_model(rep.ctx, pixels, triggers, queries_for(rep.ctx))
    if proto is None:
        return rep, entry
    clipped = Repair(rep.ctx.derived(proto), rep.clean_set, rep.probes, layers, batch_size, targets=rep.targets,
                     holdout=rep.holdout_set, reference=rep.ctx, sources=rep.sources, untargeted=rep.untargeted)
    clipped.probe_holdout = rep.probe_holdout
    return clipped, entry


def _still_backdoored(verdict, cand, tau, config):
    """Whether ``cand`` (found on the repaired model) still stands out against the original class sizes (above
    the verdict's anomaly threshold)."""
    if cand.success < tau:
        return False
    s = verdict["evidence"]["sizes"].get(cand.family)
    if s is None:  # no class of the original model had a working trigger of this family: all at the family's cap
        cap = family_cap(config, cand.family)
        s = {"sizes": [None] * len(verdict["evidence"]["synthesis"]["classes"]), "cap": cap}
    return anomaly_against(s["sizes"], s["cap"], cand.size) > verdict["thresholds"]["anomaly"]


def sanitize_blind(model, data, output=None, force=False, always=False, device="auto", threads=None, batch_size=64,
                   limit=None, preprocess=None, config=None, rounds=3, triggers_dir=None, min_images=1,
                   min_agreement=MIN_AGREEMENT, clip=True, deeper=True):
    """``scanner sanitize`` without ``--probe``: synthesize, decide, repair with the synthesized triggers.

    Returns (report, proto or None, found). The repair is the head refit of :func:`sanitize_with_probes` on the
    synthesized triggers of the suspected target(s) and their variants; after each refit the triggers are
    synthesized again on the repaired model (with RESEARCH_SHARE of the search's query budget), and any that
    still stands out joins the probes, for up to ``rounds`` refits (each chooses its ridge by cross-validation,
    :func:`scanner.repair.refit.refit`). All of it is bounded by query budgets, not by the clock: the same model,
    data and seed give the same result on any machine (``config.budget`` seconds is a safety cap on each search).
    ``deeper``: each refit may be the feature refit of the model before its clipping (see :func:`sanitize_with_probes`);
    its walk over sites is done in the first round, later rounds fit it at the site that walk found best.
    """
    started = time.perf_counter()
    cfg = config or Config()
    ctx = _context(model, preprocess, device, threads, batch_size)
    queries = cfg.queries or queries_for(ctx)
    if output is not None:
        check_output(output, force, [ctx.path])
    work, cut, refusal = graph_repair(ctx)
    images = data if not isinstance(data, (str, Path)) else ImageSet(data, limit=limit, min_images=min_images)
    whole = cached(images, ctx.preprocess)
    images, held, _ = holdout_split(whole)  # the held-out images only ever check the repaired model
    pixels = images.load_all(ctx.preprocess).pixels
    synth = Synthesizer.for_model(ctx, pixels, cfg, queries)
    log.info("synthesizing triggers (%s; %d queries)", ", ".join(synth.families), queries)
    result = synth.run()
    verdict = decide(result, ctx)
    log.info("verdict: %s %s", verdict["verdict"], verdict["targets"])
    found = verdict["verdict"] != "clean"
    report = {
        "schema": "scanner.sanitize/1",
        "mode": "synthesized",
        "model": ctx.facts(),
        "preprocess": ctx.preprocess.to_dict(),
        "data": {"clean": str(images.path), "images": int(len(pixels)) + (len(held) if held is not None else 0),
                 "search_and_repair_images": int(len(pixels)), "held_out_images": len(held) if held is not None else 0},
        "verdict": verdict["verdict"],
        "targets": verdict["targets"],
        "candidates": verdict["candidates"],
        "thresholds": verdict["thresholds"],
        "evidence": verdict["evidence"],
        "graph": verdict["graph"],
        "backdoor_found": found,
        "output": None,
    }
    if not found and not always:
        report["outcome"] = "nothing_found"
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report, None, False
    if refusal:
        _refused(report, refusal)
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report, None, found
    # Probes: the flagged triggers (with --always on a clean verdict: the most anomalous class's), and variants.
    flagged = [c for c in verdict["candidates"] if c["level"] == verdict["verdict"]] if found else []
    if not flagged and not cut:
        sizes = verdict["evidence"]["sizes"]
        fam, i = max(((f, i) for f in sizes for i in range(len(result.classes))), key=lambda p: sizes[p[0]]["anomaly"][p[1]])
        flagged = [{"target": result.classes[i].target, "family": fam}]
    by_target = {r.target: r for r in result.classes}
    probes = [by_target[c["target"]].found[c["family"]] for c in flagged]
    spread = {id(p) for p, c in zip(probes, flagged) if c.get("kind") == "all-to-all"}  # judged by what they change
    n_flagged = len(probes)
    for cand in list(probes):
        more = _best_variants(synth, cand, untargeted=id(cand) in spread)
        if cand.family == "patch" and id(cand) not in spread:
            more += _relocated(synth, cand)
        spread |= {id(v) for v in more} if id(cand) in spread else set()
        probes += more
    rounds_log, best, clip_entry, sites = [], None, None, None
    targets = sorted({c.target for c in probes})
    original = work
    if clip:  # every layer held under its clean peaks first: the refit then has less of the backdoor to undo
        clipped, clip_entry = clip_model(work, pixels, [(c.trigger(result.color), c.target) for c in probes], queries)
        if clipped is not None:
            work = work.derived(clipped)
    reference = original if clip_entry and clip_entry["chosen"] is not None else None
    earlier = {}  # the last round's Repairs: a round only adds probes, so what they measured is not measured again
    for r in range(max(1, rounds)):
        round_started = time.perf_counter()
        rep = Repair(work, images, [Probe(trigger=c.trigger(result.color), source=f"synthesized:{c.describe()}") for c in probes],
                     "last", batch_size, limit, [c.target for c in probes], holdout=held, reference=reference,
                     sources=[None] * len(probes), untargeted=[id(c) in spread for c in probes],
                     previous=earlier.get("work"))
        earlier["work"] = rep
        if max(rep.base.probe_success) <= NO_EFFECT:  # no synthesized trigger has an effect left on the model to
            # repair (after a graph cut or the clipping): nothing to refit
            rep_report, proto, _ = sanitize_with_probes(work, images, None, None, "none", rep=rep, check=False, clip=False)
            best = (rep_report, proto, None, rep)
            rounds_log.append({"round": r + 1, "probes": len(probes), "refit": False})
            break
        plain = None
        if deeper and work is not original:  # the feature refit corrects the model before the clipping
            plain = partial(_unclipped_repair, earlier, original, images, rep, batch_size, limit, held)
        rep_report, proto, _ = sanitize_with_probes(work, images, None, None, "refit", rep=rep, check=False, clip=False,
                                                    deeper=deeper, unclipped=plain, sites=sites)
        walked = rep_report["rule"]["feature_refit"] or {}
        if sites is None and walked.get("layer"):  # later rounds refit at the site the first walk found best
            sites = [walked["layer"]]
        fit = rep_report["rule"]["refit"] or rep_report["rule"]["feature_refit"]
        ridge = fit["ridge"]
        log.info("refit round %d (%s, ridge %g, probe weight %g): agreement %.2f%%, synthesized trigger success %.2f%% "
                 "(cross-validated)", r + 1, "head" if rep_report["rule"]["refit"] else "feature", ridge, fit["probe_weight"],
                 100 * rep_report["after"]["agreement"], 100 * max(rep_report["after"]["probe_success"]))
        best = (rep_report, proto, ridge, rep)
        entry = {"round": r + 1, "probes": len(probes), "ridge": ridge, "agreement": rep_report["after"]["agreement"],
                 "probe_success_after": max(rep_report["after"]["probe_success"])}
        rounds_log.append(entry)
        entry["seconds"] = round(time.perf_counter() - round_started, 3)
        if r + 1 >= rounds:
            break
        # Search the repaired model again (from the same triggers, and afresh): does the target still stand out?
        again = Synthesizer.for_model(work.derived(proto), pixels, replace(cfg, seed=cfg.seed + r + 1),
                                      max(QUERIES_MIN, int(RESEARCH_SHARE * queries)))
        fresh = [c for res in again.run(targets).classes for c in res.found.values()]
        new = [c for c in again.polish(probes[:n_flagged], POLISH_STEPS) + fresh
               if _still_backdoored(verdict, c, cfg.success, cfg)]
        entry["still_working"] = [{"target": c.target, "trigger": c.describe(), "size": round(c.size, 6),
                                   "success": round(c.success, 6)} for c in new]
        if not new:
            break
        for cand in new:
            probes += [cand] + _best_variants(synth, cand)
    rep_report, proto, ridge, rep = best
    report["repair"] = {
        **{k: rep_report[k] for k in ("rule", "pruned", "pruned_count", "refit", "fallbacks", "before", "after",
                                      "verification", "verified")},
        "method": rep_report["rule"]["method"],
        "graph_cut": cut,
        "clip": clip_entry if not _unclipped_chosen(rep_report, work, original) else {**clip_entry, "used": False},
        "ridge": ridge,
        "rounds": rounds_log,
        "probes": [{"target": c.target, "trigger": c.describe(), "size": round(c.size, 6), "success": round(c.success, 6)}
                   for c in probes],
    }
    if triggers_dir is not None:
        report["triggers"] = save_triggers(result, flagged, triggers_dir)
    result = check_repair(rep, proto, min_agreement, original=ctx) if found else None
    if not finish(report, proto, output, force, always, found, result, ctx.path, ctx=ctx):
        proto = None
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report, proto, found


def _unclipped_repair(earlier, original, images, rep, batch_size, limit, held):
    """The Repair of the model before its clipping with ``rep``'s probes, targets, sources and kinds, taking over what
    the last round's (``earlier["plain"]``) measured; it becomes that."""
    earlier["plain"] = Repair(original, images, rep.probes, "last", batch_size, limit, rep.targets, holdout=held,
                              sources=rep.sources, untargeted=rep.untargeted, previous=earlier.get("plain"))
    return earlier["plain"]


def _unclipped_chosen(rep_report, work, original):
    """Whether the blind repair's model is the feature refit of the model before its clipping."""
    return work is not original and bool((rep_report["rule"].get("feature_refit") or {}).get("chosen"))


def _best_variants(synth, cand, count=None, untargeted=False):
    """The variants of ``cand`` that work best on the original model (at least VARIANT_SUCCESS; the smallest
    first among equals; ``untargeted``, for an all-to-all trigger: by the predictions they change): MAX_VARIANTS[family]
    of them."""
    effect = (lambda v: v.changed - v.success) if untargeted else (lambda v: v.success)
    found = [v for v in synth.measure(variants(cand, (synth.h, synth.w))) if effect(v) >= VARIANT_SUCCESS]
    count = MAX_VARIANTS[cand.family] if count is None else count
    return sorted(found, key=lambda v: (-round(effect(v), 2), v.size))[:count]


def _relocated(synth, cand):
    """``cand`` (a patch) at other positions across the image where it still works on the original model (at least
    VARIANT_SUCCESS), the best MAX_RELOCATIONS: none for a backdoor tied to one position."""
    found = [v for v in synth.measure(FAMILIES["patch"].relocations(cand, (synth.h, synth.w)))
             if v.success >= VARIANT_SUCCESS]
    return sorted(found, key=lambda v: -v.success)[:MAX_RELOCATIONS]


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
