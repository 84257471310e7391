"""benchmarks/RESULTS.md: each benchmark owns one section between its begin / end markers."""

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
