"""The ``scanner`` command line: a thin layer over the Python API.

Exit codes: 0 nothing found / passed, 1 backdoor found (or policy violated), 2 error (bad model, bad
input, bad flags), 3 nothing could be analysed (no supported layer), 130 interrupted.
"""

import functools
import logging
import os
import sys

import click

from scanner import __version__
from scanner.errors import EXIT_ERROR, EXIT_OF_OUTCOME, EXIT_OK, ScannerError

log = logging.getLogger("scanner")
_STATE = {"debug": bool(os.environ.get("SCANNER_DEBUG"))}

EXIT_CODES_HELP = """\b
Exit codes:
  0  nothing found / passed
  1  backdoor found and removed (sanitize, prune: the repaired model was written) / policy violated (gate)
  2  error: bad model, bad input, bad flags
  3  nothing could be analysed (no supported layer)
  4  backdoor found but NOT removed: it still works on the repaired model; nothing written (unless --always)
"""


class _StderrFormatter(logging.Formatter):
    def format(self, record):
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"scanner: {prefix}{record.getMessage()}"


def _setup_logging(verbose, quiet):
    from scanner.progress import Progress

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    _STATE["quiet"] = bool(quiet)
    if quiet:
        Progress.enabled_default = False


def status(text):
    """Human status (tables for people when stdout carries JSON) on stderr, unless --quiet."""
    if not _STATE.get("quiet"):
        sys.stderr.write(text)


def _log_flag(ctx, param, value):
    if value:
        parent = ctx.find_root().params
        _setup_logging(parent.get("verbose", 0) + (value if param.name == "verbose" else 0),
                       parent.get("quiet") or param.name == "quiet")
    return value


