"""The content-addressed cache of prepared data: ``prepare_dataset`` writes it, ``load_prepared`` reads it.

A prepared folder ``cache_dir/<key16>/`` holds ``{train,val,test}_{x,y}.npy`` (uint8 [N,3,H,W] images, int64
labels) and ``manifest.json``, which records the parameters, the classes, the counts, the training split's
per-channel pixel mean/std (``normalization``, see :mod:`.stats`) and a sha256 for every array. The key is the
sha256 of the parameters (source content fingerprint, val_size, split_seed, subsets, ``FORMAT_VERSION``); a folder
appears atomically (a temporary folder is renamed) and a broken one is rebuilt.
Arrays are read with ``np.load(allow_pickle=False)``: never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...files import atomic_write_bytes, sha256_bytes, sha256_file, sha256_json
from ...cachedir import (
    check_int, clean_stale_tmp, manifest_bytes, publish, read_manifest_json, remove_tree, verify_listed_file,
)
from .collect import check_class_count, check_expected_classes
from .common import ARRAY_FILES, FORMAT_VERSION, MANIFEST_NAME, SPLITS, DataError
from .decode import DEFAULT_MAX_IMAGE_SIDE
from .sources import decode_source, detect_source, fingerprint, resolve_source
from .splits import make_splits
from .stats import channel_stats, stats_from_manifest

__all__ = ["PreparedData", "load_prepared", "prepare_dataset", "read_manifest"]

log = logging.getLogger("distill.image.data")


@dataclass(frozen=True)
class PreparedData:
    dir: Path
    manifest: dict
    manifest_sha256: str  # sha256 of manifest.json exactly as written (canonical JSON bytes)






# --------------------------------------------------------------------------------------------
# reading a prepared folder
# --------------------------------------------------------------------------------------------


def read_manifest(dir: str | Path) -> dict:
    return read_manifest_json(dir, what="prepared data folder", label="data", error=DataError)


def _verify_files(dir: Path, manifest: dict) -> None:
    for name in ARRAY_FILES:
        verify_listed_file(dir, manifest, name, error=DataError)


def _load_split(dir: Path, manifest: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(manifest.get("image_shape", ()))
    num_classes = len(manifest.get("classes", ()))
    arrays = []
    for kind in ("x", "y"):
        path = dir / f"{split}_{kind}.npy"
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except FileNotFoundError as e:
            raise DataError(f"{path} missing") from e
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"cannot load {path}: {e}") from e
    x, y = arrays
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise DataError(f"{dir / f'{split}_x.npy'} holds {x.dtype} {list(x.shape)}, expected "
                        f"uint8 [N, {', '.join(map(str, shape))}]")
    if y.dtype != np.int64 or y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{dir / f'{split}_y.npy'} holds {y.dtype} {list(y.shape)}, expected "
                        f"int64 [{len(x)}]")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{dir / f'{split}_y.npy'} has labels outside 0..{num_classes - 1}")
    expected_n = manifest.get("counts", {}).get(split, {}).get("total")
    if expected_n is not None and expected_n != len(y):
        raise DataError(f"{dir / f'{split}_y.npy'} has {len(y)} items, manifest says {expected_n}")
    return torch.from_numpy(x), torch.from_numpy(y)


def load_prepared(dir: str | Path, *, verify: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prepared folder -> {"train"|"val"|"test": (x uint8 [N,3,H,W], y int64 [N])} on the CPU."""
    dir = Path(dir)
    manifest = read_manifest(dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{dir / MANIFEST_NAME} has format_version {manifest.get('format_version')}, "
                        f"expected {FORMAT_VERSION}: prepare the data again")
    if verify:
        _verify_files(dir, manifest)
    return {split: _load_split(dir, manifest, split) for split in SPLITS}


# --------------------------------------------------------------------------------------------
# the cache folder
# --------------------------------------------------------------------------------------------


def _cache_params(fingerprint: str, val_size, split_seed, train_subset, test_subset) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source_sha256": fingerprint,
        "val_size": int(val_size),
        "split_seed": int(split_seed),
        "train_subset": None if train_subset is None else int(train_subset),
        "test_subset": None if test_subset is None else int(test_subset),
    }


def _try_cache_hit(final: Path, params: dict) -> PreparedData | None:
    """The cached folder if it exists, matches params and every file verifies; else None."""
    if not (final / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(final)
        for k, v in params.items():
            if manifest.get(k) != v:
                raise DataError(f"{final / MANIFEST_NAME}: {k}={manifest.get(k)!r}, expected {v!r}")
        stats_from_manifest(manifest, str(final / MANIFEST_NAME))
        _verify_files(final, manifest)
    except DataError as e:
        log.warning("ignoring broken data cache %s: %s", final, e)
        return None
    data = (final / MANIFEST_NAME).read_bytes()
    return PreparedData(final, json.loads(data), sha256_bytes(data))


def _write_npy(path: Path, arr: np.ndarray) -> dict:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}








