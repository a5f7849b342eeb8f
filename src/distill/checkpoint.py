"""Training-state checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout of a checkpoint root (``<stage out_dir>/checkpoints``)::

    LATEST                  one line: "epoch-NNNN <sha256 of epoch-NNNN/checkpoint.json>"
    epoch-NNNN/
        state.safetensors   every tensor of the state (model, optimiser, RNG, best weights)
        state.json          the rest of the state as JSON; tensors are {"__tensor__": key} references
        checkpoint.json     the manifest: format, epoch, the run's fingerprint and the sha256 + size of
                            state.json and state.safetensors

Every byte of a checkpoint is covered: the manifest checksums both state files and the ``LATEST`` pointer
checksums the manifest. ``LATEST`` may only name a plain ``epoch-NNNN`` folder directly inside the root
(never a path, never a symbolic link). Any defect (missing or truncated file, invalid JSON, checksum
mismatch, dangling tensor reference, malformed node, unknown format) is one :class:`CheckpointError` that
names the checkpoint folder (or the root, for a bad pointer); a checkpoint written for another run
configuration (see ``fingerprint``) is a :class:`CheckpointMismatch`.

Folders are written under a temporary name and renamed into place, and ``LATEST`` is replaced atomically,
so a process killed at any instant leaves the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from .files import atomic_write_bytes, fsync_dir, sha256_bytes, sha256_file, sha256_json

FORMAT = 2
MANIFEST_NAME = "checkpoint.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
POINTER_NAME = "LATEST"
STATE_FILES = (STATE_JSON, STATE_TENSORS)

_EPOCH_DIR = re.compile(r"epoch-(\d{4,9})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".epoch-"

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "POINTER_NAME",
    "CheckpointError",
    "CheckpointMismatch",
    "checkpoint_name",
    "check_fingerprint",
    "clear_checkpoints",
    "decode_state",
    "encode_state",
    "fingerprint_diff",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "read_latest",
    "retained_checkpoints",
    "save_checkpoint",
    "save_tensors_atomic",
    "point_latest",
]


class CheckpointError(RuntimeError):
    """A checkpoint (or checkpoint root) that cannot be used; the message names the folder."""


class CheckpointMismatch(CheckpointError):
    """The checkpoints in a folder belong to another run configuration (another fingerprint)."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{int(epoch):04d}"


def _epoch_of(name: str) -> int | None:
    m = _EPOCH_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (through :func:`distill.files.atomic_write_bytes`)."""
    return atomic_write_bytes(path, _tensor_bytes(tensors, metadata))


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes that depend on the tensors and metadata only: safetensors writes a metadata dict in
    hash-map order, which differs between processes, so several entries are folded into one JSON entry with
    sorted keys. Same weights, same bytes, same sha256 (stage keys of students hash their teacher's file)."""
    if metadata and len(metadata) > 1:
        metadata = {"distill": json.dumps(metadata, sort_keys=True)}
    return safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


