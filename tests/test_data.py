"""Tests for distill.image.data: sources, cache, splits, errors, augmentation, batching."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.image import data as D
from distill.image.data import cifar as D_cifar
from distill.image.data import decode as D_decode
from distill.image.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Augment,
    DataError,
    iterate_batches,
    load_prepared,
    normalize,
    prepare_dataset,
    read_manifest,
    resolve_source,
)

try:
    from _imagefolder import (big_png_bytes, class_channel, jpeg_bytes, make_imagefolder, png16_bytes,
                              write_sha256sums)
except ImportError:  # tests/ imported as a package
    from tests._imagefolder import (big_png_bytes, class_channel, jpeg_bytes, make_imagefolder, png16_bytes,
                                    write_sha256sums)

CLASSES = ["cat", "dog", "frog"]


def _prep(source, cache, **kw):
    kw.setdefault("val_size", 6)
    kw.setdefault("progress", False)
    return prepare_dataset(str(source), cache, **kw)


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, b in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    return path


def _write_tar_entries(path: Path, members: dict[str, bytes | None]) -> Path:
    """Like _write_tar, but a None value writes a directory entry."""
    with tarfile.open(path, "w:gz") as tf:
        for name, b in members.items():
            info = tarfile.TarInfo(name)
            if b is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(b)
                tf.addfile(info, io.BytesIO(b))
    return path


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


# ------------------------------------------------------------------------------------------
# sources, layout, manifest
# ------------------------------------------------------------------------------------------


def _check_prepared(prep, n_train=12, n_test=4, val_size=6):
    m = prep.manifest
    assert m["classes"] == CLASSES
    assert m["image_shape"] == [3, 32, 32]
    assert m["format_version"] == D.FORMAT_VERSION
    assert m["val_size"] == val_size and m["split_seed"] == 0
    per_val = val_size // 3
    assert m["counts"]["val"] == {"total": val_size, "per_class": [per_val] * 3}
    assert m["counts"]["train"] == {"total": 3 * n_train - val_size, "per_class": [n_train - per_val] * 3}
    assert m["counts"]["test"] == {"total": 3 * n_test, "per_class": [n_test] * 3}
    assert sorted(m["files"]) == sorted(D.ARRAY_FILES)
    raw = (prep.dir / "manifest.json").read_bytes()
    import hashlib

    assert prep.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert json.loads(raw) == m == read_manifest(prep.dir)

    arrays = load_prepared(prep.dir)
    assert set(arrays) == {"train", "val", "test"}
    for split, (x, y) in arrays.items():
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape == (m["counts"][split]["total"], 3, 32, 32)
        assert y.shape == (x.shape[0],)
        assert torch.bincount(y, minlength=3).tolist() == m["counts"][split]["per_class"]
        # Pixels and labels stay together: the class's channel is the bright one.
        means = x.float().mean(dim=(2, 3))  # [N, 3]
        assert torch.equal(means.argmax(1), torch.tensor([class_channel(int(l)) for l in y]))
    # the training split's own per-channel pixel statistics are recorded for normalisation
    train = arrays["train"][0].numpy().astype(np.float64) / 255.0
    assert m["normalization"]["split"] == "train"
    np.testing.assert_allclose(m["normalization"]["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m["normalization"]["std"], train.std(axis=(0, 2, 3)), rtol=1e-12)
    return arrays


def test_prepare_from_folder(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=12, n_test=4)
    prep = _prep(src, tmp_path / "cache")
    assert prep.dir.parent == tmp_path / "cache"
    assert len(prep.dir.name) == 16
    assert prep.manifest["source"] == str(src)
    _check_prepared(prep)
    # Nothing but the final folder is left in the cache (the temp dir was renamed).
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [prep.dir.name]


@pytest.mark.parametrize("layout", ["tarballs", "single", "single_top"])
def test_prepare_from_tarballs_matches_folder(tmp_path, layout):
    folder = make_imagefolder(tmp_path / "folder")
    ref = load_prepared(_prep(folder, tmp_path / "cache").dir)
    if layout == "tarballs":
        src = make_imagefolder(tmp_path / "tars", as_tarballs=True)
        assert (src / "train.tar.gz").is_file() and (src / "test.tar.gz").is_file()
    else:
        src = make_imagefolder(tmp_path / "one", single_tarball=True,
                               top="cifar" if layout == "single_top" else None)
        assert src.is_file()
    prep = _prep(src, tmp_path / "cache")
    arrays = _check_prepared(prep)
    # Same images (same generator seed) -> identical arrays whatever the container.
    for split in ("train", "val", "test"):
        assert torch.equal(arrays[split][0], ref[split][0])
        assert torch.equal(arrays[split][1], ref[split][1])


def test_png_and_nested_files_and_ignored_entries(tmp_path):
    src = make_imagefolder(tmp_path / "src", ext="png", n_train=4, n_test=2)
    (src / "train" / "cat" / "notes.txt").write_text("not an image")
    (src / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    (src / "test" / ".ipynb_checkpoints").mkdir()
    prep = _prep(src, tmp_path / "cache", val_size=3)
    assert prep.manifest["counts"]["train"]["total"] == 9
    assert prep.manifest["counts"]["test"]["total"] == 6


def test_split_determinism(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=20, n_test=4)
    a = load_prepared(_prep(src, tmp_path / "c1", val_size=9, split_seed=1).dir)
    b = load_prepared(_prep(src, tmp_path / "c2", val_size=9, split_seed=1).dir)
    c = load_prepared(_prep(src, tmp_path / "c3", val_size=9, split_seed=2).dir)
    for split in ("train", "val", "test"):
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    assert not torch.equal(a["val"][0], c["val"][0])
    # Train and val are disjoint and together are the whole training split.
    whole = {bytes(im.numpy()) for im in a["train"][0]} | {bytes(im.numpy()) for im in a["val"][0]}
    assert len(whole) == 60
    assert torch.equal(c["test"][0], a["test"][0])  # test never depends on the seed without subset


def test_cache_hit_does_not_decode(tmp_path, monkeypatch):
    src = make_imagefolder(tmp_path / "src", as_tarballs=True)
    first = _prep(src, tmp_path / "cache")
    # A second call, even with a different progress setting, must reuse the folder.
    def boom(*a, **k):
        raise RuntimeError("decoded")

    monkeypatch.setattr(D_decode, "decode_image", boom)
    second = prepare_dataset(str(src), tmp_path / "cache", val_size=6, progress=True)
    assert second.dir == first.dir
    assert second.manifest_sha256 == first.manifest_sha256
    assert second.manifest == first.manifest
    # Different split parameters -> a different cache folder (which has to decode).
    with pytest.raises(RuntimeError, match="decoded"):
        _prep(src, tmp_path / "cache", val_size=9)


def test_cache_follows_content_not_path(tmp_path, monkeypatch):
    src = make_imagefolder(tmp_path / "a", as_tarballs=True)
    first = _prep(src, tmp_path / "cache")
    moved = tmp_path / "b"
    src.rename(moved)
    monkeypatch.setattr(D_decode, "decode_image", None)  # calling it would raise TypeError
    assert _prep(moved, tmp_path / "cache").dir == first.dir


def test_broken_cache_is_rebuilt(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    first = _prep(src, tmp_path / "cache")
    path = first.dir / "train_x.npy"
    b = bytearray(path.read_bytes())
    b[-1] ^= 0xFF
    path.write_bytes(bytes(b))
    again = _prep(src, tmp_path / "cache")
    assert again.dir == first.dir
    assert again.manifest_sha256 == first.manifest_sha256
    load_prepared(again.dir)  # verifies


def test_subsets_are_stratified(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=12, n_test=6)
    prep = _prep(src, tmp_path / "cache", val_size=6, train_subset=9, test_subset=6)
    m = prep.manifest
    assert m["train_subset"] == 9 and m["test_subset"] == 6
    assert m["counts"]["train"]["per_class"] == [3, 3, 3]
    assert m["counts"]["val"]["per_class"] == [2, 2, 2]
    assert m["counts"]["test"]["per_class"] == [2, 2, 2]
    arrays = load_prepared(prep.dir)
    # The validation split does not depend on the subsets.
    full = load_prepared(_prep(src, tmp_path / "cache").dir)
    assert torch.equal(arrays["val"][0], full["val"][0])
    # The train subset is drawn from the remaining train images.
    full_train = {bytes(im.numpy()) for im in full["train"][0]}
    assert all(bytes(im.numpy()) in full_train for im in arrays["train"][0])


def test_unequal_classes_stratify_proportionally(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=10, n_test=2)
    for i in range(10, 30):  # dog gets 30 training images
        (src / "train" / "dog" / f"{i:04d}.jpg").write_bytes((src / "train" / "dog" / "0000.jpg").read_bytes())
    prep = _prep(src, tmp_path / "cache", val_size=10)
    assert prep.manifest["counts"]["val"]["per_class"] == [2, 6, 2]
    assert prep.manifest["counts"]["train"]["per_class"] == [8, 24, 8]


def test_expected_classes(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    _prep(src, tmp_path / "cache", expected_classes=["frog", "cat", "dog"])
    with pytest.raises(DataError, match="missing classes \\['bird'\\]"):
        _prep(src, tmp_path / "cache", expected_classes=["cat", "dog", "frog", "bird"])
    with pytest.raises(DataError, match="unexpected classes \\['frog'\\]"):
        _prep(src, tmp_path / "cache2", expected_classes=["cat", "dog"])


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_truncated_tarball(tmp_path):
    src = make_imagefolder(tmp_path / "src", as_tarballs=True)
    path = src / "train.tar.gz"
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])
    with pytest.raises(DataError, match="train.tar.gz"):
        _prep(src, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no partial cache left


def test_truncated_single_tarball(tmp_path):
    src = make_imagefolder(tmp_path / "src", single_tarball=True)
    b = src.read_bytes()
    src.write_bytes(b[: len(b) // 2])
    with pytest.raises(DataError, match="data.tar.gz"):
        _prep(src, tmp_path / "cache")


def test_not_a_tarball(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.tar.gz").write_bytes(b"this is not gzip at all" * 10)
    (src / "test.tar.gz").write_bytes(b"nor this")
    with pytest.raises(DataError, match="train.tar.gz"):
        _prep(src, tmp_path / "cache")


def test_corrupt_jpeg_member(tmp_path):
    src = make_imagefolder(tmp_path / "src", as_tarballs=True)
    members = _tar_members(src / "train.tar.gz")
    members["train/dog/0003.jpg"] = members["train/dog/0003.jpg"][:40]  # truncated JPEG
    _write_tar(src / "train.tar.gz", members)
    with pytest.raises(DataError, match="train/dog/0003.jpg"):
        _prep(src, tmp_path / "cache")


def test_corrupt_image_file_in_folder(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    (src / "test" / "frog" / "0001.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="0001.jpg"):
        _prep(src, tmp_path / "cache")


def test_mixed_image_sizes(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    (src / "train" / "cat" / "0005.jpg").write_bytes(jpeg_bytes(np.zeros((28, 32, 3), np.uint8)))
    with pytest.raises(DataError, match="0005.jpg"):
        _prep(src, tmp_path / "cache")


@pytest.mark.parametrize("as_tarballs", [False, True])
def test_missing_class_in_test(tmp_path, as_tarballs):
    src = make_imagefolder(tmp_path / "src", as_tarballs=as_tarballs)
    if as_tarballs:
        members = {k: v for k, v in _tar_members(src / "test.tar.gz").items() if "/dog/" not in k}
        _write_tar(src / "test.tar.gz", members)
    else:
        for p in (src / "test" / "dog").iterdir():
            p.unlink()
        (src / "test" / "dog").rmdir()
    with pytest.raises(DataError, match="test/dog missing"):
        _prep(src, tmp_path / "cache")


def test_empty_class_folder(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    (src / "train" / "zebra").mkdir()
    (src / "test" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        _prep(src, tmp_path / "cache")


def test_missing_source_and_bad_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _prep(tmp_path / "nope", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        _prep(tmp_path / "empty", tmp_path / "cache")
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="test missing"):
        _prep(tmp_path / "half", tmp_path / "cache")


def test_cached_npy_checksum_mismatch(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    prep = _prep(src, tmp_path / "cache")
    path = prep.dir / "val_x.npy"
    b = bytearray(path.read_bytes())
    b[-3] ^= 0x01  # one pixel
    path.write_bytes(bytes(b))
    with pytest.raises(DataError, match="val_x.npy"):
        load_prepared(prep.dir)
    load_prepared(prep.dir, verify=False)  # opting out skips the hash
    path = prep.dir / "val_y.npy"
    b = bytearray(path.read_bytes())
    b[-3] ^= 0x01  # a label out of range: caught even without the hash
    path.write_bytes(bytes(b))
    with pytest.raises(DataError, match="val_y.npy"):
        load_prepared(prep.dir, verify=False)
    (prep.dir / "train_y.npy").unlink()
    with pytest.raises(DataError, match="train_y.npy missing"):
        load_prepared(prep.dir)
    with pytest.raises(DataError, match="manifest.json"):
        load_prepared(tmp_path)


def test_sha256sums_mismatch(tmp_path):
    # SHA256SUMS in the parent of the source folder, paths relative to it (like /work/shared/data).
    src = make_imagefolder(tmp_path / "shared" / "cifar", as_tarballs=True)
    write_sha256sums(tmp_path / "shared", ["cifar/train.tar.gz", "cifar/test.tar.gz"])
    _prep(src, tmp_path / "cache")  # matching sums pass
    # Replace test.tar.gz with different (valid) content.
    make_imagefolder(tmp_path / "other", as_tarballs=True, seed=1)
    (src / "test.tar.gz").write_bytes((tmp_path / "other" / "test.tar.gz").read_bytes())
    with pytest.raises(DataError, match="test.tar.gz"):
        _prep(src, tmp_path / "cache")


def test_sha256sums_in_source_folder_single_tarball(tmp_path):
    src = make_imagefolder(tmp_path / "src", single_tarball=True)
    sums = tmp_path / "src" / "SHA256SUMS"
    sums.write_text("0" * 64 + " *data.tar.gz\n")
    with pytest.raises(DataError, match="data.tar.gz"):
        _prep(src, tmp_path / "cache")


def test_val_size_errors(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=4)
    with pytest.raises(DataError, match="val_size=12"):
        _prep(src, tmp_path / "cache", val_size=12)
    with pytest.raises(DataError, match="val_size=2"):
        _prep(src, tmp_path / "cache", val_size=2)
    with pytest.raises(DataError, match="val_size"):
        _prep(src, tmp_path / "cache", val_size=0)
    with pytest.raises(DataError, match="train_subset=7"):
        _prep(src, tmp_path / "cache", val_size=6, train_subset=7)
    with pytest.raises(DataError, match="test_subset=13"):
        _prep(src, tmp_path / "cache", val_size=6, test_subset=13)


def test_cifar_python_folder_is_checked(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in D_cifar.BATCH_FILES:
        (batches / name).write_bytes(b"not the real pickle")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        _prep(batches, tmp_path / "cache")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        _prep(tmp_path, tmp_path / "cache")


def test_torchvision_download_failure_mentions_env(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *a, **k):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match="DISTILL_CIFAR10"):
        prepare_dataset("torchvision", tmp_path / "cache", progress=False)


def test_resolve_source(monkeypatch):
    monkeypatch.delenv("DISTILL_CIFAR10", raising=False)
    assert resolve_source(None) == "torchvision"
    monkeypatch.setenv("DISTILL_CIFAR10", "/data/cifar")
    assert resolve_source(None) == "/data/cifar"
    assert resolve_source("/elsewhere") == "/elsewhere"
    assert resolve_source(Path("/p")) == "/p"


# ------------------------------------------------------------------------------------------
# bad input: links, bit depth, huge images, class rules
# ------------------------------------------------------------------------------------------


def test_symlink_loop_in_class_folder_is_refused(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2)
    os.symlink("..", src / "train" / "cat" / "loop")  # train/cat/loop -> train: every image again, as "cat"
    with pytest.raises(DataError, match=r"train/cat/loop is a symbolic link to a folder"):
        _prep(src, tmp_path / "cache", val_size=3)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("where", ["in_class", "class_itself", "split_itself"])
def test_folder_links_are_refused(tmp_path, where):
    outside = make_imagefolder(tmp_path / "outside", n_train=4, n_test=2, seed=1)
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2)
    if where == "in_class":  # a folder link inside a class folder, leaving the source
        link = src / "train" / "cat" / "more"
        os.symlink(outside / "train" / "dog", link)
    elif where == "class_itself":  # a class folder that is a link (inside the source) to another class
        link = src / "train" / "bird"
        os.symlink("cat", link)
        os.symlink("cat", src / "test" / "bird")
    else:  # the split folder itself is a link out of the source
        link = src / "test"
        for p in sorted(link.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        link.rmdir()
        os.symlink(outside / "test", link)
    with pytest.raises(DataError, match=f"{link.relative_to(src)} is a symbolic link to a folder"):
        _prep(src, tmp_path / "cache", val_size=4)


def test_symlinked_image_files(tmp_path):
    # Chosen rule: a link to an image file is read when its target stays inside the source folder and is not
    # inside another <split>/<class> folder; it is labelled by the class folder the link is in.
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2)
    (src / "pool").mkdir()
    (src / "pool" / "extra.jpg").write_bytes((src / "train" / "dog" / "0000.jpg").read_bytes())
    os.symlink("../../pool/extra.jpg", src / "train" / "cat" / "0100.jpg")
    os.symlink("0000.jpg", src / "train" / "cat" / "0101.jpg")  # same class: fine
    prep = _prep(src, tmp_path / "cache", val_size=3)
    assert prep.manifest["classes"] == CLASSES
    assert prep.manifest["counts"]["train"]["total"] + 3 == 3 * 4 + 2

    outside = tmp_path / "secret.jpg"
    outside.write_bytes((src / "train" / "dog" / "0001.jpg").read_bytes())
    bad = {  # link target -> what the message says
        os.path.relpath(outside, src / "train" / "cat"): "leads outside the source folder",
        "../dog/0001.jpg": "link into train/dog/",
        "../../test/cat/0000.jpg": "link into test/cat/",
        "nothing-here.jpg": "not a file",
    }
    for target, said in bad.items():
        link = src / "train" / "cat" / "0102.jpg"
        os.symlink(target, link)
        with pytest.raises(DataError, match="0102.jpg is a symbolic link") as e:
            _prep(src, tmp_path / "cache", val_size=3)
        assert said in str(e.value), (str(e.value), said)
        link.unlink()


def _same_images(arrays, expected: list[np.ndarray]) -> bool:
    got = sorted(bytes(im.numpy()) for split in ("train", "val", "test") for im in arrays[split][0])
    return got == sorted(bytes(e) for e in expected)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    # Chosen rule: 16 -> 8 bits by the high byte (x >> 8), like Pillow's own 16-bit RGB PNG decoding.
    rng = np.random.default_rng(0)
    expected = []
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("dark", "light"):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 65536, size=(8, 8), dtype=np.uint16)
                if i == 0:
                    a[0, :4] = [0, 255, 65535, 257 * 100]
                (tmp_path / "src" / split / cls / f"{i}.png").write_bytes(png16_bytes(a))
                expected.append(np.repeat((a >> 8).astype(np.uint8)[None], 3, axis=0))
    arrays = load_prepared(_prep(tmp_path / "src", tmp_path / "cache", val_size=2).dir)
    assert _same_images(arrays, expected)
    rows = {tuple(im[c, 0, :4].tolist()) for split in arrays.values() for im in split[0] for c in range(3)}
    assert (0, 0, 255, 100) in rows  # 0, 255, 65535, 257 * 100


def test_wide_integer_image_is_refused_not_clipped(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2, size=8)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.full((8, 8), 100_000, dtype=np.int32)).save(buf, format="TIFF")  # mode "I"
    (src / "train" / "cat" / "wide.tif").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"wide\.tif.*outside 0\.\.255"):
        _prep(src, tmp_path / "cache", val_size=3)


def test_huge_image_is_refused_from_its_header(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2, ext="png")
    # Header only, no pixel data: decoding would fail, so a size error proves nothing was decoded.
    (src / "train" / "cat" / "0000.png").write_bytes(big_png_bytes(9400, 9400, pixels=False))
    with pytest.raises(DataError, match=r"0000\.png is 9400x9400 .*max_image_side=4096"):
        _prep(src, tmp_path / "cache", val_size=3)
    # A real (valid, 25 kB) 5000x5000 PNG inside a tarball: refused the same way.
    members = {f"train/{c}/{i}.png": big_png_bytes(8, 8) for c in ("a", "b") for i in range(3)}
    members |= {f"test/{c}/0.png": big_png_bytes(8, 8) for c in ("a", "b")}
    members["train/b/1.png"] = big_png_bytes(5000, 5000)
    tar = _write_tar(tmp_path / "data.tar.gz", members)
    with pytest.raises(DataError, match=r"train/b/1\.png in .*data\.tar\.gz is 5000x5000"):
        _prep(tar, tmp_path / "cache", val_size=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_max_image_side_parameter(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2, size=32)
    with pytest.raises(DataError, match=r"is 32x32 .*max_image_side=31"):
        _prep(src, tmp_path / "cache", val_size=3, max_image_side=31)
    first = _prep(src, tmp_path / "cache", val_size=3, max_image_side=32)
    # The limit only refuses input: it is not in the cache key, and it also applies to a cache hit.
    assert _prep(src, tmp_path / "cache", val_size=3).dir == first.dir
    with pytest.raises(DataError, match="max_image_side=16"):
        _prep(src, tmp_path / "cache", val_size=3, max_image_side=16)
    with pytest.raises(DataError, match="max_image_side"):
        _prep(src, tmp_path / "cache", val_size=3, max_image_side=0)


def test_decompression_bomb_guard_is_a_data_error(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # 40x40 = 1600 px: above Pillow's limit, where Pillow only warns (and decodes); 50x50 is above twice it.
    for size in (40, 50):
        src = make_imagefolder(tmp_path / f"src{size}", n_train=4, n_test=2, size=size, ext="png")
        with pytest.raises(DataError, match=r"\d{4}\.png is too large.*MAX_IMAGE_PIXELS=1000"):
            _prep(src, tmp_path / "cache", val_size=3)


@pytest.mark.parametrize("layout", ["folder", "tarballs", "single"])
def test_single_class_is_refused(tmp_path, layout):
    src = make_imagefolder(tmp_path / "src", classes=("cat",), n_train=6, n_test=2,
                           as_tarballs=layout == "tarballs", single_tarball=layout == "single")
    with pytest.raises(DataError, match=r"only class 'cat': .*at least 2 classes") as e:
        _prep(src, tmp_path / "cache", val_size=2)
    assert str(tmp_path / "src") in str(e.value)


def _split_members(members: dict, layout: str, root: Path):
    """Write members as a tarball pair (returns the folder) or one tarball (returns it)."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "single":
        return _write_tar_entries(root / "data.tar.gz", members)
    for split in ("train", "test"):
        _write_tar_entries(root / f"{split}.tar.gz", {k: v for k, v in members.items() if k.startswith(split)})
    return root


