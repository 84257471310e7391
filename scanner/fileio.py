"""Atomic output files: written to a temp file beside the target, then renamed."""

import contextlib
import os
import tempfile
from pathlib import Path

from scanner.errors import ScannerError


def check_output(path, force=False, inputs=()):
    """Refuse an output that would overwrite an input, or an existing file without ``force``."""
    path = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and path.exists() and os.path.samefile(src, path):
            raise ScannerError("output would overwrite the input; choose another file", path)
    if path.exists() and not force:
        raise ScannerError("output exists; pass --force to overwrite it", path)
    if path.exists() and path.is_dir():
        raise ScannerError("output is a directory", path)
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside ``path``; on success rename it to ``path``, on any error remove it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScannerError(f"cannot create output folder: {exc.strerror}", path.parent) from exc
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path, data):
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))
