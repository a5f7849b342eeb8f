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
decoded. Bad input is refused with a :class:`DataError` naming the file: links in an image folder
that loop, leave the source or cross classes (:mod:`.folder`), images larger than ``max_image_side``
or 16/32-bit images that would be clipped (:mod:`.decode`), empty classes, train/test class
mismatches and fewer than two classes (:mod:`.collect`).

The package, by seam:

- :mod:`.common`     DataError, cache layout constants, file-name rules
- :mod:`.sources`    which format a source is, its content fingerprint, decoding it (dispatch)
- :mod:`.folder`     (a) ImageFolder folders, including the symbolic-link rules
- :mod:`.tarball`    (b), (c) streamed tarballs
- :mod:`.cifar`      (d), (e) torchvision CIFAR-10
- :mod:`.checksums`  SHA256SUMS files
- :mod:`.decode`     one image file -> uint8 [3, H, W], with its size and bit-depth rules
- :mod:`.collect`    gathering images into splits; the class rules shared by every format
- :mod:`.splits`     the seeded, stratified validation split and subsets
- :mod:`.cache`      prepare_dataset, the manifest, load_prepared: the content-addressed cache
- :mod:`.augment`    normalize, Augment, iterate_batches, the CIFAR-10 mean/std (legacy model folders only)
- :mod:`.stats`      the training split's per-channel pixel mean/std (recorded in the manifest)
- :mod:`.progress`   progress bar / log lines while decoding
"""

from .augment import CIFAR10_MEAN, CIFAR10_STD, Augment, iterate_batches, normalize
from .cache import PreparedData, load_prepared, prepare_dataset, read_manifest
from .cifar import CIFAR10_CLASSES
from .common import (
    ARRAY_FILES,
    ENV_SOURCE,
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    SPLITS,
    SUMS_NAME,
    TAR_SUFFIXES,
    TORCHVISION_SOURCE,
    DataError,
)
from .decode import DEFAULT_MAX_IMAGE_SIDE
from .sources import resolve_source
from .stats import PixelStats, channel_stats, stats_from_manifest

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_MAX_IMAGE_SIDE",
    "FORMAT_VERSION",
    "SPLITS",
    "Augment",
    "DataError",
    "PixelStats",
    "PreparedData",
    "channel_stats",
    "iterate_batches",
    "load_prepared",
    "normalize",
    "prepare_dataset",
    "read_manifest",
    "resolve_source",
    "stats_from_manifest",
]
