"""The content-addressed prepared-data cache, shared by every kind (images, token streams, ...).

A prepared folder is ``<cache_dir>/<key[:16]>/`` holding data files and a canonical ``manifest.json`` that
records the cache key and the sha256 and size of every file. It is built in ``.tmp-<key16>-*`` and renamed
into place (:func:`publish`); a folder that does not verify is moved aside and deleted
(:func:`discard_broken`); temporary folders left by killed processes are removed after a day
(:func:`clean_stale_tmp`). What goes into the key and the manifest is each kind's business.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

from .files import fsync_dir, sha256_file

T = TypeVar("T")

MANIFEST_NAME = "manifest.json"

__all__ = ["check_int", "clean_stale_tmp", "discard_broken", "manifest_bytes", "publish", "read_manifest_json",
           "remove_tree", "verify_listed_file"]


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical JSON encoding of a manifest (what manifest.json holds, byte for byte)."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def read_manifest_json(dir: str | os.PathLike, *, what: str, label: str, error: type[Exception] = ValueError) -> dict:
    """``dir/manifest.json`` as a dict with a ``files`` mapping; any defect is one ``error`` naming the file.
    ``what`` names the folder ("prepared data folder"), ``label`` the manifest ("data")."""
    path = Path(dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise error(f"{path} missing: not a {what}") from e
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from e
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise error(f"{path} is not a distill {label} manifest")
    return manifest


def verify_listed_file(dir: Path, manifest: dict, name: str, *, error: type[Exception] = ValueError) -> None:
    """Check ``dir/name`` against its manifest entry (size first, then sha256); ``error`` names the file."""
    path = dir / name
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise error(f"{dir / MANIFEST_NAME} does not list {name}")
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise error(f"{path} missing") from e
    if size != entry.get("bytes"):
        raise error(f"size mismatch for {path}: {size} bytes, manifest says {entry.get('bytes')}")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise error(f"checksum mismatch for {path}: sha256 {digest}, manifest says {entry.get('sha256')} "
                    "(corrupt or modified file)")


def check_int(name: str, value, *, minimum: int, allow_none: bool = False, error: type[Exception] = ValueError) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def discard_broken(final: Path) -> None:
    """Move a broken cache folder out of the way (atomically), then delete it."""
    if not final.exists():
        return
    aside = final.with_name(f".broken-{final.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(final, aside)
    except OSError:
        return  # someone else moved or replaced it
    remove_tree(aside)


def clean_stale_tmp(cache_dir: Path, key16: str, max_age_s: float = 24 * 3600) -> None:
    now = time.time()
    for p in cache_dir.glob(f".tmp-{key16}-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                remove_tree(p)
        except OSError:
            pass


def publish(tmp: Path, final: Path, hit: Callable[[], Optional[T]]) -> Optional[T]:
    """Rename ``tmp`` to ``final``. If another process got there first, its result when it verifies
    (``hit()``), else the broken folder is discarded and the rename tried once more. None when ours landed."""
    for attempt in range(2):
        try:
            os.rename(tmp, final)
            fsync_dir(final.parent)
            return None
        except OSError:
            theirs = hit()
            if theirs is not None:
                remove_tree(tmp)
                return theirs
            if attempt:
                raise
            discard_broken(final)
    raise AssertionError("unreachable")
