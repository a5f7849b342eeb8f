"""Integrity errors, containment of file:// stores, key limits, and credentials in the S3 endpoint URL."""

from __future__ import annotations

import pickle
import traceback
import uuid

import pytest

from tasks.storage import (
    ChecksumMismatch,
    DirNotFound,
    FileStore,
    IntegrityError,
    LockTimeout,
    ObjectNotFound,
    S3Store,
    StoreError,
    is_integrity_error,
)
from tests.servers import free_port
from tests.test_storage import moto, s3_env, store, tamper  # noqa: F401 - fixtures

SECRET = "pw-SEKRET-5d1e9b"


# --------------------------------------------------------------------------- integrity errors


def test_integrity_errors_share_a_base_and_pickle():
    errors = [
        ChecksumMismatch("a/b", "0" * 64, "1" * 64),
        IntegrityError("manifest is not valid JSON"),
        ObjectNotFound("a/b", "file:///x"),
        DirNotFound("a/MANIFEST.json", "file:///x"),
        LockTimeout("locks/promote/m", 1.5, "file:///x", "host:1:abc"),
    ]
    for e in errors:
        clone = pickle.loads(pickle.dumps(e))  # Prefect persists task exceptions
        assert type(clone) is type(e) and str(clone) == str(e) and isinstance(clone, StoreError)
    assert issubclass(ChecksumMismatch, IntegrityError) and issubclass(IntegrityError, StoreError)
    assert [is_integrity_error(e) for e in errors] == [True, True, False, False, False]


def test_is_integrity_error_recognises_core_errors():
    from distill.checkpoint import CheckpointError, CheckpointMismatch
    from distill.image.data import DataError

    assert is_integrity_error(CheckpointError("bad checkpoint"))
    assert is_integrity_error(CheckpointMismatch("other config"))
    assert is_integrity_error(DataError("bad data"))
    from distill.lm.stages import TokenizerMismatch

    assert is_integrity_error(TokenizerMismatch("teacher vs student"))  # a retry would fail the same way
    for exc in (StoreError("network down"), RuntimeError("x"), ValueError("x"), OSError(5, "EIO"), None):
        assert not is_integrity_error(exc)
    # a wrapper raised explicitly from an integrity error is one too; an error merely raised while handling one is not
    try:
        try:
            raise ChecksumMismatch("k", "0" * 64, "1" * 64)
        except ChecksumMismatch as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as outer:
        assert is_integrity_error(outer)
    try:
        try:
            raise ChecksumMismatch("k", "0" * 64, "1" * 64)
        except ChecksumMismatch:
            raise RuntimeError("cleanup failed")
    except RuntimeError as outer:
        assert not is_integrity_error(outer)


# --------------------------------------------------------------------------- containment


