"""Gathering decoded images into the train and test splits, and the class rules every source format obeys.

One rule set for folders, tarball pairs and single tarballs alike:

* a class is a (non-hidden) folder ``<split>/<class>/`` -- in a tarball, any member at or below that path,
  directory entries included -- and every class must hold at least one image in every split;
* train and test must have the same classes (a mismatch is refused naming the classes missing on each side);
* there must be at least two classes (:func:`check_class_count`, also applied to CIFAR and cache hits);
* all images have the same size.
"""

from __future__ import annotations

import numpy as np

from .common import DataError

__all__ = ["SplitCollector", "check_class_count", "check_expected_classes", "finish_splits"]


class SplitCollector:
    """Collects decoded images of one split, grouped by class folder."""

    def __init__(self, split: str, origin: str):
        self.split = split
        self.origin = origin  # the folder or archive the split comes from, for messages
        self.items: list[tuple[str, str, np.ndarray]] = []  # (class, member name, CHW image)
        self.classes: set[str] = set()  # class folders seen, including empty ones
        self.shape: tuple[int, int] | None = None
        self.shape_from: str | None = None

    def add_class(self, cls: str) -> None:
        self.classes.add(cls)

    def add(self, cls: str, name: str, img: np.ndarray) -> None:
        hw = (int(img.shape[1]), int(img.shape[2]))
        if self.shape is None:
            self.shape, self.shape_from = hw, name
        elif hw != self.shape:
            raise DataError(
                f"image {name} is {hw[1]}x{hw[0]} (WxH) but {self.shape_from} is "
                f"{self.shape[1]}x{self.shape[0]}: all images must have the same size"
            )
        self.classes.add(cls)
        self.items.append((cls, name, img))

    def finish(self) -> tuple[list[str], np.ndarray, list[str]]:
        """-> (class names, images [N,3,H,W] ordered by (class, name), class of each image)."""
        if not self.items:
            raise DataError(f"no images found for split '{self.split}' in {self.origin}")
        counts: dict[str, int] = {c: 0 for c in self.classes}
        for cls, _, _ in self.items:
            counts[cls] += 1
        empty = sorted(c for c, n in counts.items() if n == 0)
        if empty:
            raise DataError(
                f"class folder {self.split}/{empty[0]} in {self.origin} holds no images (empty classes: "
                f"{', '.join(empty)}): every class needs at least one image in train and in test"
            )
        self.items.sort(key=lambda t: (t[0], t[1]))
        x = np.stack([t[2] for t in self.items])
        cls_of = [t[0] for t in self.items]
        self.items = []
        return sorted(counts), x, cls_of


def _check_same_classes(collectors: dict[str, SplitCollector]) -> None:
    train, test = collectors["train"], collectors["test"]
    missing = {"train": sorted(test.classes - train.classes), "test": sorted(train.classes - test.classes)}
    if not missing["train"] and not missing["test"]:
        return
    first = "test" if missing["test"] else "train"
    details = "; ".join(f"missing in {s} ({collectors[s].origin}): {', '.join(missing[s])}"
                        for s in ("test", "train") if missing[s])
    raise DataError(
        f"{first}/{missing[first][0]} missing in {collectors[first].origin}: train and test must have the "
        f"same class folders ({details})"
    )


def finish_splits(collectors: dict[str, SplitCollector]) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Apply the class rules to the train and test collectors -> (class names, {split: (x, y)})."""
    _check_same_classes(collectors)
    shapes = {s: collectors[s].shape for s in ("train", "test")}
    arrays = {}
    classes: list[str] = []
    for s in ("train", "test"):
        classes, x, cls_of = collectors[s].finish()
        index = {c: i for i, c in enumerate(classes)}
        arrays[s] = (x, np.fromiter((index[c] for c in cls_of), dtype=np.int64, count=len(cls_of)))
    if shapes["train"] != shapes["test"]:
        raise DataError(
            f"train images in {collectors['train'].origin} are {shapes['train']} (HxW) but test images in "
            f"{collectors['test'].origin} are {shapes['test']}: all images must have the same size"
        )
    return classes, arrays


def check_class_count(classes: list[str], where: str) -> None:
    """Refuse a data set with fewer than two classes (a classifier trained on it is meaningless)."""
    if len(classes) < 2:
        found = f"only class {classes[0]!r}" if classes else "no class"
        raise DataError(f"{where} has {found}: a classification data set needs at least 2 classes")


def check_expected_classes(classes: list[str], expected: list[str] | None, where: str) -> None:
    if expected is None:
        return
    missing = sorted(set(expected) - set(classes))
    extra = sorted(set(classes) - set(expected))
    if missing or extra or len(set(expected)) != len(expected):
        parts = []
        if missing:
            parts.append(f"missing classes {missing}")
        if extra:
            parts.append(f"unexpected classes {extra}")
        if not parts:
            parts.append(f"expected_classes has duplicates: {list(expected)}")
        raise DataError(f"{where}: {'; '.join(parts)}")
