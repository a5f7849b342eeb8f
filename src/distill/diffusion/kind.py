"""The diffusion step-distillation kind (``distill-diffusion``) as a :class:`distill.kinds.Kind`.

Plan after the teacher: the baseline (the teacher sampled with DDIM at ``target_steps``), the progressive rounds
(``progressive-<k>`` for k = sample_steps / 2 ... final_steps, each taught by the previous round) and the
consistency student. The gate and the KD gain compare FID at ``target_steps`` (lower wins).
"""

from __future__ import annotations

from typing import Optional

from ..kinds import Column, Kind, Member, Metric, register_kind
from . import stages
from .config import PRESETS, DiffusionLabConfig, load_profile, progressive_steps


def prepare(cfg: DiffusionLabConfig, progress: bool = True) -> dict:
    prep = stages.prepare(cfg, progress=progress)
    m = prep["manifest"]
    return {"dir": prep["dir"], "manifest_sha256": prep["manifest_sha256"], "n_train": m["counts"]["train"]["total"],
            "summary": {"classes": m["classes"], "counts": m["counts"], "image_size": cfg.data.image_size,
                        "channels": cfg.data.channels}}


def plan(cfg: DiffusionLabConfig) -> list[Member]:
    members = [Member("baseline", "baseline")]
    previous: Optional[str] = None
    for k in progressive_steps(cfg):
        name = f"progressive-{k}"
        members.append(Member("student", name, kd={"method": "progressive", "steps": k},
                              sweep={"steps": k, "method": "progressive"},
                              main=cfg.main == "progressive" and k == cfg.target_steps, teacher=previous))
        previous = name
    if cfg.consistency.enabled:
        members.append(Member("student", "consistency", kd={"method": "consistency", "skip": cfg.consistency.skip},
                              sweep={"steps": cfg.target_steps, "method": "consistency"},
                              main=cfg.main == "consistency"))
    return members


def fingerprint(role: str, cfg: DiffusionLabConfig, *, data_sha256: str, kd: Optional[dict] = None,
                teacher_sha256: Optional[str] = None, init_sha256: Optional[str] = None) -> dict:
    return stages.stage_fingerprint(role, cfg, data_sha256=data_sha256, kd=kd,
                                    teacher_sha256=None if role == "teacher" else teacher_sha256)


def train(role: str, cfg: DiffusionLabConfig, data_dir, out_dir, *, teacher_dir=None, init_dir=None,
          kd: Optional[dict] = None, log_fn=None, on_checkpoint=None, resume: bool = True) -> dict:
    return stages.train(role, cfg, data_dir, out_dir, teacher_dir=teacher_dir, kd=kd, log_fn=log_fn,
                        on_checkpoint=on_checkpoint, resume=resume)


def evaluate(model_dir, data_dir, cfg: DiffusionLabConfig, *, split: str = "test", teacher_dir=None,
             speed: bool = True, out_path=None) -> dict:
    return stages.evaluate(model_dir, data_dir, cfg, split=split, teacher_dir=teacher_dir, speed=speed,
                           out_path=out_path)


def speed(model_dir, data_dir, cfg: DiffusionLabConfig) -> dict:
    return stages.speed(model_dir, data_dir, cfg)


def total_steps(role: str, cfg: DiffusionLabConfig, kd: Optional[dict] = None) -> int:
    """Optimiser steps of a stage (the progress bar's denominator)."""
    if role == "teacher":
        return cfg.teacher.train.steps if cfg.teacher.source == "train" else 1
    if role == "student" and kd:
        return (cfg.progressive if kd.get("method") == "progressive" else cfg.consistency).train.steps
    return 1


def _batch_errors(cfg: DiffusionLabConfig, n_train: int) -> list[str]:
    sections = [("teacher.train", cfg.teacher.train)] if cfg.teacher.source == "train" else []
    sections += [("progressive.train", cfg.progressive.train)] if cfg.progressive.enabled else []
    sections += [("consistency.train", cfg.consistency.train)] if cfg.consistency.enabled else []
    return [f"{f}.batch_size ({s.batch_size}) is larger than the training split ({n_train} images)"
            for f, s in sections if s.batch_size > n_train]


def _steps_columns(cfg_steps=(1, 2, 4, 8)) -> tuple[Column, ...]:
    return tuple(Column(f"FID @{k}", f"fid_s{k}", "f1") for k in cfg_steps)


KIND: Kind = register_kind(Kind(
    name="diffusion",
    flow="distill-diffusion",
    description="diffusion step distillation: a many-step DDIM teacher -> progressive and consistency students "
                "sampling in 1-4 steps",
    config_model=DiffusionLabConfig,
    profiles=tuple(PRESETS),
    load_profile=load_profile,
    prepare=prepare,
    plan=plan,
    fingerprint=fingerprint,
    train=train,
    evaluate=evaluate,
    speed=speed,
    weights_sha256=stages.weights_sha256,
    load_model=stages.load_model,
    selection=Metric("val_fid", "min", "validation FID at the model's own step count"),
    test_metric=Metric("fid", "min", "test FID"),
    columns=(
        Column("model", "model", "str"),
        Column("steps", "steps", "int"),
        Column("FID", "fid", "f2"),
        Column("KD gain (FID)", "gain", "gain"),
        Column("KID", "kid", "f4"),
        Column("PSNR vs teacher (dB)", "psnr", "f2"),
        *_steps_columns(),
        Column("params", "params", "int"),
        Column("latency (ms/img)", "latency_ms", "f1"),
        Column("images/s", "images_per_s", "f1"),
    ),
    sweep_axes=("steps", "method"),
    extras={"batch_errors": _batch_errors, "model_format": "diffusers", "total_steps": total_steps,
            "baseline_needs_teacher": True,
            "curve": {"steps": [1, 2, 4, 8], "key": "fid_s{}", "label": "FID (lower is better)",
                      "x_label": "sampling steps", "log_x": True}},
))
