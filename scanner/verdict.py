"""The verdict: clean, suspicious or backdoored, with the suspected target class(es) and the evidence.

Signals, per class and trigger family (:mod:`scanner.synthesis`):

- size anomaly: a backdoor's target needs a far smaller trigger than the other classes. The anomaly index
  is ``(median - x) / spread`` over the classes of ``x = log(size)`` (a class whose search found no
  working trigger counts at the family's largest size), with ``spread = max(1.4826 * MAD, SPREAD_FLOOR)``:
  sizes within a factor of ``exp(SPREAD_FLOOR)`` of each other are within the search's own noise;
- the synthesized trigger's success on held-out clean images;
- the l-inf fingerprint: the robust z-score of the largest rise of a last-conv channel's peak under the
  trigger (the paper's observation: a backdoor trigger drives a few channels far above the others);
- a weights-only signal needing no data: each conv channel's Lipschitz upper bound (CLP: the largest
  singular value of its kernel, times ``|gamma| / sqrt(var + eps)`` of a BatchNormalization right after it
  when the BN is not folded), and the channels above ``mean + CLP_U * std`` of their layer. Reported as
  evidence; it does not decide the verdict alone (CLP misses blend-type backdoors).

A class is ``backdoored`` when its trigger works, its size anomaly is above ``ANOMALY`` and either the
fingerprint is above ``FINGERPRINT_Z`` or the anomaly is above ``STRONG_ANOMALY``; ``suspicious`` when it
works, its anomaly is above ``ANOMALY`` and either the anomaly reaches ``SUSPICIOUS_ANOMALY`` or the
fingerprint ``SUSPICIOUS_Z`` (an anomaly just above 2 alone is what natural classes of a clean model show
now and then: a single MAD test over ten classes is too weak to act on; the zoo's clean models showed
blend-family anomalies up to 3.0 across seeds, backdoor targets 4.5-7.5).
"""

import logging
from dataclasses import replace

import numpy as np

from scanner.layers import CONV_OPS, GraphIndex, discover

ANOMALY = 2.0
STRONG_ANOMALY = 4.0
SPREAD_FLOOR = float(np.log(1.5))
FINGERPRINT_Z = 10.0
SUSPICIOUS_ANOMALY = 3.5
SUSPICIOUS_Z = 6.0
CLP_U = 3.0
VERDICTS = ("clean", "suspicious", "backdoored")
log = logging.getLogger("scanner")


def classify(works, anomaly, z):
    """Level of one synthesized trigger from its success, size anomaly and l-inf fingerprint z."""
    if not works or anomaly <= ANOMALY:
        return "clean"
    if anomaly >= STRONG_ANOMALY or z >= FINGERPRINT_Z:
        return "backdoored"
    if anomaly >= SUSPICIOUS_ANOMALY or z >= SUSPICIOUS_Z:
        return "suspicious"
    return "clean"


def anomaly_index(values):
    """Small-side anomaly index of each value: (median - x) / max(1.4826 * MAD, SPREAD_FLOOR)."""
    v = np.asarray(values, np.float64)
    med = np.median(v)
    spread = max(1.4826 * float(np.median(np.abs(v - med))), SPREAD_FLOOR)
    return (med - v) / spread, float(med), spread


def family_cap(config, family):
    """The largest trigger size the search allows in ``family``."""
    if family == "patch":
        return float(config.max_patch) ** 2
    return float(config.max_alpha)


def size_evidence(synthesis):
    """Per family: per-class effective sizes, anomaly indices, median and spread."""
    out = {}
    for family in synthesis.config.families:
        cap = family_cap(synthesis.config, family)
        sizes = synthesis.sizes(family)
        eff = [min(s, cap) if s is not None else cap for s in sizes]
        index, med, spread = anomaly_index(np.log(np.maximum(eff, 1e-6)))
        out[family] = {
            "cap": cap,
            "sizes": [None if s is None else round(float(s), 6) for s in sizes],
            "anomaly": [round(float(a), 3) for a in index],
            "median_size": round(float(np.exp(med)), 6),
            "spread_log": round(spread, 4),
        }
    return out


