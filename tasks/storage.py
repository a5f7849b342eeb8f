"""One small object-store interface over ``file://`` and ``s3://``.

Every object is written atomically and carries the sha256 of its bytes, recorded
at put time: a sidecar ``<key>.sha256`` for :class:`FileStore`, the object
metadata ``sha256`` for :class:`S3Store`.  Every read verifies it.

Keys are ``/``-separated relative paths (``runs/<flow-run-id>/teacher/model.safetensors``).
Callers make them run-scoped (:func:`run_prefix`) or content-addressed
(:func:`content_key`, :meth:`Store.put_blob`), so a key is never written by two
different producers with different content.

Credentials never live in a store URL: S3 credentials and the endpoint come from the
standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ...), which
boto3 reads itself.  Reprs, ``url``/``uri`` values and error messages never contain them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
MANIFEST_NAME = "MANIFEST.json"
SIDECAR_SUFFIX = ".sha256"
TMP_MARK = ".distill-tmp-"
DEFAULT_STORE_DIR = Path(".distill") / "store"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")  # 3-63 chars (S3 rules, lenient on "_")

__all__ = [
    "ChecksumMismatch",
    "FileStore",
    "ObjectNotFound",
    "ObjectRef",
    "S3Store",
    "Store",
    "StoreError",
    "content_key",
    "join_key",
    "open_store",
    "run_prefix",
    "sha256_file",
    "validate_key",
    "validate_prefix",
]


# --------------------------------------------------------------------------- basics


@dataclass(frozen=True)
class ObjectRef:
    uri: str
    key: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StoreError(RuntimeError):
    """Any storage failure. Messages name the key/URI, never credentials."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str, where: str = ""):
        self.key, self._where = key, where
        super().__init__(f"object not found: {key!r}" + (f" ({where})" if where else ""))

    def __reduce__(self):  # picklable (Prefect persists task exceptions)
        return (type(self), (self.key, self._where))


class ChecksumMismatch(StoreError):
    def __init__(self, key: str, expected: str, actual: str, what: str = "stored bytes"):
        self.key, self.expected, self.actual, self._what = key, expected, actual, what
        super().__init__(
            f"sha256 mismatch for key {key!r}: recorded {expected}, {what} hash to {actual}"
        )

    def __reduce__(self):
        return (type(self), (self.key, self.expected, self.actual, self._what))


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative ``/``-separated key, else raise StoreError.

    Rejected: empty keys, absolute paths, backslashes, NUL, empty / ``.`` / ``..``
    segments, and names reserved for the store's own files (``*.sha256`` sidecars,
    ``.distill-tmp-*`` temporaries).
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise StoreError(f"invalid key {key!r}: absolute keys are not allowed")
    if "\\" in key or "\x00" in key:
        raise StoreError(f"invalid key {key!r}: backslash and NUL are not allowed")
    for seg in key.split("/"):
        if seg == "":
            raise StoreError(f"invalid key {key!r}: empty path segment")
        if seg in (".", ".."):
            raise StoreError(f"invalid key {key!r}: '.' and '..' segments are not allowed")
        if seg.startswith(TMP_MARK):
            raise StoreError(f"invalid key {key!r}: {TMP_MARK}* names are reserved")
    if key.endswith(SIDECAR_SUFFIX):
        raise StoreError(f"invalid key {key!r}: *{SIDECAR_SUFFIX} names are reserved for checksums")
    return key