def test_symbolic_links_in_a_file_store_are_refused(tmp_path):
    store = FileStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    (outside / "victim.txt.sha256").write_text(f"{'0' * 64}  victim.txt\n")
    (store.root / "runs").mkdir()
    (store.root / "runs" / "evil").symlink_to(outside, target_is_directory=True)
    (store.root / "link.bin").symlink_to(outside / "victim.txt")
    (store.root / "link.bin.sha256").write_text(f"{'0' * 64}  link.bin\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("x")

    actions = {
        "put": lambda: store.put_bytes(b"pwned", "runs/evil/victim.txt"),
        "put new": lambda: store.put_bytes(b"pwned", "runs/evil/new/file.txt"),
        "get": lambda: store.get_bytes("runs/evil/victim.txt"),
        "get link": lambda: store.get_bytes("link.bin"),
        "stat": lambda: store.stat("runs/evil/victim.txt"),
        "exists": lambda: store.exists("runs/evil/victim.txt"),
        "list": lambda: store.list("runs/evil"),
        "delete": lambda: store.delete("runs/evil/victim.txt"),
        "delete link": lambda: store.delete("link.bin"),
        "put_dir": lambda: store.put_dir(src, "runs/evil/dir"),
        "get_dir": lambda: store.get_dir("runs/evil", tmp_path / "out"),
    }
    for what, action in actions.items():
        with pytest.raises(StoreError, match="symbolic link") as exc:
            action()
        assert str(tmp_path / "outside") not in str(exc.value), what
    (store.root / ".distill-locks").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        with store.lock("promote/x", timeout=0):
            pass
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt", "victim.txt.sha256"]
    assert (outside / "victim.txt").read_text() == "keep me"
    assert store.list("") == [] and store.list("runs") == []  # links are never listed


@pytest.mark.parametrize("key, limit", [("a/" + "x" * 256, "255"), ("d/" * 400 + "f" * 300, "1024")])
def test_overlong_keys_raise_store_error(store, key, limit):
    for action in (lambda: store.put_bytes(b"x", key), lambda: store.get_bytes(key), lambda: store.exists(key)):
        with pytest.raises(StoreError, match=limit) as exc:
            action()
        assert len(str(exc.value)) < 300  # the key is truncated in the message


def test_key_length_limits_count_bytes_and_the_backend(store):
    key = "é" * 120 + "/" + "é" * 128  # 256 bytes in the last segment, 128 characters
    with pytest.raises(StoreError, match="255"):
        store.put_bytes(b"x", key)
    long_name = "n" * 250  # fits a segment, but not with the FileStore's ".sha256" sidecar
    if isinstance(store, FileStore):
        with pytest.raises(StoreError, match="sidecar"):
            store.put_bytes(b"x", long_name)
    else:
        assert store.put_bytes(b"x", long_name).size == 1
        key = "/".join(["k" * 200] * 5) + "/" + "k" * 18  # 1023 bytes: a valid key, too long with "pfx/"
        with pytest.raises(StoreError, match="1024") as exc:
            store.put_bytes(b"x", key)
        assert "pfx" in str(exc.value) and len(str(exc.value)) < 300
        with pytest.raises(StoreError, match="1024"):
            store.list(key)


# --------------------------------------------------------------------------- credentials in the endpoint URL


def _texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


@pytest.mark.parametrize("how", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "argument"])
def test_endpoint_password_never_leaks_from_an_unreachable_endpoint(monkeypatch, how):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://admin:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    kwargs = {}
    if how == "argument":
        kwargs["endpoint_url"] = endpoint
    else:
        monkeypatch.setenv(how, endpoint)
    with pytest.raises(StoreError, match="cannot reach S3 endpoint http://127.0.0.1:") as exc:
        S3Store("some-bucket", "p", **kwargs)
    texts = _texts(exc.value)
    assert all(SECRET not in t and "admin" not in t for t in texts)


def test_endpoint_password_never_leaks_from_a_working_store(s3_env, monkeypatch, tmp_path):
    endpoint = s3_env.endpoint.replace("http://", f"http://admin:{SECRET}@")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = S3Store(f"leak-test-{uuid.uuid4().hex[:8]}", "pfx", create_bucket=True)
    store.put_bytes(b"abc", "x")  # the store works: user info is stripped, not sent
    assert store.get_bytes("x") == b"abc"
    texts = [repr(store), str(store), store.url, store.uri("a/b"), store.endpoint,
             pickle.dumps(store).decode("latin-1")]
    assert store.endpoint == s3_env.endpoint
    tamper(store, "x", b"abd")
    for action in (
        lambda: store.get_bytes("x"),
        lambda: store.get_bytes("missing"),
        lambda: store.get_dir("no/dir", tmp_path / "d"),
        lambda: store.put_bytes(b"x", "k" * 1100),
        lambda: S3Store("no-such-bucket-here"),
    ):
        with pytest.raises(StoreError) as exc:
            action()
        texts += _texts(exc.value)
    assert all(SECRET not in t for t in texts)