def command(fn):
    """Every command: needs onnxruntime, takes -q/-v too, reports ScannerError as one line (see :func:`main`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from scanner.runtime.session import ort

        ort()
        return fn(*args, **kwargs)

    wrapper = click.option("-v", "--verbose", count=True, expose_value=False, callback=_log_flag, help="More log lines on stderr.")(wrapper)
    wrapper = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_log_flag, help="Only errors on stderr.")(wrapper)
    return wrapper


def emit(text, output=None, force=False, inputs=()):
    """Write the product to ``output`` (atomically) or to stdout."""
    if output:
        from scanner.fileio import check_output, write_text

        check_output(output, force=True if force is None else force, inputs=inputs)
        write_text(output, text)
        log.info("wrote %s", output)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# Flag groups, so that one flag means the same thing in every command.
MIN_IMAGES_HELP = "Fail when fewer usable images remain (unreadable files are counted and named)."
PREPROCESS_HELP = ("imagenet | caffe | inception | raw | FILE.json: how pixels become the model's input (overrides the "
                   "model's metadata; without either a float model is fed 0-1 RGB, with a warning).")


def data_options(fn=None, min_images_default=1, min_images_help=MIN_IMAGES_HELP):
    """The data and runtime flags: --preprocess, --device, --batch-size, --threads, --limit, --min-images."""

    def wrap(fn):
        for deco in reversed(
            [
                click.option("--preprocess", "preprocess", type=click.Path(dir_okay=False), help=PREPROCESS_HELP),
                click.option("--scores", "scores", default=None, metavar="NAME",
                             help="The graph output holding the class scores [default: the one float (N, K) output, K >= 2]."),
                click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="onnxruntime provider."),
                click.option("--batch-size", type=click.IntRange(1, 65536), default=128, show_default=True),
                click.option("--threads", type=click.IntRange(1, 1024), default=None, help="onnxruntime intra-op threads."),
                click.option("--limit", type=click.IntRange(1), default=None, help="Use at most N images."),
                click.option("--min-images", type=click.IntRange(1), default=min_images_default,
                             show_default=min_images_default is not None, help=min_images_help),
            ]
        ):
            fn = deco(fn)
        return fn

    return wrap(fn) if fn is not None else wrap


def output_options(formats=("table", "json")):
    def wrap(fn):
        fn = click.option("--force", is_flag=True, help="Overwrite an existing output file.")(fn)
        fn = click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to FILE instead of stdout.")(fn)
        fn = click.option("--format", "fmt", type=click.Choice(formats), default=formats[0], show_default=True)(fn)
        return fn

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", prog_name="scanner")
@click.option("-v", "--verbose", count=True, help="More log lines on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr; no progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def cli(verbose, quiet, debug):
    """Find and remove backdoors in ONNX image classifiers (Cheng et al., arXiv:2002.12162).

    \b
    Examples:
      scanner inspect models/cnn_badnets.onnx
      scanner scan models/cnn_badnets.onnx --data models/data/clean --probe models/triggers/badnets_3x3.json
    """
    _STATE["debug"] = _STATE["debug"] or debug
    _setup_logging(verbose, quiet)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--preprocess", "preprocess", type=click.Path(dir_okay=False), help=PREPROCESS_HELP)
@click.option("--scores", "scores", default=None, metavar="NAME", help="The graph output holding the class scores.")
@output_options()
@command
def inspect_cmd(model, preprocess, scores, fmt, output, force):
    """Model facts and the layer table: every Conv / Gemm / MatMul layer and where its channels are read.

    \b
    Example:
      scanner inspect models/cnn_badnets.onnx --format json
    """
    from scanner.commands.inspect import inspect_model
    from scanner.report.tables import inspect_table, to_json

    from scanner.context import ModelContext

    info = inspect_model(ModelContext.open(model, preprocess, scores=scores))
    emit(to_json(info) if fmt == "json" else inspect_table(info), output, force, [model])
    return EXIT_OK


@cli.command("scan")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Clean images: a folder, DIR/<class>/..., or .npz.")
@click.option("--probe", type=click.Path(), help="A trigger .json file, or a folder of images that carry a trigger.")
@click.option("--layers", default="last", show_default=True, help="last | all | ID[,ID...] (see `scanner inspect`).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Top channels to report.")
@data_options
@output_options()
@click.option("--html", "html_out", type=click.Path(dir_okay=False), help="Also write a self-contained HTML audit to FILE.")
@command
def scan_cmd(model, data, probe, layers, top, preprocess, scores, device, batch_size, threads, limit, min_images, fmt, output,
             force, html_out):
    """Measure per-channel l-inf / l1 / l2 activation norms on clean and probe images.

    \b
    Example:
      scanner scan models/cnn_badnets.onnx --data models/data/clean \\
          --probe models/triggers/badnets_3x3.json --format json -o scan.json
    """
    from scanner.commands.scan import scan
    from scanner.context import ModelContext
    from scanner.fileio import check_output
    from scanner.report.tables import scan_table, to_json

    for path in (output, html_out):
        if path:
            check_output(path, force, [model])
    ctx = ModelContext.open(model, preprocess, device, threads, batch_size, scores)
    report = scan(ctx, data, probe, layers, limit=limit, top=top, min_images=min_images)
    if html_out:
        from scanner.report.html import scan_html

        emit(scan_html(report, ctx, data, probe), html_out, True, [model])
    emit(to_json(report) if fmt == "json" else scan_table(report, top), output, True, [model])
    return EXIT_OK


def prune_options(fn):
    fn = click.option("--layers", default="last", show_default=True, help="last | all | ID[,ID...] (see `scanner inspect`).")(fn)
    fn = click.option("--target", type=click.IntRange(0), default=None, help="Target class of the probe (default: the class it pushes images to).")(fn)
    return fn


def model_output_options(fn):
    """Flags of the commands that write a model: the report's format, a JSON report file, --force, --always."""
    fn = click.option("--always", is_flag=True,
                      help="Write the model even when nothing was found, or when the backdoor was NOT removed "
                           "(the report and the exit code still say so).")(fn)
    fn = click.option("--force", is_flag=True, help="Overwrite existing output files.")(fn)
    fn = click.option("--report", "report_out", type=click.Path(dir_okay=False), help="Also write the JSON report to FILE.")(fn)
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)(fn)


