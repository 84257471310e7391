"""What the benchmarks share: a fresh process measured, and benchmarks/RESULTS.md, where each benchmark owns one
section between its begin / end markers."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


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


def measure(cmd):
    """(exit code, stdout, seconds, peak RSS MiB) of a fresh process (its own rusage, from wait4)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode()
    return os.waitstatus_to_exitcode(status), text, seconds, usage.ru_maxrss / 1024
