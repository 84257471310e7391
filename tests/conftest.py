import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CLEAN = MODELS / "data" / "clean"
TEST = MODELS / "data" / "test"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def without_timings(obj):
    """A report with every "seconds" field left out: what must be equal between two runs of the same work."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def zoo_manifest():
    path = MODELS / "manifest.json"
    if not path.exists():
        pytest.skip("models/manifest.json missing: run python -m models.recipes.build")
    return json.loads(path.read_text())


def zoo_entry(name):
    for m in zoo_manifest()["models"]:
        if m["name"] == name:
            return m
    pytest.skip(f"zoo model {name} not in the manifest")


def zoo_path(name):
    return MODELS / zoo_entry(name)["file"]


RGB = MODELS / "rgb"


def rgb_entry(name):
    """The RGB zoo manifest entry of model ``name``."""
    path = RGB / "manifest.json"
    if not path.exists():
        pytest.skip("models/rgb/manifest.json missing: run python -m models.recipes.rgb")
    return next(m for m in json.loads(path.read_text())["models"] if m["name"] == name)


@pytest.fixture
def run_cli(capfd):
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    from scanner.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out, err = capfd.readouterr()
        return exc.value.code, out, err

    return run