def _repair_outcome(report, report_out, fmt, model):
    """Write a repair report (``--report`` file, JSON on stdout) and return the exit code of its outcome."""
    from scanner.report.tables import to_json

    if report_out:
        emit(to_json(report), report_out, True, [model])
    if fmt == "json":
        emit(to_json(report))
    return EXIT_OF_OUTCOME[report["outcome"]]


@cli.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Clean images (labeled DIR/<class>/... gives accuracy).")
@click.option("--probe", required=True, type=click.Path(), help="A trigger .json file, or a folder of triggered images.")
@click.option("-o", "--output", "model_out", required=True, type=click.Path(dir_okay=False), help="The pruned ONNX file.")
@click.option("--count", type=click.IntRange(0), default=None, help="Prune the top K channels.")
@click.option("--ratio", type=click.FloatRange(0, 1), default=None, help="Prune this fraction of the measured channels.")
@click.option("--max-accuracy-drop", "max_drop", type=click.FloatRange(0, 1), default=None,
              help="Largest prune set whose clean accuracy (or agreement) drop stays within D [default 0.02].")
@prune_options
@data_options
@model_output_options
@command
def prune_cmd(model, data, probe, model_out, count, ratio, max_drop, layers, target, preprocess, scores, device, batch_size,
              threads, limit, min_images, fmt, report_out, force, always):
    """The paper's defense: rank channels by l-inf rise on probe images, zero the top ones, write a verified model.

    \b
    Example:
      scanner prune models/cnn_badnets.onnx --data models/data/test \\
          --probe models/triggers/badnets_3x3.json --max-accuracy-drop 0.02 -o pruned.onnx
    """
    from scanner.commands.prune import prune_model
    from scanner.fileio import check_output
    from scanner.report.tables import repair_table

    if report_out:
        check_output(report_out, force, [model])
    from scanner.context import ModelContext

    check_output(model_out, force, [model])
    ctx = ModelContext.open(model, preprocess, device, threads, batch_size, scores)
    report, _ = prune_model(ctx, data, probe, model_out, layers, count, ratio, max_drop, force, device, threads,
                            batch_size, limit, preprocess, target, min_images=min_images, always=always)
    status(repair_table(report))
    return _repair_outcome(report, report_out, fmt, model)


@cli.command("sanitize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Clean images (labels optional).")
@click.option("--probe", "probes", multiple=True, type=click.Path(),
              help="A trigger .json or a folder of triggered images (repeatable). Without it, triggers are synthesized.")
@click.option("-o", "--output", "model_out", required=True, type=click.Path(dir_okay=False), help="The sanitized ONNX file.")
@click.option("--method", type=click.Choice(["prune", "refit", "both"]), default="refit", show_default=True,
              help="With --probe: prune = l-inf pruning; refit = closed-form head refit on clean + probe pairs; both.")
@click.option("--max-accuracy-drop", "max_drop", type=click.FloatRange(0, 1), default=0.02, show_default=True, help="With --probe and --method prune|both.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="The repaired model must agree with the original on this fraction of held-out clean images to count "
                   "as sanitized (with --probe --method prune and labeled data: --max-accuracy-drop instead).")
@click.option("--queries", type=click.IntRange(100), default=None,
              help="Without --probe: forward passes of the trigger search [default: from the model's cost per image].")
@click.option("--budget", type=click.FloatRange(0), default=600.0, show_default=True,
              help="Without --probe: seconds, a safety cap on each trigger search (0: none); a search cut short says so.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the trigger search.")
