"""Which of the five source formats a ``source`` is, its content fingerprint, and decoding it.

(a) a folder in ImageFolder layout (:mod:`.folder`); (b) a folder with ``train.tar.gz`` and ``test.tar.gz``
and (c) a single tarball (:mod:`.tarball`); (d) a torchvision CIFAR-10 python folder and (e) the string
``"torchvision"`` (:mod:`.cifar`). See the :mod:`distill.image.data` docstring for the details.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...files import sha256_file, sha256_json
from .checksums import Sums
from .cifar import BATCH_DIR, BATCH_FILES, load_cifar_python, torchvision_download
from .collect import SplitCollector, finish_splits
from .common import ENV_SOURCE, TAR_SUFFIXES, TORCHVISION_SOURCE, DataError, is_tarball_name
from .folder import decode_folder, scan_imagefolder
from ...progress import Progress
from .tarball import decode_tarball

__all__ = ["Source", "decode_source", "detect_source", "fingerprint", "resolve_source"]

log = logging.getLogger("distill.image.data")


def resolve_source(source: str | os.PathLike | None) -> str:
    """``None`` (or "") -> ``$DISTILL_CIFAR10`` if set and non-empty, else ``"torchvision"``."""
    if source is None or str(source) == "":
        env = os.environ.get(ENV_SOURCE, "").strip()
        return env if env else TORCHVISION_SOURCE
    return os.fspath(source)


@dataclass
class Source:
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


def _detect_folder(path: Path, display: str) -> Source:
    if path.name == BATCH_DIR and (path / "batches.meta").exists():
        return Source("cifar-python", display, path, cifar_root=path.parent)
    if (path / BATCH_DIR).is_dir():
        return Source("cifar-python", display, path, cifar_root=path)
    train_tar, test_tar = _find_split_tarball(path, "train"), _find_split_tarball(path, "test")
    if train_tar is not None or test_tar is not None:
        if train_tar is None or test_tar is None:
            missing = "train" if train_tar is None else "test"
            raise DataError(f"{path} has a {'test' if missing == 'train' else 'train'} tarball "
                            f"but no {missing}.tar.gz")
        return Source("tarballs", display, path, tarballs={"train": train_tar, "test": test_tar})
    has_train, has_test = (path / "train").is_dir(), (path / "test").is_dir()
    if has_train or has_test:
        if not (has_train and has_test):
            raise DataError(f"{path / ('test' if has_train else 'train')} missing: an ImageFolder "
                            f"source needs both train/<class>/ and test/<class>/ folders")
        return Source("imagefolder", display, path)
    if (path / "batches.meta").exists() and (path / "data_batch_1").exists():
        raise DataError(
            f"{path} looks like CIFAR-10 python batches but torchvision needs the folder to be "
            f"named {BATCH_DIR}; rename it or pass its parent"
        )
    raise DataError(
        f"data source {path} has neither train/ and test/ folders, nor train.tar.gz and "
        f"test.tar.gz, nor a {BATCH_DIR} folder"
    )


def detect_source(source: str, cache_dir: Path) -> Source:
    if source == TORCHVISION_SOURCE:
        return Source("torchvision", "torchvision:CIFAR10", None, cifar_root=cache_dir / "torchvision")
    path = Path(source).expanduser()
    display = os.path.abspath(path)
    if not path.exists():
        raise DataError(
            f"data source {source} does not exist (expected an ImageFolder folder, a folder with "
            f"train.tar.gz/test.tar.gz, a tarball, a CIFAR-10 python folder or 'torchvision')"
        )
    if path.is_file():
        if not is_tarball_name(path.name):
            raise DataError(f"data source {path} is a file but not a tarball ({', '.join(TAR_SUFFIXES)})")
        return Source("tarball", display, path)
    return _detect_folder(path, display)


def _listing_digest(sums: Sums, named_paths) -> str:
    """sha256 of the sorted [name, sha256] listing of ``named_paths``; checks SHA256SUMS on the way."""
    listing = []
    for name, p in named_paths:
        digest = sha256_file(p)
        sums.check(p, digest)
        listing.append([name, digest])
    return sha256_json(sorted(listing))


def fingerprint(src: Source) -> str:
    """sha256 of the source content; verifies SHA256SUMS entries on the way."""
    if src.kind == "torchvision":
        torchvision_download(src.cifar_root)
    if src.kind == "tarball":
        digest = sha256_file(src.path)
        Sums(src.path.parent).check(src.path, digest)
        return digest
    if src.kind == "tarballs":
        return _listing_digest(Sums(src.path), ((src.tarballs[s].name, src.tarballs[s]) for s in ("train", "test")))
    if src.kind == "imagefolder":
        src.files, src.classes = scan_imagefolder(src.path)
        return _listing_digest(Sums(src.path), ((rel, p) for _, _, rel, p in src.files))
    if src.kind in ("cifar-python", "torchvision"):
        batch_dir = src.cifar_root / BATCH_DIR
        for name in BATCH_FILES:
            if not (batch_dir / name).is_file():
                raise DataError(f"{batch_dir / name} missing: not a complete CIFAR-10 python folder")
        sums = Sums(src.path if src.path is not None else batch_dir)
        return _listing_digest(sums, ((name, batch_dir / name) for name in BATCH_FILES))
    raise AssertionError(src.kind)


def _decode_images(src: Source, collectors: dict[str, SplitCollector], progress: bool, max_side: int) -> None:
    if src.kind == "imagefolder":
        if src.files is None:
            src.files, src.classes = scan_imagefolder(src.path)
        for s in ("train", "test"):
            collectors[s].classes |= src.classes[s]
        with Progress(len(src.files), f"decode {src.display}", "img", progress) as bar:
            decode_folder(src.files, collectors, bar, max_side)
    elif src.kind == "tarballs":
        total = sum(p.stat().st_size for p in src.tarballs.values())
        with Progress(total, f"decode {src.display}", "B", progress) as bar:
            done = 0
            for s in ("train", "test"):
                done += decode_tarball(src.tarballs[s], {s: collectors[s]}, bar, done, max_side)
    else:  # single tarball
        with Progress(src.path.stat().st_size, f"decode {src.display}", "B", progress) as bar:
            decode_tarball(src.path, collectors, bar, 0, max_side)


def decode_source(
    src: Source, progress: bool, max_side: int,
) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Decode a source -> (sorted class names, {"train": (x, y), "test": (x, y)})."""
    t0 = time.perf_counter()
    if src.kind in ("cifar-python", "torchvision"):
        classes, arrays = load_cifar_python(src.cifar_root)
        log.info("loaded %s in %.1fs", src.display, time.perf_counter() - t0)
        return classes, arrays
    if src.kind == "imagefolder":
        origin = {s: str(src.path / s) for s in ("train", "test")}
    elif src.kind == "tarballs":
        origin = {s: str(src.tarballs[s]) for s in ("train", "test")}
    else:
        origin = {s: str(src.path) for s in ("train", "test")}
    collectors = {s: SplitCollector(s, origin[s]) for s in ("train", "test")}
    _decode_images(src, collectors, progress, max_side)
    classes, arrays = finish_splits(collectors)
    n = sum(len(a[1]) for a in arrays.values())
    log.info("decoded %d images from %s in %.1fs", n, src.display, time.perf_counter() - t0)
    return classes, arrays
