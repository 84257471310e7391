"""benchmarks/RESULTS.md: each benchmark owns one section between its begin / end markers."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(text, begin, end, path=RESULTS):
    """Replace the text between ``begin`` and ``end`` (markers included in ``text``), or append it."""
    old = path.read_text()
    if begin in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)
