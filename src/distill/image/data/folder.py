"""Source (a): a folder in ImageFolder layout, ``train/<class>/**/*.jpg|png|...`` and ``test/<class>/**``.

Symbolic links (an image's split and class are the folders it is found under, and nothing outside the source
folder is ever read):

* a link to a folder anywhere from ``train/``/``test/`` down (a split folder, a class folder or a folder inside
  one) is refused with a :class:`DataError` naming it: it could loop (``train/cat/loop -> ..``), pull in
  images from another class or split, or leave the source;
* a link to an image file is read (and labelled by the class folder the link is in) when its target stays
  inside the source folder and is not inside another ``<split>/<class>/`` folder; a link that leaves the
  source folder, points into another class or split, or dangles is refused, naming it;
* hidden entries (``.name``) are skipped and never followed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...files import PathEscapeError, contained_path
from . import decode
from .collect import SplitCollector
from .common import DataError, is_image_name
from ...progress import Progress

__all__ = ["decode_folder", "scan_imagefolder"]

#: (split, class, path relative to the source folder, path) of one image file.
FolderFile = tuple[str, str, str, Path]


def _refuse_folder_link(link: Path) -> None:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    raise DataError(
        f"{link} is a symbolic link to a folder ({target}): links to folders are not followed in an image "
        f"folder (they can loop or pull in images from another class, split or outside the source); "
        f"replace it with a real folder"
    )


def _check_file_link(root: Path, root_r: Path, path: Path, split: str, cls: str) -> None:
    """Refuse an image-file link that leaves the source, borrows from another class or split, or dangles."""
    try:
        target = contained_path(root_r, path.relative_to(root))
    except PathEscapeError as e:
        raise DataError(
            f"{path} is a symbolic link to {os.readlink(path)}, which leads outside the source folder "
            f"{root_r}: links may not leave the source"
        ) from e
    inner = target.relative_to(root_r).parts
    if len(inner) >= 2 and inner[0] in ("train", "test") and tuple(inner[:2]) != (split, cls):
        raise DataError(
            f"{path} is a symbolic link into {inner[0]}/{inner[1]}/: an image's split and class are the "
            f"folder it is found under ({split}/{cls}), so a link may not borrow an image from another "
            f"class or split"
        )
    if not target.is_file():
        raise DataError(f"{path} is a symbolic link to {target}, which is not a file (dangling link?)")


def _raise_walk_error(e: OSError) -> None:
    raise DataError(f"cannot list {e.filename}: {e.strerror or e}") from e


def _scan_class(root: Path, root_r: Path, split: str, cls_dir: Path) -> list[FolderFile]:
    files: list[FolderFile] = []
    for dirpath, dirnames, filenames in os.walk(cls_dir, onerror=_raise_walk_error):  # never follows links
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if (here / d).is_symlink():
                _refuse_folder_link(here / d)
        for fn in sorted(filenames):
            if fn.startswith(".") or not is_image_name(fn):
                continue
            p = here / fn
            if p.is_symlink():
                _check_file_link(root, root_r, p, split, cls_dir.name)
            files.append((split, cls_dir.name, p.relative_to(root).as_posix(), p))
    return files


def scan_imagefolder(root: Path) -> tuple[list[FolderFile], dict[str, set[str]]]:
    """Image files under root/{train,test}/<class>/** -> [(split, class, relpath, path)], classes."""
    root_r = root.resolve()
    files: list[FolderFile] = []
    classes: dict[str, set[str]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        if split_dir.is_symlink():
            _refuse_folder_link(split_dir)
        classes[split] = set()
        try:
            entries = sorted(split_dir.iterdir())
        except OSError as e:
            raise DataError(f"cannot list {split_dir}: {e}") from e
        for cls_dir in entries:
            if cls_dir.name.startswith("."):
                continue
            if cls_dir.is_symlink():
                if cls_dir.is_dir():
                    _refuse_folder_link(cls_dir)
                continue  # a link to a file next to the class folders: not a class, ignored like any file
            if not cls_dir.is_dir():
                continue
            classes[split].add(cls_dir.name)
            files.extend(_scan_class(root, root_r, split, cls_dir))
    return files, classes


def decode_folder(
    files: list[FolderFile], collectors: dict[str, SplitCollector], progress: Progress, max_side: int,
) -> None:
    for i, (split, cls, rel, path) in enumerate(files, 1):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from e
        collectors[split].add(cls, rel, decode.decode_image(data, str(path), max_side))
        if i % 256 == 0:
            progress.update_to(i, i)
    progress.update_to(len(files), len(files))