def channel_lipschitz(model):
    """Per conv layer: channel Lipschitz upper bounds and CLP outliers, from the graph's real topology."""
    gi = GraphIndex(model, infer=False)
    rows = []
    for layer in discover(model):
        if layer.op_type not in CONV_OPS:
            continue
        node = gi.nodes[gi.by_name[layer.node]]
        w = gi.const(node.input[1])
        group = gi.attr(node, "group", 1)
        if w is None or w.ndim < 3:
            continue
        w = np.asarray(w, np.float64)
        if layer.op_type == "ConvTranspose":
            if group != 1:
                continue
            w = np.moveaxis(w, 1, 0)
        kernels = w.reshape(w.shape[0], w.shape[1], -1)
        bound = np.array([np.linalg.norm(k, 2) for k in kernels])
        bn = "folded or absent"
        if "BatchNormalization" in layer.chain:
            bn_node = gi.nodes[gi.by_name[layer.chain_nodes[layer.chain.index("BatchNormalization")]]]
            gamma, _, _, var = (np.asarray(gi.const(n), np.float64).reshape(-1) for n in bn_node.input[1:5])
            eps = gi.attr(bn_node, "epsilon", 1e-5)
            bound = bound * np.abs(gamma) / np.sqrt(var + eps)
            bn = "unfused BatchNormalization"
        mean, std = float(bound.mean()), float(bound.std())
        z = (bound - mean) / std if std > 0 else np.zeros_like(bound)
        rows.append(
            {
                "layer": layer.id,
                "channels": int(len(bound)),
                "batchnorm": bn,
                "max_z": round(float(z.max()), 3),
                "outliers": [int(k) for k in np.flatnonzero(z > CLP_U)],
            }
        )
    return {"u": CLP_U, "layers": rows, "outliers": int(sum(len(r["outliers"]) for r in rows))}


def decide(synthesis, model=None):
    """The verdict (JSON-ready): ``verdict``, ``targets``, per-class ``candidates`` and the ``evidence``."""
    sizes = size_evidence(synthesis)
    tau = synthesis.config.success
    candidates = []
    for i, result in enumerate(synthesis.classes):
        for family, cand in result.found.items():
            a = sizes[family]["anomaly"][i]
            works = cand.success >= tau
            fp = result.fingerprint.get(family, {})
            z = fp.get("z", [0.0])[0] if fp else 0.0
            level = classify(works, a, z)
            if level == "clean":
                continue
            candidates.append(
                {
                    "target": result.target,
                    "family": family,
                    "level": level,
                    "trigger": cand.describe(),
                    "size": round(cand.size, 6),
                    "success": round(cand.success, 6),
                    "anomaly": a,
                    "fingerprint_z": z,
                    "fingerprint_channels": fp.get("channels", []),
                }
            )
    rank = {v: i for i, v in enumerate(VERDICTS)}
    candidates.sort(key=lambda c: (-rank[c["level"]], -c["anomaly"]))
    verdict = max((c["level"] for c in candidates), key=rank.get, default="clean")
    targets = []
    for c in candidates:
        if c["level"] == verdict and c["target"] not in targets:
            targets.append(c["target"])
    out = {
        "verdict": verdict,
        "targets": targets,
        "candidates": candidates,
        "thresholds": {
            "anomaly": ANOMALY,
            "suspicious_anomaly": SUSPICIOUS_ANOMALY,
            "suspicious_fingerprint_z": SUSPICIOUS_Z,
            "strong_anomaly": STRONG_ANOMALY,
            "spread_floor_log": round(SPREAD_FLOOR, 4),
            "fingerprint_z": FINGERPRINT_Z,
            "success": tau,
        },
        "evidence": {"sizes": sizes, "synthesis": synthesis.to_dict()},
    }
    if model is not None:
        out["evidence"]["clp"] = channel_lipschitz(getattr(model, "proto", model))
    return out


