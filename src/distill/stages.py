"""The lab's stages (prepare, train teacher / baseline / student, evaluate) as plain functions over folders.

The CLI and the Prefect tasks both call these; outputs are files (safetensors, JSON), never pickles.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .checkpoint import atomic_write_json, save_tensors_atomic, sha256_file
from .config import DataConfig, EvalConfig, KDConfig, LabConfig
from .data import load_prepared, prepare_dataset, read_manifest
from .evaluate import evaluate as _evaluate
from .models import build_model
from .train import fit

log = logging.getLogger("distill.stages")

Role = Literal["teacher", "baseline", "student"]
ROLES = ("teacher", "baseline", "student")


def prepare(data_cfg: DataConfig, cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    prep = prepare_dataset(
        data_cfg.source,
        cache_dir or data_cfg.cache_dir,
        val_size=data_cfg.val_size,
        split_seed=data_cfg.split_seed,
        train_subset=data_cfg.train_subset,
        test_subset=data_cfg.test_subset,
        expected_classes=data_cfg.expected_classes,
        progress=progress,
    )
    return {"dir": str(prep.dir), "manifest": prep.manifest, "manifest_sha256": prep.manifest_sha256}


def load_model(model_dir: str | Path) -> nn.Module:
    """Rebuild a trained model from ``config.json`` + ``model.safetensors`` (no pickle involved)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "config.json").read_text())
    model = build_model(meta["model"]["name"], meta["num_classes"], **meta["model"].get("kwargs", {}))
    weights = model_dir / "model.safetensors"
    if meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise ValueError(f"checksum mismatch for {weights}")
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def train(
    role: Role,
    cfg: LabConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    teacher_dir: str | Path | None = None,
    kd: KDConfig | None = None,
    log_fn: Callable[[dict, int], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    resume: bool = True,
) -> dict:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "student" and teacher_dir is None:
        raise ValueError("role 'student' needs teacher_dir (the output folder of the teacher stage)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_prepared(data_dir)
    manifest = read_manifest(data_dir)
    classes = manifest["classes"]
    spec = cfg.teacher if role == "teacher" else cfg.student
    tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
    kd = (kd or cfg.kd) if role == "student" else None

    torch.manual_seed(tcfg.seed)  # baseline and student start from the same initial weights
    model = build_model(spec.name, len(classes), **spec.kwargs)
    teacher = load_model(teacher_dir) if role == "student" else None
    desc = role if kd is None else f"student T={kd.temperature:g} a={kd.alpha:g}"
    t0 = time.perf_counter()
    model, res = fit(
        model, data, tcfg, teacher=teacher, kd=kd, log_fn=log_fn,
        ckpt_dir=out_dir / "checkpoints", on_checkpoint=on_checkpoint, resume=resume, desc=desc,
    )
    wall = time.perf_counter() - t0
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    weights = out_dir / "model.safetensors"
    save_tensors_atomic(weights, model.state_dict(), metadata={"role": role, "model": spec.name})
    meta = {
        "role": role,
        "model": spec.model_dump(),
        "num_classes": len(classes),
        "classes": classes,
        "kd": kd.model_dump() if kd else None,
        "train": tcfg.model_dump(),
        "lab": cfg.digest_dict(),
        "data_manifest_sha256": manifest_sha256(data_dir),
        "weights_sha256": sha256_file(weights),
        "distill_version": __version__,
        "teacher_weights_sha256": json.loads((Path(teacher_dir) / "config.json").read_text())["weights_sha256"] if teacher_dir else None,
    }
    atomic_write_json(out_dir / "config.json", meta)
    atomic_write_json(out_dir / "history.json", res.history)
    summary = {
        "role": role,
        "model_path": str(weights),
        "val_acc": res.best_val_acc,
        "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "resumed_from_epoch": res.resumed_from_epoch,
        "train_seconds": res.train_seconds,
        "wall_seconds": wall,
        "images_per_second": res.images_per_second,
        "runtime": res.runtime,
        "kd": meta["kd"],
    }
    atomic_write_json(out_dir / "metrics.json", summary)
    return summary


def manifest_sha256(data_dir: str | Path) -> str:
    return sha256_file(Path(data_dir) / "manifest.json")


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    eval_cfg: EvalConfig | None = None,
    *,
    split: str = "test",
    teacher_dir: str | Path | None = None,
    out_path: str | Path | None = None,
) -> dict:
    data = load_prepared(data_dir)
    if split not in data:
        raise ValueError(f"split must be one of {sorted(data)}, got {split!r}")
    x, y = data[split]
    model = load_model(model_dir)
    teacher = load_model(teacher_dir) if teacher_dir else None
    metrics = _evaluate(model, x, y, eval_cfg, classes=read_manifest(data_dir)["classes"], teacher=teacher)
    metrics["split"] = split
    atomic_write_json(out_path or Path(model_dir) / f"eval_{split}.json", metrics)
    return metrics
