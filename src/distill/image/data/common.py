"""What every part of :mod:`distill.image.data` shares: :class:`DataError`, the cache layout constants and the naming
rules for image and archive files."""

from __future__ import annotations

from typing import Iterable

from ...errors import DataError

__all__ = [
    "ARRAY_FILES",
    "DataError",
    "ENV_SOURCE",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "SPLITS",
    "SUMS_NAME",
    "TAR_SUFFIXES",
    "TORCHVISION_SOURCE",
    "is_hidden",
    "is_image_name",
    "is_tarball_name",
]

#: Bump whenever the cache layout or the split algorithm changes: it is part of the cache key.
#: 2: the manifest records the training split's pixel statistics (``normalization``).
FORMAT_VERSION = 2

ENV_SOURCE = "DISTILL_CIFAR10"
TORCHVISION_SOURCE = "torchvision"
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
SUMS_NAME = "SHA256SUMS"
ARRAY_FILES = tuple(f"{s}_{k}.npy" for s in SPLITS for k in ("x", "y"))

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_tarball_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)
