"""Atomic output files: written to a temp file beside the target, then renamed."""

import contextlib
import os
import tempfile
from pathlib import Path

from scanner.errors import ScannerError


def check_output(path, force=False, inputs=()):
    """Refuse an output that would overwrite an input, an existing file without ``force``, or a folder that
    cannot be created (checked before any work is done)."""
    path = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and path.exists() and os.path.samefile(src, path):
            raise ScannerError("output would overwrite the input; choose another file", path)
    if path.is_dir():
        raise ScannerError("output is a directory", path)
    if path.exists() and not force:
        raise ScannerError("output exists; pass --force to overwrite it", path)
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ScannerError(f"cannot create the output folder: {parent} is not a folder", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScannerError(f"cannot write to {parent} (permission denied)", path)
    return path


def _error(exc, path, what):
    return ScannerError(f"{what}: {exc.strerror or exc}", path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside ``path``; on success rename it to ``path``, on any error (or Ctrl-C) remove it.

    The target is never left half-written: it is either the old file (or absent) or the complete new one.
    OS errors while creating, writing or renaming the temp file become a ScannerError naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _error(exc, path.parent, "cannot create output folder") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _error(exc, path, "cannot write") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, ScannerError):
            raise _error(exc, path, "cannot write") from None
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data):
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))
