"""The image-classifier kind (``distill-cifar``) as a :class:`distill.kinds.Kind`: plain functions over the
stage functions of :mod:`distill.image.stages`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..kinds import Column, Kind, Member, Metric, register_kind
from . import serving, stages
from .config import KDConfig, LabConfig, PRESETS, load_profile


def _kd_name(kd: KDConfig) -> str:
    return f"sweep-T{kd.temperature:g}-a{kd.alpha:g}"


def prepare(cfg: LabConfig, progress: bool = True) -> dict:
    prep = stages.prepare(cfg.data, progress=progress)
    m = prep["manifest"]
    return {"dir": prep["dir"], "manifest_sha256": prep["manifest_sha256"], "n_train": m["counts"]["train"]["total"],
            "summary": {"classes": m["classes"], "counts": m["counts"]}}


def _base_plan(cfg: LabConfig) -> list[Member]:
    """Baseline, the main student, then the temperature x alpha sweep (the member equal to the main student is
    the main student itself)."""
    main_kd = cfg.kd.model_dump(mode="json")
    members = [Member("baseline", "baseline"),
               Member("student", "student", kd=main_kd, main=True,
                      sweep={"temperature": cfg.kd.temperature, "alpha": cfg.kd.alpha}
                      if cfg.sweep.enabled and cfg.kd in cfg.sweep.members() else None)]
    if cfg.sweep.enabled:
        for kd in cfg.sweep.members():
            if (kd.temperature, kd.alpha) == (cfg.kd.temperature, cfg.kd.alpha):
                continue
            kd = cfg.kd.model_copy(update={"temperature": kd.temperature, "alpha": kd.alpha})
            members.append(Member("student", _kd_name(kd), kd=kd.model_dump(mode="json"),
                                  sweep={"temperature": kd.temperature, "alpha": kd.alpha}))
    return members


def plan(cfg: LabConfig) -> list[Member]:
    """The base plan (:func:`_base_plan`) once per seed of ``cfg.seeds``: the first seed's members keep their
    names, the others get ``-s<seed>``. With ``cfg.lockstep`` they all train in one lockstep stage (group
    ``lockstep``), or in stages of at most ``cfg.group_size`` members (``lockstep-1``, ``lockstep-2``, ...)."""
    members: list[Member] = []
    for i, seed in enumerate(cfg.seeds):
        suffix = "" if i == 0 else f"-s{seed}"
        members += [replace(m, name=m.name + suffix, seed=seed, replica_of=m.name) for m in _base_plan(cfg)]
    if cfg.lockstep:
        size = cfg.group_size or len(members)
        n_groups = -(-len(members) // size)
        members = [replace(m, group="lockstep" if n_groups == 1 else f"lockstep-{i // size + 1}")
                   for i, m in enumerate(members)]
    return members


def fingerprint(role: str, cfg: LabConfig, *, data_sha256: str, kd: Optional[dict] = None,
                teacher_sha256: Optional[str] = None, init_sha256: Optional[str] = None,
                seed: Optional[int] = None) -> dict:
    return stages.stage_fingerprint(role, cfg, data_manifest_sha256=data_sha256, kd=kd, seed=seed,
                                    teacher_weights_sha256=teacher_sha256 if role == "student" else None)


def train(role: str, cfg: LabConfig, data_dir, out_dir, *, teacher_dir=None, init_dir=None, kd: Optional[dict] = None,
          log_fn=None, on_checkpoint=None, resume: bool = True, seed: Optional[int] = None) -> dict:
    kd_cfg = KDConfig.model_validate(kd) if kd else None
    return stages.train(role, cfg, data_dir, out_dir, teacher_dir=teacher_dir if role == "student" else None,
                        kd=kd_cfg, log_fn=log_fn, on_checkpoint=on_checkpoint, resume=resume, seed=seed)


def train_group(cfg: LabConfig, data_dir, out_dir, members: list[dict], *, teacher_dir=None, log_fns=None,
                on_checkpoint=None, resume: bool = True) -> dict[str, dict]:
    return stages.train_group(cfg, data_dir, out_dir, members, teacher_dir=teacher_dir, log_fns=log_fns,
                              on_checkpoint=on_checkpoint, resume=resume)


def evaluate(model_dir, data_dir, cfg: LabConfig, *, split: str = "test", teacher_dir=None, speed: bool = True,
             out_path=None) -> dict:
    """Flat test metrics: ``test_accuracy``, ``test_loss``, ``test_ece``, agreement, params, size (and speed)."""
    m = stages.evaluate(model_dir, data_dir, cfg.eval, split=split, teacher_dir=teacher_dir, out_path=out_path,
                        speed=speed)
    return _flat(m, split)


def _flat(m: dict, split: str) -> dict:
    """``accuracy``/``loss``/``ece`` as ``<split>_<name>``; per-class accuracy ``acc_<class>`` as
    ``per_class/<class>``: a prefix MLflow's chart view groups in a section of its own after the metrics every
    role shares (test and validation accuracy, KD gain), which the compare views show first."""
    renamed = {"accuracy", "loss", "ece"}
    out = {}
    for k, v in m.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "split":
            out[f"{split}_{k}" if k in renamed else f"per_class/{k[4:]}" if k.startswith("acc_") else k] = v
    return out


def speed(model_dir, data_dir, cfg: LabConfig) -> dict:
    return stages.speed(model_dir, data_dir, cfg.eval)


def weights_sha256(model_dir) -> str:
    return stages._read_model_meta(Path(model_dir))["weights_sha256"]


def _batch_errors(cfg: LabConfig, n_train: int) -> list[str]:
    return [f"{f}.batch_size ({getattr(cfg, f).batch_size}) is larger than the training split ({n_train} images)"
            for f in ("teacher_train", "student_train") if getattr(cfg, f).batch_size > n_train]


KIND: Kind = register_kind(Kind(
    name="cifar",
    flow="distill-cifar",
    description="image classifiers: ResNet teacher -> smaller ResNet student, Hinton soft targets, temperature sweep",
    config_model=LabConfig,
    profiles=tuple(PRESETS),
    load_profile=load_profile,
    prepare=prepare,
    plan=plan,
    fingerprint=fingerprint,
    train=train,
    evaluate=evaluate,
    speed=speed,
    weights_sha256=weights_sha256,
    load_model=stages.load_model,
    selection=Metric("val_acc", "max", "validation accuracy"),
    test_metric=Metric("test_accuracy", "max", "test accuracy"),
    columns=(
        Column("model", "model", "str"),
        Column("val acc", "val_acc", "pct"),
        Column("test acc", "test_accuracy", "pct"),
        Column("KD gain", "gain", "gain_pt"),
        Column("agreement", "agreement", "pct"),
        Column("ECE", "test_ece", "f4"),
        Column("params", "params", "int"),
        Column("size (MB)", "size_mb", "f2"),
        Column("latency b1 (ms)", "latency_ms_b1", "f2"),
        Column("throughput (img/s)", "throughput", "f0"),
    ),
    sweep_axes=("temperature", "alpha"),
    # registration: the servable model (raw images in, its normalisation inside, probabilities out), an example
    # of raw input for its signature, and the metadata a consumer needs (class names, input and output spec)
    extras={"batch_errors": _batch_errors, "model_format": "pytorch", "serving_model": serving.servable_model,
            "input_example": serving.raw_input_example, "model_metadata": serving.serving_metadata},
    train_group=train_group,
))

