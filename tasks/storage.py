"""One small object-store interface over ``file://`` and ``s3://``.

Objects
-------
Every object is written atomically and carries the sha256 of its bytes, recorded at put time: a sidecar
``<key>.sha256`` for :class:`FileStore`, the object metadata ``sha256`` for :class:`S3Store`.  Every read
verifies it.  A reader never sees a torn object or a checksum error caused by a concurrent overwrite: S3
replaces an object and its metadata in one PUT; :class:`FileStore` swaps object and sidecar in (and deletes
them) under an exclusive ``flock`` of their folder, and readers take the shared lock while they read the
sidecar and open the object, so they get the old pair or the new pair.

Keys are ``/``-separated relative paths (``runs/<flow-run-id>/teacher/model.safetensors``), at most 1024
bytes of UTF-8 including the store's own prefix (S3's limit) and 255 bytes per segment.  Callers make them
run-scoped (:func:`run_prefix`) or content-addressed (:func:`content_key`, :meth:`Store.put_blob`).
Segments starting with ``.distill-`` and names ending in ``.sha256`` are reserved for the store itself.
:class:`FileStore` refuses every key whose path leads through a symbolic link or out of its root.

Published folders
-----------------
:meth:`Store.put_dir` publishes a local folder under ``prefix`` as immutable *generations*::

    <prefix>/MANIFEST.json                 {"format": "distill.dir/2", "generation": "<gen>",
                                             "files": {"<relpath>": {"sha256": "...", "size": N}, ...}}
    <prefix>/.gen/<gen>/<relpath>          the files of generation <gen> (never overwritten)

``<gen>`` is ``YYYYmmddTHHMMSSffffffZ-<8 hex>`` (UTC time of the upload, so generations sort by age).  The
files are uploaded first; then the one ``MANIFEST.json`` object is replaced in a single atomic write: a
reader sees the old complete version or the new complete version, never a mix and never neither.  A
publish of content identical to the current manifest (whose objects are intact) writes nothing.  After a
publish, the generation that was replaced is kept (for readers still downloading it) and the ones older than
it are deleted.  A reader that finds an object gone re-reads the manifest and, if a newer generation
replaced the one it was reading, starts again (:meth:`Store.get_dir`, :meth:`Store.get_dir_file`,
:meth:`Store.fetch_dir`).  Concurrent publishes of *different* content to one prefix: the last manifest
written wins; a generation still being uploaded is newer than the one the winner replaced, so it is not
garbage-collected under its writer.

The previous layout (``MANIFEST.json`` = ``{relpath: {sha256, size}}`` with the files at
``<prefix>/<relpath>``) is still read; the next publish over it replaces it and deletes its files.
Because files no longer live at ``<prefix>/<relpath>``, read one file of a folder with
:meth:`Store.get_dir_file` and list it with :meth:`Store.dir_manifest`.

Locks
-----
:meth:`Store.lock` is a lease in the store (``.distill-locks/<name-slug>-<hash>.lock`` under the store root,
a JSON record with owner id and expiry).  See its docstring for the guarantees of each backend.

Credentials never live in a store URL: S3 credentials and the endpoint come from the standard AWS
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ...).  User info in an endpoint URL is stripped before the client sees it; reprs,
``url``/``uri``/``endpoint`` values and error messages never contain credentials (:mod:`tasks.secrets`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import unquote, urlsplit

from distill.files import (
    PathEscapeError,
    atomic_write_bytes,
    atomic_write_chunks,
    atomic_write_json,
    contained_path,
    fsync_dir,
    sha256_bytes,
    sha256_json,
    sha256_stream,
)

from .secrets import redact_text, redact_url, strip_userinfo

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
MANIFEST_NAME = "MANIFEST.json"
DIR_FORMAT = "distill.dir/2"
GEN_DIR = ".gen"
SIDECAR_SUFFIX = ".sha256"
RESERVED_MARK = ".distill-"  # segments starting with this are the store's own (temporaries, locks)
TMP_MARK = ".distill-tmp-"
LOCK_DIR = ".distill-locks"
MAX_KEY_BYTES = 1024  # S3's limit for a whole key (including the store prefix)
MAX_SEGMENT_BYTES = 255  # a file name on common file systems

DIR_READ_ATTEMPTS = 25  # re-reads of a folder whose manifest keeps moving to newer generations
FETCH_STATE = "store-objects.json"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_GEN_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{8}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")  # 3-63 chars (S3 rules, lenient on "_")

T = TypeVar("T")

__all__ = [
    "ChecksumMismatch",
    "DirNotFound",
    "FileStore",
    "IntegrityError",
    "Lease",
    "LockTimeout",
    "ObjectNotFound",
    "ObjectRef",
    "S3Store",
    "Store",
    "StoreError",
    "content_key",
    "is_integrity_error",
    "join_key",
    "open_store",
    "run_prefix",
    "sha256_file",
    "validate_key",
    "validate_prefix",
]


# --------------------------------------------------------------------------- errors


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


class IntegrityError(StoreError):
    """Stored or downloaded bytes do not match what was recorded for them, or the record (checksum,
    manifest) is missing or malformed.  Not transient: retrying reads the same bad bytes again."""


class ChecksumMismatch(IntegrityError):
    def __init__(self, key: str, expected: str, actual: str, what: str = "stored bytes"):
        self.key, self.expected, self.actual, self._what = key, expected, actual, what
        super().__init__(
            f"sha256 mismatch for key {_show(key)}: recorded {expected}, {what} hash to {actual}"
        )

    def __reduce__(self):  # picklable (Prefect persists task exceptions)
        return (type(self), (self.key, self.expected, self.actual, self._what))


class ObjectNotFound(StoreError):
    def __init__(self, key: str, where: str = ""):
        self.key, self._where = key, where
        super().__init__(f"object not found: {_show(key)}" + (f" ({where})" if where else ""))

    def __reduce__(self):
        return (type(self), (self.key, self._where))


class DirNotFound(ObjectNotFound):
    """No ``MANIFEST.json`` under a prefix: the folder was never published (or its upload did not finish)."""

    def __init__(self, key: str, where: str = ""):
        self.key, self._where = key, where
        StoreError.__init__(
            self,
            f"no {MANIFEST_NAME} at {_show(key)}" + (f" ({where})" if where else "")
            + ": the folder is missing or its upload did not complete",
        )


class LockTimeout(StoreError):
    def __init__(self, name: str, timeout: float, where: str = "", holder: str = ""):
        self.name, self.timeout, self._where, self.holder = name, timeout, where, holder
        super().__init__(
            f"timed out after {timeout:g}s waiting for lock {name!r}" + (f" in {where}" if where else "")
            + (f" (held by {holder})" if holder else "")
        )

    def __reduce__(self):
        return (type(self), (self.name, self.timeout, self._where, self.holder))


_CORE_INTEGRITY = {("distill.checkpoint", "CheckpointError"), ("distill.errors", "DataError"),
                   ("distill.image.stages", "ModelLoadError"), ("distill.lm.stages", "TokenizerMismatch")}


def is_integrity_error(exc: BaseException | None) -> bool:
    """True if ``exc`` (or an exception it was explicitly raised ``from``) means bad bytes rather than a
    passing fault: :class:`IntegrityError` (:class:`ChecksumMismatch`, ...), ``distill.checkpoint
    .CheckpointError``, ``distill.errors.DataError``, ``ModelLoadError`` and ``TokenizerMismatch`` (recognised by class, without importing the compute
    core).  For a Prefect ``retry_condition_fn``: such a failure fails at once instead of being retried."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, IntegrityError):
            return True
        for cls in type(exc).__mro__:
            module = cls.__module__ or ""
            for mod, name in _CORE_INTEGRITY:
                if cls.__name__ == name and (module == mod or module.startswith(mod + ".")):
                    return True
        exc = exc.__cause__
    return False