@click.option("--triggers-dir", type=click.Path(file_okay=False), help="Save the synthesized triggers (JSON + PNG) here.")
@click.option("--clip/--no-clip", default=True, show_default=True,
              help="Bound every layer's channels by their clean per-image peaks before the head refit (Min / Max nodes "
                   "in the written model; with --probe, for --method refit|both).")
@click.option("--feature-refit/--no-feature-refit", "deeper", default=True, show_default=True,
              help="Where the head refit leaves a trigger working, also try correcting the last feature layer's weights "
                   "and keep whichever does better, cross-validated (--method refit).")
@prune_options
@data_options
@model_output_options
@command
def sanitize_cmd(model, data, probes, model_out, method, max_drop, min_agreement, queries, budget, seed, triggers_dir, clip, deeper,
                 layers, target,
                 preprocess, scores, device, batch_size, threads, limit, min_images, fmt, report_out, force, always):
    """Find and remove a backdoor; write a verified, sanitized model (exit 1 when one was found and removed).

    Without --probe: synthesize the smallest trigger per class (forward passes only), decide (clean /
    suspicious / backdoored), and repair with the synthesized triggers of the suspected target(s). A clean
    verdict writes no model unless --always.

    \b
    Examples:
      scanner sanitize models/cnn_badnets.onnx --data models/data/clean -o sanitized.onnx --report report.json
      scanner sanitize models/cnn_blend.onnx --data models/data/clean \\
          --probe models/triggers/blend_random.json -o sanitized.onnx
    """
    from scanner.commands.sanitize import sanitize_blind, sanitize_with_probes
    from scanner.detect.synthesis import Config
    from scanner.fileio import check_output
    from scanner.report.tables import repair_table, verdict_table

    from scanner.context import ModelContext

    if report_out:
        check_output(report_out, force, [model])
    check_output(model_out, force, [model])
    ctx = ModelContext.open(model, preprocess, device, threads, batch_size, scores)
    if not probes:
        report, proto, found = sanitize_blind(ctx, data, model_out, force, always, device, threads, batch_size, limit,
                                              preprocess, Config(seed=seed, queries=queries, budget=budget or None),
                                              triggers_dir=triggers_dir,
                                              min_images=min_images, min_agreement=min_agreement, clip=clip,
                                              deeper=deeper)
        status(verdict_table(report))
        if "repair" in report:
            status(repair_table({**report["repair"], **{k: report.get(k) for k in ("removal", "outcome", "output")}}))
    else:
        report, proto, found = sanitize_with_probes(ctx, data, list(probes), model_out, method, layers, max_drop, force,
                                                    always, device, threads, batch_size, limit, preprocess,
                                                    None if target is None else [target] * len(probes),
                                                    min_images=min_images, min_agreement=min_agreement, clip=clip,
                                                    deeper=deeper)
        status(repair_table(report))
    return _repair_outcome(report, report_out, fmt, model)


@cli.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Labeled images: DIR/<class index>/... or .npz with labels.")
@click.option("--trigger", type=click.Path(dir_okay=False), help="Trigger .json to measure attack success.")
@click.option("--target", type=click.IntRange(0), default=None, help="The attack's target class (with --trigger).")
@click.option("--compare", type=click.Path(dir_okay=False), help="A second model (e.g. the sanitized one), side by side.")
@data_options
@output_options()
@command
def evaluate_cmd(model, data, trigger, target, compare, preprocess, scores, device, batch_size, threads, limit, min_images,
                 fmt, output, force):
    """Clean accuracy and attack success rate (on images whose true class is not the target).

    \b
    Example:
      scanner evaluate models/cnn_badnets.onnx --data models/data/test \\
          --trigger models/triggers/badnets_3x3.json --target 0 --compare pruned.onnx
    """
    from scanner.commands.evaluate import evaluate
    from scanner.report.tables import evaluate_table, to_json

    if output:
        from scanner.fileio import check_output

        check_output(output, force, [model])
    report = evaluate(model, data, trigger, target, compare, device, batch_size, threads, limit, preprocess, min_images,
                      scores)
    emit(to_json(report) if fmt == "json" else evaluate_table(report), output, True, [model])
    return EXIT_OK


