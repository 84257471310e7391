"""Probes: clean images carrying a trigger (a trigger file) or a red team's folder of triggered images."""

from pathlib import Path

from scanner.data.images import ImageSet
from scanner.errors import ScannerError
from scanner.data.triggers import Trigger


class Probe:
    """What the model is probed with: ``trigger`` (stamped on the clean images) or ``images`` (a folder)."""

    def __init__(self, trigger=None, images=None, source=None):
        self.trigger, self.images, self.source = trigger, images, source

    @classmethod
    def open(cls, path, limit=None, min_images=None):
        """A trigger JSON file or a folder / .npz of images that already carry a trigger."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() == ".json":
            return cls(trigger=Trigger.load(path), source=str(path))
        if not path.exists():
            raise ScannerError("probe not found (expected a trigger .json file or a folder of triggered images)", path)
        return cls(images=ImageSet(path, limit=limit, min_images=min_images), source=str(path))

    def describe(self):
        """JSON-ready description."""
        if self.trigger is not None:
            return {"kind": "trigger", "source": self.source, "trigger": self.trigger.describe()}
        return {"kind": "images", "source": self.source, "images": len(self.images)}

    def paired_with(self, clean):
        """Whether the probe folder holds the same relative file names as the clean set (image pairs)."""
        if self.images is None:
            return True
        return self.images.names == clean.names