# --- fingerprints -------------------------------------------------------------------------------------------


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_diff(old: Any, new: Any, _path: str = "") -> list[str]:
    """Where two fingerprint documents differ: ``["role ('baseline' -> 'student')", "train.epochs (4 -> 2)"]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{_path}.{k}" if _path else str(k)
            if k not in old:
                out.append(f"{p} (absent -> {_short(new[k])})")
            elif k not in new:
                out.append(f"{p} ({_short(old[k])} -> absent)")
            else:
                out.extend(fingerprint_diff(old[k], new[k], p))
        return out
    if json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
        return []
    return [f"{_path or '(whole document)'} ({_short(old)} -> {_short(new)})"]


def _mismatch(folder: Path, recorded: Any, expected: dict) -> CheckpointMismatch:
    if isinstance(recorded, dict):
        why = "it differs in " + ", ".join(fingerprint_diff(recorded, expected))
    else:
        why = "it records no run fingerprint"
    return CheckpointMismatch(
        f"checkpoint {folder} belongs to another run configuration: {why}. Resuming it would mix two runs. "
        f"Start fresh with --no-resume (resume=False), which deletes the old checkpoints, "
        f"or delete {folder.parent}."
    )


# --- pickle-free encoding of nested state (optimizer/scheduler state dicts, RNG states) --------------------


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode_state(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        return {"__items__": [[k, encode_state(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint value of type {type(obj).__name__} at {path}")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`; a dangling tensor reference or a malformed node is a CheckpointError."""
    if isinstance(obj, dict):
        if len(obj) != 1:
            raise CheckpointError(f"malformed checkpoint node with keys {sorted(obj)}")
        (tag, body), = obj.items()
        if tag == "__tensor__":
            if not isinstance(body, str) or body not in tensors:
                raise CheckpointError(f"dangling tensor reference {body!r}: not in {STATE_TENSORS}")
            return tensors[body]
        if tag == "__dict__" and isinstance(body, dict):
            return {k: decode_state(v, tensors) for k, v in body.items()}
        if tag == "__items__" and isinstance(body, list) and all(isinstance(i, list) and len(i) == 2 for i in body):
            return {_hashable(k): decode_state(v, tensors) for k, v in body}
        if tag == "__tuple__" and isinstance(body, list):
            return tuple(decode_state(v, tensors) for v in body)
        raise CheckpointError(f"malformed checkpoint node {tag!r}")
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


def _hashable(k: Any) -> Any:
    if k is None or isinstance(k, (bool, int, float, str)):
        return k
    raise CheckpointError(f"malformed checkpoint node: dictionary key {k!r}")


# --- writing ------------------------------------------------------------------------------------------------


