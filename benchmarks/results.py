"""What the benchmarks share: a fresh process measured, and benchmarks/RESULTS.md, where each benchmark owns one
section between its begin / end markers."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def head(src):
    """The short commit of the checkout at ``src`` ("?" when it is not a git checkout)."""
    return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip() or "?"


def write_section(text, begin, end, path=RESULTS):
    """Replace the text between ``begin`` and ``end`` (markers included in ``text``), or append it."""
    old = path.read_text()
    start = old.find(begin)
    stop = old.find(end, start) if start >= 0 else -1  # the end marker after this begin marker
    if start >= 0 and stop >= 0:
        new = old[:start] + text + old[stop + len(end):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)


def publish(text, begin, end, write=False):
    """Print a benchmark's section (stdout carries the product) and, with ``write``, put it in RESULTS.md."""
    print(text)
    if write:
        write_section(text, begin, end)


GNU_TIME = "/usr/bin/time"


def measure(cmd):
    """(exit code, stdout, seconds, peak RSS MiB) of a fresh process.

    The peak is read by GNU time when it is installed: Linux gives a forked child the parent's RSS high-water mark,
    and keeps it through exec, so the child's own rusage reads at least what this (possibly large) benchmark
    process held when it started the child. Without GNU time, that rusage, with this caveat."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as peak:
        gnu_time = os.access(GNU_TIME, os.X_OK)
        p = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", peak.name, *cmd] if gnu_time else list(cmd), stdout=out,
                             stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode()
        kib = peak.read().split() if gnu_time else []  # "Command exited with non-zero status N" may come first
    rss = int(kib[-1]) / 1024 if kib and kib[-1].isdigit() else usage.ru_maxrss / 1024
    return os.waitstatus_to_exitcode(status), text, seconds, rss


def centered_head(ctx, data, seed=0, images=64):
    """(weight, bias) float32 of a random head for ``ctx``'s head layer, re-drawn around its input features on the
    first ``images`` of ``data`` (logits with a spread of 3): a network with random weights otherwise predicts one
    class for every image, and the search refuses such a model."""
    from scanner.data.images import ImageSet

    head = ctx.head
    pixels = ImageSet(data, limit=images).load_all(ctx.preprocess).pixels
    feats = ctx.runner(features=(head.input,)).run(pixels).features[head.input].astype(np.float64)
    w = np.random.RandomState(seed).randn(head.channels, feats.shape[1])
    w *= 3.0 / max(((feats - feats.mean(0)) @ w.T).std(), 1e-12)
    return w.astype(np.float32), (-w @ feats.mean(0)).astype(np.float32)