@pytest.mark.parametrize("layout", ["tarballs", "single"])
def test_empty_class_in_tarball_is_refused_like_a_folder(tmp_path, layout):
    folder = make_imagefolder(tmp_path / "folder", n_train=4, n_test=2)
    images = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}
    empty_shapes = {
        "explicit directory entry": {"train/zebra/": None, "test/zebra/": None},
        "only a directory entry, no slash": {"train/zebra": None, "test/zebra": None},
        "only non-image files": {"train/zebra/README.txt": b"x", "test/zebra/README.txt": b"x"},
        "only hidden files": {"train/zebra/.0000.jpg": images["train/cat/0000.jpg"],
                              "test/zebra/.0000.jpg": images["test/cat/0000.jpg"]},
        "only a sub-folder entry": {"train/zebra/sub/": None, "test/zebra/sub/": None},
        "empty in test only": {**{f"train/zebra/{i}.jpg": images[f"train/cat/000{i}.jpg"] for i in range(4)},
                               "test/zebra/": None},
    }
    for i, (shape, extra) in enumerate(empty_shapes.items()):
        src = _split_members({**images, **extra}, layout, tmp_path / f"src{i}")
        with pytest.raises(DataError, match=r"class folder (train|test)/zebra in .* holds no images") as e:
            _prep(src, tmp_path / "cache", val_size=3)
        assert str(tmp_path / f"src{i}") in str(e.value), shape


