"""Sources (b) and (c): tarballs, read as a stream and never extracted to disk.

Members are ``train/<class>/...`` and ``test/<class>/...``, or ``top/train/<class>/...`` for a tarball made from
a folder; the first member that matches either form fixes the prefix for the whole archive. A class is any
non-hidden ``<split>/<class>`` that a member lies at or below -- a directory entry, an image, or any other
member -- exactly like a class folder of an ImageFolder source, so a class without images is refused (see
:mod:`.collect`) instead of being dropped. Only regular-file members with an image extension are decoded.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

from . import decode
from .collect import SplitCollector
from .common import DataError, is_hidden, is_image_name
from ...progress import Progress

__all__ = ["decode_tarball"]

_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _member_parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _member_prefix(parts: list[str]) -> str | None:
    """"" for ``train/<class>/...``, "top" for ``top/train/<class>/...``, None otherwise."""
    if len(parts) >= 2 and parts[0] in ("train", "test"):
        return ""
    if len(parts) >= 3 and parts[1] in ("train", "test"):
        return parts[0]
    return None


def _read_members(
    tf: tarfile.TarFile, path: Path, collectors: dict[str, SplitCollector], max_side: int, on_image,
) -> None:
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
        if len(parts) < 2 or parts[0] not in collectors or is_hidden(parts[:2]):
            continue
        split, cls = parts[0], parts[1]
        if len(parts) == 2 and not member.isdir():
            continue  # a file next to the class folders, not a class
        collectors[split].add_class(cls)
        if len(parts) == 2 or is_hidden(parts[2:]) or not member.isfile() or not is_image_name(parts[-1]):
            continue
        f = tf.extractfile(member)
        data = f.read() if f is not None else b""
        img = decode.decode_image(data, f"{member.name} in {path}", max_side)
        collectors[split].add(cls, member.name, img)
        on_image()


def decode_tarball(
    path: Path, collectors: dict[str, SplitCollector], progress: Progress, done_before: int, max_side: int,
) -> int:
    """Stream ``path`` and decode its image members into the collectors of the splits it holds.

    Returns the number of compressed bytes read (for the progress of the next archive).
    """
    size = path.stat().st_size
    images = progress.images
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
            def on_image() -> None:
                nonlocal images
                images += 1
                if images % 256 == 0:
                    progress.update_to(done_before + raw.tell(), images)

            _read_members(tf, path, collectors, max_side, on_image)
    except _ARCHIVE_ERRORS as e:
        raise DataError(
            f"cannot read archive {path}: {type(e).__name__}: {e} (truncated or corrupt?)"
        ) from e
    progress.update_to(done_before + size, images)
    return size