GATE_HELP = """\b
Default policy (scanner/policy.py; a --policy file and the flags override single values):
  fail_on = "backdoored"   warn_on = "suspicious"   min_images = 100
  unanalysable = "fail"    partial = "fail"         (max_anomaly, max_fingerprint_z, max_clp_outliers: off)

\b
Exit codes (several models: the worst, in the order 2, 1, 3, 0):
  0  every model passed (warnings allowed)
  1  policy violated: a model failed
  2  error: bad model (recorded in the report, the other models still run), bad input, bad flags
  3  nothing could be analysed: no supported layer (policy unanalysable = "fail")
"""


@cli.command("gate", epilog=GATE_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Clean images: a folder, DIR/<class>/..., or .npz.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Policy file (.toml; .yaml/.yml with PyYAML).")
@click.option("--fail-on", type=click.Choice(["suspicious", "backdoored", "never"]), default=None,
              help="Verdicts at or above this level fail [policy default: backdoored].")
@click.option("--max-anomaly", type=float, default=None, help="Fail when a working trigger's size anomaly index exceeds this.")
@click.option("--max-fingerprint-z", type=float, default=None, help="Fail when a working trigger's l-inf fingerprint z exceeds this.")
@click.option("--allow-unanalysable", is_flag=True, default=None, help="A model without a supported layer passes (with a warning).")
@click.option("--queries", type=click.IntRange(100), default=None,
              help="Forward passes of the trigger search per model [default: from the model's cost per image].")
@click.option("--budget", type=click.FloatRange(0), default=None,
              help="Seconds, a safety cap on the trigger search per model (0: none) [default 600]; a search cut short "
                   "fails the model (policy partial = fail).")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed of the trigger search [default 0].")
@data_options(min_images_default=None, min_images_help="Fewer usable clean images fail the model [policy default: 100].")
@output_options(("table", "json", "sarif"))
@click.option("--html", "html_out", type=click.Path(dir_okay=False), help="Also write a self-contained HTML audit to FILE.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run one Ray task per model (pip install 'scanner[ray]'): alone, on a local Ray started for the run; "
                   "'auto' for the running cluster; or a Ray address.")
@click.option("--ray-cpus", type=click.FloatRange(0, min_open=True), default=None, help="CPUs per model task [1].")
@click.option("--ray-gpus", type=click.FloatRange(0), default=None, help="GPUs per model task [0].")
@click.option("--ray-memory", default=None, metavar="SIZE", help="Memory reserved per model task, e.g. 4GB [none].")
@command
def gate_cmd(models, data, policy_file, fail_on, max_anomaly, max_fingerprint_z, allow_unanalysable, queries, budget, seed,
             preprocess, scores, device, batch_size, threads, limit, min_images, fmt, output, force, html_out, ray_address,
             ray_cpus, ray_gpus, ray_memory):
    """Deployment gate: detect backdoors (no repair) in one or more models and judge them by a policy.

    MODELS are .onnx files, folders of them, globs ('registry/**/*.onnx') or .txt files listing paths, one per
    line. The product (table, JSON report or SARIF 2.1.0 log) goes to stdout or -o FILE; with -o or a machine
    format, the summary table also goes to stderr. With --ray, each model is a Ray task; the report and the exit
    code are the same as without.

    \b
    Examples:
      scanner gate models/cnn_badnets.onnx --data models/data/clean
      scanner gate models/ --data models/data/clean --policy gate.toml --format sarif -o gate.sarif --html audit.html
      scanner gate registry.txt --data clean/ --ray auto --ray-cpus 2 --ray-memory 4GB --format json -o gate.json
    """
    from scanner.commands.gate import run_gate
    from scanner.fileio import check_output
    from scanner.policy import load_policy
    from scanner.report.tables import color_enabled, gate_table, to_json

    for path in (output, html_out):
        if path:
            check_output(path, force, list(models))
    overrides = {"fail_on": fail_on, "min_images": min_images, "max_anomaly": max_anomaly,
                 "max_fingerprint_z": max_fingerprint_z, "unanalysable": "pass" if allow_unanalysable else None,
                 "budget": budget, "queries": queries, "seed": seed, "limit": limit}
    policy = load_policy(policy_file, overrides)
    ray = None
    if ray_address is None and any(v is not None for v in (ray_cpus, ray_gpus, ray_memory)):
        raise click.UsageError("--ray-cpus, --ray-gpus and --ray-memory need --ray")
    if ray_address is not None and ray_address != "local" and os.path.exists(ray_address):
        raise click.UsageError(f"--ray took {ray_address!r} as the Ray address; write --ray=ADDRESS, or --ray after the models")
    if ray_address is not None:
        from scanner.runtime.cluster import RayOptions, parse_memory

        ray = RayOptions(None if ray_address == "local" else ray_address, ray_cpus or 1.0, ray_gpus or 0.0,
                         parse_memory(ray_memory) if ray_memory is not None else None)
    report, artefacts = run_gate(models, data, policy, preprocess, device, threads, keep=bool(html_out), batch_size=batch_size,
                                 scores=scores, executor="ray" if ray else "local", ray=ray)
    if fmt == "json":
        product = to_json(report)
    elif fmt == "sarif":
        from scanner.report.sarif import to_sarif_json

        product = to_sarif_json(report)
    else:
        product = gate_table(report, color=color_enabled(sys.stdout) and not output)
    if fmt != "table" or output:
        status(gate_table(report, color=color_enabled(sys.stderr)))
    if html_out:
        from scanner.report.html import gate_html

        emit(gate_html(report, artefacts), html_out, True, list(models))
    emit(product, output, True, list(models))
    return report["exit_code"]


def _one_line(text):
    """``text`` on one line (a message from a library may carry newlines)."""
    return " ".join(str(text).split())


def main(argv=None):
    """Console entry point: maps errors to one stderr line and an exit code (a traceback only with --debug).

    Logging and progress settings made by the flags are put back afterwards, so in-process runs (tests, API
    users) do not leak ``-q``/``-v`` into each other.
    """
    from scanner.progress import Progress

    saved = (log.level, list(log.handlers), log.propagate, dict(_STATE), Progress.enabled_default)
    try:
        _main(argv)
    finally:
        log.setLevel(saved[0])
        log.handlers[:] = saved[1]
        log.propagate = saved[2]
        _STATE.clear()
        _STATE.update(saved[3])
        Progress.enabled_default = saved[4]


def _main(argv):
    try:
        rv = cli.main(args=argv, prog_name="scanner", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.UsageError as exc:
        where = f"scanner {exc.ctx.command_path.split(' ', 1)[1]}" if exc.ctx and " " in exc.ctx.command_path else "scanner"
        sys.stderr.write(f"scanner: error: {_one_line(exc.format_message())} (see '{where} --help')\n")
        sys.exit(EXIT_ERROR)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("\nscanner: interrupted\n")
        sys.exit(130)
    except ScannerError as exc:
        if _STATE["debug"]:
            raise
        sys.stderr.write(f"scanner: error: {_one_line(exc)}\n")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        sys.stderr.write(f"scanner: error: {_one_line(exc.format_message())}\n")
        sys.exit(EXIT_ERROR)
    except BrokenPipeError:
        sys.exit(EXIT_ERROR)
    except MemoryError:
        if _STATE["debug"]:
            raise
        sys.stderr.write("scanner: error: out of memory (try a smaller --batch-size or --limit)\n")
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # a bug: still one line unless --debug
        if _STATE["debug"]:
            raise
        sys.stderr.write(f"scanner: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} (run with --debug for a traceback)\n")
        sys.exit(EXIT_ERROR)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":
    main()
