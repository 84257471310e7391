"""The full Fashion-MNIST test set (10,000 images) for benchmarks, read from the Debian package's IDX files."""

import gzip
from pathlib import Path

import numpy as np

ROOT = Path("/usr/share/datasets/fashion-mnist")


def load_test():
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the 10k test split."""
    with gzip.open(ROOT / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(ROOT / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def test_npz(path):
    """Write the test split as an .npz ImageSet (images, labels) once; return its path."""
    path = Path(path)
    if not path.exists():
        images, labels = load_test()
        np.savez(path, images=images, labels=labels)
    return path
