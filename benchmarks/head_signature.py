"""The head signature (scanner.detect.weights.head_signature) over every zoo model: does the backdoor target's
head row stand out, and does a clean model's? Weights only, no data.

    python benchmarks/head_signature.py [--markdown]
"""

import json
import sys
from pathlib import Path

from scanner.context import ModelContext
from scanner.detect.weights import head_signature

ROOT = Path(__file__).resolve().parents[1] / "models"


def zoo():
    """(name, path, targets) of every model in the grayscale and RGB zoo manifests."""
    for folder in (ROOT, ROOT / "rgb"):
        for m in json.loads((folder / "manifest.json").read_text())["models"]:
            targets = m.get("targets")
            if targets is None:
                targets = [] if m.get("target") is None else [m["target"]]
            yield m["name"], folder / m["file"], sorted(targets)


def main(markdown=False):
    rows = []
    for name, path, targets in zoo():
        sig = head_signature(*(lambda c: (c.proto, c.layers))(ModelContext.open(path)))
        row = {"model": name, "targets": targets}
        for stat in ("max", "l2"):
            top = sig[stat]
            rest = [z for k, z in zip(top["classes"], top["z"]) if k not in targets]
            row[stat] = {"top": top["classes"][0], "top_z": top["z"][0], "best_other_z": rest[0] if rest else None}
        rows.append(row)
    if markdown:
        print("| model | true target(s) | top class by row max (z) | best non-target z | top by row l2 (z) | best non-target z |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['targets'] or 'clean'} | {r['max']['top']} ({r['max']['top_z']:.2f}) | "
                  f"{r['max']['best_other_z']} | {r['l2']['top']} ({r['l2']['top_z']:.2f}) | {r['l2']['best_other_z']} |")
    else:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main("--markdown" in sys.argv)
