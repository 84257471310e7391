"""A minimal progress bar on stderr (only when stderr is a terminal and not quiet)."""

import sys
import time


class Progress:
    """``with Progress(total, "scan") as p: p.advance(n)``; draws nothing when disabled."""

    enabled_default = None  # set by the CLI (--quiet / terminal detection)

    def __init__(self, total, label, enabled=None):
        self.total, self.label, self.done = total, label, 0
        self.note = ""
        """Shown after the counts (e.g. what is left of a stage)."""
        if enabled is None:
            enabled = Progress.enabled_default if Progress.enabled_default is not None else sys.stderr.isatty()
        self.enabled = bool(enabled) and total > 0
        self.start = time.perf_counter()
        self._last = 0.0

    def __enter__(self):
        return self

    def advance(self, n):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 24)
            line = f"{self.label:<10} [{bar:<24}] {self.done}/{self.total} {rate:,.0f} img/s {self.note}"
            sys.stderr.write(f"\r{line[:100]:<100}")
            sys.stderr.flush()

    def __exit__(self, *exc):
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
        return False