def _write_synced(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def save_checkpoint(
    root: str | Path,
    epoch: int,
    state: dict[str, Any],
    *,
    fingerprint: dict | None = None,
    keep_last: int | None = 2,
    keep_epochs: Iterable[int] = (),
) -> Path:
    """Write ``root/epoch-NNNN`` atomically, point ``root/LATEST`` at it, then prune (unless ``keep_last`` is
    None): keep the last ``keep_last`` epochs and those in ``keep_epochs``. Epoch folders newer than ``epoch``
    (left by an older, abandoned history of this root) are removed. Returns the folder.

    ``fingerprint`` is the JSON document that identifies the run configuration; it is recorded in the
    manifest, and :func:`load_checkpoint` refuses the checkpoint for any other fingerprint."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(epoch)
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{_TMP_PREFIX}{name[6:]}.tmp-"))
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = encode_state(state, tensors)
        files = {
            STATE_TENSORS: _write_synced(tmp / STATE_TENSORS, _tensor_bytes(tensors)),
            STATE_JSON: _write_synced(tmp / STATE_JSON, _json_bytes({"format": FORMAT, "epoch": epoch, "state": skeleton})),
        }
        manifest = {
            "format": FORMAT,
            "epoch": epoch,
            "fingerprint": fingerprint,
            "fingerprint_sha256": sha256_json(fingerprint) if fingerprint is not None else None,
            "files": files,
        }
        manifest_sha = _write_synced(tmp / MANIFEST_NAME, _json_bytes(manifest))["sha256"]
        fsync_dir(tmp)
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / POINTER_NAME, f"{name} {manifest_sha}\n".encode())
    for stale in retained_checkpoints(root):
        if _epoch_of(stale) > epoch:
            shutil.rmtree(root / stale, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(root, keep_last=keep_last, keep_epochs=keep_epochs)
    return final


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def point_latest(root: str | Path, name: str) -> str:
    """Point ``root/LATEST`` at the existing checkpoint folder ``root/name`` (after a restore from a store,
    say); records the sha256 of its manifest, which it returns. The folder is verified first."""
    root = Path(root)
    folder = _checkpoint_folder(root, name)
    manifest_sha = sha256_file(folder / MANIFEST_NAME) if (folder / MANIFEST_NAME).is_file() else None
    if manifest_sha is None:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST_NAME} missing")
    _verified_manifest(folder, manifest_sha)
    atomic_write_bytes(root / POINTER_NAME, f"{name} {manifest_sha}\n".encode())
    return manifest_sha


# --- retention ----------------------------------------------------------------------------------------------


def retained_checkpoints(root: str | Path) -> list[str]:
    """Names of the epoch folders in ``root`` (real folders named ``epoch-NNNN``), oldest first. After
    :func:`save_checkpoint` has pruned, these are exactly the checkpoints kept; a store mirror may drop the rest."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if _epoch_of(p.name) is not None and p.is_dir() and not p.is_symlink()]
    return sorted(names, key=_epoch_of)


def prune_checkpoints(root: str | Path, *, keep_last: int, keep_epochs: Iterable[int] = ()) -> list[str]:
    """Delete all epoch folders but the last ``keep_last``, those of ``keep_epochs`` and the one ``LATEST``
    names; also temporary folders of interrupted writes. Returns :func:`retained_checkpoints`."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    names = retained_checkpoints(root)
    keep = set(names[-keep_last:]) | {checkpoint_name(e) for e in keep_epochs}
    try:
        pointed = read_latest(root)
    except CheckpointError:
        pointed = None
    if pointed is not None:
        keep.add(pointed[0])
    for n in names:
        if n not in keep:
            shutil.rmtree(root / n, ignore_errors=True)
    for p in root.glob(f"{_TMP_PREFIX}*.tmp-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    return retained_checkpoints(root)


def clear_checkpoints(root: str | Path) -> None:
    """Remove ``LATEST``, every epoch folder and temporary leftovers from ``root`` (other files stay)."""
    root = Path(root)
    if not root.is_dir():
        return
    (root / POINTER_NAME).unlink(missing_ok=True)
    for p in root.iterdir():
        if _epoch_of(p.name) is not None or (p.name.startswith(_TMP_PREFIX) and ".tmp-" in p.name):
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p)


# --- reading ------------------------------------------------------------------------------------------------


def _checkpoint_folder(root: Path, name: str) -> Path:
    if _epoch_of(name) is None:
        raise CheckpointError(f"checkpoint root {root}: {POINTER_NAME} names {name!r}, not a plain epoch-NNNN folder")
    folder = root / name
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"checkpoint root {root}: {POINTER_NAME} names {name!r}, which is not a folder in it")
    return folder


def read_latest(root: str | Path) -> tuple[str, str] | None:
    """``(folder name, manifest sha256)`` from ``root/LATEST``, or None if there is no pointer."""
    root = Path(root)
    pointer = root / POINTER_NAME
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"checkpoint root {root}: cannot read {POINTER_NAME}: {e}") from e
    try:
        parts = raw.decode("ascii").split()
    except UnicodeDecodeError:
        parts = []
    if len(parts) != 2 or _epoch_of(parts[0]) is None or not _SHA256.fullmatch(parts[1]):
        raise CheckpointError(
            f"checkpoint root {root}: {POINTER_NAME} must read 'epoch-NNNN <sha256 of its {MANIFEST_NAME}>', "
            f"got {raw[:100]!r}"
        )
    return parts[0], parts[1]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``LATEST`` points at (verified to be an epoch folder directly inside ``root`` whose manifest
    matches the pointer), or None if there is no pointer."""
    root = Path(root)
    pointed = read_latest(root)
    if pointed is None:
        return None
    folder = _checkpoint_folder(root, pointed[0])
    _verified_manifest(folder, pointed[1])
    return folder


def _read_file(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {folder}: {name} missing") from e
    except OSError as e:
        raise CheckpointError(f"checkpoint {folder}: cannot read {name}: {e}") from e


def _parse_json(folder: Path, name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {name} is not valid JSON (truncated or edited?): {e}") from e


def _verified_manifest(folder: Path, manifest_sha256: str | None = None) -> dict:
    data = _read_file(folder, MANIFEST_NAME)
    if manifest_sha256 is not None and sha256_bytes(data) != manifest_sha256:
        raise CheckpointError(
            f"checkpoint {folder}: checksum mismatch for {MANIFEST_NAME}: sha256 {sha256_bytes(data)}, "
            f"{POINTER_NAME} says {manifest_sha256} (edited or corrupt)"
        )
    manifest = _parse_json(folder, MANIFEST_NAME, data)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST_NAME} has format {fmt!r}, expected {FORMAT}")
    epoch, files = manifest.get("epoch"), manifest.get("files")
    if type(epoch) is not int or epoch < 0 or (_epoch_of(folder.name) not in (None, epoch)):
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST_NAME} records epoch {epoch!r}, not that of the folder")
    for name in STATE_FILES:
        entry = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int):
            raise CheckpointError(f"checkpoint {folder}: {MANIFEST_NAME} has no valid entry for {name}")
    return manifest


