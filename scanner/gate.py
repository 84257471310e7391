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

The policy (:data:`DEFAULT_POLICY`, a TOML or YAML file, single values overridden by flags)::

    fail_on = "backdoored"      # verdicts at or above this level fail: suspicious | backdoored | never
    warn_on = "suspicious"      # verdicts at or above this level (and below fail_on) pass with a warning
    min_images = 100            # fewer usable clean images: the model fails (the verdict would not be trusted)
    unanalysable = "fail"       # a model with no supported layer: fail (exit 3) | pass (skipped, with a warning)
    partial = "warn"            # the trigger search hit its time budget: pass | warn | fail
    # max_anomaly = 6.0         # optional: fail when a class's working trigger has a size anomaly index above this
    # max_fingerprint_z = 15.0  # optional: fail when a working trigger drives a channel's l-inf above this z
    # max_clp_outliers = 20     # optional: fail when more conv channels than this are CLP (Lipschitz) outliers

    [analysis]
    budget = 40.0               # seconds for the trigger search per model (0: no time limit, fully reproducible)
    seed = 0
    # steps = 60                # random-search steps per class and family (fewer: faster, less sensitive)
    # families = ["patch", "blend"]  # trigger families to search
    # limit = 1000              # use at most N clean images
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from scanner import __version__
from scanner.errors import EXIT_ERROR, EXIT_FINDINGS, EXIT_NOTHING, EXIT_OK, NothingToAnalyse, ScannerError

log = logging.getLogger("scanner")
SCHEMA = "scanner.gate/1"
LEVELS = ("clean", "suspicious", "backdoored")
FAIL_ON = ("suspicious", "backdoored", "never")
PARTIAL = ("pass", "warn", "fail")
UNANALYSABLE = ("fail", "pass")
STATUSES = ("passed", "warned", "skipped", "failed", "unanalysable", "error")
EXIT_OF = {"passed": EXIT_OK, "warned": EXIT_OK, "skipped": EXIT_OK, "failed": EXIT_FINDINGS,
           "unanalysable": EXIT_NOTHING, "error": EXIT_ERROR}
KEEP_IMAGES = 256
"""Clean images kept in memory per model for the HTML audit."""
SEVERITY = {EXIT_OK: 0, EXIT_NOTHING: 1, EXIT_FINDINGS: 2, EXIT_ERROR: 3}
"""Which exit code wins when models differ: error, then policy violated, then nothing analysed, then passed."""


@dataclass
class Analysis:
    """How the detection runs (the ``[analysis]`` table of a policy file)."""

    budget: float = None
    """Seconds of trigger search per model (None: the synthesis default; 0: no time limit)."""
    seed: int = 0
    steps: int = None
    families: list = None
    """Trigger families to search (patch, blend; None: all)."""
    limit: int = None