# ---- scanner sanitize without --probe --------------------------------------------------------------
MIN_AGREEMENT = 0.98
VARIANT_SUCCESS = 0.5
"""A variant of a synthesized trigger joins the probes when it still sends this fraction to the target."""
RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""Refit ridges (relative to the feature energy) tried, from RIDGE_START down while agreement holds, else up."""
RIDGE_START = 0.1
MAX_VARIANTS = {"patch": 2, "blend": 1}
BUDGET = 55.0
SYNTHESIS_SHARE = 0.6
POLISH_STEPS = 40


def _still_backdoored(sizes, family, cand, tau):
    """Whether ``cand`` (found on the repaired model) still stands out against the original class sizes."""
    if cand.success < tau:
        return False
    cap = sizes[family]["cap"]
    eff = [min(s, cap) if s is not None else cap for s in sizes[family]["sizes"]]
    logs = np.log(np.maximum(eff, 1e-6))
    med = float(np.median(logs))
    spread = max(1.4826 * float(np.median(np.abs(logs - med))), SPREAD_FLOOR)
    return (med - np.log(max(cand.size, 1e-6))) / spread > ANOMALY


def sanitize_blind(model, data, output=None, force=False, always=False, device="auto", threads=None, batch_size=64,
                   limit=None, preprocess=None, config=None, rounds=3, triggers_dir=None, budget=BUDGET):
    """``scanner sanitize`` without ``--probe``: synthesize, decide, repair with the synthesized triggers.

    Returns (report, proto or None, found). The repair is the head refit of :func:`repair.sanitize_with_probes`
    on the synthesized triggers of the suspected target(s) and their variants; after each refit the triggers are
    synthesized again on the repaired model, and any that still stands out joins the probes, for up to
    ``rounds`` refits, while agreement with the original on clean images stays >= MIN_AGREEMENT. ``budget``
    (seconds) bounds the whole job: the synthesis gets SYNTHESIS_SHARE of it, and no refit round starts that
    would likely end after it.
    """
    import time

    from scanner.data.images import ImageSet
    from scanner.fileio import check_output
    from scanner.model import ModelFile, load_model
    from scanner.data.probes import Probe
    from scanner.repair import Repair, sanitize_with_probes, write_model
    from scanner.synthesis import Config, Oracle, Synthesizer, load_pixels

    started = time.perf_counter()
    cfg = config or Config()
    if budget:
        cfg = replace(cfg, budget=min(cfg.budget or budget, SYNTHESIS_SHARE * budget))
    else:
        budget = float("inf")
    mf = model if isinstance(model, ModelFile) else load_model(model)
    if output is not None:
        check_output(output, force, [mf.path])
    oracle = Oracle(mf, preprocess, device, threads)
    images = data if isinstance(data, ImageSet) else ImageSet(data, limit=limit)
    pixels = load_pixels(images, oracle.pre)
    synth = Synthesizer(oracle, pixels, cfg)
    log.info("synthesizing triggers for every class (%s; budget %.0fs)", ", ".join(cfg.families), cfg.budget or 0)
    result = synth.run()
    verdict = decide(result, mf)
    log.info("verdict: %s %s", verdict["verdict"], verdict["targets"])
    found = verdict["verdict"] != "clean"
    report = {
        "schema": "scanner.sanitize/1",
        "mode": "synthesized",
        "model": mf.facts(),
        "preprocess": oracle.pre.to_dict(),
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
        rep = Repair(mf, images, [Probe(trigger=c.trigger(result.color), source=f"synthesized:{c.describe()}") for c in probes],
                     "last", device, threads, batch_size, limit, preprocess, [c.target for c in probes])
        fits = []
        for ridge in _ridges(fits):
            fit_started = time.perf_counter()
            rep_report, proto, _ = sanitize_with_probes(mf, images, None, None, "refit", force=force, always=True,
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
        again = Synthesizer(Oracle(proto, oracle.pre, device, threads), pixels,
                            replace(cfg, seed=cfg.seed + r + 1, budget=max(1.0, min(cfg.budget, budget - (time.perf_counter() - started) - 2 * round_seconds))))
        fresh = [c for res in again.run(targets).classes for c in res.found.values()]
        new = [c for c in again.polish(probes[:n_flagged], POLISH_STEPS) + fresh
               if _still_backdoored(verdict["evidence"]["sizes"], c.family, c, cfg.success)]
        entry["still_working"] = [{"target": c.target, "trigger": c.describe(), "size": round(c.size, 6),
                                   "success": round(c.success, 6)} for c in new]
        if not new:
            break
        for cand in new:
            probes += [cand] + _best_variants(synth, cand)
    rep_report, proto, ridge = best
    report["repair"] = {
        "method": "refit",
        "ridge": ridge,
        "rounds": rounds_log,
        "probes": [{"target": c.target, "trigger": c.describe(), "size": round(c.size, 6), "success": round(c.success, 6)}
                   for c in probes],
        "before": rep_report["before"],
        "after": rep_report["after"],
        "verified": True,
    }
    if rep_report["after"]["agreement"] < MIN_AGREEMENT:
        log.warning("agreement with the original model on clean images is %.2f%% (< %.0f%%)",
                                             100 * rep_report["after"]["agreement"], 100 * MIN_AGREEMENT)
    if triggers_dir is not None:
        report["triggers"] = save_triggers(result, flagged, triggers_dir)
    if output is not None:
        write_model(proto, output, force, mf.path)
        report["output"] = str(output)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report, proto, found


def _ridges(fits):
    """Ridges to try, given the fits so far: down from RIDGE_START while agreement holds, else up until it does."""
    i = RIDGES.index(RIDGE_START)
    yield RIDGES[i]
    step = -1 if fits[-1][0]["after"]["agreement"] >= MIN_AGREEMENT else 1
    j = i + step
    while 0 <= j < len(RIDGES):
        yield RIDGES[j]
        ok = fits[-1][0]["after"]["agreement"] >= MIN_AGREEMENT
        if (step < 0 and not ok) or (step > 0 and ok):
            return
        j += step


def _best_variants(synth, cand, count=None):
    """The variants of ``cand`` that work best on the original model (at least VARIANT_SUCCESS; the smallest
    first among equals): MAX_VARIANTS[family] of them."""
    from scanner.synthesis import variants

    found = [v for v in synth.measure(variants(cand, (synth.h, synth.w))) if v.success >= VARIANT_SUCCESS]
    count = MAX_VARIANTS[cand.family] if count is None else count
    return sorted(found, key=lambda v: (-round(v.success, 2), v.size))[:count]


def save_triggers(result, flagged, folder):
    """Write each class's best synthesized trigger per family (JSON + PNG) into ``folder``; return the paths."""
    from pathlib import Path

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


