"""``scanner gate``: the deployment gate. Detect (trigger synthesis + verdict, no repair), then judge by a policy.

One report for one or more models (schema ``scanner.gate/1``), one exit code, the worst over the models:

====  ==============================================================================
code  meaning
====  ==============================================================================
0     every model passed (possibly with warnings)
1     the policy was violated (a model failed)
2     error: a model could not be read or analysed, bad input, bad flags
3     nothing could be analysed: a model has no supported layer (and the policy says that fails)
====  ==============================================================================

Worst first: 2, then 1, then 3, then 0 (a backdoored model next to an unanalysable one gives 1).

The policy and the judgement are in :mod:`scanner.policy`.
"""

import glob
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from scanner import __version__
from scanner.context import ModelContext
from scanner.data.images import ImageSet
from scanner.detect.synthesis import Config, Synthesizer, queries_for, search_runner
from scanner.detect.verdict import decide
from scanner.errors import EXIT_ERROR, EXIT_FINDINGS, EXIT_NOTHING, EXIT_OK, NothingToAnalyse, ScannerError
from scanner.policy import DEFAULT_POLICY, EXIT_OF, STATUSES, judge
from scanner.runtime.session import check_device

log = logging.getLogger("scanner")
SCHEMA = "scanner.gate/1"
KEEP_IMAGES = 256
"""Clean images kept in memory per model for the HTML audit."""
SEVERITY = {EXIT_OK: 0, EXIT_NOTHING: 1, EXIT_FINDINGS: 2, EXIT_ERROR: 3}
"""Which exit code wins when models differ: error, then policy violated, then nothing analysed, then passed."""