@pytest.mark.parametrize("as_tarballs", [False, True])
def test_class_mismatch_names_the_classes_of_both_sides(tmp_path, as_tarballs):
    src = make_imagefolder(tmp_path / "src", n_train=4, n_test=2)
    (src / "train" / "cat").rename(src / "train" / "zebra")  # zebra only in train, cat only in test
    (src / "test" / "dog").rename(src / "test" / "yak")  # yak only in test, dog only in train
    if as_tarballs:
        tars = tmp_path / "tars"
        tars.mkdir()
        for split in ("train", "test"):
            with tarfile.open(tars / f"{split}.tar.gz", "w:gz") as tf:
                tf.add(src / split, arcname=split)
        src = tars
    with pytest.raises(DataError) as e:
        _prep(src, tmp_path / "cache", val_size=3)
    msg = str(e.value)
    assert "missing in test" in msg and "missing in train" in msg, msg
    assert "cat, yak" in msg.split("missing in train")[1], msg
    assert "dog, zebra" in msg.split("missing in test")[1].split("missing in train")[0], msg


# ------------------------------------------------------------------------------------------
# normalisation and augmentation
# ------------------------------------------------------------------------------------------


STATS = (CIFAR10_MEAN, CIFAR10_STD)


def _manual_norm(x_uint8):
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


