"""Sources (d) and (e): a torchvision CIFAR-10 python folder, or torchvision's own download of it.

torchvision checks every batch file against the official md5 before it unpickles it, so only the genuine
CIFAR-10 pickles are ever loaded (the source fingerprint adds a sha256 on top).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import ENV_SOURCE, DataError

__all__ = ["BATCH_DIR", "BATCH_FILES", "CIFAR10_CLASSES", "load_cifar_python", "torchvision_download"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
BATCH_DIR = "cifar-10-batches-py"
BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def torchvision_download(root: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10

        # download=True is a no-op when the archive is already there and its md5 checks out.
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:
        raise DataError(
            f"could not download CIFAR-10 with torchvision into {root}: {type(e).__name__}: {e}. "
            f"Without network access set {ENV_SOURCE} (or pass a source) to a local copy: an "
            f"ImageFolder folder, a folder with train.tar.gz/test.tar.gz, a tarball or a "
            f"{BATCH_DIR} folder"
        ) from e


def load_cifar_python(root: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """torchvision CIFAR10(root, download=False) -> (sorted classes, {split: (x NCHW uint8, y)})."""
    from torchvision.datasets import CIFAR10

    loaded = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR10(str(root), train=(split == "train"), download=False)
        except Exception as e:
            raise DataError(
                f"cannot load CIFAR-10 from {root / BATCH_DIR} ({split}): {type(e).__name__}: {e}"
            ) from e
        x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        y = np.asarray(ds.targets, dtype=np.int64)
        loaded[split] = (list(ds.classes), x, y)
    classes_tr, classes_te = loaded["train"][0], loaded["test"][0]
    if classes_tr != classes_te:
        raise DataError(f"train and test classes differ in {root / BATCH_DIR}")
    classes = sorted(classes_tr)
    remap = np.array([classes.index(c) for c in classes_tr], dtype=np.int64)
    return classes, {s: (loaded[s][1], remap[loaded[s][2]]) for s in ("train", "test")}
