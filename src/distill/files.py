"""The one place for file-integrity facts: sha256 of files and bytes, atomic writes, path containment.

Every other module (checkpoints, the data cache, stage outputs, the store adapters in ``tasks/``) uses these
functions instead of its own copy, so that "written atomically" and "sha256 recorded" mean the same thing
everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable

CHUNK_SIZE = 1 << 20

__all__ = [
    "CHUNK_SIZE",
    "PathEscapeError",
    "atomic_write_bytes",
    "atomic_write_chunks",
    "atomic_write_json",
    "contained_path",
    "fsync_dir",
    "sha256_bytes",
    "sha256_file",
    "sha256_json",
    "sha256_stream",
]


class PathEscapeError(ValueError):
    """A relative path or link would lead outside the folder it must stay in."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(f: BinaryIO) -> tuple[str, int]:
    """(hex sha256, number of bytes) of what is left in ``f``."""
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK_SIZE):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON encoding (sorted keys, no whitespace): a fingerprint of a config."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it survives a power cut (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes] | bytes) -> Path:
    """Write ``path`` through a fsynced temporary file in the same folder and ``os.replace``: a reader (or a
    process killed at any instant) sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(chunks, (bytes, bytearray, memoryview)):
                f.write(chunks)
            else:
                for chunk in chunks:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_chunks(path, data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def contained_path(root: str | os.PathLike, rel: str | os.PathLike, *, follow_links: bool = True) -> Path:
    """``root / rel`` if it stays inside ``root`` after resolving ``..`` and (with ``follow_links``) symbolic
    links; else :class:`PathEscapeError`. ``rel`` must be relative."""
    root_r = Path(root).resolve()
    rel = Path(rel)
    if rel.is_absolute():
        raise PathEscapeError(f"{str(rel)!r} is absolute; expected a path inside {root_r}")
    candidate = root_r / rel
    target = candidate.resolve() if follow_links else Path(os.path.normpath(candidate))
    if target != root_r and root_r not in target.parents:
        raise PathEscapeError(f"{str(rel)!r} leads outside {root_r}")
    return target