def test_normalize_matches_manual():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalize(x, *STATS)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, _manual_norm(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize(x[0], *STATS), _manual_norm(x[:1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        normalize(x.float(), *STATS)


def test_augment_shape_dtype_and_determinism():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = Augment(*STATS)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, x.clone())  # input untouched


def test_augment_flip_only():
    # Left half 0, right half 255: a flip swaps the halves; nothing else changes.
    x = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    x[..., 16:] = 255
    out = Augment(*STATS, pad=0, flip=True)(x, torch.Generator().manual_seed(0))
    plain = normalize(x, *STATS)
    flipped = normalize(x.flip(-1), *STATS)
    is_plain = (out == plain).flatten(1).all(1)
    is_flipped = (out == flipped).flatten(1).all(1)
    assert bool((is_plain ^ is_flipped).all())
    assert 60 < int(is_flipped.sum()) < 140  # p = 0.5
    # flip=False, pad=0 is plain normalisation.
    assert torch.equal(Augment(*STATS, pad=0, flip=False)(x), plain)


def test_augment_crop_shifts_and_zero_padding():
    n = 300
    x = torch.full((n, 3, 32, 32), 200, dtype=torch.uint8)
    out = Augment(*STATS, pad=4, flip=False)(x, torch.Generator().manual_seed(0))
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), *STATS)  # normalised black
    val = normalize(torch.full((1, 3, 1, 1), 200, dtype=torch.uint8), *STATS)
    is_zero = torch.isclose(out, zero.expand_as(out))
    is_val = torch.isclose(out, val.expand_as(out))
    assert bool((is_zero | is_val).all())  # every pixel is image or padding
    shifted = is_zero.flatten(1).any(1)
    assert 0.7 * n < int(shifted.sum()) < n  # (1 - 1/81) shifted in expectation
    # Padding is one contiguous band of at most 4 rows/cols at one side per axis.
    rows_pad = is_zero[:, 0].all(2).sum(1)  # fully padded rows per image
    cols_pad = is_zero[:, 0].all(1).sum(1)
    assert int(rows_pad.max()) == 4 and int(cols_pad.max()) == 4
    assert int((rows_pad == 0).sum()) > 0
    # The number of non-padding pixels matches (32 - |dy|) * (32 - |dx|).
    valid = is_val[:, 0].sum((1, 2))
    assert torch.equal(valid, (32 - rows_pad) * (32 - cols_pad))


