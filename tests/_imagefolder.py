"""Tiny generated image datasets for tests (no network, a few milliseconds).

``make_imagefolder(root, ...)`` writes random JPEGs (or PNGs) in one of the layouts that
``distill.image.data.prepare_dataset`` accepts and returns the source to pass to it:

- ``as_tarballs=False`` (default): ``root/train/<class>/NNNN.jpg`` and ``root/test/<class>/...``;
  returns ``root``.
- ``as_tarballs=True``: ``root/train.tar.gz`` and ``root/test.tar.gz`` with members
  ``train/<class>/NNNN.jpg`` / ``test/<class>/NNNN.jpg`` (like /work/shared/data/cifar10-jpeg);
  returns ``root``.
- ``single_tarball=True``: ``root/data.tar.gz`` holding ``train/`` and ``test/`` (under ``top/``
  if ``top`` is given); returns the tarball path.

Each class has its own base colour (class i: channel i % 3 is bright), plus noise, so tests can
check that labels and pixels stay together after decoding: see ``class_channel``.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_imagefolder", "class_channel", "jpeg_bytes", "png16_bytes", "big_png_bytes", "write_sha256sums"]


def class_channel(label: int) -> int:
    """The channel that is bright in images of class index ``label``."""
    return label % 3


def _image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    base = np.full((size, size, 3), 40, dtype=np.int16)
    base[..., class_channel(label)] = 200
    noise = rng.integers(-30, 31, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png16_bytes(arr: np.ndarray) -> bytes:
    """A real 16-bit greyscale PNG (Pillow mode ``I;16``) of the uint16 array ``arr`` [H, W]."""
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint16))
    assert im.mode == "I;16", im.mode
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def big_png_bytes(width: int, height: int, *, pixels: bool = True) -> bytes:
    """An all-black 8-bit greyscale PNG of ``width`` x ``height`` that is tiny on disk (zeros compress ~1000x).

    With ``pixels=False`` the file has the header only and no image data: decoding it fails, reading its
    size does not -- so a reader that refuses it for its size provably did so before decoding.
    """
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if not pixels:
        return head + _png_chunk(b"IEND", b"")
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + one byte per pixel
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return head + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _files(classes, n_train, n_test, size, seed, ext) -> dict[str, bytes]:
    """{"train/<class>/NNNN.ext": bytes}; labels follow the sorted class names."""
    rng = np.random.default_rng(seed)
    label = {c: i for i, c in enumerate(sorted(classes))}
    fmt = "PNG" if ext == "png" else "JPEG"
    out: dict[str, bytes] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                out[f"{split}/{c}/{i:04d}.{ext}"] = jpeg_bytes(_image(rng, label[c], size), fmt)
    return out


def _add_tar(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def make_imagefolder(
    root,
    classes=("cat", "dog", "frog"),
    n_train: int = 12,
    n_test: int = 4,
    size: int = 32,
    as_tarballs: bool = False,
    seed: int = 0,
    *,
    single_tarball: bool = False,
    top: str | None = None,
    ext: str = "jpg",
) -> Path:
    """Write a tiny dataset under ``root`` (created) and return the source path (see module doc).

    ``n_train``/``n_test`` are images per class.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = _files(classes, n_train, n_test, size, seed, ext)
    if single_tarball:
        path = root / "data.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, data in files.items():
                _add_tar(tf, f"{top}/{name}" if top else name, data)
        return path
    if as_tarballs:
        for split in ("train", "test"):
            with tarfile.open(root / f"{split}.tar.gz", "w:gz") as tf:
                for name, data in files.items():
                    if name.startswith(split + "/"):
                        _add_tar(tf, name, data)
        return root
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_sha256sums(folder, paths) -> Path:
    """Write ``folder/SHA256SUMS`` (sha256sum format) for ``paths`` (relative to folder)."""
    folder = Path(folder)
    lines = []
    for rel in paths:
        digest = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        lines.append(f"{digest}  {Path(rel).as_posix()}\n")
    out = folder / "SHA256SUMS"
    out.write_text("".join(lines))
    return out


def tiny_overrides(source, cache, n_train: int = 40, n_test: int = 10, **extra) -> dict:
    # 3 classes; overrides cannot null a field (None means "keep the preset"), so give exact subset sizes
    ov = {
        "data": {"source": str(source), "cache_dir": str(cache), "val_size": 30, "train_subset": 3 * n_train - 30,
                 "test_subset": 3 * n_test},
        "teacher": {"name": "resnet_small", "kwargs": {"width": 8, "depth": 1}},
        "student": {"name": "resnet_small", "kwargs": {"width": 4, "depth": 1}},
        "teacher_train": {"epochs": 2, "batch_size": 30},
        "student_train": {"epochs": 2, "batch_size": 30},
        "sweep": {"temperatures": [1.0, 4.0]},
        "eval": {"latency_runs": 2, "throughput_runs": 1, "warmup_runs": 1, "throughput_batch": 16},
        "seeds": [0],  # one seed unless a test asks for replicas
    }
    ov.update(extra)
    return ov
