"""The gate on a Ray cluster: one Ray task per model, the clean data shipped once, results as they come.

Each task runs :func:`scanner.commands.gate.gate_model`, the path the in-process gate runs, so the verdicts are the
same model by model (the query budget makes the work independent of the machine). What crosses the wire: the
clean images once (:meth:`scanner.data.images.ImageSet.packed`, in the object store), the policy and the flags;
back comes each model's JSON entry (and, with ``--html``, its audit view, drawn on the worker). The model files are
read by the workers from the paths given: on a multi-node cluster every node must see them at the same path (a
shared file system or the mounted registry).

Faults: a task whose worker dies (a runtime segfault, the kernel's or Ray's out-of-memory killer, a lost node) is
retried once (``RETRIES``), as an infrastructure failure may be; a model that takes its worker down twice becomes
an error entry and the other models finish. Ctrl-C cancels every task that has not finished; the caller writes
nothing.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from scanner.errors import ScannerError
from scanner.progress import Progress

log = logging.getLogger("scanner")
RETRIES = 1
"""Retries of a task whose worker died; a model that fails the same way twice is an error entry."""


@dataclass
class RayOptions:
    """Where and how the gate's tasks run."""

    address: str = None
    """None: start a local Ray for this run; ``auto``: the running cluster; else what ``ray.init`` takes."""
    cpus: float = 1.0
    """CPUs per task (also the task's onnxruntime threads when --threads is not given)."""
    gpus: float = 0.0
    memory: int = None
    """Bytes of memory per task (Ray schedules by it); None: no reservation."""


def parse_memory(text):
    """``4GB``, ``512MiB``, ``2e9`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not m:
        raise ScannerError(f"--ray-memory {text!r}: expected bytes or a size like 4GB or 512MiB")
    unit = (m.group(2) or "").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _gate_task(path, images, policy, preprocess, device, threads, keep, batch_size, scores):
    """One model on a worker: its gate entry, and its audit view when ``keep``."""
    from scanner.commands.gate import gate_model

    entry, art = gate_model(path, images, policy, preprocess, device, threads, keep, batch_size, scores)
    if not keep:
        return entry, None
    from scanner.report.html import gate_view

    return entry, gate_view(entry, art)


def _crash_entry(path, exc, policy):
    from scanner.commands.gate import problem_entry

    what = type(exc).__name__
    text = " ".join(str(exc).split())[:200]
    return problem_entry(path, ScannerError(f"the Ray worker analysing it died ({what}, after {RETRIES} retry): {text}",
                                            path), policy)


def gate_on_ray(paths, images, policy, options, preprocess=None, device="auto", threads=None, keep=False,
                batch_size=128, scores=None):
    """(entry, view or None) per model of ``paths``, in their order, each analysed in a Ray task."""
    try:
        import ray
    except ImportError:
        raise ScannerError("--ray needs Ray: pip install 'scanner[ray]' (on the driver and on every worker)") from None
    started_here = not ray.is_initialized()
    if started_here:
        log.info("starting Ray (%s)", options.address or "a local instance")
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ScannerError(f"cannot start or reach Ray at {options.address or 'a local instance'}: "
                               f"{' '.join(str(exc).split())[:200]}") from None
    try:
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False)(_gate_task)
        data = ray.put(images.packed())  # once, for every task
        threads = threads or max(1, int(options.cpus))
        refs = {}
        for i, path in enumerate(paths):
            ref = task.options(name=f"gate:{Path(path).name}", num_cpus=options.cpus, num_gpus=options.gpus,
                               memory=options.memory).remote(str(path), data, policy, preprocess, device, threads,
                                                             keep, batch_size, scores)
            refs[ref] = i
        results = [None] * len(paths)
        pending = list(refs)
        bar = Progress(len(paths), "gate (ray)")
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = refs[done[0]]
                try:
                    results[i] = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker died twice, the node was lost, out of memory
                    log.warning("%s: %s", paths[i], type(exc).__name__)
                    results[i] = (_crash_entry(paths[i], exc, policy), None)
                entry = results[i][0]
                log.info("[%d/%d] %s: %s %s", len(paths) - len(pending), len(paths), paths[i], entry["status"],
                         entry.get("verdict") or entry.get("error") or "")
                bar.note = f"{Path(paths[i]).name}: {entry['status']}"
                bar.advance(1)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.__exit__(None, None, None)
        return results
    finally:
        if started_here:
            ray.shutdown()
