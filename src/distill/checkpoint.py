"""Training-state checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``epoch-NNNN`` holding ``state.safetensors`` and ``state.json`` (which records the
sha256 of the tensor file). Folders are written under a temporary name and renamed into place, and the
``LATEST`` pointer is replaced atomically, so a process killed at any instant leaves either the previous or
the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: decode_state(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {k: decode_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        raise CheckpointError(f"malformed checkpoint node: {sorted(obj)}")
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


def save_checkpoint(root: str | Path, epoch: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/epoch-NNNN`` atomically and point ``root/LATEST`` at it. Returns the folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = encode_state(state, tensors)
        save_tensors_atomic(tmp / "state.safetensors", tensors)
        meta = {"epoch": epoch, "format": 1, "sha256": sha256_file(tmp / "state.safetensors"), "state": skeleton}
        atomic_write_json(tmp / "state.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / "LATEST", (name + "\n").encode())
    old = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / "LATEST"
    if not pointer.exists():
        return None
    folder = root / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def load_checkpoint(folder: str | Path) -> tuple[int, dict[str, Any]]:
    folder = Path(folder)
    meta_path, tensor_path = folder / "state.json", folder / "state.safetensors"
    for p in (meta_path, tensor_path):
        if not p.exists():
            raise CheckpointError(f"checkpoint file missing: {p}")
    meta = json.loads(meta_path.read_text())
    actual = sha256_file(tensor_path)
    if actual != meta.get("sha256"):
        raise CheckpointError(f"checksum mismatch for {tensor_path}: expected {meta.get('sha256')}, got {actual}")
    tensors = load_file(str(tensor_path))
    return int(meta["epoch"]), decode_state(meta["state"], tensors)
