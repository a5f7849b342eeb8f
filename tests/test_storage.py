"""tasks.storage on a local folder and on S3 (a real moto server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import traceback
import uuid
from pathlib import Path

import pytest

from tasks.storage import (
    MANIFEST_NAME,
    ChecksumMismatch,
    FileStore,
    ObjectNotFound,
    S3Store,
    StoreError,
    content_key,
    open_store,
    run_prefix,
)
from tests.servers import moto_server

MiB = 1024 * 1024
SECRET = "SEKRET-do-not-leak-8f3a1c"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_env(moto, monkeypatch):
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    return moto


def raw_s3(moto):
    import boto3

    return boto3.client(
        "s3", endpoint_url=moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def new_s3_store(**kw) -> S3Store:
    bucket = f"distill-test-{uuid.uuid4().hex[:10]}"
    return S3Store(bucket, "pfx", create_bucket=True, multipart_threshold=5 * MiB,
                   multipart_chunksize=5 * MiB, **kw)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return new_s3_store()


def tamper(store, key: str, data: bytes, keep_checksum: bool = True) -> None:
    """Overwrite an object's bytes behind the store's back."""
    if isinstance(store, FileStore):
        path = store.root / key
        path.write_bytes(data)
        if not keep_checksum:
            (store.root / (key + ".sha256")).unlink()
    else:
        client = raw_s3(store_moto(store))
        full = f"{store.prefix}/{key}"
        meta = client.head_object(Bucket=store.bucket, Key=full)["Metadata"] if keep_checksum else {}
        client.put_object(Bucket=store.bucket, Key=full, Body=data, Metadata=meta)


def store_moto(store):
    from types import SimpleNamespace

    return SimpleNamespace(endpoint=store.endpoint)


def no_temp_files(root: Path) -> bool:
    return not any(p.name.startswith(".distill-tmp-") for p in root.rglob("*"))


# --------------------------------------------------------------------------- both stores


def test_roundtrip_and_recorded_sha(store, tmp_path):
    data = b"hello distill\n" * 100
    ref = store.put_bytes(data, "a/b/hello.txt")
    assert ref.key == "a/b/hello.txt"
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    assert ref.uri == store.uri("a/b/hello.txt") and ref.uri.startswith(store.url + "/")
    assert store.get_bytes("a/b/hello.txt") == data
    assert store.stat("a/b/hello.txt") == ref
    assert store.verify("a/b/hello.txt") == ref
    assert store.exists("a/b/hello.txt") and not store.exists("a/b/nope.txt")

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    fref = store.put_file(src, "a/c/src.bin")
    assert fref.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    out = store.get_file("a/c/src.bin", tmp_path / "dl" / "deep" / "src.bin")
    assert out == tmp_path / "dl" / "deep" / "src.bin" and out.read_bytes() == src.read_bytes()
    assert no_temp_files(tmp_path / "dl")

    store.put_json({"b": [1, 2.5], "a": "x"}, "ab/meta.json")
    assert store.get_json("ab/meta.json") == {"a": "x", "b": [1, 2.5]}
    store.put_bytes(b"", "empty")
    assert store.get_bytes("empty") == b"" and store.stat("empty").size == 0

    assert store.list("") == ["a/b/hello.txt", "a/c/src.bin", "ab/meta.json", "empty"]
    assert store.list("a") == ["a/b/hello.txt", "a/c/src.bin"]  # folder prefix: not "ab/..."
    assert store.list("a/") == store.list("a")
    assert store.list("zzz") == []
    if isinstance(store, FileStore):  # sidecars exist on disk but are never listed
        assert (store.root / "a/b/hello.txt.sha256").read_text().split()[0] == ref.sha256

    # overwrite + delete
    store.put_bytes(b"v2", "a/b/hello.txt")
    assert store.get_bytes("a/b/hello.txt") == b"v2"
    store.delete("a/b/hello.txt")
    store.delete("a/b/hello.txt")  # idempotent
    assert not store.exists("a/b/hello.txt")
    with pytest.raises(ObjectNotFound, match="a/b/hello.txt"):
        store.get_bytes("a/b/hello.txt")


def test_get_file_detects_tampering(store, tmp_path):
    store.put_bytes(b"original bytes", "runs/r1/model.bin")
    tamper(store, "runs/r1/model.bin", b"evil bytes!!!!")
    dest = tmp_path / "dl" / "model.bin"
    with pytest.raises(ChecksumMismatch, match="runs/r1/model.bin") as exc:
        store.get_file("runs/r1/model.bin", dest)
    assert exc.value.key == "runs/r1/model.bin"
    clone = pickle.loads(pickle.dumps(exc.value))  # Prefect may persist task exceptions
    assert isinstance(clone, ChecksumMismatch) and str(clone) == str(exc.value)
    assert not dest.exists() and no_temp_files(tmp_path / "dl")  # nothing half-written
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("runs/r1/model.bin")
    with pytest.raises(ChecksumMismatch, match="runs/r1/model.bin"):
        store.verify("runs/r1/model.bin")
    # the recorded checksum is what stat reports
    assert store.stat("runs/r1/model.bin").sha256 == hashlib.sha256(b"original bytes").hexdigest()


def test_object_without_recorded_checksum_is_refused(store):
    store.put_bytes(b"x", "k")
    tamper(store, "k", b"y", keep_checksum=False)
    with pytest.raises(StoreError, match="no recorded sha256"):
        store.get_bytes("k")


def test_put_dir_get_dir(store, tmp_path):
    src = tmp_path / "out"
    (src / "checkpoints" / "epoch-0001").mkdir(parents=True)
    files = {
        "model.safetensors": os.urandom(1000),
        "config.json": b'{"role": "teacher"}',
        "checkpoints/epoch-0001/state.json": b"{}",
        "checkpoints/LATEST": b"epoch-0001",
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    prefix = run_prefix("flow-123", "teacher")
    manifest = store.put_dir(src, prefix)
    assert manifest == {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()}
    assert store.dir_manifest(prefix) == manifest
    doc = store.get_json(f"{prefix}/{MANIFEST_NAME}")
    assert doc["format"] == "distill.dir/2" and doc["files"] == manifest
    gen = f"{prefix}/.gen/{doc['generation']}"
    assert sorted(store.list(prefix)) == sorted([f"{gen}/{r}" for r in files] + [f"{prefix}/{MANIFEST_NAME}"])
    for rel, data in files.items():
        assert store.get_dir_file(prefix, rel) == data

    out = store.get_dir(prefix, tmp_path / "restored")
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data

    # incomplete dir (no manifest) is refused
    store.put_bytes(b"x", "runs/flow-123/partial/a.bin")
    with pytest.raises(StoreError, match=MANIFEST_NAME):
        store.get_dir("runs/flow-123/partial", tmp_path / "p")

    # a tampered member fails the download
    tamper(store, f"{gen}/config.json", b'{"role": "evil"}')
    with pytest.raises(ChecksumMismatch, match="config.json"):
        store.get_dir(prefix, tmp_path / "restored2")

    (src / MANIFEST_NAME).write_text("{}")
    with pytest.raises(StoreError, match="reserved"):
        store.put_dir(src, "runs/x")


def test_put_blob_is_content_addressed_and_deduplicated(store, tmp_path, monkeypatch):
    f = tmp_path / "data.npy"
    f.write_bytes(os.urandom(5000))
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    ref = store.put_blob(f)
    assert ref.key == f"blobs/sha256/{sha[:2]}/{sha}" == content_key("blobs", sha)
    assert ref.sha256 == sha and store.get_bytes(ref.key) == f.read_bytes()

    calls = []
    original = type(store)._put
    monkeypatch.setattr(type(store), "_put", lambda self, *a: calls.append(a) or original(self, *a))
    again = store.put_blob(f)
    assert again == ref and calls == []  # no second upload
    other = tmp_path / "other.bin"
    other.write_bytes(b"different")
    ref2 = store.put_blob(other, namespace="datasets")
    assert ref2.key.startswith("datasets/sha256/") and len(calls) == 1


@pytest.mark.parametrize(
    "key", ["", "/abs/key", "a//b", "a/../b", "..", "a/./b", "a\\b", "trailing/", "x.sha256", "a/.distill-tmp-1"]
)
def test_invalid_keys_are_rejected(store, key):
    with pytest.raises(StoreError, match="invalid key"):
        store.put_bytes(b"x", key)
    with pytest.raises(StoreError, match="invalid key"):
        store.get_bytes(key)
    with pytest.raises(StoreError, match="invalid key"):
        store.exists(key)


def test_key_helpers():
    assert run_prefix("abc-123", "teacher", "model") == "runs/abc-123/teacher/model"
    with pytest.raises(StoreError):
        run_prefix("a/b")
    with pytest.raises(StoreError):
        run_prefix("")
    with pytest.raises(StoreError):
        content_key("blobs", "not-a-sha")
    with pytest.raises(StoreError):
        content_key("../x", "0" * 64)


class FailingSource(io.BytesIO):
    """Seekable; reads fine for hashing, then raises halfway through the upload pass."""

    def __init__(self, data: bytes, fail_at: int):
        super().__init__(data)
        self.fail_at, self.rewinds = fail_at, 0

    def seek(self, *args):
        self.rewinds += 1
        return super().seek(*args)

    def read(self, n=-1):
        if self.rewinds and self.tell() >= self.fail_at:
            raise OSError("simulated I/O error halfway through the upload")
        return super().read(n)


class ChangingSource(io.BytesIO):
    """Seekable; the bytes change between the hashing pass and the upload pass."""

    def seek(self, *args):
        pos = super().seek(*args)
        buf = self.getbuffer()
        buf[len(buf) // 2] ^= 0xFF
        del buf
        return pos


def _s3_calls(store) -> list[str]:
    calls: list[str] = []
    store._client.meta.events.register("before-call.s3.*", lambda model, **kw: calls.append(model.name))
    return calls


@pytest.mark.parametrize("source_kind", ["fails-halfway", "changes-under-us"])
def test_failed_upload_leaves_nothing_under_the_key(store, tmp_path, source_kind):
    data = os.urandom(12 * MiB)  # > multipart threshold (5 MiB) of the S3 store
    store.put_bytes(b"old version", "runs/r/keep.bin")
    calls = _s3_calls(store) if isinstance(store, S3Store) else []

    for key in ("runs/r/new.bin", "runs/r/keep.bin"):
        source = FailingSource(data, fail_at=7 * MiB) if source_kind == "fails-halfway" else ChangingSource(data)
        with pytest.raises(StoreError) as exc:
            store.put_fileobj(source, key)
        if source_kind == "changes-under-us":
            assert isinstance(exc.value, ChecksumMismatch)

    assert not store.exists("runs/r/new.bin")
    assert store.list("runs/r") == ["runs/r/keep.bin"]
    assert store.get_bytes("runs/r/keep.bin") == b"old version"  # a failed overwrite keeps the old object
    if isinstance(store, FileStore):
        assert no_temp_files(store.root)
    else:
        # a multipart upload really was started, and then aborted
        assert "CreateMultipartUpload" in calls and "AbortMultipartUpload" in calls
        assert "CompleteMultipartUpload" not in calls
        pending = store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert pending == []


def test_large_upload_roundtrip(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    ref = store.put_file(src, "big.bin")
    assert store.verify("big.bin") == ref
    if isinstance(store, S3Store):  # went up as multipart: ETag "<md5>-<parts>"
        head = store._client.head_object(Bucket=store.bucket, Key="pfx/big.bin")
        assert head["ETag"].strip('"').endswith("-3")
    assert store.get_file("big.bin", tmp_path / "big2.bin").read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- S3 specifics


def test_missing_bucket_error(s3_env):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist") as exc:
        open_store("s3://no-such-bucket-here/some/prefix")
    assert "create_bucket=True" in str(exc.value)
    store = open_store("s3://created-on-demand/x", create_bucket=True)
    assert isinstance(store, S3Store) and store.url == "s3://created-on-demand/x"
    assert open_store("s3://created-on-demand/x").list() == []  # exists now


def test_credentials_never_leak(s3_env, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-token")
    caplog.set_level("DEBUG", logger="tasks.storage")
    store = new_s3_store()
    texts = [repr(store), str(store), store.url, store.uri("a/b"), store.endpoint]
    texts.append(pickle.dumps(store).decode("latin-1"))
    errors = []
    store.put_bytes(b"abc", "x")
    tamper(store, "x", b"abd")
    for action in (
        lambda: store.get_bytes("x"),
        lambda: store.get_bytes("missing"),
        lambda: store.get_file("missing", tmp_path / "m"),
        lambda: store.put_bytes(b"x", "../x"),
        lambda: open_store("s3://no-such-bucket-leak"),
        lambda: open_store(f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"),
        lambda: store.put_fileobj(FailingSource(os.urandom(6 * MiB), 5 * MiB + 10), "y"),
    ):
        with pytest.raises(StoreError) as exc:
            action()
        errors.append(exc.value)
    for e in errors:
        texts += [str(e), repr(e), "".join(traceback.format_exception(e))]
    texts += [r.getMessage() for r in caplog.records]
    assert texts and all(SECRET not in t for t in texts)
    # the URL with credentials is refused without being echoed
    assert "credentials" in str(errors[5]) and "AKIAEXAMPLE" not in str(errors[5])


def test_s3_store_pickles_without_client(s3_env):
    store = new_s3_store()
    store.put_bytes(b"p", "k")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url and clone.get_bytes("k") == b"p"


# --------------------------------------------------------------------------- factory


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_STORE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    default = open_store()
    assert isinstance(default, FileStore) and default.root == (tmp_path / ".distill" / "store").resolve()
    assert default.url == f"file://{default.root}"

    monkeypatch.setenv("DISTILL_STORE_URL", f"file://{tmp_path}/envstore")
    assert open_store().root == tmp_path / "envstore"
    assert open_store(str(tmp_path / "plain")).root == tmp_path / "plain"
    assert open_store(tmp_path / "pathobj").root == tmp_path / "pathobj"
    assert open_store("relative/dir").root == tmp_path / "relative" / "dir"
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="local"):
        open_store("file://otherhost/x")