def test_augment_crop_is_a_translation():
    # Each pixel value encodes its position: a crop is a translation of the padded image.
    base = torch.arange(32 * 32).view(32, 32) % 251 + 1  # 1..251, never 0
    x = base.to(torch.uint8).expand(50, 3, 32, 32).contiguous()
    out = Augment(pad=4, flip=True, mean=(0, 0, 0), std=(1 / 255,) * 3)(x, torch.Generator().manual_seed(3))
    out = out.round().to(torch.int64)[:, 0]
    padded = torch.nn.functional.pad(base, (4, 4, 4, 4))
    for img in out:
        ok = False
        for dy in range(9):
            for dx in range(9):
                crop = padded[dy:dy + 32, dx:dx + 32]
                if torch.equal(img, crop) or torch.equal(img, crop.flip(-1)):
                    ok = True
                    break
            if ok:
                break
        assert ok


def test_augment_generator_device_mismatch_is_handled():
    # A CPU generator with CPU data; a generator is only consumed on its own device.
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator(device="cpu").manual_seed(0)
    assert Augment(*STATS)(x, g).device == x.device
    assert Augment(*STATS)(x).shape == x.shape  # global RNG


# ------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------


def test_iterate_batches():
    x = torch.arange(10).view(10, 1)
    y = torch.arange(10)
    batches = list(iterate_batches(x, y, 4, shuffle=False, drop_last=False))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(iterate_batches(x, y, 4, shuffle=False, drop_last=True))) == 2
    assert list(iterate_batches(x, y, 20, shuffle=False, drop_last=True)) == []

    a = list(iterate_batches(x, y, 3, shuffle=True, drop_last=False, generator=torch.Generator().manual_seed(1)))
    b = list(iterate_batches(x, y, 3, shuffle=True, drop_last=False, generator=torch.Generator().manual_seed(1)))
    c = list(iterate_batches(x, y, 3, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(2)))
    assert [t[1].tolist() for t in a] == [t[1].tolist() for t in b]
    assert sorted(torch.cat([t[1] for t in a]).tolist()) == list(range(10))
    assert torch.cat([t[1] for t in a]).tolist() != list(range(10))
    assert all(torch.equal(xb[:, 0], yb) for xb, yb in a)  # x and y stay paired
    assert [len(t[1]) for t in c] == [3, 3, 3]
    with pytest.raises(ValueError):
        list(iterate_batches(x, y[:5], 2, shuffle=False, drop_last=False))