def _verified_file(folder: Path, name: str, entry: dict) -> bytes:
    data = _read_file(folder, name)
    if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {folder}: checksum mismatch for {name}: {len(data)} bytes sha256 {sha256_bytes(data)}, "
            f"{MANIFEST_NAME} says {entry['bytes']} bytes sha256 {entry['sha256']}"
        )
    return data


def load_checkpoint(
    folder: str | Path, *, manifest_sha256: str | None = None, fingerprint: dict | None = None
) -> tuple[int, dict[str, Any]]:
    """``(epoch, state)`` of a checkpoint folder, every file verified against its manifest (and the manifest
    against ``manifest_sha256`` when given, as :func:`load_latest_checkpoint` does). With ``fingerprint``, a
    checkpoint of another run configuration is a :class:`CheckpointMismatch`."""
    folder = Path(folder)
    manifest = _verified_manifest(folder, manifest_sha256)
    if fingerprint is not None and manifest.get("fingerprint_sha256") != sha256_json(fingerprint):
        raise _mismatch(folder, manifest.get("fingerprint"), fingerprint)
    meta = _parse_json(folder, STATE_JSON, _verified_file(folder, STATE_JSON, manifest["files"][STATE_JSON]))
    blob = _verified_file(folder, STATE_TENSORS, manifest["files"][STATE_TENSORS])
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("epoch") != manifest["epoch"] or "state" not in meta:
        raise CheckpointError(f"checkpoint {folder}: {STATE_JSON} does not describe epoch {manifest['epoch']} in format {FORMAT}")
    try:
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {folder}: cannot read {STATE_TENSORS}: {e}") from e
    try:
        state = decode_state(meta["state"], tensors)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {folder}: {STATE_JSON}: {e}") from e
    return manifest["epoch"], state


def resume_checkpoint(root: str | Path, fingerprint: dict, *, fresh_hint: str):
    """:func:`check_fingerprint` then :func:`load_latest_checkpoint` (``None`` when there is none). A checkpoint
    of another fingerprint raises :class:`CheckpointMismatch`; any other defect is a :class:`CheckpointError`
    that ends with how to start fresh (``fresh_hint``)."""
    try:
        check_fingerprint(root, fingerprint)
        return load_latest_checkpoint(root, fingerprint=fingerprint)
    except CheckpointMismatch:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{e}. To discard the checkpoints in {root} and start over: {fresh_hint}") from e

def load_latest_checkpoint(root: str | Path, *, fingerprint: dict | None = None) -> tuple[Path, int, dict] | None:
    """``(folder, epoch, state)`` of the checkpoint ``root/LATEST`` names, fully verified; None without a pointer."""
    root = Path(root)
    pointed = read_latest(root)
    if pointed is None:
        return None
    folder = _checkpoint_folder(root, pointed[0])
    epoch, state = load_checkpoint(folder, manifest_sha256=pointed[1], fingerprint=fingerprint)
    return folder, epoch, state


def check_fingerprint(root: str | Path, fingerprint: dict) -> None:
    """Raise :class:`CheckpointMismatch` if any checkpoint in ``root`` was written for another fingerprint
    (and :class:`CheckpointError` if a manifest cannot be read)."""
    root = Path(root)
    expected = sha256_json(fingerprint)
    for name in retained_checkpoints(root):
        manifest = _verified_manifest(root / name)
        if manifest.get("fingerprint_sha256") != expected:
            raise _mismatch(root / name, manifest.get("fingerprint"), fingerprint)