@dataclass
class Policy:
    """What fails the gate. See the module docstring for the file format and the defaults."""

    fail_on: str = "backdoored"
    warn_on: str = "suspicious"
    min_images: int = 100
    unanalysable: str = "fail"
    partial: str = "warn"
    max_anomaly: float = None
    max_fingerprint_z: float = None
    max_clp_outliers: int = None
    analysis: Analysis = field(default_factory=Analysis)
    source: str = "default"

    def to_dict(self):
        d = asdict(self)
        return d

    def updated(self, values, source):
        """A copy with ``values`` (a dict as in a policy file, or flag overrides) applied and validated."""
        if not isinstance(values, dict):
            raise ScannerError("a policy must be a table / mapping of keys", source)
        known = {f.name for f in fields(self)} - {"analysis", "source"}
        unknown = set(values) - known - {"analysis", "version"}
        if unknown:
            raise ScannerError(f"unknown policy key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}, [analysis]", source)
        if values.get("version", 1) != 1:
            raise ScannerError(f"unsupported policy version {values['version']!r} (this scanner reads version 1)", source)
        top = {k: v for k, v in values.items() if k in known and v is not None}
        analysis = self.analysis
        if values.get("analysis") is not None:
            sub = values["analysis"]
            if not isinstance(sub, dict):
                raise ScannerError("[analysis] must be a table", source)
            aknown = {f.name for f in fields(Analysis)}
            bad = set(sub) - aknown
            if bad:
                raise ScannerError(f"unknown [analysis] key(s) {sorted(bad)}; known: {', '.join(sorted(aknown))}", source)
            analysis = replace(analysis, **{k: v for k, v in sub.items() if v is not None})
        new = replace(self, analysis=analysis, source=str(source) if self.source == "default" else f"{self.source} + {source}",
                      **top)
        new._check(source)
        return new

    def _check(self, source):
        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ScannerError(f"policy {name} must be one of {', '.join(options)}, got {v!r}", source)

        choice("fail_on", FAIL_ON)
        choice("warn_on", FAIL_ON)
        choice("unanalysable", UNANALYSABLE)
        choice("partial", PARTIAL)
        _number(self, "min_images", source, integer=True, low=1)
        _number(self, "max_clp_outliers", source, integer=True, low=0)
        _number(self, "max_anomaly", source)
        _number(self, "max_fingerprint_z", source)
        _number(self.analysis, "budget", source, low=0, what="[analysis] budget")
        if self.analysis.budget is not None:
            self.analysis.budget = float(self.analysis.budget)
        _number(self.analysis, "seed", source, integer=True, low=0, what="[analysis] seed")
        _number(self.analysis, "steps", source, integer=True, low=1, what="[analysis] steps")
        _number(self.analysis, "limit", source, integer=True, low=1, what="[analysis] limit")
        fams = self.analysis.families
        if fams is not None:
            from scanner.synthesis import FAMILIES

            if isinstance(fams, str):
                fams = [f.strip() for f in fams.split(",") if f.strip()]
            if not isinstance(fams, (list, tuple)) or not fams or any(f not in FAMILIES for f in fams):
                raise ScannerError(f"[analysis] families must be a list of {', '.join(FAMILIES)}, got {fams!r}", source)
            self.analysis.families = list(fams)


def _number(obj, name, source, integer=False, low=None, what=None):
    v = getattr(obj, name)
    if v is None:
        return
    what = what or f"policy {name}"
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (not integer and not math.isfinite(v)) or (low is not None and v < low):
        kind = "an integer" if integer else "a number"
        raise ScannerError(f"{what} must be {kind}{f' >= {low}' if low is not None else ''}, got {v!r}", source)


DEFAULT_POLICY = Policy()


def load_policy(path=None, overrides=None):
    """The default policy, then the file at ``path`` (TOML, or YAML when PyYAML is installed), then ``overrides``."""
    policy = DEFAULT_POLICY
    if path is not None:
        policy = policy.updated(read_policy_file(path), path)
    if overrides:
        analysis = {k: overrides.pop(k) for k in ("budget", "seed", "steps", "families", "limit") if k in overrides}
        values = {k: v for k, v in overrides.items() if v is not None}
        analysis = {k: v for k, v in analysis.items() if v is not None}
        if analysis:
            values["analysis"] = analysis
        if values:
            policy = policy.updated(values, "flags")
    return policy