def expand_models(paths):
    """Model files from ``paths``: files as given; folders as their ``*.onnx`` files (sorted, recursive); a glob
    (``registry/**/*.onnx``) as its matches (sorted); a ``.txt`` file as a list of paths, one per line (blank lines
    and ``#`` comments skipped; relative paths from the list's folder), each expanded the same way."""
    out = []
    for p in paths:
        p = Path(p)
        if p.suffix.lower() == ".txt" and p.is_file():
            try:
                lines = [ln.strip() for ln in p.read_text().splitlines()]
            except (OSError, UnicodeDecodeError) as exc:
                raise ScannerError(f"cannot read the list of models ({type(exc).__name__})", p) from None
            listed = [Path(ln) if Path(ln).is_absolute() else p.parent / ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise ScannerError("the list of models is empty", p)
            out += expand_models(listed)
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*.onnx") if q.is_file())
            if not found:
                raise ScannerError("no .onnx file in this folder", p)
            out += found
        elif not p.exists() and glob.has_magic(str(p)):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
            if not found:
                raise ScannerError("no file matches this pattern", p)
            out += found
        else:
            out.append(p)
    seen, unique = set(), []
    for p in out:
        if str(p) not in seen:
            seen.add(str(p))
            unique.append(p)
    return unique


@dataclass
class Artefacts:
    """In-memory results of one analysis that the HTML audit draws from (not part of the JSON report)."""

    ctx: object  # ModelContext
    runner: object  # the search's Runner
    pixels: object  # (N, H, W, C) uint8 clean images
    synthesis: object  # synthesis.Synthesis
    images: object  # the ImageSet


def search_config(analysis):
    """The trigger search settings of a policy's ``[analysis]`` table."""
    cfg = Config(seed=analysis.seed)
    if analysis.budget is not None:
        cfg = replace(cfg, budget=float(analysis.budget))
    if analysis.queries is not None:
        cfg = replace(cfg, queries=int(analysis.queries))
    if analysis.steps is not None:
        cfg = replace(cfg, steps=int(analysis.steps))
    if analysis.families:
        cfg = replace(cfg, families=tuple(analysis.families))
    return cfg


def analyse(path, images, policy, preprocess=None, device="auto", threads=None, keep=False, batch_size=128, scores=None):
    """Detection for one model: synthesis + verdict. Returns (entry, Artefacts or None).

    ``entry`` is the model's JSON-ready record without the policy judgement; errors raise (ScannerError,
    NothingToAnalyse), the caller records them.
    """
    started = time.perf_counter()
    ctx = ModelContext.open(path, preprocess, device, threads, batch_size, scores)
    ctx.select("last")  # NothingToAnalyse when there is no supported layer
    cfg = search_config(policy.analysis)
    runner = search_runner(ctx, cfg.batch_size)
    pixels = images.load_all(ctx.preprocess).pixels
    entry = {
        "model": ctx.facts(),
        "preprocess": ctx.preprocess.to_dict(),
        "runtime": {"provider": runner.provider},
        "data": {"clean": str(images.path), "images": int(len(pixels)), "skipped": len(images.skipped)},
    }
    if len(pixels) < policy.min_images:
        entry["verdict"] = None
        entry["seconds"] = round(time.perf_counter() - started, 3)
        return entry, None
    synthesis = Synthesizer(runner, pixels, cfg, queries_for(ctx)).run()
    verdict = decide(synthesis, ctx)
    entry.update(
        verdict=verdict["verdict"],
        targets=verdict["targets"],
        candidates=verdict["candidates"],
        thresholds=verdict["thresholds"],
        evidence=verdict["evidence"],
        graph=verdict["graph"],
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("%s: %s %s (%.1fs)", ctx.path, verdict["verdict"], verdict["targets"] or "", entry["seconds"])
    # The audit needs a few hundred clean images, not all of them (memory stays flat in the number of models).
    return entry, (Artefacts(ctx, runner, pixels[:KEEP_IMAGES].copy(), synthesis, images) if keep else None)


def problem_entry(path, exc, policy):
    """The entry of a model that could not be analysed."""
    entry = {"path": str(path), "model": {"path": str(path)}, "verdict": None, "reasons": [], "warnings": [], "error": " ".join(str(exc).split())}
    if isinstance(exc, NothingToAnalyse):
        entry["status"] = "unanalysable" if policy.unanalysable == "fail" else "skipped"
        (entry["reasons"] if policy.unanalysable == "fail" else entry["warnings"]).append(f"nothing to analyse: {entry['error']}")
    else:
        entry["status"] = "error"
        entry["reasons"].append(entry["error"])
    entry["exit_code"] = EXIT_OF[entry["status"]]
    return entry


def worst(codes):
    """The exit code of several models: the most severe (2, then 1, then 3, then 0)."""
    return max(codes, key=SEVERITY.get, default=EXIT_OK)


def gate_model(path, images, policy, preprocess=None, device="auto", threads=None, keep=False, batch_size=128, scores=None):
    """One model through the gate: analysis and judgement. Returns (entry, Artefacts or None); a model that cannot
    be loaded or analysed becomes an error (or unanalysable) entry, never an exception. Every executor runs this."""
    try:
        entry, art = analyse(path, images, policy, preprocess, device, threads, keep, batch_size, scores)
    except ScannerError as exc:
        log.warning("%s", " ".join(str(exc).split()))
        entry, art = problem_entry(path, exc, policy), None
    except MemoryError:
        entry, art = problem_entry(path, ScannerError("out of memory (try --limit)", path), policy), None
    except Exception as exc:  # a bug: record it, keep gating the other models
        log.debug("analysis of %s failed", path, exc_info=True)
        entry, art = problem_entry(path, ScannerError(f"internal error: {type(exc).__name__}: {exc}", path), policy), None
    else:
        judge(entry, policy)
    return {"path": str(path), **{k: v for k, v in entry.items() if k != "path"}}, art


def run_gate(models, data, policy=None, preprocess=None, device="auto", threads=None, keep=False, batch_size=128,
             scores=None, executor="local", ray=None):
    """Gate every model in ``models`` (files, folders, globs, .txt lists). Returns (report, {path: Artefacts}).

    ``executor``: ``"local"`` runs the models one after the other in this process; ``"ray"`` runs one Ray task
    per model (:mod:`scanner.runtime.cluster`, options in ``ray``, a :class:`~scanner.runtime.cluster.RayOptions`);
    both run :func:`gate_model` and give the same report apart from timings. A model that cannot be loaded or
    analysed is recorded as an error (or as unanalysable) and the others still run; a bad ``data`` path is an
    error for the whole run (raised).
    """
    policy = policy or DEFAULT_POLICY
    started = time.perf_counter()
    paths = expand_models(models)
    images = ImageSet(data, limit=policy.analysis.limit)
    entries, artefacts = [], {}
    if executor == "ray":
        from scanner.runtime.cluster import RayOptions, gate_on_ray

        for entry, view in gate_on_ray(paths, images, policy, ray or RayOptions(), preprocess, device, threads, keep,
                                       batch_size, scores):
            entries.append(entry)
            if view is not None:
                artefacts[entry["path"]] = view
    elif executor == "local":
        check_device(device)  # a setting every model would fail on: one error, not one per model
        for i, path in enumerate(paths):
            log.info("[%d/%d] %s", i + 1, len(paths), path)
            entry, art = gate_model(path, images, policy, preprocess, device, threads, keep, batch_size, scores)
            entries.append(entry)
            if art is not None:
                artefacts[str(path)] = art
    else:
        raise ScannerError(f"unknown executor {executor!r}: local or ray")
    code = worst(e["exit_code"] for e in entries)
    counts = {s: sum(e["status"] == s for e in entries) for s in STATUSES}
    report = {
        "schema": SCHEMA,
        "tool": {"name": "scanner", "version": __version__},
        "policy": policy.to_dict(),
        "result": {EXIT_OK: "passed", EXIT_FINDINGS: "failed", EXIT_ERROR: "error", EXIT_NOTHING: "unanalysable"}[code],
        "exit_code": code,
        "summary": {"models": len(entries), **counts},
        "models": entries,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return report, artefacts
