"""The head signature (scanner.detect.weights.head_signature) over every zoo model: does the backdoor target's
head row stand out, and does a clean model's? Weights only, no data.

    python benchmarks/head_signature.py [--markdown] [--write-results]
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import publish  # noqa: E402
from scanner.context import ModelContext  # noqa: E402
from scanner.detect.weights import head_signature  # noqa: E402

BEGIN, END = "<!-- head-signature: begin -->", "<!-- head-signature: end -->"

ROOT = Path(__file__).resolve().parents[1] / "models"


def zoo():
    """(name, path, targets) of every model in the grayscale and RGB zoo manifests."""
    for folder in (ROOT, ROOT / "rgb"):
        for m in json.loads((folder / "manifest.json").read_text())["models"]:
            targets = m.get("targets")
            if targets is None:
                targets = [] if m.get("target") is None else [m["target"]]
            yield m["name"], folder / m["file"], sorted(targets)


def main(markdown=False, write=False):
    rows = []
    for name, path, targets in zoo():
        sig = head_signature(*(lambda c: (c.proto, c.layers))(ModelContext.open(path)))
        row = {"model": name, "targets": targets}
        for stat in ("max", "l2"):
            top = sig[stat]
            rest = [z for k, z in zip(top["classes"], top["z"]) if k not in targets]
            row[stat] = {"top": top["classes"][0], "top_z": top["z"][0], "best_other_z": rest[0] if rest else None}
        rows.append(row)
    if not markdown:
        print(json.dumps(rows, indent=1))
        return
    lines = ["| model | true target(s) | top class by row max (z) | best non-target z | top by row l2 (z) | best non-target z |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['targets'] or 'clean'} | {r['max']['top']} ({r['max']['top_z']:.2f}) | "
                     f"{r['max']['best_other_z']} | {r['l2']['top']} ({r['l2']['top_z']:.2f}) | {r['l2']['best_other_z']} |")
    text = "\n".join([
        BEGIN, "## Head-row signature, weights only (issue 13)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores. Command: "
        "`python benchmarks/head_signature.py --markdown --write-results`. Per class, the classifier head's row: its "
        "largest weight and its l2 norm as robust z over the classes (the top three are in every report, "
        "`evidence.head_signature`). Not in the verdict: it is weak wherever a clean head's top row comes close to "
        "a backdoored one's (compare the clean rows below); at "
        f"{sum(1 for r in rows if r['targets'] and r['max']['top'] in r['targets'])} of "
        f"{sum(1 for r in rows if r['targets'])} backdoored models the target is the top row by row max.",
        "", *lines, "", END])
    publish(text, BEGIN, END, write)


if __name__ == "__main__":
    main("--markdown" in sys.argv or "--write-results" in sys.argv, "--write-results" in sys.argv)