# ------------------------------------------------------------------------------------------
# the real CIFAR-10 copy
# ------------------------------------------------------------------------------------------


@pytest.mark.data
def test_real_cifar10(tmp_path):
    source = os.environ.get("DISTILL_CIFAR10")
    if not source:
        pytest.skip("DISTILL_CIFAR10 is not set")
    t0 = time.perf_counter()
    prep = prepare_dataset(source, tmp_path / "cache", train_subset=1000, test_subset=1000, progress=False)
    seconds = time.perf_counter() - t0
    print(f"\nprepared {source} (decode of all 60,000 images + split + write) in {seconds:.1f}s")
    m = prep.manifest
    assert m["classes"] == list(D.CIFAR10_CLASSES)
    assert m["image_shape"] == [3, 32, 32]
    assert m["counts"]["val"] == {"total": 5000, "per_class": [500] * 10}
    assert m["counts"]["train"] == {"total": 1000, "per_class": [100] * 10}
    assert m["counts"]["test"] == {"total": 1000, "per_class": [100] * 10}
    arrays = load_prepared(prep.dir)
    mean = arrays["test"][0].double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.49, 0.48, 0.45], dtype=torch.float64), atol=0.02), mean
    t1 = time.perf_counter()
    again = prepare_dataset(source, tmp_path / "cache", train_subset=1000, test_subset=1000, progress=False)
    assert again.dir == prep.dir
    print(f"cache hit in {time.perf_counter() - t1:.2f}s")