def validate_prefix(prefix: str | None) -> str:
    """A key prefix: ``""`` (everything) or a valid key; one trailing ``/`` is tolerated."""
    if prefix is None or prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise StoreError(f"invalid prefix {prefix!r}")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if not stripped:
        raise StoreError(f"invalid prefix {prefix!r}")
    return validate_key(stripped)


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` (empty parts are skipped) and validate the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


def run_prefix(flow_run_id: str, *parts: str) -> str:
    """``runs/<flow_run_id>/<parts...>``: the key prefix for everything one flow run writes."""
    if not flow_run_id or "/" in str(flow_run_id):
        raise StoreError(f"invalid flow run id {flow_run_id!r}")
    return join_key("runs", str(flow_run_id), *parts)


def content_key(namespace: str, sha256: str) -> str:
    """``<namespace>/sha256/<hex[:2]>/<hex>``: the key of a content-addressed blob."""
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise StoreError(f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits")
    return join_key(namespace, "sha256", sha256[:2], sha256)


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size) of a local file, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _hash_stream(f: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK_SIZE):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except Exception:
        return False


class _VerifyingReader:
    """Read-only, non-seekable view of a source that must yield exactly ``size`` bytes
    hashing to ``sha256``.  Raises StoreError (on the read that completes the stream) if
    the source changed since it was hashed, so that no store ever commits such an object.
    """

    def __init__(self, raw: BinaryIO, key: str, sha256: str, size: int):
        self._raw, self._key, self._sha, self._size = raw, key, sha256, size
        self._h = hashlib.sha256()
        self._seen = 0
        self._finished = False

    def read(self, n: int | None = -1) -> bytes:
        if self._finished:
            return b""
        remaining = self._size - self._seen
        want = remaining if n is None or n < 0 else min(n, remaining)
        data = self._raw.read(want) if want > 0 else b""
        if len(data) > want:  # pragma: no cover - misbehaving source
            raise StoreError(f"source for key {self._key!r} returned more bytes than asked")
        if want > 0 and not data:
            raise StoreError(
                f"source for key {self._key!r} ended after {self._seen} of {self._size} bytes"
                " (changed while uploading?)"
            )
        self._h.update(data)
        self._seen += len(data)
        if self._seen == self._size:
            self._finish()
        return data

    def _finish(self) -> None:
        self._finished = True
        if self._raw.read(1):
            raise StoreError(
                f"source for key {self._key!r} is longer than {self._size} bytes (changed while uploading?)"
            )
        actual = self._h.hexdigest()
        if actual != self._sha:
            raise ChecksumMismatch(self._key, self._sha, actual, what="source bytes (changed while uploading?)")

    def chunks(self) -> Iterator[bytes]:
        while True:
            data = self.read(CHUNK_SIZE)
            if not data:  # only after the verified end (a short source raises in read)
                return
            yield data


def _fsync_dir(path: Path) -> None:
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


def _write_temp(folder: Path, chunks: Iterator[bytes] | bytes) -> Path:
    """Write a fsynced temp file in ``folder`` (removed again on any failure)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TMP_MARK}{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as out:
            if isinstance(chunks, (bytes, bytearray)):
                out.write(chunks)
            else:
                for chunk in chunks:
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(dest: Path, chunks: Iterator[bytes] | bytes) -> None:
    """Write ``dest`` via a temp file in the same folder + fsync + os.replace."""
    tmp = _write_temp(dest.parent, chunks)
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


# --------------------------------------------------------------------------- interface


class Store(ABC):
    """Object store with recorded and verified sha256 checksums."""

    url: str  # base URL; never contains credentials

    # -- backend primitives ------------------------------------------------------------
    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def _put(self, source: _VerifyingReader, key: str, sha256: str, size: int) -> ObjectRef:
        """Store exactly the bytes of ``source`` under ``key`` (already validated) with the
        recorded ``sha256``.  On any failure nothing new may be left under ``key``."""

    @abstractmethod
    @contextmanager
    def _open(self, key: str) -> Iterator[tuple[str, Iterator[bytes]]]:
        """Yield (recorded sha256, iterator over the stored bytes). ObjectNotFound if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (a folder-like prefix: ``a/b`` matches ``a/b/...``), sorted."""

    @abstractmethod
    def stat(self, key: str) -> ObjectRef: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""

    # -- generic operations ------------------------------------------------------------
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    __str__ = __repr__

    def put_fileobj(self, fileobj: BinaryIO, key: str) -> ObjectRef:
        """Store a readable binary stream. Seekable streams are hashed, rewound and read
        again (and must not change in between); others are spooled to a temp file first."""
        key = validate_key(key)
        if _seekable(fileobj):
            try:
                start = fileobj.tell()
                sha, size = _hash_stream(fileobj)
                fileobj.seek(start)
            except OSError as e:
                raise StoreError(f"put {self.uri(key)} failed reading the source: {type(e).__name__}: {e}") from e
            return self._put(_VerifyingReader(fileobj, key, sha, size), key, sha, size)
        with tempfile.TemporaryFile() as spool:
            h = hashlib.sha256()
            size = 0
            try:
                while chunk := fileobj.read(CHUNK_SIZE):
                    h.update(chunk)
                    size += len(chunk)
                    spool.write(chunk)
            except OSError as e:
                raise StoreError(f"put {self.uri(key)} failed reading the source: {type(e).__name__}: {e}") from e
            spool.seek(0)
            sha = h.hexdigest()
            return self._put(_VerifyingReader(spool, key, sha, size), key, sha, size)

    def put_file(self, local_path: str | os.PathLike, key: str) -> ObjectRef:
        key = validate_key(key)
        path = Path(local_path)
        if not path.is_file():
            raise StoreError(f"put_file: {str(path)!r} is not a file")
        sha, size = sha256_file(path)
        with open(path, "rb") as f:
            ref = self._put(_VerifyingReader(f, key, sha, size), key, sha, size)
        log.debug("put %s (%d bytes, sha256 %s)", ref.uri, size, sha)
        return ref

    def put_bytes(self, data: bytes, key: str) -> ObjectRef:
        key = validate_key(key)
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        return self._put(_VerifyingReader(io.BytesIO(data), key, sha, len(data)), key, sha, len(data))

    def put_json(self, obj: Any, key: str) -> ObjectRef:
        data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        return self.put_bytes(data, key)

    def _read_verified(self, key: str, sink) -> ObjectRef:
        h = hashlib.sha256()
        size = 0
        with self._open(key) as (expected, chunks):
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                if sink is not None:
                    sink(chunk)
        actual = h.hexdigest()
        if actual != expected:
            raise ChecksumMismatch(key, expected, actual)
        return ObjectRef(uri=self.uri(key), key=key, sha256=actual, size=size)

    def _get_file(self, key: str, local_path: str | os.PathLike) -> ObjectRef:
        key = validate_key(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{TMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as out:
                ref = self._read_verified(key, out.write)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ref

    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        """Download ``key`` to ``local_path`` (atomically), verifying the recorded sha256."""
        self._get_file(key, local_path)
        return Path(local_path)

    def get_bytes(self, key: str) -> bytes:
        key = validate_key(key)
        buf = bytearray()
        self._read_verified(key, buf.extend)
        return bytes(buf)

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key).decode("utf-8"))

    def verify(self, key: str) -> ObjectRef:
        """Re-hash the stored bytes and compare them to the recorded sha256."""
        return self._read_verified(validate_key(key), None)

    def put_dir(self, local_dir: str | os.PathLike, prefix: str) -> dict[str, dict[str, Any]]:
        """Upload every file under ``local_dir`` to ``prefix/<relpath>``, then write
        ``prefix/MANIFEST.json`` ({relpath: {sha256, size}}) last: the directory is
        complete iff its manifest exists.  Returns the manifest."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StoreError(f"put_dir: {str(root)!r} is not a directory")
        prefix = validate_prefix(prefix)
        files: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                p = Path(dirpath) / name
                if p.is_file():
                    files.append((p.relative_to(root).as_posix(), p))
        files.sort()
        if any(rel == MANIFEST_NAME for rel, _ in files):
            raise StoreError(f"put_dir: {str(root)!r} contains a top-level {MANIFEST_NAME}, which is reserved")
        manifest_key = join_key(prefix, MANIFEST_NAME)
        self.delete(manifest_key)  # an overwritten dir is incomplete until its new manifest lands
        manifest: dict[str, dict[str, Any]] = {}
        for rel, path in files:
            ref = self.put_file(path, join_key(prefix, rel))
            manifest[rel] = {"sha256": ref.sha256, "size": ref.size}
        self.put_json(manifest, manifest_key)
        return manifest

    def get_dir(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Download a directory written by put_dir, verifying each file against its manifest."""
        prefix = validate_prefix(prefix)
        manifest_key = join_key(prefix, MANIFEST_NAME)
        try:
            manifest = self.get_json(manifest_key)
        except ObjectNotFound:
            raise StoreError(
                f"no {MANIFEST_NAME} under {self.uri(prefix) if prefix else self.url!r}:"
                " the directory is missing or its upload did not complete"
            ) from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{self.uri(manifest_key)}: manifest is not a JSON object")
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        for rel in sorted(manifest):
            entry = manifest[rel]
            key = join_key(prefix, validate_key(rel))
            ref = self._get_file(key, out.joinpath(*rel.split("/")))
            if ref.sha256 != entry.get("sha256") or ref.size != entry.get("size"):
                raise ChecksumMismatch(key, str(entry.get("sha256")), ref.sha256, what="manifest entry vs stored object")
        return out

    def put_blob(self, local_path: str | os.PathLike, namespace: str = "blobs") -> ObjectRef:
        """Content-addressed upload to ``content_key(namespace, sha256)``; skipped if an
        object with the same recorded sha256 and size is already there."""
        path = Path(local_path)
        if not path.is_file():
            raise StoreError(f"put_blob: {str(path)!r} is not a file")
        sha, size = sha256_file(path)
        key = content_key(namespace, sha)
        try:
            ref = self.stat(key)
            if ref.sha256 == sha and ref.size == size:
                log.debug("blob %s already stored", ref.uri)
                return ref
        except ObjectNotFound:
            pass
        except StoreError:
            pass  # e.g. no recorded checksum (incomplete earlier write): overwrite it
        with open(path, "rb") as f:
            return self._put(_VerifyingReader(f, key, sha, size), key, sha, size)


# --------------------------------------------------------------------------- file://


class FileStore(Store):
    """Objects are plain files under ``root``; ``<key>.sha256`` sidecars hold checksums
    (``sha256sum -c`` compatible). An object is complete iff both files exist."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root.as_posix()}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{validate_key(key)}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + SIDECAR_SUFFIX)

    def _recorded(self, key: str, path: Path) -> str:
        try:
            text = self._sidecar(path).read_text(encoding="ascii")
        except FileNotFoundError:
            raise StoreError(
                f"no recorded sha256 for key {key!r} (incomplete write, or not written by this store)"
            ) from None
        sha = text.split()[0] if text.split() else ""
        if not _HEX64.match(sha):
            raise StoreError(f"corrupt sha256 sidecar for key {key!r}")
        return sha

    def _put(self, source: _VerifyingReader, key: str, sha256: str, size: int) -> ObjectRef:
        dest = self._path(key)
        if dest.is_dir():
            raise StoreError(f"cannot put key {key!r}: a folder of keys exists there")
        try:
            # 1. stream + verify into a temp file: a failure here leaves the key untouched
            tmp = _write_temp(dest.parent, source.chunks())
            try:
                # 2. drop the old checksum, swap the object in: meanwhile the key reads as
                #    absent (incomplete), never as corrupt
                self._sidecar(dest).unlink(missing_ok=True)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(dest.parent)
            # 3. record the checksum: the object is complete
            _atomic_write(self._sidecar(dest), f"{sha256}  {dest.name}\n".encode("utf-8"))
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"put {self.uri(key)} failed: {type(e).__name__}: {e.strerror or e}") from e
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha256, size=size)

    @contextmanager
    def _open(self, key: str):
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key, self.url)
        sha = self._recorded(key, path)
        with open(path, "rb") as f:
            yield sha, iter(lambda: f.read(CHUNK_SIZE), b"")

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return path.is_file() and self._sidecar(path).is_file()

    def stat(self, key: str) -> ObjectRef:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key, self.url)
        sha = self._recorded(key, path)
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha, size=path.stat().st_size)

    def list(self, prefix: str = "") -> list[str]:
        prefix = validate_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            names = set(filenames)
            for name in filenames:
                if name.endswith(SIDECAR_SUFFIX) or name.startswith(TMP_MARK):
                    continue
                if name + SIDECAR_SUFFIX not in names:
                    continue  # incomplete object
                keys.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._sidecar(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- s3://


def _rebuild_s3(bucket: str, prefix: str, options: dict) -> "S3Store":
    return S3Store(bucket, prefix, **options)


class S3Store(Store):
    """Objects in an S3 (or S3-compatible: MinIO, moto) bucket, sha256 in the object
    metadata ``sha256``.  Uploads go through boto3's managed transfer (multipart above
    ``multipart_threshold``); a failed upload is aborted and leaves nothing under the key.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        create_bucket: bool = False,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        max_concurrency: int = 4,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._options = dict(
            endpoint_url=endpoint_url,
            region_name=region_name,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        # boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself; MLflow's variable is a fallback.
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint_url is None and not env_endpoint:
            endpoint_url = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
        custom_endpoint = bool(endpoint_url or env_endpoint)
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            # self-hosted S3 (MinIO, moto) needs path-style addressing
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
        )
        self._session = boto3.session.Session(region_name=region_name)
        self._client = self._session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        self._ensure_bucket(create_bucket)

    def __reduce__(self):  # picklable (e.g. as a Prefect task argument): the client is rebuilt
        return (_rebuild_s3, (self.bucket, self.prefix, self._options))

    # -- helpers ---------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The endpoint URL (user info stripped)."""
        ep = self._client.meta.endpoint_url or ""
        parts = urlsplit(ep)
        if parts.username or parts.password:
            host = parts.hostname or ""
            ep = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "") + parts.path
        return ep

    def _secrets(self) -> list[str]:
        values = [os.environ.get(v) for v in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]
        try:
            creds = self._session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                values += [frozen.secret_key, frozen.token, frozen.access_key]
        except Exception:
            pass
        return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _error(self, op: str, key: str | None, exc: BaseException) -> StoreError:
        from botocore.exceptions import ClientError

        where = self.uri(key) if key else self.url
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if key and (code in ("404", "NoSuchKey", "NotFound") or status == 404) and code != "NoSuchBucket":
                return ObjectNotFound(key, self.url)
            if code == "NoSuchBucket":
                return StoreError(f"{op} {where} failed: S3 bucket {self.bucket!r} does not exist")
            msg = f"{op} {where} failed: {code or status}: {err.get('Message', '')}"
        else:
            msg = f"{op} {where} failed: {type(exc).__name__}: {exc}"
        return StoreError(self._scrub(msg))

    def _ensure_bucket(self, create: bool) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("403", "AccessDenied") or status == 403:
                raise StoreError(
                    f"access denied to S3 bucket {self.bucket!r} at {self.endpoint}: check the AWS_* credentials"
                ) from None
            if not (code in ("404", "NoSuchBucket", "NotFound") or status == 404):
                raise self._error("head bucket", None, e) from None
        except BotoCoreError as e:
            raise StoreError(
                self._scrub(f"cannot reach S3 endpoint {self.endpoint} for bucket {self.bucket!r}: {type(e).__name__}: {e}")
            ) from None
        if not create:
            raise StoreError(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}; create it first"
                " (or pass create_bucket=True)"
            )
        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region not in ("us-east-1", "aws-global"):
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error("create bucket", None, e) from None
        except BotoCoreError as e:
            raise self._error("create bucket", None, e) from None
        log.info("created S3 bucket %s", self.bucket)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- primitives ------------------------------------------------------------------
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(validate_key(key))}"

    def _put(self, source: _VerifyingReader, key: str, sha256: str, size: int) -> ObjectRef:
        # `source` exposes only read(): s3transfer treats it as non-seekable and reads it
        # once, sequentially, so the verification at its end runs before the upload is
        # completed.  Any exception makes s3transfer abort the multipart upload (and a
        # single PutObject is never sent), so nothing is left under the key.
        try:
            self._client.upload_fileobj(
                source,
                self.bucket,
                self._full(key),
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Config=self._transfer,
            )
        except StoreError:
            raise
        except Exception as e:
            raise self._error("put", key, e) from None
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha256, size=size)

    @contextmanager
    def _open(self, key: str):
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as e:
            raise self._error("get", key, e) from None
        body = resp["Body"]
        try:
            sha = (resp.get("Metadata") or {}).get("sha256", "")
            if not _HEX64.match(sha):
                raise StoreError(f"no recorded sha256 for key {key!r} (object not written by this store)")

            def chunks():
                try:
                    yield from body.iter_chunks(CHUNK_SIZE)
                except StoreError:
                    raise
                except Exception as e:
                    raise self._error("get", key, e) from None

            yield sha, chunks()
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def stat(self, key: str) -> ObjectRef:
        key = validate_key(key)
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as e:
            raise self._error("stat", key, e) from None
        sha = (resp.get("Metadata") or {}).get("sha256", "")
        if not _HEX64.match(sha):
            raise StoreError(f"no recorded sha256 for key {key!r} (object not written by this store)")
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha, size=int(resp["ContentLength"]))

    def list(self, prefix: str = "") -> list[str]:
        prefix = validate_prefix(prefix)
        full = self._full(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as e:
            raise self._error("list", prefix or None, e) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        key = validate_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as e:
            err = self._error("delete", key, e)
            if not isinstance(err, ObjectNotFound):
                raise err from None


# --------------------------------------------------------------------------- factory


def open_store(url: str | os.PathLike | None = None, *, create_bucket: bool = False, **s3_options: Any) -> Store:
    """Open a store from a URL.

    ``None`` -> ``$DISTILL_STORE_URL`` -> ``file://<cwd>/.distill/store``;
    ``file:///abs/dir`` or a plain path -> :class:`FileStore`;
    ``s3://bucket[/prefix]`` -> :class:`S3Store` (``create_bucket`` and ``s3_options`` apply only there).
    """
    if url is None:
        url = os.environ.get("DISTILL_STORE_URL") or (Path.cwd() / DEFAULT_STORE_DIR)
    if isinstance(url, os.PathLike):
        return FileStore(url)
    if not isinstance(url, str) or not url:
        raise StoreError("empty store URL")
    if "://" not in url:
        return FileStore(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        # never echo the URL: it may carry credentials
        raise StoreError(
            f"credentials in a {scheme}:// store URL are not supported; use the standard AWS_* environment variables"
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"file:// store URLs must be local (got host {parts.netloc!r})")
        return FileStore(unquote(parts.path))
    if scheme == "s3":
        if not parts.netloc:
            raise StoreError("s3:// store URL without a bucket")
        return S3Store(parts.netloc, parts.path.strip("/"), create_bucket=create_bucket, **s3_options)
    raise StoreError(f"unsupported store URL scheme {scheme!r} (expected file:// or s3://)")
