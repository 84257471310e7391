"""A cache of gate analyses (trigger synthesis + verdict) shared by the gate, report and browser tests.

The detection takes tens of seconds per model on 2 cores; the tests run it for real once per model file
(content hash) and analysis settings, then replay the result (a deep copy, with the path of the file asked
for). Everything after the analysis (policy, exit codes, JSON, SARIF, HTML, the CLI) runs for real.
"""

import copy
import hashlib
from pathlib import Path

import pytest

import scanner.commands.gate

_CACHE = {}
_REAL = scanner.commands.gate.analyse


def cached_analyse(path, images, policy, preprocess=None, device="auto", threads=None, keep=False, batch_size=128, scores=None):
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else str(p)
    key = (digest, repr(policy.analysis), policy.min_images, str(Path(images.path).resolve()), len(images), preprocess, scores)
    if key not in _CACHE:
        try:
            _CACHE[key] = ("ok", _REAL(path, images, policy, preprocess, device, threads, True, batch_size, scores))
        except Exception as exc:  # errors are replayed too (cheap, but keeps behaviour identical)
            _CACHE[key] = ("raise", exc)
    kind, value = _CACHE[key]
    if kind == "raise":
        raise value
    entry, art = value
    entry = copy.deepcopy(entry)
    entry["model"]["path"] = str(path)
    return entry, (art if keep else None)


@pytest.fixture(autouse=True)
def _cache_analyses(monkeypatch):
    monkeypatch.setattr(scanner.commands.gate, "analyse", cached_analyse)
