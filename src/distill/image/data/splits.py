"""Seeded, stratified splitting: the validation split drawn from train, and the train/test subsets.

Part of the cache key through ``FORMAT_VERSION``: change the algorithm only together with a version bump.
"""

from __future__ import annotations

import numpy as np

from .common import DataError

__all__ = ["make_splits"]


def _allocate(counts: np.ndarray, k: int, lo: np.ndarray, hi: np.ndarray, what: str) -> np.ndarray:
    """Split k over classes proportionally to counts (largest remainder), lo <= a <= hi."""
    if lo.sum() > k or hi.sum() < k:
        raise DataError(f"cannot draw a stratified {what} of {k} images from per-class counts "
                        f"{counts.tolist()}")
    ideal = k * counts / counts.sum()
    a = np.clip(np.floor(ideal).astype(np.int64), lo, hi)
    while a.sum() < k:
        rem = np.where(a < hi, ideal - a, -np.inf)
        a[int(np.argmax(rem))] += 1  # argmax takes the first (lowest class index) on ties
    while a.sum() > k:
        rem = np.where(a > lo, ideal - a, np.inf)
        a[int(np.argmin(rem))] -= 1
    return a


def _stratified_split(
    y: np.ndarray, num_classes: int, k: int, rng: np.random.Generator, lo_each: int, keep_each: int,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw k indices stratified by class -> (chosen, rest), both sorted."""
    counts = np.bincount(y, minlength=num_classes)
    lo = np.minimum(np.full(num_classes, lo_each), np.maximum(counts - keep_each, 0))
    hi = np.maximum(counts - keep_each, 0)
    alloc = _allocate(counts, k, lo, hi, what)
    chosen, rest = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        perm = rng.permutation(idx)
        chosen.append(perm[: alloc[c]])
        rest.append(perm[alloc[c]:])
    return np.sort(np.concatenate(chosen)), np.sort(np.concatenate(rest))


def _check_subset(name: str, value: int, available: int, num_classes: int, what: str) -> None:
    if value > available:
        raise DataError(f"{name}={value} exceeds the {available} {what}")
    if value < num_classes:
        raise DataError(f"{name}={value} is smaller than the {num_classes} classes")


def make_splits(
    y_train: np.ndarray, y_test: np.ndarray, num_classes: int, *, val_size: int, split_seed: int,
    train_subset: int | None, test_subset: int | None, where: str,
) -> dict[str, np.ndarray]:
    """-> {"train"|"val": indices into the training split, "test": indices into the test split}."""
    n_train, n_test = len(y_train), len(y_test)
    if val_size < num_classes:
        raise DataError(f"val_size={val_size} is smaller than the {num_classes} classes of {where}: "
                        f"the validation split needs at least one image per class")
    if val_size >= n_train:
        raise DataError(f"val_size={val_size} must be smaller than the {n_train} training images "
                        f"of {where}")
    # Independent seeded streams, so the validation split does not depend on the subset options.
    rng_val = np.random.default_rng([split_seed, 0])
    rng_sub = np.random.default_rng([split_seed, 1])
    rng_test = np.random.default_rng([split_seed, 2])
    # Every class keeps at least one training image.
    val_idx, train_idx = _stratified_split(y_train, num_classes, val_size, rng_val, 1, 1, "validation split")
    if train_subset is not None:
        _check_subset("train_subset", train_subset, len(train_idx), num_classes,
                      f"training images left in {where} after the {val_size}-image validation split")
        sub, _ = _stratified_split(y_train[train_idx], num_classes, train_subset, rng_sub, 1, 0,
                                   "train subset")
        train_idx = train_idx[sub]
    test_idx = np.arange(n_test)
    if test_subset is not None:
        _check_subset("test_subset", test_subset, n_test, num_classes, f"test images of {where}")
        test_idx, _ = _stratified_split(y_test, num_classes, test_subset, rng_test, 1, 0, "test subset")
    return {"train": train_idx, "val": val_idx, "test": test_idx}