def read_policy_file(path):
    """The mapping in a ``.toml``, ``.yaml`` or ``.yml`` policy file (other names are read as TOML)."""
    path = Path(path)
    if not path.is_file():
        raise ScannerError("policy file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScannerError(f"cannot read the policy file ({exc})", path) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ScannerError("YAML policy files need PyYAML (pip install pyyaml), or write the policy as TOML", path) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ScannerError(f"not valid YAML ({' '.join(str(exc).split())[:200]})", path) from None
        return {} if data is None else data
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ScannerError("TOML policy files need Python 3.11+ (or pip install tomli)", path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScannerError(f"not valid TOML ({exc})", path) from None


def expand_models(paths):
    """Model files from ``paths``: files as given, folders as their ``*.onnx`` files (sorted, recursive)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.onnx") if q.is_file())
            if not found:
                raise ScannerError("no .onnx file in this folder", p)
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

    model: object  # ModelFile
    oracle: object  # synthesis.Oracle
    pixels: object  # (N, H, W, C) uint8 clean images
    synthesis: object  # synthesis.Synthesis
    images: object  # the ImageSet


def analyse(path, images, policy, preprocess=None, device="auto", threads=None, keep=False):
    """Detection for one model: synthesis + verdict. Returns (entry, Artefacts or None).

    ``entry`` is the model's JSON-ready record without the policy judgement; errors raise (ScannerError,
    NothingToAnalyse), the caller records them.
    """
    from scanner.layers import discover, select
    from scanner.model import load_model
    from scanner.synthesis import Config, Oracle, Synthesizer, load_pixels
    from scanner.verdict import decide

    started = time.perf_counter()
    mf = load_model(path)
    select(discover(mf.proto), "last")  # NothingToAnalyse when there is no supported layer
    oracle = Oracle(mf, preprocess, device, threads)
    pixels = load_pixels(images, oracle.pre)
    entry = {
        "model": mf.facts(),
        "preprocess": oracle.pre.to_dict(),
        "runtime": {"provider": oracle.session.provider},
        "data": {"clean": str(images.path), "images": int(len(pixels)), "skipped": len(images.skipped)},
    }
    if len(pixels) < policy.min_images:
        entry["verdict"] = None
        entry["seconds"] = round(time.perf_counter() - started, 3)
        return entry, None
    a = policy.analysis
    cfg = Config(seed=a.seed)
    if a.budget is not None:
        cfg = replace(cfg, budget=float(a.budget))
    if a.steps is not None:
        cfg = replace(cfg, steps=int(a.steps))
    if a.families:
        cfg = replace(cfg, families=tuple(a.families))
    synthesis = Synthesizer(oracle, pixels, cfg).run()
    verdict = decide(synthesis, mf)
    entry.update(
        verdict=verdict["verdict"],
        targets=verdict["targets"],
        candidates=verdict["candidates"],
        thresholds=verdict["thresholds"],
        evidence=verdict["evidence"],
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("%s: %s %s (%.1fs)", mf.path, verdict["verdict"], verdict["targets"] or "", entry["seconds"])
    # The audit needs a few hundred clean images, not all of them (memory stays flat in the number of models).
    return entry, (Artefacts(mf, oracle, pixels[:KEEP_IMAGES].copy(), synthesis, images) if keep else None)


def judge(entry, policy):
    """Apply ``policy`` to an analysed model's entry: sets status, reasons, warnings, exit_code (in place)."""
    reasons, warnings = [], []
    verdict = entry.get("verdict")
    images = entry["data"]["images"]
    if verdict is None:
        reasons.append(f"only {images} usable clean image(s); the policy needs min_images {policy.min_images}")
    else:
        rank = LEVELS.index(verdict)
        targets = ", ".join(str(t) for t in entry["targets"]) or "-"
        if policy.fail_on != "never" and rank >= LEVELS.index(policy.fail_on):
            reasons.append(f"verdict {verdict} (target {targets}); the policy fails on {policy.fail_on}")
        elif policy.warn_on != "never" and rank >= LEVELS.index(policy.warn_on):
            warnings.append(f"verdict {verdict} (target {targets})")
        ev = entry["evidence"]
        syn = ev["synthesis"]
        if policy.max_anomaly is not None:
            for fam, s in ev["sizes"].items():
                for i, (size, a) in enumerate(zip(s["sizes"], s["anomaly"])):
                    if size is not None and a > policy.max_anomaly:
                        reasons.append(f"class {syn['classes'][i]['target']} {fam} trigger size anomaly {a:.2f} "
                                       f"> max_anomaly {policy.max_anomaly:g}")
        if policy.max_fingerprint_z is not None:
            for row in syn["classes"]:
                for fam in syn["families"]:
                    c = row.get(fam)
                    if c and c["works"] and c.get("fingerprint") and c["fingerprint"]["z"][0] > policy.max_fingerprint_z:
                        reasons.append(f"class {row['target']} {fam} trigger drives channel {c['fingerprint']['channels'][0]} "
                                       f"to l-inf z {c['fingerprint']['z'][0]:.1f} > max_fingerprint_z {policy.max_fingerprint_z:g}")
        clp = ev.get("clp")
        if policy.max_clp_outliers is not None and clp is not None and clp["outliers"] > policy.max_clp_outliers:
            reasons.append(f"{clp['outliers']} CLP outlier channel(s) > max_clp_outliers {policy.max_clp_outliers}")
        if syn.get("truncated"):
            msg = "the trigger search reached its time budget: the verdict may miss a backdoor (raise [analysis] budget)"
            if policy.partial == "fail":
                reasons.append(msg)
            elif policy.partial == "warn":
                warnings.append(msg)
    entry["status"] = "failed" if reasons else "warned" if warnings else "passed"
    entry["reasons"], entry["warnings"] = reasons, warnings
    entry["exit_code"] = EXIT_OF[entry["status"]]
    return entry


def _problem(path, exc, policy):
    """The entry of a model that could not be analysed."""
    entry = {"model": {"path": str(path)}, "verdict": None, "reasons": [], "warnings": [], "error": " ".join(str(exc).split())}
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


def run_gate(models, data, policy=None, preprocess=None, device="auto", threads=None, keep=False):
    """Gate every model in ``models`` (files or folders). Returns (report, {path: Artefacts}).

    A model that cannot be loaded or analysed is recorded as an error (or as unanalysable) and the others
    still run; a bad ``data`` path is an error for the whole run (raised).
    """
    from scanner.data.images import ImageSet

    policy = policy or DEFAULT_POLICY
    started = time.perf_counter()
    paths = expand_models(models)
    images = ImageSet(data, limit=policy.analysis.limit)
    entries, artefacts = [], {}
    for i, path in enumerate(paths):
        log.info("[%d/%d] %s", i + 1, len(paths), path)
        try:
            entry, art = analyse(path, images, policy, preprocess, device, threads, keep)
        except ScannerError as exc:
            log.warning("%s", " ".join(str(exc).split()))
            entry, art = _problem(path, exc, policy), None
        except MemoryError:
            entry, art = _problem(path, ScannerError("out of memory (try --limit)", path), policy), None
        except Exception as exc:  # a bug: record it, keep gating the other models
            log.debug("analysis of %s failed", path, exc_info=True)
            entry, art = _problem(path, ScannerError(f"internal error: {type(exc).__name__}: {exc}", path), policy), None
        else:
            judge(entry, policy)
        entry = {"path": str(path), **{k: v for k, v in entry.items() if k != "path"}}
        entries.append(entry)
        if art is not None:
            artefacts[str(path)] = art
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


# ---- terminal ----------------------------------------------------------------------------------------
_COLORS = {"passed": "32", "warned": "33", "skipped": "33", "failed": "31", "unanalysable": "35", "error": "31",
           "clean": "32", "suspicious": "33", "backdoored": "31"}


def _paint(text, key, color):
    return f"\x1b[{_COLORS[key]}m{text}\x1b[0m" if color and key in _COLORS else text


def gate_table(report, color=False):
    """The terminal summary: one row per model (model, verdict, targets, evidence, policy result)."""
    from scanner.report import table

    rows, notes = [], []
    for e in report["models"]:
        verdict = e.get("verdict") or "-"
        evidence = "-"
        if e.get("candidates"):
            c = e["candidates"][0]
            evidence = f"{c['trigger']}, success {c['success']:.0%}, anomaly {c['anomaly']:.1f}, l-inf z {c['fingerprint_z']:.1f}"
        elif e.get("evidence"):
            worst_a = max((max(s["anomaly"]) for s in e["evidence"]["sizes"].values()), default=0.0)
            evidence = f"largest size anomaly {worst_a:.1f}"
        elif e.get("error"):
            msg = e["error"][len(e["path"]) + 2:] if e["error"].startswith(e["path"] + ": ") else e["error"]
            evidence = msg[:60] + ("..." if len(msg) > 60 else "")
        targets = ", ".join(str(t) for t in e.get("targets") or []) or "-"
        rows.append([e["path"], verdict, targets, evidence, e["status"].upper()])
        for r in e["reasons"]:
            notes.append(f"  {e['path']}: {r}")
        for w in e["warnings"]:
            notes.append(f"  {e['path']}: warning: {w}")
    text = table(["model", "verdict", "targets", "evidence", "policy"], rows, ["<", "<", "<", "<", "<"])
    if color:  # color after alignment (escape codes have no width)
        lines = text.split("\n")
        for i, e in enumerate(report["models"]):
            line = lines[i + 2]
            status = e["status"].upper()
            k = line.rfind(status)
            line = line[:k] + _paint(status, e["status"], True) + line[k + len(status):]
            v = e.get("verdict")
            if v:
                k = line.find(" " + v + " ", len(e["path"]))
                if k >= 0:
                    line = line[: k + 1] + _paint(v, v, True) + line[k + 1 + len(v):]
            lines[i + 2] = line
        text = "\n".join(lines)
    out = [text]
    if notes:
        out += [""] + notes
    s = report["summary"]
    parts = [f"{s[k]} {k}" for k in STATUSES if s[k]]
    result = report["result"].upper()
    out.append("")
    out.append(f"gate: {_paint(result, report['result'], color)} (exit {report['exit_code']}): {', '.join(parts)}; "
               f"policy {report['policy']['source']}; {report['seconds']:.1f}s")
    return "\n".join(out) + "\n"