# --------------------------------------------------------------------------- keys


def _show(key: Any, limit: int = 80) -> str:
    """repr of a key for messages, truncated."""
    if isinstance(key, str) and len(key) > limit:
        return repr(key[:limit]) + f"... ({len(key.encode('utf-8', 'replace'))} bytes)"
    return repr(key)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative ``/``-separated key, else raise StoreError.

    Rejected: empty keys, absolute paths, backslashes, NUL, empty / ``.`` / ``..`` segments, keys over 1024
    bytes or with a segment over 255 bytes (UTF-8), and names reserved for the store's own files
    (``*.sha256`` sidecars, ``.distill-*`` temporaries and locks).
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid key {_show(key)}: must be a non-empty string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError(f"invalid key {_show(key)}: not encodable as UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise StoreError(f"invalid key {_show(key)}: {size} bytes, longer than the limit of {MAX_KEY_BYTES}")
    if key.startswith("/"):
        raise StoreError(f"invalid key {_show(key)}: absolute keys are not allowed")
    if "\\" in key or "\x00" in key:
        raise StoreError(f"invalid key {_show(key)}: backslash and NUL are not allowed")
    for seg in key.split("/"):
        if seg == "":
            raise StoreError(f"invalid key {_show(key)}: empty path segment")
        if seg in (".", ".."):
            raise StoreError(f"invalid key {_show(key)}: '.' and '..' segments are not allowed")
        if seg.startswith(RESERVED_MARK):
            raise StoreError(f"invalid key {_show(key)}: {RESERVED_MARK}* names are reserved")
        if len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise StoreError(
                f"invalid key {_show(key)}: segment {_show(seg, 40)} is longer than {MAX_SEGMENT_BYTES} bytes"
            )
    if key.endswith(SIDECAR_SUFFIX):
        raise StoreError(f"invalid key {_show(key)}: *{SIDECAR_SUFFIX} names are reserved for checksums")
    return key


def validate_prefix(prefix: str | None) -> str:
    """A key prefix: ``""`` (everything) or a valid key; one trailing ``/`` is tolerated."""
    if prefix is None or prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise StoreError(f"invalid prefix {_show(prefix)}")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if not stripped:
        raise StoreError(f"invalid prefix {_show(prefix)}")
    return validate_key(stripped)


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` (empty parts are skipped) and validate the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


def run_prefix(flow_run_id: str, *parts: str) -> str:
    """``runs/<flow_run_id>/<parts...>``: the key prefix for everything one flow run writes."""
    if not flow_run_id or "/" in str(flow_run_id):
        raise StoreError(f"invalid flow run id {_show(flow_run_id)}")
    return join_key("runs", str(flow_run_id), *parts)


def content_key(namespace: str, sha256: str) -> str:
    """``<namespace>/sha256/<hex[:2]>/<hex>``: the key of a content-addressed blob."""
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise StoreError(f"invalid sha256 {_show(sha256)}: expected 64 lowercase hex digits")
    return join_key(namespace, "sha256", sha256[:2], sha256)


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size) of a local file, streamed."""
    with open(path, "rb") as f:
        return sha256_stream(f)


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
            raise StoreError(f"source for key {_show(self._key)} returned more bytes than asked")
        if want > 0 and not data:
            raise StoreError(
                f"source for key {_show(self._key)} ended after {self._seen} of {self._size} bytes"
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
                f"source for key {_show(self._key)} is longer than {self._size} bytes (changed while uploading?)"
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


def _write_temp(folder: Path, chunks: Iterator[bytes] | bytes) -> Path:
    """A fsynced ``.distill-tmp-*`` file in ``folder`` (removed again on any failure).  The store needs the
    temporary on its own (not :func:`distill.files.atomic_write_chunks`) because it swaps two files in."""
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


@contextmanager
def _flocked(folder: Path, shared: bool = False) -> Iterator[None]:
    """A ``flock`` on a folder (exclusive, or shared): short critical sections of several processes."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _new_generation() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond:06d}Z-{uuid.uuid4().hex[:8]}"


def _check_expected(key: str, expect: dict | None, recorded: str, size: int) -> None:
    if expect is not None and (recorded != expect.get("sha256") or size != expect.get("size")):
        raise ChecksumMismatch(
            key, str(expect.get("sha256")), f"{recorded} ({size} bytes, manifest says {expect.get('size')})",
            what="the manifest entry vs the stored object: the object's bytes",
        )


# --------------------------------------------------------------------------- published folders


@dataclass(frozen=True)
class _DirVersion:
    """One published version of a folder, as read from its manifest."""

    prefix: str
    manifest_sha: str  # recorded sha256 of the MANIFEST.json object that was read: the version's identity
    generation: str | None  # None: the previous, flat layout
    files: dict[str, dict[str, Any]]

    @property
    def base(self) -> str:
        if self.generation is None:
            return self.prefix
        return join_key(self.prefix, GEN_DIR, self.generation)

    def key(self, rel: str) -> str:
        return join_key(self.base, rel)


def _parse_manifest(doc: Any, where: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(generation or None for the flat layout, {relpath: {sha256, size}}); IntegrityError if malformed."""
    generation = None
    files = doc
    if isinstance(doc, dict) and isinstance(doc.get("format"), str):
        if doc["format"] != DIR_FORMAT:
            raise IntegrityError(f"{where}: unsupported manifest format {doc['format']!r} (expected {DIR_FORMAT})")
        generation, files = doc.get("generation"), doc.get("files")
        if not isinstance(generation, str) or not _GEN_RE.match(generation):
            raise IntegrityError(f"{where}: manifest names no valid generation")
    if not isinstance(files, dict):
        raise IntegrityError(f"{where}: manifest is not a JSON object of files")
    out: dict[str, dict[str, Any]] = {}
    for rel, entry in files.items():
        try:
            validate_key(rel)
        except StoreError as e:
            raise IntegrityError(f"{where}: manifest lists a bad path: {e}") from None
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.match(entry["sha256"])
        size = entry.get("size") if isinstance(entry, dict) else None
        if not ok or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"{where}: manifest entry for {_show(rel)} is malformed")
        out[rel] = {"sha256": entry["sha256"], "size": size}
    return generation, out


def _scan_dir(root: Path) -> dict[str, tuple[Path, str, int]]:
    """{relpath: (path, sha256, size)} of every file under ``root``, checked against the reserved names."""
    found: dict[str, tuple[Path, str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                sha, size = sha256_file(p)
                found[rel] = (p, sha, size)
    for rel in found:
        top = rel.split("/", 1)[0]
        if rel == MANIFEST_NAME or top == GEN_DIR:
            raise StoreError(f"put_dir: {str(root)!r} contains a top-level {top}, which is reserved")
        validate_key(rel)
    return dict(sorted(found.items()))


def _local_file(out: Path, rel: str) -> Path:
    try:
        return contained_path(out, rel)
    except PathEscapeError as e:
        raise StoreError(f"manifest path {_show(rel)} leads outside {str(out)!r}: {e}") from None


def _local_mismatch(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first relpath whose local copy in ``folder`` is missing or differs (size, sha256), else None."""
    for rel, entry in sorted(files.items()):
        try:
            p = contained_path(folder, rel)
            if p.is_symlink() or not p.is_file() or p.stat().st_size != entry["size"]:
                return rel
            if sha256_file(p) != (entry["sha256"], entry["size"]):
                return rel
        except (OSError, PathEscapeError):
            return rel
    return None


def _swap_in(tmp: Path, target: Path, files: dict[str, dict[str, Any]]) -> None:
    """Rename the complete folder ``tmp`` to ``target``; a bad ``target`` is moved aside first; a good one
    (put there by a concurrent fetch) is kept and ``tmp`` is left for the caller to remove."""
    for _ in range(5):
        try:
            os.rename(tmp, target)
            fsync_dir(target.parent)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise StoreError(f"cannot move the fetched folder into {str(target)!r}: {e.strerror or e}") from None
        if _local_mismatch(target, files) is None:
            return
        trash = target.parent / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    raise StoreError(f"could not install a fetched folder at {str(target)!r} (kept changing)")


def _sweep_cache_slot(slot: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporaries of crashed fetches (``.fetch-*``, ``.trash-*``) older than ``max_age_s``."""
    now = time.time()
    for p in slot.glob(".*"):
        if p.name.startswith((".fetch-", ".trash-")):
            try:
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _read_json_file(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- locks


def _lock_id(name: str) -> str:
    """A file-name-safe, unique id for a lock name: ``<slug>-<sha256[:16]>.lock``."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise StoreError(f"invalid lock name {_show(name)}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "lock"
    return f"{slug}-{sha256_bytes(name.encode('utf-8'))[:16]}.lock"


def _lease_record(name: str, owner: str, ttl: float) -> bytes:
    now = time.time()
    rec = {"name": name, "owner": owner, "acquired": now, "expires": now + ttl, "ttl": ttl,
           "nonce": uuid.uuid4().hex}
    return json.dumps(rec, sort_keys=True).encode("utf-8")


def _lease_info(data: bytes | None) -> dict:
    try:
        rec = json.loads(data or b"")
        return rec if isinstance(rec, dict) else {}
    except ValueError:
        return {}


def _lease_expired(data: bytes) -> bool:
    """A malformed record counts as expired (it can only come from outside the store)."""
    try:
        return time.time() > float(_lease_info(data)["expires"])
    except (KeyError, TypeError, ValueError):
        return True


def _describe_holder(data: bytes | None) -> str:
    rec = _lease_info(data)
    if not rec:
        return ""
    try:
        left = float(rec["expires"]) - time.time()
        return f"{rec.get('owner')}, lease {'expires in %.1fs' % left if left >= 0 else 'expired'}"
    except (KeyError, TypeError, ValueError):
        return str(rec.get("owner", ""))


class Lease:
    """A held :meth:`Store.lock`.  A background thread renews it every ``ttl / 3`` seconds; ``lost`` turns
    true if another process took it over (it expired: the holder was stalled for longer than ``ttl``)."""

    def __init__(self, store: "Store", name: str, lock_id: str, owner: str, ttl: float, token: str):
        self.store, self.name, self.owner, self.ttl = store, name, owner, ttl
        self._lock_id, self._token = lock_id, token
        self.expires = time.time() + ttl
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew:{name}", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, owner={self.owner!r}, lost={self._lost})"

    def _start(self) -> None:
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = max(self.ttl / 3.0, 0.05)
        while not self._stop.wait(interval):
            data = _lease_record(self.name, self.owner, self.ttl)
            try:
                token = self.store._lock_replace(self._lock_id, self._token, data)
            except Exception as e:  # noqa: BLE001 - a passing fault: try again at the next interval
                log.warning("renewing lock %r failed (%s); retrying", self.name, redact_text(str(e)))
                continue
            if token is None:
                self._lost = True
                log.error("lock %r was taken over by another process (lease expired)", self.name)
                return
            self._token, self.expires = token, float(_lease_info(data)["expires"])

    def _release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._lost:
            return
        try:
            if not self.store._lock_delete(self._lock_id, self._token):
                log.warning("lock %r was no longer ours at release (taken over after expiry)", self.name)
        except Exception as e:  # noqa: BLE001 - never mask the body's outcome; the lease expires anyway
            log.warning("releasing lock %r failed (%s); it expires after %gs", self.name, redact_text(str(e)), self.ttl)


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
    def _open(self, key: str) -> Iterator[tuple[str, Iterator[bytes], str | None]]:
        """Yield (recorded sha256, iterator over the stored bytes, fingerprint or None). ObjectNotFound if
        absent.  The fingerprint identifies these exact stored bytes cheaply (see :meth:`_fingerprint`)."""

    def _fingerprint(self, key: str) -> str | None:
        """A cheap identity of the object's stored bytes (equal iff not rewritten), or None if the backend
        has none (then verifying means re-hashing)."""
        return None

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

    # lock records: opaque tokens identify one written version of a record
    @abstractmethod
    def _lock_create(self, lock_id: str, data: bytes) -> str | None:
        """Create the record if there is none; its token, or None if one exists."""

    @abstractmethod
    def _lock_read(self, lock_id: str) -> tuple[bytes | None, str | None]:
        """(record bytes, token), or (None, None) if there is no record."""

    @abstractmethod
    def _lock_replace(self, lock_id: str, token: str, data: bytes) -> str | None:
        """Replace the record iff it is still the version ``token``; the new token, or None."""

    @abstractmethod
    def _lock_delete(self, lock_id: str, token: str) -> bool:
        """Delete the record iff it is still the version ``token``."""

    def _prune_dirs(self, prefixes: list[str]) -> None:
        """Remove empty folders left by deleted keys (FileStore); nothing for object stores."""

    def _check_key(self, key: str) -> None:
        """Raise StoreError if ``key`` is not a valid key for this backend (length with the store prefix,
        symbolic links, ...)."""
        validate_key(key)

    # -- generic operations ------------------------------------------------------------
    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"

    __str__ = __repr__

    def put_fileobj(self, fileobj: BinaryIO, key: str) -> ObjectRef:
        """Store a readable binary stream. Seekable streams are hashed, rewound and read
        again (and must not change in between); others are spooled to a temp file first."""
        key = validate_key(key)
        if _seekable(fileobj):
            try:
                start = fileobj.tell()
                sha, size = sha256_stream(fileobj)
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
        sha = sha256_bytes(data)
        return self._put(_VerifyingReader(io.BytesIO(data), key, sha, len(data)), key, sha, len(data))

    def put_json(self, obj: Any, key: str) -> ObjectRef:
        data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        return self.put_bytes(data, key)

    def _iter_verified(self, key: str, info: dict, expect: dict | None = None) -> Iterator[bytes]:
        """The stored bytes of ``key``; at the end raises ChecksumMismatch if they do not hash to the recorded
        sha256 (or the recorded sha256/size differ from ``expect``), else fills ``info`` (ref, fingerprint)."""
        h = hashlib.sha256()
        size = 0
        with self._open(key) as (recorded, chunks, fingerprint):
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                yield chunk
        actual = h.hexdigest()
        if actual != recorded:
            raise ChecksumMismatch(key, recorded, actual)
        _check_expected(key, expect, recorded, size)
        info["ref"] = ObjectRef(uri=self.uri(key), key=key, sha256=actual, size=size)
        info["fingerprint"] = fingerprint

    def _read_verified(self, key: str, expect: dict | None = None) -> tuple[bytes, ObjectRef]:
        info: dict = {}
        data = b"".join(self._iter_verified(key, info, expect))
        return data, info["ref"]

    def _get_file(self, key: str, local_path: str | os.PathLike, expect: dict | None = None
                  ) -> tuple[ObjectRef, str | None]:
        info: dict = {}
        atomic_write_chunks(Path(local_path), self._iter_verified(validate_key(key), info, expect))
        return info["ref"], info["fingerprint"]

    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        """Download ``key`` to ``local_path`` (atomically), verifying the recorded sha256."""
        self._get_file(key, local_path)
        return Path(local_path)

    def get_bytes(self, key: str) -> bytes:
        return self._read_verified(validate_key(key))[0]

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key).decode("utf-8"))

    def verify(self, key: str, expect: dict | None = None) -> ObjectRef:
        """Re-hash the stored bytes and compare them to the recorded sha256 (and to ``expect``:
        ``{"sha256", "size"}``, if given)."""
        return self._verify(validate_key(key), expect)[0]

    def _verify(self, key: str, expect: dict | None) -> tuple[ObjectRef, str | None]:
        info: dict = {}
        for _ in self._iter_verified(key, info, expect):
            pass
        return info["ref"], info["fingerprint"]

    # -- published folders -------------------------------------------------------------
    def _dir_version(self, prefix: str) -> _DirVersion:
        mkey = join_key(prefix, MANIFEST_NAME)
        try:
            data, ref = self._read_verified(mkey)
        except ObjectNotFound:
            raise DirNotFound(mkey, self.url) from None
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise IntegrityError(f"{self.uri(mkey)}: manifest is not valid JSON") from None
        generation, files = _parse_manifest(doc, self.uri(mkey))
        return _DirVersion(prefix=prefix, manifest_sha=ref.sha256, generation=generation, files=files)

    def _read_dir(self, prefix: str, fn: Callable[[_DirVersion], T]) -> T:
        """Run ``fn`` on the current version of a folder; if it fails because the folder moved on to a newer
        version meanwhile (objects of the old one gone), run it again on the new one."""
        last: BaseException | None = None
        for attempt in range(DIR_READ_ATTEMPTS):
            version = self._dir_version(prefix)
            try:
                return fn(version)
            except IntegrityError:
                raise
            except StoreError as e:
                try:
                    now = self._dir_version(prefix)
                except StoreError:
                    raise e from None
                if now.manifest_sha == version.manifest_sha:
                    raise
                last = e
                log.debug("%s moved to a newer version while being read (%s); reading again",
                          self._dir_uri(prefix), e)
                time.sleep(min(0.01 * (attempt + 1), 0.2))
        raise StoreError(f"{self._dir_uri(prefix)} kept changing while being read ({DIR_READ_ATTEMPTS} attempts;"
                         f" last: {last})")

    def _dir_uri(self, prefix: str) -> str:
        return self.uri(prefix) if prefix else self.url

    def dir_manifest(self, prefix: str) -> dict[str, dict[str, Any]]:
        """``{relpath: {"sha256", "size"}}`` of the current published version of the folder at ``prefix``
        (its manifest read and verified); DirNotFound if none."""
        version = self._dir_version(validate_prefix(prefix))
        return {rel: dict(entry) for rel, entry in version.files.items()}

    def get_dir_file(self, prefix: str, relpath: str) -> bytes:
        """The bytes of one file of the published folder at ``prefix``, verified against the object's recorded
        sha256 and the manifest entry.  ObjectNotFound if the folder has no such file."""
        prefix, rel = validate_prefix(prefix), validate_key(relpath)

        def read(version: _DirVersion) -> bytes:
            entry = version.files.get(rel)
            if entry is None:
                raise ObjectNotFound(join_key(prefix, rel), f"not in {self.uri(join_key(prefix, MANIFEST_NAME))}")
            return self._read_verified(version.key(rel), expect=entry)[0]

        return self._read_dir(prefix, read)

    def _dir_intact(self, version: _DirVersion) -> bool:
        """Every object of ``version`` exists with the recorded sha256 and size of its manifest entry."""
        try:
            for rel, entry in version.files.items():
                ref = self.stat(version.key(rel))
                if ref.sha256 != entry["sha256"] or ref.size != entry["size"]:
                    return False
        except StoreError:
            return False
        return True

    def _current_dir(self, prefix: str) -> _DirVersion | None:
        try:
            return self._dir_version(prefix)
        except DirNotFound:
            return None
        except IntegrityError as e:
            log.warning("replacing a corrupt manifest: %s", e)
            return None

    def put_dir(self, local_dir: str | os.PathLike, prefix: str) -> dict[str, dict[str, Any]]:
        """Publish every file under ``local_dir`` as the new version of the folder at ``prefix`` (see the
        module docstring: a fresh generation, then one atomic write of ``prefix/MANIFEST.json``).  Readers see
        the old or the new complete version.  Content identical to the current version writes nothing.
        Returns ``{relpath: {"sha256", "size"}}``."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StoreError(f"put_dir: {str(root)!r} is not a directory")
        prefix = validate_prefix(prefix)
        local = _scan_dir(root)
        files = {rel: {"sha256": sha, "size": size} for rel, (_p, sha, size) in local.items()}
        current = self._current_dir(prefix)
        if current is not None and current.files == files and self._dir_intact(current):
            log.debug("%s is already published with this content", self._dir_uri(prefix))
            return files
        generation = _new_generation()
        base = join_key(prefix, GEN_DIR, generation)
        manifest_key = join_key(prefix, MANIFEST_NAME)
        keys = {rel: join_key(base, rel) for rel in local}
        for key in [*keys.values(), manifest_key]:
            self._check_key(key)  # every key is valid for this backend before anything is written
        try:
            for rel, (path, sha, size) in local.items():
                with open(path, "rb") as f:
                    self._put(_VerifyingReader(f, keys[rel], sha, size), keys[rel], sha, size)
        except BaseException:
            self._abandon(base)
            raise
        self.put_json({"format": DIR_FORMAT, "generation": generation, "files": files}, manifest_key)
        self._retire(prefix, current, generation)
        return files

    def _abandon(self, base: str) -> None:
        """Best effort: remove what a failed publish uploaded (else a later publish collects it)."""
        try:
            self._delete_quietly(self.list(base), [base])
        except Exception as e:  # noqa: BLE001 - never mask the error that made the publish fail
            log.warning("could not clean up %s after a failed publish: %s", self.uri(base), e)

    def _delete_quietly(self, keys: list[str], prune: list[str]) -> None:
        for key in keys:
            try:
                self.delete(key)
            except StoreError as e:
                log.warning("could not delete %s: %s", self.uri(key), e)
        self._prune_dirs(prune)

    def _retire(self, prefix: str, replaced: _DirVersion | None, new_generation: str) -> None:
        """After a publish: delete the files of the flat layout it replaced, or the generations older than the
        one it replaced (that one stays for readers still downloading it)."""
        if replaced is None:
            return
        try:
            if replaced.generation is None:
                flat = [replaced.key(rel) for rel in replaced.files if rel.split("/", 1)[0] != GEN_DIR]
                self._delete_quietly(flat, [])
                return
            gen_prefix = join_key(prefix, GEN_DIR)
            doomed: dict[str, list[str]] = {}
            for key in self.list(gen_prefix):
                gen = key[len(gen_prefix) + 1:].split("/", 1)[0]
                if _GEN_RE.match(gen) and gen < replaced.generation and gen != new_generation:
                    doomed.setdefault(gen, []).append(key)
            for gen, keys in sorted(doomed.items()):
                self._delete_quietly(keys, [join_key(gen_prefix, gen)])
        except StoreError as e:
            log.warning("garbage collection under %s failed (the publish succeeded): %s", self._dir_uri(prefix), e)

    def _download(self, version: _DirVersion, out: Path, written: set[str] | None = None) -> dict[str, str]:
        """Download every file of ``version`` into ``out`` (each atomically, verified against its recorded
        sha256 and the manifest).  Returns {key: fingerprint} for backends that have fingerprints."""
        fingerprints: dict[str, str] = {}
        for rel in sorted(version.files):
            key = version.key(rel)
            _ref, fp = self._get_file(key, _local_file(out, rel), expect=version.files[rel])
            if written is not None:
                written.add(rel)
            if fp is not None:
                fingerprints[key] = fp
        return fingerprints

    def get_dir(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Download the current published version of the folder at ``prefix`` into ``local_dir``, verifying
        every file against the manifest.  If a concurrent publish replaces the version being read, the
        download starts again on the new one (files of the old one that it lacks are removed again)."""
        prefix = validate_prefix(prefix)
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: set[str] = set()

        def download(version: _DirVersion) -> Path:
            for rel in sorted(written - set(version.files)):
                _local_file(out, rel).unlink(missing_ok=True)
                written.discard(rel)
            self._download(version, out, written)
            return out

        return self._read_dir(prefix, download)

    def fetch_dir(self, prefix: str, cache_root: str | os.PathLike) -> Path:
        """The current published version of the folder at ``prefix`` as a local folder under ``cache_root``,
        downloaded once and checked on every call.

        Every call reads the store's manifest (verified) and checks the store's objects: re-hashed
        (FileStore), or their identity (S3 ETag, recorded sha256 and size) compared with the one whose bytes
        were verified earlier, re-hashed if it changed.  A corrupt store object raises ChecksumMismatch even
        though a good local copy exists.  Then the local files are checked (size + sha256); a missing, bad
        or stale copy is downloaded again into a temporary folder and renamed into place, so concurrent
        callers (threads or processes) only ever see complete folders.

        Layout: ``cache_root/<sha256(url|prefix)[:20]>/<sha256(files)[:24]>/`` (one folder per content; a
        new version gets a new folder, earlier ones are left for processes that may still use them).
        Files in the folder that the manifest does not list are ignored."""
        prefix = validate_prefix(prefix)
        slot = Path(cache_root).expanduser().resolve() / sha256_bytes(f"{self.url}|{prefix}".encode())[:20]
        slot.mkdir(parents=True, exist_ok=True)
        return self._read_dir(prefix, lambda version: self._fetch_version(version, slot))

    def _fetch_version(self, version: _DirVersion, slot: Path) -> Path:
        target = slot / sha256_json(version.files)[:24]
        state_path = slot / FETCH_STATE
        seen = _read_json_file(state_path)
        before = dict(seen)
        if target.is_dir():
            self._check_store_objects(version, seen)
            bad = _local_mismatch(target, version.files)
            if bad is None:
                if seen != before:
                    atomic_write_json(state_path, seen)
                return target
            log.warning("local copy %s of %s is bad (%s); fetching it again", target, self._dir_uri(version.prefix), bad)
        _sweep_cache_slot(slot)
        tmp = Path(tempfile.mkdtemp(dir=slot, prefix=".fetch-"))
        try:
            seen.update(self._download(version, tmp))
            os.chmod(tmp, 0o755)
            _swap_in(tmp, target, version.files)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_json(state_path, seen)
        return target

    def _check_store_objects(self, version: _DirVersion, seen: dict) -> None:
        """Raise ChecksumMismatch if a store object of ``version`` is corrupt; ``seen`` maps keys to the
        fingerprints whose bytes were verified (updated in place)."""
        for rel, entry in sorted(version.files.items()):
            key = version.key(rel)
            fp = self._fingerprint(key)
            if fp is not None and seen.get(key) == fp:
                continue
            verified = self._verify(key, entry)[1]
            if verified is not None:
                seen[key] = verified

    # -- content-addressed blobs ------------------------------------------------------
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

    # -- locks ---------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, *, ttl: float = 120, timeout: float = 600, poll: float = 0.2) -> Iterator[Lease]:
        """A cross-process lock named ``name``, held as a lease in the store; yields the :class:`Lease`.

        The record holds an owner id (host:pid:random) and an expiry ``ttl`` seconds ahead; a background
        thread renews it every ``ttl / 3`` s while the block runs, so holds may last far longer than ``ttl``.
        A holder that died (or stalled past ``ttl``) loses the lease: its record expires and may be taken
        over.  Waits (polling every ~``poll`` s) at most ``timeout`` s, then raises :class:`LockTimeout`.  On
        exit the record is deleted only if it is still ours.

        FileStore: records are created with ``O_CREAT|O_EXCL``; creation, takeover, renewal and release
        (compare-and-swap on the record's sha256) run under an exclusive ``flock`` of the lock folder and
        reads under a shared one, so a record is never seen half written and two takers of an expired lease
        cannot both win (the store must be on a file system with working ``flock``: local, or NFSv4).  S3Store: conditional writes (``If-None-Match: *`` to create,
        ``If-Match: <ETag>`` to take over, renew and delete), then a read-back of the record; on AWS S3 and
        MinIO the conditions are atomic.  moto's server checks a condition and then writes without a lock,
        so two requests inside that window can both pass; the read-back makes the earlier of the two see the
        later record and back off, which closes the window except for a writer stalled between its check and
        its write for longer than the other's whole round trip.  Expiry uses wall clocks: ``ttl`` must
        exceed the clock skew between hosts."""
        if not (ttl > 0) or timeout < 0 or not (poll > 0):
            raise StoreError(f"lock {name!r}: ttl and poll must be > 0 and timeout >= 0")
        lock_id = _lock_id(name)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + timeout
        while True:
            token, holder = self._lock_try(lock_id, name, owner, ttl)
            if token is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(name, timeout, self.url, redact_text(_describe_holder(holder)))
            time.sleep(min(left, poll * random.uniform(0.5, 1.5)))
        lease = Lease(self, name, lock_id, owner, ttl, token)
        lease._start()
        try:
            yield lease
        finally:
            lease._release()

    def _lock_try(self, lock_id: str, name: str, owner: str, ttl: float) -> tuple[str | None, bytes | None]:
        """One attempt: create the record, or take over an expired one.  (token or None, current record)."""
        data = _lease_record(name, owner, ttl)
        token = self._lock_create(lock_id, data)
        current: bytes | None = None
        if token is None:
            current, current_token = self._lock_read(lock_id)
            if current is None:
                token = self._lock_create(lock_id, data)  # released in between
            elif _lease_expired(current):
                token = self._lock_replace(lock_id, current_token, data)
                if token is not None:
                    log.warning("lock %r: took over the expired lease of %s", name, _describe_holder(current))
        if token is None:
            return None, current
        current, current_token = self._lock_read(lock_id)  # read back (see lock())
        return (token, None) if current_token == token else (None, current)


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

    def _path(self, key: str, *, is_object: bool = True) -> Path:
        """The path of a key, refused if it leads through a symbolic link or out of the root."""
        key = validate_key(key)
        segs = key.split("/")
        if is_object and len(segs[-1].encode("utf-8")) > MAX_SEGMENT_BYTES - len(SIDECAR_SUFFIX):
            raise StoreError(
                f"invalid key {_show(key)}: its last segment is longer than"
                f" {MAX_SEGMENT_BYTES - len(SIDECAR_SUFFIX)} bytes (no room for the {SIDECAR_SUFFIX} sidecar)"
            )
        path = self.root
        for seg in segs:
            path = path / seg
            if path.is_symlink():
                rel = path.relative_to(self.root).as_posix()
                raise StoreError(f"key {_show(key)}: {rel!r} is a symbolic link in {self.url}; refused")
        try:
            contained_path(self.root, key)
        except PathEscapeError:
            raise StoreError(f"key {_show(key)} leads outside {self.url}; refused") from None
        return path

    def _check_key(self, key: str) -> None:
        self._path(key)

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + SIDECAR_SUFFIX)

    def _sidecar_text(self, key: str, path: Path) -> str:
        sidecar = self._sidecar(path)
        if sidecar.is_symlink():
            raise StoreError(f"key {_show(key)}: its checksum sidecar is a symbolic link; refused")
        try:
            return sidecar.read_text(encoding="ascii")
        except FileNotFoundError:
            if not path.exists():
                raise ObjectNotFound(key, self.url) from None
            raise IntegrityError(
                f"no recorded sha256 for key {_show(key)} (incomplete write, or not written by this store)"
            ) from None
        except UnicodeDecodeError:
            raise IntegrityError(f"corrupt sha256 sidecar for key {_show(key)}") from None

    def _recorded(self, key: str, path: Path) -> tuple[str, str]:
        text = self._sidecar_text(key, path)
        sha = text.split()[0] if text.split() else ""
        if not _HEX64.match(sha):
            raise IntegrityError(f"corrupt sha256 sidecar for key {_show(key)}")
        return sha, text

    def _put(self, source: _VerifyingReader, key: str, sha256: str, size: int) -> ObjectRef:
        dest = self._path(key)
        if dest.is_dir():
            raise StoreError(f"cannot put key {_show(key)}: a folder of keys exists there")
        tmp_obj = tmp_sum = None
        try:
            # 1. stream + verify into temp files: a failure here leaves the key untouched
            tmp_obj = _write_temp(dest.parent, source.chunks())
            tmp_sum = _write_temp(dest.parent, f"{sha256}  {dest.name}\n".encode("utf-8"))
            # 2. swap object and checksum in under the folder's exclusive lock: readers (shared lock) see
            #    the old pair or the new one; a writer killed in here leaves "no recorded sha256"
            with _flocked(dest.parent):
                self._sidecar(dest).unlink(missing_ok=True)
                os.replace(tmp_obj, dest)
                os.replace(tmp_sum, self._sidecar(dest))
            fsync_dir(dest.parent)
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"put {self.uri(key)} failed: {type(e).__name__}: {e.strerror or e}") from None
        finally:
            for tmp in (tmp_obj, tmp_sum):
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha256, size=size)

    @contextmanager
    def _shared(self, key: str, path: Path) -> Iterator[None]:
        """The shared folder lock of ``path``: no swap or delete of an object in that folder meanwhile."""
        try:
            with _flocked(path.parent, shared=True):
                yield
        except FileNotFoundError:
            raise ObjectNotFound(key, self.url) from None
        except NotADirectoryError:
            raise ObjectNotFound(key, self.url) from None

    @contextmanager
    def _open(self, key: str):
        path = self._path(key)
        with self._shared(key, path):  # the sidecar and the object we open belong together
            if not path.is_file():
                raise ObjectNotFound(key, self.url)
            sha, _text = self._recorded(key, path)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                raise ObjectNotFound(key, self.url) from None
            except OSError as e:
                raise StoreError(f"get {self.uri(key)} failed: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:  # a later swap replaces the path, not the file we hold open
            yield sha, iter(lambda: f.read(CHUNK_SIZE), b""), None

    def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            with self._shared(key, path):
                return path.is_file() and self._sidecar(path).is_file()
        except ObjectNotFound:
            return False

    def stat(self, key: str) -> ObjectRef:
        path = self._path(key)
        with self._shared(key, path):
            if not path.is_file():
                raise ObjectNotFound(key, self.url)
            sha, _text = self._recorded(key, path)
            size = path.stat().st_size
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha, size=size)

    def list(self, prefix: str = "") -> list[str]:
        prefix = validate_prefix(prefix)
        base = self._path(prefix, is_object=False) if prefix else self.root
        keys: list[str] = []
        pending = [base]
        while pending:
            folder = pending.pop()
            try:
                with _flocked(folder, shared=True):  # no object of this folder is half swapped in meanwhile
                    entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise StoreError(f"list {self.url}: {e.strerror or e}") from None
            names = {e.name for e in entries}
            for entry in entries:
                if entry.name.startswith(RESERVED_MARK) or entry.is_symlink():
                    continue
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif not entry.name.endswith(SIDECAR_SUFFIX) and entry.name + SIDECAR_SUFFIX in names:
                    keys.append(Path(entry.path).relative_to(self.root).as_posix())  # complete objects only
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if not path.parent.is_dir():
                return
            with _flocked(path.parent):
                path.unlink(missing_ok=True)
                self._sidecar(path).unlink(missing_ok=True)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"delete {self.uri(key)} failed: {type(e).__name__}: {e.strerror or e}") from None

    def _prune_dirs(self, prefixes: list[str]) -> None:
        for prefix in prefixes:
            try:
                top = self._path(prefix, is_object=False)
            except StoreError:
                continue
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass

    # -- lock records ------------------------------------------------------------------
    def _lock_dir(self) -> Path:
        folder = self.root / LOCK_DIR
        if folder.is_symlink():
            raise StoreError(f"{LOCK_DIR} in {self.url} is a symbolic link; refused")
        folder.mkdir(exist_ok=True)
        return folder

    # every record is created, replaced and deleted under the lock folder's exclusive flock, and read under
    # its shared one: a record is never seen half written, and compare-and-swap has one winner
    def _lock_create(self, lock_id: str, data: bytes) -> str | None:
        folder = self._lock_dir()
        with _flocked(folder):
            try:
                fd = os.open(folder / lock_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(folder)
        return sha256_bytes(data)

    @staticmethod
    def _lock_record(folder: Path, lock_id: str) -> tuple[bytes | None, str | None]:
        try:
            data = (folder / lock_id).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, sha256_bytes(data)

    def _lock_read(self, lock_id: str) -> tuple[bytes | None, str | None]:
        folder = self._lock_dir()
        with _flocked(folder, shared=True):
            return self._lock_record(folder, lock_id)

    def _lock_replace(self, lock_id: str, token: str, data: bytes) -> str | None:
        folder = self._lock_dir()
        with _flocked(folder):
            if self._lock_record(folder, lock_id)[1] != token:
                return None
            atomic_write_bytes(folder / lock_id, data)
        return sha256_bytes(data)

    def _lock_delete(self, lock_id: str, token: str) -> bool:
        folder = self._lock_dir()
        with _flocked(folder):
            if self._lock_record(folder, lock_id)[1] != token:
                return False
            (folder / lock_id).unlink()
        fsync_dir(folder)
        return True


# --------------------------------------------------------------------------- s3://


def _rebuild_s3(bucket: str, prefix: str, options: dict) -> "S3Store":
    return S3Store(bucket, prefix, **options)


_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey", "404"}


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
            raise StoreError(f"invalid S3 bucket name {_show(bucket)}")
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
        endpoint, self._endpoint_secrets = self._resolve_endpoint(endpoint_url)
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            # self-hosted S3 (MinIO, moto) needs path-style addressing
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        self._session = boto3.session.Session(region_name=region_name)
        self._client = self._session.client("s3", endpoint_url=endpoint, config=config)
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
    @staticmethod
    def _resolve_endpoint(endpoint_url: str | None) -> tuple[str | None, list[str]]:
        """The endpoint (argument, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` as boto3 reads them,
        else MLflow's ``MLFLOW_S3_ENDPOINT_URL``) without user info, and the user info it carried.  S3
        authenticates with the AWS keys; user info in the URL is never sent, logged or echoed."""
        raw = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
               or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)
        if not raw:
            return None, []
        try:
            clean, user, password = strip_userinfo(raw)
        except ValueError:
            raise StoreError(f"invalid S3 endpoint URL {redact_url(raw)!r}") from None
        return clean, [s for s in (password, user) if s]

    @property
    def endpoint(self) -> str:
        """The endpoint URL (user info stripped)."""
        ep = self._client.meta.endpoint_url or ""
        try:
            return strip_userinfo(ep)[0]
        except ValueError:
            return redact_url(ep) or ""

    def _secrets(self) -> list[str]:
        values = [os.environ.get(v) for v in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]
        values += self._endpoint_secrets
        try:
            creds = self._session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                values += [frozen.secret_key, frozen.token, frozen.access_key]
        except Exception:
            pass
        return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)

    def _scrub(self, text: str) -> str:
        return redact_text(text, self._secrets())

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
                raise StoreError(self._scrub(
                    f"access denied to S3 bucket {self.bucket!r} at {self.endpoint}: check the AWS_* credentials"
                )) from None
            if not (code in ("404", "NoSuchBucket", "NotFound") or status == 404):
                raise self._error("head bucket", None, e) from None
        except BotoCoreError as e:
            raise StoreError(self._scrub(
                f"cannot reach S3 endpoint {self.endpoint} for bucket {self.bucket!r}: {type(e).__name__}: {e}"
            )) from None
        if not create:
            raise StoreError(self._scrub(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}; create it first"
                " (or pass create_bucket=True)"
            ))
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

    def _s3key(self, key: str) -> str:
        """The full S3 key of a valid key, refused if it exceeds S3's limit with the store prefix."""
        full = self._full(validate_key(key))
        size = len(full.encode("utf-8"))
        if size > MAX_KEY_BYTES:
            raise StoreError(
                f"invalid key {_show(key)}: {size} bytes with the store prefix {self.prefix!r},"
                f" longer than S3's limit of {MAX_KEY_BYTES}"
            )
        return full

    def _check_key(self, key: str) -> None:
        self._s3key(key)

    @staticmethod
    def _fp(etag: Any, sha: str, size: Any) -> str:
        return f"{str(etag).strip(chr(34))}|{sha}|{size}"

    # -- primitives ------------------------------------------------------------------
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(validate_key(key))}"

    def _put(self, source: _VerifyingReader, key: str, sha256: str, size: int) -> ObjectRef:
        # `source` exposes only read(): s3transfer treats it as non-seekable and reads it
        # once, sequentially, so the verification at its end runs before the upload is
        # completed.  Any exception makes s3transfer abort the multipart upload (and a
        # single PutObject is never sent), so nothing is left under the key.
        full = self._s3key(key)
        try:
            self._client.upload_fileobj(
                source,
                self.bucket,
                full,
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
        full = self._s3key(key)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            raise self._error("get", key, e) from None
        body = resp["Body"]
        try:
            sha = (resp.get("Metadata") or {}).get("sha256", "")
            if not _HEX64.match(sha):
                raise IntegrityError(f"no recorded sha256 for key {_show(key)} (object not written by this store)")

            def chunks():
                try:
                    yield from body.iter_chunks(CHUNK_SIZE)
                except StoreError:
                    raise
                except Exception as e:
                    raise self._error("get", key, e) from None

            yield sha, chunks(), self._fp(resp.get("ETag"), sha, resp.get("ContentLength"))
        finally:
            body.close()

    def _head(self, key: str) -> dict:
        full = self._s3key(key)
        try:
            return self._client.head_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            raise self._error("stat", key, e) from None

    def _fingerprint(self, key: str) -> str | None:
        resp = self._head(key)
        sha = (resp.get("Metadata") or {}).get("sha256", "")
        return self._fp(resp.get("ETag"), sha, resp.get("ContentLength"))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def stat(self, key: str) -> ObjectRef:
        key = validate_key(key)
        resp = self._head(key)
        sha = (resp.get("Metadata") or {}).get("sha256", "")
        if not _HEX64.match(sha):
            raise IntegrityError(f"no recorded sha256 for key {_show(key)} (object not written by this store)")
        return ObjectRef(uri=self.uri(key), key=key, sha256=sha, size=int(resp["ContentLength"]))

    def list(self, prefix: str = "") -> list[str]:
        prefix = validate_prefix(prefix)
        full = self._s3key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as e:
            raise self._error("list", prefix or None, e) from None
        return sorted(k for k in keys if not k.startswith(RESERVED_MARK))

    def delete(self, key: str) -> None:
        full = self._s3key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as e:
            err = self._error("delete", key, e)
            if not isinstance(err, ObjectNotFound):
                raise err from None

    # -- lock records ------------------------------------------------------------------
    def _lock_key(self, lock_id: str) -> str:
        return self._full(f"{LOCK_DIR}/{lock_id}")

    def _conditional(self, op: str, lock_id: str, call: Callable[[], T]) -> T | None:
        """Run a conditional request; None if its condition failed (someone else's record is there)."""
        from botocore.exceptions import ClientError

        try:
            return call()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _CONDITION_FAILED or status in _CONDITION_FAILED:
                return None
            raise StoreError(self._scrub(f"{op} lock record {lock_id} in {self.url} failed: {code}: "
                                         f"{e.response.get('Error', {}).get('Message', '')}")) from None
        except Exception as e:
            raise StoreError(self._scrub(f"{op} lock record {lock_id} in {self.url} failed: "
                                         f"{type(e).__name__}: {e}")) from None

    def _lock_create(self, lock_id: str, data: bytes) -> str | None:
        resp = self._conditional("create", lock_id, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._lock_key(lock_id), Body=data, IfNoneMatch="*",
            ContentType="application/json"))
        return None if resp is None else resp["ETag"]

    def _lock_read(self, lock_id: str) -> tuple[bytes | None, str | None]:
        def get():
            resp = self._client.get_object(Bucket=self.bucket, Key=self._lock_key(lock_id))
            with resp["Body"] as body:
                return body.read(), resp["ETag"]

        got = self._conditional("read", lock_id, get)
        return (None, None) if got is None else got

    def _lock_replace(self, lock_id: str, token: str, data: bytes) -> str | None:
        resp = self._conditional("replace", lock_id, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._lock_key(lock_id), Body=data, IfMatch=token,
            ContentType="application/json"))
        return None if resp is None else resp["ETag"]

    def _lock_delete(self, lock_id: str, token: str) -> bool:
        resp = self._conditional("delete", lock_id, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=self._lock_key(lock_id), IfMatch=token))
        return resp is not None


# --------------------------------------------------------------------------- factory


def open_store(url: str | os.PathLike | None = None, *, create_bucket: bool = False, **s3_options: Any) -> Store:
    """Open a store from a URL.

    ``None`` -> :func:`distill.home.store_url` (``$DISTILL_STORE_URL``, else ``<$DISTILL_HOME>/store``);
    ``file:///abs/dir`` or a plain path -> :class:`FileStore`;
    ``s3://bucket[/prefix]`` -> :class:`S3Store` (``create_bucket`` and ``s3_options`` apply only there).
    """
    if url is None:
        from distill import home

        url = home.store_url()
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
