"""Published folders (generations + one manifest) and the verified local cache (Store.fetch_dir)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.storage import (
    MANIFEST_NAME,
    ChecksumMismatch,
    DirNotFound,
    FileStore,
    ObjectNotFound,
    S3Store,
    StoreError,
    is_integrity_error,
)
from tests.test_storage import _s3_calls, moto, s3_env, store, tamper  # noqa: F401 - fixtures

PREFIX = "runs/r1/teacher/model"


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def generations(store, prefix: str = PREFIX) -> set[str]:
    gen_prefix = f"{prefix}/.gen/"
    return {k[len(gen_prefix):].split("/")[0] for k in store.list(prefix) if k.startswith(gen_prefix)}


def current_generation(store, prefix: str = PREFIX) -> str:
    return store.get_json(f"{prefix}/{MANIFEST_NAME}")["generation"]


def count_calls(monkeypatch, cls, name: str) -> list:
    calls: list = []
    original = getattr(cls, name)

    def counting(self, *a, **kw):
        calls.append(a)
        return original(self, *a, **kw)

    monkeypatch.setattr(cls, name, counting)
    return calls


V1 = {"model.safetensors": os.urandom(3000), "config.json": b'{"v": 1}', "sub/history.json": b"[1]"}
V2 = {"model.safetensors": os.urandom(3000), "config.json": b'{"v": 2}', "sub/extra.txt": b"new"}


# --------------------------------------------------------------------------- publishing


def test_publish_of_identical_content_writes_nothing(store, tmp_path, monkeypatch):
    src = write_tree(tmp_path / "v1", V1)
    store.put_dir(src, PREFIX)
    gen = current_generation(store)
    puts = count_calls(monkeypatch, type(store), "_put")
    deletes = count_calls(monkeypatch, type(store), "delete")
    again = store.put_dir(write_tree(tmp_path / "copy", V1), PREFIX)
    assert puts == [] and deletes == []
    assert again == store.dir_manifest(PREFIX) and current_generation(store) == gen


def test_publish_repairs_a_damaged_current_version(store, tmp_path):
    src = write_tree(tmp_path / "v1", V1)
    store.put_dir(src, PREFIX)
    gen = current_generation(store)
    store.delete(f"{PREFIX}/.gen/{gen}/config.json")  # the identical publish must not be a no-op now
    store.put_dir(src, PREFIX)
    assert current_generation(store) != gen
    assert tree(store.get_dir(PREFIX, tmp_path / "out")) == V1


def test_old_generations_are_collected_and_the_previous_one_kept(store, tmp_path):
    versions = [dict(V1, **{"config.json": f'{{"v": {i}}}'.encode()}) for i in range(4)]
    seen = []
    for i, files in enumerate(versions):
        store.put_dir(write_tree(tmp_path / f"v{i}", files), PREFIX)
        seen.append(current_generation(store))
        assert generations(store) == set(seen[-2:])  # the current one and the one it replaced
    assert tree(store.get_dir(PREFIX, tmp_path / "out")) == versions[-1]
    if isinstance(store, FileStore):  # collected generations leave no empty folders behind
        assert sorted(p.name for p in (store.root / PREFIX / ".gen").iterdir()) == sorted(seen[-2:])


def test_failed_publish_keeps_the_published_version(store, tmp_path, monkeypatch):
    store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)
    gen = current_generation(store)
    original = type(store)._put
    calls = []

    def failing(self, source, key, sha, size):
        calls.append(key)
        if len(calls) == 2:
            raise StoreError("simulated upload failure")
        return original(self, source, key, sha, size)

    monkeypatch.setattr(type(store), "_put", failing)
    with pytest.raises(StoreError, match="simulated"):
        store.put_dir(write_tree(tmp_path / "v2", V2), PREFIX)
    monkeypatch.undo()
    assert current_generation(store) == gen and generations(store) == {gen}  # the partial upload is gone
    assert tree(store.get_dir(PREFIX, tmp_path / "out")) == V1


def test_reserved_names_in_a_published_folder(store, tmp_path):
    src = write_tree(tmp_path / "src", {".gen/x": b"x"})
    with pytest.raises(StoreError, match="reserved"):
        store.put_dir(src, PREFIX)


# --------------------------------------------------------------------------- reading


def test_dir_manifest_and_get_dir_file(store, tmp_path):
    manifest = store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)
    assert store.dir_manifest(PREFIX) == manifest == {
        rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in V1.items()
    }
    assert store.get_dir_file(PREFIX, "sub/history.json") == b"[1]"
    assert store.get_dir_file(PREFIX + "/", "config.json") == b'{"v": 1}'
    with pytest.raises(ObjectNotFound, match="nope.txt"):
        store.get_dir_file(PREFIX, "nope.txt")
    with pytest.raises(DirNotFound, match=MANIFEST_NAME) as missing:
        store.dir_manifest("runs/none")
    assert isinstance(missing.value, StoreError) and not is_integrity_error(missing.value)
    with pytest.raises(StoreError, match=MANIFEST_NAME):
        store.get_dir_file("runs/none", "config.json")

    tamper(store, f"{PREFIX}/.gen/{current_generation(store)}/config.json", b'{"v": 9}')
    with pytest.raises(ChecksumMismatch, match="config.json") as bad:
        store.get_dir_file(PREFIX, "config.json")
    assert is_integrity_error(bad.value)


def test_manifest_entry_must_match_the_stored_object(store, tmp_path):
    store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)
    gen = current_generation(store)
    # a consistent object (its own checksum is right) that is not the one the manifest lists
    store.put_bytes(b'{"v": "other"}', f"{PREFIX}/.gen/{gen}/config.json")
    with pytest.raises(ChecksumMismatch, match="manifest"):
        store.get_dir_file(PREFIX, "config.json")
    with pytest.raises(ChecksumMismatch, match="config.json"):
        store.get_dir(PREFIX, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()  # the bad file was never moved into place


def test_get_dir_restarts_when_a_newer_generation_replaces_the_one_being_read(store, tmp_path, monkeypatch):
    v1 = {"0-only-in-v1.txt": b"old", "a.bin": b"a1", "b.bin": b"b1"}
    v2 = {"a.bin": b"a2", "b.bin": b"b2"}
    v3 = {"a.bin": b"a3", "b.bin": b"b3", "c.bin": b"c3"}
    store.put_dir(write_tree(tmp_path / "v1", v1), PREFIX)
    original = type(store)._get_file
    calls = []

    def racing(self, key, local_path, expect=None):
        calls.append(key)
        if len(calls) == 2:  # one file of v1 is down: two publishes land, v1's generation is collected
            self.put_dir(write_tree(tmp_path / "v2", v2), PREFIX)
            self.put_dir(write_tree(tmp_path / "v3", v3), PREFIX)
        return original(self, key, local_path, expect)

    monkeypatch.setattr(type(store), "_get_file", racing)
    out = store.get_dir(PREFIX, tmp_path / "out")
    assert tree(out) == v3  # the new complete version, nothing of the old one left behind
    monkeypatch.undo()
    assert store.get_dir_file(PREFIX, "c.bin") == b"c3"


def test_previous_flat_layout_is_read_and_replaced(store, tmp_path, monkeypatch):
    manifest = {}
    for rel, data in V1.items():  # what the previous version of put_dir wrote
        ref = store.put_bytes(data, f"{PREFIX}/{rel}")
        manifest[rel] = {"sha256": ref.sha256, "size": ref.size}
    store.put_json(manifest, f"{PREFIX}/{MANIFEST_NAME}")

    assert store.dir_manifest(PREFIX) == manifest
    assert store.get_dir_file(PREFIX, "sub/history.json") == V1["sub/history.json"]
    assert tree(store.get_dir(PREFIX, tmp_path / "out")) == V1
    assert tree(store.fetch_dir(PREFIX, tmp_path / "cache")) == V1

    puts = count_calls(monkeypatch, type(store), "_put")
    store.put_dir(write_tree(tmp_path / "same", V1), PREFIX)  # identical: nothing rewritten
    assert puts == []
    monkeypatch.undo()

    store.put_dir(write_tree(tmp_path / "v2", V2), PREFIX)
    gen = current_generation(store)
    assert sorted(store.list(PREFIX)) == sorted(
        [f"{PREFIX}/{MANIFEST_NAME}"] + [f"{PREFIX}/.gen/{gen}/{rel}" for rel in V2]
    )  # the flat files of the replaced version are gone
    assert tree(store.get_dir(PREFIX, tmp_path / "out2")) == V2


def test_malformed_manifest_is_an_integrity_error(store, tmp_path):
    store.put_json({"format": "distill.dir/2", "generation": "../../etc", "files": {}}, f"{PREFIX}/{MANIFEST_NAME}")
    with pytest.raises(StoreError, match="generation") as exc:
        store.get_dir(PREFIX, tmp_path / "out")
    assert is_integrity_error(exc.value)
    store.put_json({"../escape": {"sha256": "0" * 64, "size": 1}}, f"{PREFIX}/{MANIFEST_NAME}")
    with pytest.raises(StoreError, match="bad path") as exc:
        store.get_dir(PREFIX, tmp_path / "out")
    assert is_integrity_error(exc.value) and not (tmp_path / "escape").exists()
    store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)  # a publish replaces a corrupt manifest
    assert store.dir_manifest(PREFIX).keys() == V1.keys()


# --------------------------------------------------------------------------- verified local cache


def test_fetch_dir_downloads_once_and_checks_every_call(store, tmp_path, monkeypatch):
    store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)
    cache = tmp_path / "cache"
    local = store.fetch_dir(PREFIX, cache)
    assert tree(local) == V1 and local.is_relative_to(cache.resolve())

    downloads = count_calls(monkeypatch, type(store), "_get_file")
    s3_calls = _s3_calls(store) if isinstance(store, S3Store) else []
    assert store.fetch_dir(PREFIX, cache) == local and downloads == []
    if isinstance(store, S3Store):  # objects verified earlier are recognised by their ETag, not downloaded
        assert s3_calls.count("GetObject") == 1 and s3_calls.count("HeadObject") == len(V1)

    (local / "config.json").write_bytes(b'{"v": 7}')  # same size, other bytes
    (local / "sub" / "history.json").unlink()
    assert store.fetch_dir(PREFIX, cache) == local and tree(local) == V1
    assert len(downloads) == len(V1)
    assert not [p for p in local.parent.iterdir() if p.name.startswith((".fetch-", ".trash-"))]


def test_fetch_dir_refuses_a_corrupt_store_object_despite_a_good_local_copy(store, tmp_path):
    store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)
    local = store.fetch_dir(PREFIX, tmp_path / "cache")
    tamper(store, f"{PREFIX}/.gen/{current_generation(store)}/model.safetensors", os.urandom(3000))
    with pytest.raises(ChecksumMismatch, match="model.safetensors") as exc:
        store.fetch_dir(PREFIX, tmp_path / "cache")
    assert is_integrity_error(exc.value)
    assert tree(local) == V1  # the local copy is not touched
    with pytest.raises(ChecksumMismatch):  # nor is a fresh cache filled from it
        store.fetch_dir(PREFIX, tmp_path / "cache2")


def test_fetch_dir_follows_a_new_version(store, tmp_path):
    store.put_dir(write_tree(tmp_path / "v1", V1), PREFIX)
    first = store.fetch_dir(PREFIX, tmp_path / "cache")
    store.put_dir(write_tree(tmp_path / "v2", V2), PREFIX)
    second = store.fetch_dir(PREFIX, tmp_path / "cache")
    assert second != first and tree(second) == V2
    assert tree(first) == V1  # a process still using the old copy keeps it
    with pytest.raises(StoreError, match=MANIFEST_NAME):
        store.fetch_dir("runs/none", tmp_path / "cache")
