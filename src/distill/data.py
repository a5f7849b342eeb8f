"""Dataset preparation and batch augmentation.

Sources (see :func:`prepare_dataset`) are decoded once into a content-addressed cache of
uint8 ``.npy`` arrays plus a ``manifest.json`` that records a sha256 for every file.
Training and evaluation then read the cache with :func:`load_prepared` (never pickle) and
augment whole batches on whatever device they live on with :class:`Augment`.

Supported sources:

(a) a folder in ImageFolder layout: ``train/<class>/*.jpg|png|...`` and ``test/<class>/*``;
(b) a folder holding ``train.tar.gz`` and ``test.tar.gz`` (also ``.tgz``/``.tar``/``.tar.bz2``/
    ``.tar.xz``) with members ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``;
(c) a single tarball (``.tar``, ``.tar.gz``, ``.tgz``, ...) that holds ``train/`` and ``test/``
    (optionally under one top-level folder);
(d) a torchvision CIFAR-10 folder (``cifar-10-batches-py`` itself or a folder that contains it);
(e) the string ``"torchvision"``: torchvision downloads CIFAR-10 into ``cache_dir/torchvision``
    (needs network access).

Tarballs are read as a stream and never extracted to disk. If a ``SHA256SUMS`` file in the
source folder or its parent lists a source file, the file is checked against it before it is
decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FORMAT_VERSION",
    "SPLITS",
    "Augment",
    "DataError",
    "PreparedData",
    "iterate_batches",
    "load_prepared",
    "normalize",
    "prepare_dataset",
    "read_manifest",
    "resolve_source",
]

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: Bump whenever the cache layout or the split algorithm changes: it is part of the cache key.
FORMAT_VERSION = 1

ENV_SOURCE = "DISTILL_CIFAR10"
TORCHVISION_SOURCE = "torchvision"
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
SUMS_NAME = "SHA256SUMS"
ARRAY_FILES = tuple(f"{s}_{k}.npy" for s in SPLITS for k in ("x", "y"))

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_CIFAR_BATCH_DIR = "cifar-10-batches-py"
_CIFAR_BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class DataError(ValueError):
    """Bad input data: a missing, corrupt or inconsistent file. The message names the file."""


@dataclass(frozen=True)
class PreparedData:
    dir: Path
    manifest: dict
    manifest_sha256: str  # sha256 of manifest.json exactly as written (canonical JSON bytes)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def resolve_source(source: str | os.PathLike | None) -> str:
    """``None`` (or "") -> ``$DISTILL_CIFAR10`` if set and non-empty, else ``"torchvision"``."""
    if source is None or str(source) == "":
        env = os.environ.get(ENV_SOURCE, "").strip()
        return env if env else TORCHVISION_SOURCE
    return os.fspath(source)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _manifest_bytes(manifest: dict) -> bytes:
    """Canonical JSON encoding of the manifest (what manifest.json holds, byte for byte)."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def _is_hidden(parts) -> bool:
    return any(p.startswith(".") for p in parts)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tarball_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _check_int(name: str, value, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# SHA256SUMS
# --------------------------------------------------------------------------------------------

_SUMS_GNU = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_SUMS_BSD = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")


def _read_sums(folder: Path) -> dict[Path, tuple[str, Path]]:
    """{resolved path: (sha256, the SHA256SUMS file)} from ``folder/SHA256SUMS`` if present."""
    sums_file = folder / SUMS_NAME
    if not sums_file.is_file():
        return {}
    out: dict[Path, tuple[str, Path]] = {}
    try:
        text = sums_file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {sums_file}: {e}") from e
    for line in text.splitlines():
        line = line.rstrip("\r")
        m = _SUMS_GNU.match(line)
        if m:
            digest, rel = m.group(1), m.group(2)
        else:
            m = _SUMS_BSD.match(line)
            if not m:
                continue  # blank lines, comments; sha256sum -c also skips what it cannot parse
            rel, digest = m.group(1), m.group(2)
        out[(folder / rel).resolve()] = (digest.lower(), sums_file)
    return out


class _Sums:
    """Checksums listed in SHA256SUMS files of the source folder and its parent."""

    def __init__(self, source_folder: Path):
        self.entries: list[dict[Path, tuple[str, Path]]] = []
        folder = source_folder.resolve()
        for f in (folder, folder.parent):
            entries = _read_sums(f)
            if entries:
                self.entries.append(entries)

    def check(self, path: Path, digest: str) -> None:
        resolved = path.resolve()
        for entries in self.entries:
            hit = entries.get(resolved)
            if hit is not None and hit[0] != digest:
                raise DataError(
                    f"checksum mismatch for {path}: sha256 {digest} but {hit[1]} lists {hit[0]} "
                    f"(corrupt or modified file)"
                )


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


class _Progress:
    """tqdm bar on an interactive stderr, otherwise a log line every ~10 %."""

    def __init__(self, total: int, desc: str, unit: str, progress: bool):
        self.total = max(int(total), 1)
        self.desc = desc
        self.done = 0
        self.images = 0
        self.next_pct = 10
        self.t0 = time.perf_counter()
        self.bar = None
        if progress and getattr(sys.stderr, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=True, leave=False)
            except Exception:  # pragma: no cover - tqdm missing or broken terminal
                self.bar = None

    def update_to(self, done: int, images: int) -> None:
        done = min(int(done), self.total)
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(images=images, refresh=False)
        else:
            pct = 100 * done // self.total
            if pct >= self.next_pct:
                log.info("%s: %d%% (%d images, %.1fs)", self.desc, pct, images,
                         time.perf_counter() - self.t0)
                self.next_pct = (pct // 10 + 1) * 10
        self.done = done
        self.images = images

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode one image file to a uint8 array [3, H, W]. ``name`` is used in error messages."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    return arr.transpose(2, 0, 1)


class _SplitCollector:
    """Collects decoded images of one split, grouped by class folder."""

    def __init__(self, split: str, origin: str):
        self.split = split
        self.origin = origin  # the folder or archive the split comes from, for messages
        self.items: list[tuple[str, str, np.ndarray]] = []  # (class, member name, CHW image)
        self.classes: set[str] = set()  # class folders seen, including empty ones
        self.shape: tuple[int, int] | None = None
        self.shape_from: str | None = None

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
                f"class folder {self.split}/{empty[0]} in {self.origin} holds no images"
            )
        self.items.sort(key=lambda t: (t[0], t[1]))
        x = np.stack([t[2] for t in self.items])
        cls_of = [t[0] for t in self.items]
        self.items = []
        return sorted(counts), x, cls_of


def _member_parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _member_prefix(parts: list[str]) -> str | None:
    """"" for ``train/<class>/...``, "top" for ``top/train/<class>/...``, None otherwise."""
    if len(parts) >= 2 and parts[0] in ("train", "test"):
        return ""
    if len(parts) >= 3 and parts[1] in ("train", "test"):
        return parts[0]
    return None


def _decode_tarball(
    path: Path, collectors: dict[str, _SplitCollector], progress: _Progress, done_before: int
) -> int:
    """Stream ``path`` and decode its image members into the collectors of the splits it holds.

    Returns the number of compressed bytes read (for the progress of the next archive).
    """
    size = path.stat().st_size
    images = progress.images
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
            # Members are train/<class>/... or, for a tarball made from a folder, top/train/<class>/...
            # The first member that matches either form fixes the prefix for the whole archive.
            prefix: str | None = None
            for member in tf:
                parts = _member_parts(member.name)
                if prefix is None:
                    prefix = _member_prefix(parts)
                    if prefix is None:
                        continue
                if prefix:
                    if not parts or parts[0] != prefix:
                        continue
                    parts = parts[1:]
                if len(parts) < 2 or parts[0] not in collectors or _is_hidden(parts):
                    continue
                split, cls = parts[0], parts[1]
                if member.isdir() or len(parts) == 2:
                    if member.isdir():
                        collectors[split].classes.add(cls)
                    continue
                if not member.isfile() or not _is_image_name(parts[-1]):
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                img = _decode_image(data, f"{member.name} in {path}")
                collectors[split].add(cls, member.name, img)
                images += 1
                if images % 256 == 0:
                    progress.update_to(done_before + raw.tell(), images)
    except _ARCHIVE_ERRORS as e:
        raise DataError(
            f"cannot read archive {path}: {type(e).__name__}: {e} (truncated or corrupt?)"
        ) from e
    progress.update_to(done_before + size, images)
    return size


def _decode_folder(
    root: Path, files: list[tuple[str, str, str, Path]], collectors: dict[str, _SplitCollector],
    progress: _Progress,
) -> None:
    for i, (split, cls, rel, path) in enumerate(files, 1):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from e
        collectors[split].add(cls, rel, _decode_image(data, str(path)))
        if i % 256 == 0:
            progress.update_to(i, i)
    progress.update_to(len(files), len(files))


def _scan_imagefolder(root: Path) -> tuple[list[tuple[str, str, str, Path]], dict[str, set[str]]]:
    """Image files under root/{train,test}/<class>/** -> [(split, class, relpath, path)], classes."""
    files: list[tuple[str, str, str, Path]] = []
    classes: dict[str, set[str]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        classes[split] = set()
        for cls_dir in sorted(split_dir.iterdir()):
            if cls_dir.name.startswith(".") or not cls_dir.is_dir():
                continue
            classes[split].add(cls_dir.name)
            for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if fn.startswith(".") or not _is_image_name(fn):
                        continue
                    p = Path(dirpath) / fn
                    files.append((split, cls_dir.name, p.relative_to(root).as_posix(), p))
    return files, classes


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    kind: str  # "imagefolder" | "tarballs" | "tarball" | "cifar-python" | "torchvision"
    display: str
    path: Path | None  # folder or tarball
    fingerprint: str = ""
    # kind-specific
    tarballs: dict[str, Path] | None = None  # "tarballs": split -> archive
    files: list | None = None  # "imagefolder": scanned files
    classes: dict[str, set[str]] | None = None  # "imagefolder": class folders per split
    cifar_root: Path | None = None  # "cifar-python"/"torchvision": root holding cifar-10-batches-py


def _find_split_tarball(folder: Path, split: str) -> Path | None:
    for suffix in TAR_SUFFIXES:
        p = folder / f"{split}{suffix}"
        if p.is_file():
            return p
    return None


def _detect_source(source: str, cache_dir: Path) -> _Source:
    if source == TORCHVISION_SOURCE:
        return _Source("torchvision", "torchvision:CIFAR10", None,
                       cifar_root=cache_dir / "torchvision")
    path = Path(source).expanduser()
    display = os.path.abspath(path)
    if not path.exists():
        raise DataError(
            f"data source {source} does not exist (expected an ImageFolder folder, a folder with "
            f"train.tar.gz/test.tar.gz, a tarball, a CIFAR-10 python folder or 'torchvision')"
        )
    if path.is_file():
        if not _is_tarball_name(path.name):
            raise DataError(f"data source {path} is a file but not a tarball ({', '.join(TAR_SUFFIXES)})")
        return _Source("tarball", display, path)
    # A folder.
    if path.name == _CIFAR_BATCH_DIR and (path / "batches.meta").exists():
        return _Source("cifar-python", display, path, cifar_root=path.parent)
    if (path / _CIFAR_BATCH_DIR).is_dir():
        return _Source("cifar-python", display, path, cifar_root=path)
    train_tar, test_tar = _find_split_tarball(path, "train"), _find_split_tarball(path, "test")
    if train_tar is not None or test_tar is not None:
        if train_tar is None or test_tar is None:
            missing = "train" if train_tar is None else "test"
            raise DataError(f"{path} has a {'test' if missing == 'train' else 'train'} tarball "
                            f"but no {missing}.tar.gz")
        return _Source("tarballs", display, path, tarballs={"train": train_tar, "test": test_tar})
    has_train, has_test = (path / "train").is_dir(), (path / "test").is_dir()
    if has_train or has_test:
        if not (has_train and has_test):
            raise DataError(f"{path / ('test' if has_train else 'train')} missing: an ImageFolder "
                            f"source needs both train/<class>/ and test/<class>/ folders")
        return _Source("imagefolder", display, path)
    if (path / "batches.meta").exists() and (path / "data_batch_1").exists():
        raise DataError(
            f"{path} looks like CIFAR-10 python batches but torchvision needs the folder to be "
            f"named {_CIFAR_BATCH_DIR}; rename it or pass its parent"
        )
    raise DataError(
        f"data source {path} has neither train/ and test/ folders, nor train.tar.gz and "
        f"test.tar.gz, nor a {_CIFAR_BATCH_DIR} folder"
    )


def _fingerprint(src: _Source) -> str:
    """sha256 of the source content; verifies SHA256SUMS entries on the way."""
    if src.kind == "torchvision":
        _torchvision_download(src.cifar_root)
    if src.kind == "tarball":
        sums = _Sums(src.path.parent)
        digest = _sha256_file(src.path)
        sums.check(src.path, digest)
        return digest
    if src.kind == "tarballs":
        sums = _Sums(src.path)
        listing = []
        for split in ("train", "test"):
            p = src.tarballs[split]
            digest = _sha256_file(p)
            sums.check(p, digest)
            listing.append([p.name, digest])
        return _sha256_json(sorted(listing))
    if src.kind == "imagefolder":
        sums = _Sums(src.path)
        files, classes = _scan_imagefolder(src.path)
        src.files, src.classes = files, classes
        listing = []
        for _, _, rel, p in files:
            digest = _sha256_file(p)
            sums.check(p, digest)
            listing.append([rel, digest])
        return _sha256_json(sorted(listing))
    if src.kind in ("cifar-python", "torchvision"):
        batch_dir = src.cifar_root / _CIFAR_BATCH_DIR
        sums = _Sums(src.path if src.path is not None else batch_dir)
        listing = []
        for name in _CIFAR_BATCH_FILES:
            p = batch_dir / name
            if not p.is_file():
                raise DataError(f"{p} missing: not a complete CIFAR-10 python folder")
            digest = _sha256_file(p)
            sums.check(p, digest)
            listing.append([name, digest])
        return _sha256_json(sorted(listing))
    raise AssertionError(src.kind)


def _torchvision_download(root: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10

        # download=True is a no-op when the archive is already there and its md5 checks out.
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:
        raise DataError(
            f"could not download CIFAR-10 with torchvision into {root}: {type(e).__name__}: {e}. "
            f"Without network access set {ENV_SOURCE} (or pass a source) to a local copy: an "
            f"ImageFolder folder, a folder with train.tar.gz/test.tar.gz, a tarball or a "
            f"{_CIFAR_BATCH_DIR} folder"
        ) from e


def _load_cifar_python(root: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """torchvision CIFAR10(root, download=False) -> {split: (classes, x NCHW uint8, y)}."""
    from torchvision.datasets import CIFAR10

    out = {}
    for split in ("train", "test"):
        try:
            # torchvision checks every batch file against the official md5 before it unpickles
            # it, so only the genuine CIFAR-10 pickles are ever loaded (we add a sha256 on top).
            ds = CIFAR10(str(root), train=(split == "train"), download=False)
        except Exception as e:
            raise DataError(
                f"cannot load CIFAR-10 from {root / _CIFAR_BATCH_DIR} ({split}): "
                f"{type(e).__name__}: {e}"
            ) from e
        x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
        y = np.asarray(ds.targets, dtype=np.int64)
        out[split] = (list(ds.classes), x, y)
    return out


def _decode_source(src: _Source, progress: bool) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Decode a source -> (sorted class names, {"train": (x, y), "test": (x, y)})."""
    t0 = time.perf_counter()
    if src.kind in ("cifar-python", "torchvision"):
        loaded = _load_cifar_python(src.cifar_root)
        classes_tr, classes_te = loaded["train"][0], loaded["test"][0]
        if classes_tr != classes_te:
            raise DataError(f"train and test classes differ in {src.cifar_root / _CIFAR_BATCH_DIR}")
        classes = sorted(classes_tr)
        remap = np.array([classes.index(c) for c in classes_tr], dtype=np.int64)
        arrays = {s: (loaded[s][1], remap[loaded[s][2]]) for s in ("train", "test")}
        log.info("loaded %s in %.1fs", src.display, time.perf_counter() - t0)
        return classes, arrays

    if src.kind == "imagefolder":
        origin = {s: str(src.path / s) for s in ("train", "test")}
    elif src.kind == "tarballs":
        origin = {s: str(src.tarballs[s]) for s in ("train", "test")}
    else:
        origin = {s: str(src.path) for s in ("train", "test")}
    collectors = {s: _SplitCollector(s, origin[s]) for s in ("train", "test")}

    if src.kind == "imagefolder":
        if src.files is None:
            src.files, src.classes = _scan_imagefolder(src.path)
        for s in ("train", "test"):
            collectors[s].classes |= src.classes[s]
        bar = _Progress(len(src.files), f"decode {src.display}", "img", progress)
        try:
            _decode_folder(src.path, src.files, collectors, bar)
        finally:
            bar.close()
    elif src.kind == "tarballs":
        total = sum(p.stat().st_size for p in src.tarballs.values())
        bar = _Progress(total, f"decode {src.display}", "B", progress)
        try:
            done = 0
            for s in ("train", "test"):
                done += _decode_tarball(src.tarballs[s], {s: collectors[s]}, bar, done)
        finally:
            bar.close()
    else:  # single tarball
        bar = _Progress(src.path.stat().st_size, f"decode {src.display}", "B", progress)
        try:
            _decode_tarball(src.path, collectors, bar, 0)
        finally:
            bar.close()

    # Train and test must have the same class folders.
    names = {s: collectors[s].classes for s in ("train", "test")}
    for s, other in (("train", "test"), ("test", "train")):
        missing = sorted(names[other] - names[s])
        if missing:
            raise DataError(
                f"{s}/{missing[0]} missing in {origin[s]}: train and test must have the same "
                f"class folders (missing in {s}: {', '.join(missing)})"
            )
    shapes = {s: collectors[s].shape for s in ("train", "test")}
    arrays = {}
    classes: list[str] = []
    for s in ("train", "test"):
        classes, x, cls_of = collectors[s].finish()
        index = {c: i for i, c in enumerate(classes)}
        arrays[s] = (x, np.fromiter((index[c] for c in cls_of), dtype=np.int64, count=len(cls_of)))
    if shapes["train"] != shapes["test"]:
        raise DataError(
            f"train images in {origin['train']} are {shapes['train']} (HxW) but test images in "
            f"{origin['test']} are {shapes['test']}: all images must have the same size"
        )
    n = sum(len(a[1]) for a in arrays.values())
    log.info("decoded %d images from %s in %.1fs", n, src.display, time.perf_counter() - t0)
    return classes, arrays


# --------------------------------------------------------------------------------------------
# stratified splitting
# --------------------------------------------------------------------------------------------


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


def _make_splits(
    y_train: np.ndarray, y_test: np.ndarray, num_classes: int, *, val_size: int, split_seed: int,
    train_subset: int | None, test_subset: int | None, where: str,
) -> dict[str, np.ndarray]:
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
        if train_subset > len(train_idx):
            raise DataError(f"train_subset={train_subset} exceeds the {len(train_idx)} training images "
                            f"left in {where} after the {val_size}-image validation split")
        if train_subset < num_classes:
            raise DataError(f"train_subset={train_subset} is smaller than the {num_classes} classes")
        sub, _ = _stratified_split(y_train[train_idx], num_classes, train_subset, rng_sub, 1, 0,
                                   "train subset")
        train_idx = train_idx[sub]
    test_idx = np.arange(n_test)
    if test_subset is not None:
        if test_subset > n_test:
            raise DataError(f"test_subset={test_subset} exceeds the {n_test} test images of {where}")
        if test_subset < num_classes:
            raise DataError(f"test_subset={test_subset} is smaller than the {num_classes} classes")
        test_idx, _ = _stratified_split(y_test, num_classes, test_subset, rng_test, 1, 0, "test subset")
    return {"train": train_idx, "val": val_idx, "test": test_idx}


# --------------------------------------------------------------------------------------------
# cache
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


def read_manifest(dir: str | Path) -> dict:
    path = Path(dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path} missing: not a prepared data folder") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{path} is not a distill data manifest")
    return manifest


def _verify_files(dir: Path, manifest: dict) -> None:
    files = manifest["files"]
    missing = [f for f in ARRAY_FILES if f not in files]
    if missing:
        raise DataError(f"{dir / MANIFEST_NAME} does not list {missing[0]}")
    for name in ARRAY_FILES:
        path = dir / name
        entry = files[name]
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise DataError(f"{path} missing") from e
        if size != entry.get("bytes"):
            raise DataError(f"size mismatch for {path}: {size} bytes, manifest says {entry.get('bytes')}")
        digest = _sha256_file(path)
        if digest != entry.get("sha256"):
            raise DataError(f"checksum mismatch for {path}: sha256 {digest}, manifest says "
                            f"{entry.get('sha256')} (corrupt or modified file)")


def load_prepared(dir: str | Path, *, verify: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prepared folder -> {"train"|"val"|"test": (x uint8 [N,3,H,W], y int64 [N])} on the CPU."""
    dir = Path(dir)
    manifest = read_manifest(dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{dir / MANIFEST_NAME} has format_version {manifest.get('format_version')}, "
                        f"expected {FORMAT_VERSION}: prepare the data again")
    if verify:
        _verify_files(dir, manifest)
    shape = tuple(manifest.get("image_shape", ()))
    num_classes = len(manifest.get("classes", ()))
    out = {}
    for split in SPLITS:
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
        out[split] = (torch.from_numpy(x), torch.from_numpy(y))
    return out


def _try_cache_hit(final: Path, params: dict) -> PreparedData | None:
    """The cached folder if it exists, matches params and every file verifies; else None."""
    if not (final / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(final)
        for k, v in params.items():
            if manifest.get(k) != v:
                raise DataError(f"{final / MANIFEST_NAME}: {k}={manifest.get(k)!r}, expected {v!r}")
        _verify_files(final, manifest)
    except DataError as e:
        log.warning("ignoring broken data cache %s: %s", final, e)
        return None
    data = (final / MANIFEST_NAME).read_bytes()
    return PreparedData(final, json.loads(data), hashlib.sha256(data).hexdigest())


def _check_classes(classes: list[str], expected: list[str] | None, where: str) -> None:
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


def _write_npy(path: Path, arr: np.ndarray) -> dict:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _sha256_file(path), "bytes": path.stat().st_size}


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _discard_broken(final: Path) -> None:
    """Move a broken cache folder out of the way (atomically), then delete it."""
    if not final.exists():
        return
    aside = final.with_name(f".broken-{final.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(final, aside)
    except OSError:
        return  # someone else moved or replaced it
    _remove_tree(aside)


def _clean_stale_tmp(cache_dir: Path, key16: str, max_age_s: float = 24 * 3600) -> None:
    now = time.time()
    for p in cache_dir.glob(f".tmp-{key16}-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                _remove_tree(p)
        except OSError:
            pass


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
) -> PreparedData:
    """Decode ``source`` once into ``cache_dir/<key16>/`` (or reuse it) and return it.

    ``source``: see the module docstring; ``None`` means :func:`resolve_source`.
    The cache key covers the source content, val_size, split_seed, the subsets and
    FORMAT_VERSION. A validation split of ``val_size`` images is drawn from the training split
    (seeded, stratified); ``train_subset``/``test_subset`` then subsample train and test
    (seeded, stratified). Raises :class:`DataError` on any bad input.
    """
    _check_int("val_size", val_size, minimum=1)
    _check_int("split_seed", split_seed, minimum=0)
    _check_int("train_subset", train_subset, minimum=1, allow_none=True)
    _check_int("test_subset", test_subset, minimum=1, allow_none=True)
    source = resolve_source(source)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    src = _detect_source(source, cache_dir)
    src.fingerprint = _fingerprint(src)
    params = _cache_params(src.fingerprint, val_size, split_seed, train_subset, test_subset)
    key = _sha256_json(params)
    final = cache_dir / key[:16]

    hit = _try_cache_hit(final, params)
    if hit is not None:
        _check_classes(hit.manifest["classes"], expected_classes, src.display)
        log.info("data cache hit: %s", final)
        return hit

    _clean_stale_tmp(cache_dir, key[:16])
    classes, arrays = _decode_source(src, progress)
    _check_classes(classes, expected_classes, src.display)
    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
    idx = _make_splits(y_tr, y_te, len(classes), val_size=val_size, split_seed=split_seed,
                       train_subset=train_subset, test_subset=test_subset, where=src.display)
    out = {
        "train": (x_tr[idx["train"]], y_tr[idx["train"]]),
        "val": (x_tr[idx["val"]], y_tr[idx["val"]]),
        "test": (x_te[idx["test"]], y_te[idx["test"]]),
    }
    del arrays, x_tr, x_te

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_dir))
    try:
        files = {}
        for split in SPLITS:
            x, y = out[split]
            files[f"{split}_x.npy"] = _write_npy(tmp / f"{split}_x.npy", np.ascontiguousarray(x))
            files[f"{split}_y.npy"] = _write_npy(tmp / f"{split}_y.npy", np.ascontiguousarray(y))
        manifest = {
            **params,
            "source": src.display,
            "cache_key": key,
            "classes": list(classes),
            "image_shape": [int(d) for d in out["train"][0].shape[1:]],
            "counts": {
                s: {"total": int(len(out[s][1])),
                    "per_class": np.bincount(out[s][1], minlength=len(classes)).tolist()}
                for s in SPLITS
            },
            "files": files,
        }
        data = _manifest_bytes(manifest)
        with open(tmp / MANIFEST_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for attempt in range(2):
            try:
                os.rename(tmp, final)
                break
            except OSError:
                # Another process finished first: use its result if it verifies.
                theirs = _try_cache_hit(final, params)
                if theirs is not None:
                    _remove_tree(tmp)
                    return theirs
                if attempt:
                    raise
                _discard_broken(final)
    except BaseException:
        _remove_tree(tmp)
        raise
    log.info("prepared %s -> %s", src.display, final)
    return PreparedData(final, json.loads(data), hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------------------------
# batches and augmentation
# --------------------------------------------------------------------------------------------

_AFFINE_CACHE: dict = {}


def _affine(mean, std, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C,1,1] float32 with (x/255 - mean)/std == x*scale + shift."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    key = (mean, std, str(device))
    hit = _AFFINE_CACHE.get(key)
    if hit is None:
        m = torch.tensor(mean, dtype=torch.float64)
        s = torch.tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * s)).to(torch.float32).view(-1, 1, 1).to(device)
        shift = (-m / s).to(torch.float32).view(-1, 1, 1).to(device)
        hit = _AFFINE_CACHE[key] = (scale, shift)
    return hit


def normalize(x_uint8: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 (x/255 - mean)/std on the same device."""
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {x_uint8.dtype}")
    scale, shift = _affine(mean, std, x_uint8.shape[-3], x_uint8.device)
    return torch.addcmul(shift, x_uint8.to(torch.float32), scale)


class Augment:
    """Batched RandomCrop(H, padding=pad) + RandomHorizontalFlip + normalize, on x's device.

    ``x_uint8`` is [N, C, H, W] uint8. The image is zero-padded (in uint8, so the padding
    becomes the normalised value of black) and each image gets its own crop offset and flip, drawn
    from ``generator`` (or the global RNG of x's device). Random numbers are drawn on the
    generator's device and moved to x's device, so the result is a function of the generator
    state only.
    """

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD, pad: int = 4, flip: bool = True):
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad = int(pad)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"Augment(mean={self.mean}, std={self.std}, pad={self.pad}, flip={self.flip})"

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x_uint8
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"Augment expects uint8 [N,C,H,W], got {x.dtype} {list(x.shape)}")
        n, c, h, w = x.shape
        dev = x.device
        rdev = generator.device if generator is not None else dev
        p = self.pad
        rows = torch.arange(h, device=dev).expand(n, h)
        cols = torch.arange(w, device=dev).expand(n, w)
        if p > 0:
            x = F.pad(x, (p, p, p, p))  # zero padding in uint8, before normalising
            oy = torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=rdev).to(dev)
            ox = torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=rdev).to(dev)
            rows = rows + oy
            cols = cols + ox
        if self.flip:
            flip = (torch.rand((n, 1), generator=generator, device=rdev) < 0.5).to(dev)
            cols = torch.where(flip, cols.flip(1), cols)
        out = x[
            torch.arange(n, device=dev).view(n, 1, 1, 1),
            torch.arange(c, device=dev).view(1, c, 1, 1),
            rows.reshape(n, 1, h, 1),
            cols.reshape(n, 1, 1, w),
        ]
        return normalize(out, self.mean, self.std)


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, drop_last: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (xb, yb) mini-batches; with shuffle, one torch.randperm per pass."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} items but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    end = n - n % batch_size if drop_last else n
    if shuffle:
        rdev = generator.device if generator is not None else x.device
        perm = torch.randperm(n, generator=generator, device=rdev)
        perm_x = perm.to(x.device)
        perm_y = perm_x if y.device == x.device else perm.to(y.device)
        for i in range(0, end, batch_size):
            yield x[perm_x[i:i + batch_size]], y[perm_y[i:i + batch_size]]
    else:
        for i in range(0, end, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