def _write_folder(tmp: Path, out: dict, manifest_head: dict, classes: list[str]) -> bytes:
    """Write the arrays and manifest.json into ``tmp``; -> the manifest bytes."""
    files = {}
    for split in SPLITS:
        x, y = out[split]
        files[f"{split}_x.npy"] = _write_npy(tmp / f"{split}_x.npy", np.ascontiguousarray(x))
        files[f"{split}_y.npy"] = _write_npy(tmp / f"{split}_y.npy", np.ascontiguousarray(y))
    manifest = {
        **manifest_head,
        "classes": list(classes),
        "image_shape": [int(d) for d in out["train"][0].shape[1:]],
        "counts": {
            s: {"total": int(len(out[s][1])),
                "per_class": np.bincount(out[s][1], minlength=len(classes)).tolist()}
            for s in SPLITS
        },
        # what models trained on this folder normalise with: the training split's own pixel statistics
        "normalization": {"split": "train", **channel_stats(out["train"][0]).to_json()},
        "files": files,
    }
    data = manifest_bytes(manifest)
    atomic_write_bytes(tmp / MANIFEST_NAME, data)
    return data




def _check_prepared(manifest: dict, where: str, expected_classes, max_image_side: int) -> None:
    """The rules that hold whether the data were just decoded or came from the cache."""
    classes = list(manifest["classes"])
    check_expected_classes(classes, expected_classes, where)
    check_class_count(classes, where)
    _, h, w = manifest["image_shape"]
    if w > max_image_side or h > max_image_side:
        raise DataError(f"the images of {where} are {w}x{h} (WxH), larger than max_image_side="
                        f"{max_image_side} px per side")


# --------------------------------------------------------------------------------------------
# prepare_dataset
# --------------------------------------------------------------------------------------------


def prepare_dataset(
    source: str | None,
    cache_dir: str | Path,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    expected_classes: list[str] | None = None,
    progress: bool = True,
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
) -> PreparedData:
    """Decode ``source`` once into ``cache_dir/<key16>/`` (or reuse it) and return it.

    ``source``: see the :mod:`distill.image.data` docstring; ``None`` means :func:`resolve_source`.
    The cache key covers the source content, val_size, split_seed, the subsets and
    FORMAT_VERSION. A validation split of ``val_size`` images is drawn from the training split
    (seeded, stratified); ``train_subset``/``test_subset`` then subsample train and test
    (seeded, stratified). ``max_image_side`` (``None``: the default, 4096) refuses any image wider or
    taller than that many pixels, from its header, before its pixels are decoded; it only refuses input,
    so it is not part of the cache key. Raises :class:`DataError` on any bad input.
    """
    if max_image_side is None:
        max_image_side = DEFAULT_MAX_IMAGE_SIDE
    check_int("val_size", val_size, minimum=1, error=DataError)
    check_int("split_seed", split_seed, minimum=0, error=DataError)
    check_int("train_subset", train_subset, minimum=1, allow_none=True, error=DataError)
    check_int("test_subset", test_subset, minimum=1, allow_none=True, error=DataError)
    check_int("max_image_side", max_image_side, minimum=1, error=DataError)
    source = resolve_source(source)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    src = detect_source(source, cache_dir)
    src.fingerprint = fingerprint(src)
    params = _cache_params(src.fingerprint, val_size, split_seed, train_subset, test_subset)
    key = sha256_json(params)
    final = cache_dir / key[:16]

    hit = _try_cache_hit(final, params)
    if hit is not None:
        _check_prepared(hit.manifest, src.display, expected_classes, max_image_side)
        log.info("data cache hit: %s", final)
        return hit

    clean_stale_tmp(cache_dir, key[:16])
    classes, arrays = decode_source(src, progress, max_image_side)
    check_expected_classes(classes, expected_classes, src.display)
    check_class_count(classes, src.display)
    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
    idx = make_splits(y_tr, y_te, len(classes), val_size=val_size, split_seed=split_seed,
                      train_subset=train_subset, test_subset=test_subset, where=src.display)
    out = {
        "train": (x_tr[idx["train"]], y_tr[idx["train"]]),
        "val": (x_tr[idx["val"]], y_tr[idx["val"]]),
        "test": (x_te[idx["test"]], y_te[idx["test"]]),
    }
    del arrays, x_tr, x_te

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_dir))
    try:
        head = {**params, "source": src.display, "cache_key": key}
        data = _write_folder(tmp, out, head, classes)
        theirs = publish(tmp, final, lambda: _try_cache_hit(final, params))
    except BaseException:
        remove_tree(tmp)
        raise
    if theirs is not None:
        return theirs
    log.info("prepared %s -> %s", src.display, final)
    return PreparedData(final, json.loads(data), sha256_bytes(data))
