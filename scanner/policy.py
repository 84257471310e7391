"""The deployment gate's policy: what fails a model, read from a file and flags, and the judgement itself.

The policy (:data:`DEFAULT_POLICY`, a TOML or YAML file, single values overridden by flags)::

    fail_on = "backdoored"      # verdicts at or above this level fail: suspicious | backdoored | never
    warn_on = "suspicious"      # verdicts at or above this level (and below fail_on) pass with a warning
    min_images = 100            # fewer usable clean images: the model fails (the verdict would not be trusted)
    unanalysable = "fail"       # a model with no supported layer: fail (exit 3) | pass (skipped, with a warning)
    partial = "fail"            # the trigger search hit its time cap (cut short): pass | warn | fail
    # max_anomaly = 6.0         # optional: fail when a class's working trigger has a size anomaly index above this
    # max_fingerprint_z = 15.0  # optional: fail when a working trigger drives a channel's l-inf above this z
    # max_clp_outliers = 20     # optional: fail when more conv channels than this are CLP (Lipschitz) outliers

    [analysis]
    # queries = 20000           # forward passes of the trigger search per model (default: from the model's cost)
    budget = 600.0              # seconds: a safety cap on the search per model (0: none); a search cut short fails
    seed = 0
    # steps = 50                # random-search steps per class and family, at most
    # families = ["patch", "blend", "signal", "warp", "filter"]  # trigger families to search
    # limit = 1000              # use at most N clean images
"""

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from scanner.errors import EXIT_ERROR, EXIT_FINDINGS, EXIT_NOTHING, EXIT_OK, ScannerError

LEVELS = ("clean", "suspicious", "backdoored")
FAIL_ON = ("suspicious", "backdoored", "never")
PARTIAL = ("pass", "warn", "fail")
UNANALYSABLE = ("fail", "pass")
STATUSES = ("passed", "warned", "skipped", "failed", "unanalysable", "error")
EXIT_OF = {"passed": EXIT_OK, "warned": EXIT_OK, "skipped": EXIT_OK, "failed": EXIT_FINDINGS,
           "unanalysable": EXIT_NOTHING, "error": EXIT_ERROR}


@dataclass
class Analysis:
    """How the detection runs (the ``[analysis]`` table of a policy file)."""

    budget: float = None
    """Seconds: a safety cap on the trigger search per model (None: the synthesis default; 0: none)."""
    queries: int = None
    """Forward passes of the trigger search per model (None: the default from the model's cost per image)."""
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
    partial: str = "fail"
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
        _number(self.analysis, "queries", source, integer=True, low=100, what="[analysis] queries")
        _number(self.analysis, "steps", source, integer=True, low=1, what="[analysis] steps")
        _number(self.analysis, "limit", source, integer=True, low=1, what="[analysis] limit")
        fams = self.analysis.families
        if fams is not None:
            from scanner.detect.families import FAMILIES

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
        analysis = {k: overrides.pop(k) for k in ("budget", "queries", "seed", "steps", "families", "limit") if k in overrides}
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
            msg = ("the trigger search was cut short by its time cap: the verdict may miss a backdoor (raise [analysis] "
                   "budget, or lower [analysis] queries)")
            if policy.partial == "fail":
                reasons.append(msg)
            elif policy.partial == "warn":
                warnings.append(msg)
    entry["status"] = "failed" if reasons else "warned" if warnings else "passed"
    entry["reasons"], entry["warnings"] = reasons, warnings
    entry["exit_code"] = EXIT_OF[entry["status"]]
    return entry