def verdict_table(report):
    """Human summary of a synthesized-trigger sanitize report (for stderr)."""
    from scanner.report import table

    ev = report["evidence"]
    syn = ev["synthesis"]
    rows = []
    for i, row in enumerate(syn["classes"]):
        cells = [row["target"]]
        for fam in syn["families"]:
            c = row.get(fam)
            if c is None:
                cells += ["-", "-", "-"]
                continue
            size = f"{c['size']:.4f}" if c["works"] else f">{ev['sizes'][fam]['cap']:.2f}"
            cells += [size, f"{c['success']:.0%}", f"{ev['sizes'][fam]['anomaly'][i]:+.1f}"]
        rows.append(cells)
    heads = ["class"] + [h for fam in syn["families"] for h in (f"{fam} size", "success", "anomaly")]
    lines = [table(heads, rows)]
    targets = ", ".join(str(t) for t in report["targets"]) or "-"
    lines.append(f"verdict: {report['verdict']} (target {targets}); {syn['queries']} queries in {syn['seconds']:.1f}s"
                 + (" (time budget reached)" if syn["truncated"] else ""))
    for c in report["candidates"][:4]:
        lines.append(f"  class {c['target']} {c['family']}: {c['trigger']}, size {c['size']:.4f}, success {c['success']:.1%}, "
                     f"anomaly {c['anomaly']:.1f}, l-inf fingerprint z {c['fingerprint_z']:.1f} -> {c['level']}")
    if report["verdict"] == "clean" and report.get("output") is None:
        lines.append("no backdoor found: no model written (use --always to write one anyway)")
    return "\n".join(lines) + "\n"
