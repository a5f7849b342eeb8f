"""The lab's stages (prepare, train teacher / baseline / student, evaluate) as plain functions over folders.

The CLI and the Prefect tasks both call these; outputs are files (safetensors, JSON), never pickles.

A training stage is identified by :func:`stage_fingerprint` (role, model, training config, KD config, data
and teacher checksums): it is recorded in the stage's config.json and in each of its checkpoints, and a
stage re-run into a folder of another fingerprint is refused instead of silently resuming the other run
(:func:`distill.stage_output.claim_out_dir`).

Normalisation: a model is trained on inputs normalised with the per-channel pixel mean/std of its prepared
training split (the manifest's ``normalization``) and records them in its config.json (``normalization``);
:func:`evaluate`, :func:`speed`, :func:`input_example` and every consumer of :func:`load_model` normalise with
:func:`model_normalization` of the model folder. Model folders written before this was recorded were trained
with the CIFAR-10 constants, which :func:`model_normalization` returns for them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from .. import __version__
import numpy as np

from ..checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    point_latest,
    retained_checkpoints,
    save_tensors_atomic,
)
from .config import DataConfig, EvalConfig, KDConfig, LabConfig, ModelSpec, TrainConfig
from .data import CIFAR10_MEAN, CIFAR10_STD, PixelStats, load_prepared, normalize, prepare_dataset, read_manifest
from .data.stats import stats_from_manifest, stats_from_record
from .evaluate import evaluate as _evaluate
from .evaluate import speed_metrics, throughput_batch
from ..files import atomic_write_json, sha256_bytes, sha256_file, sha256_json
from ..stage_output import claim_out_dir
from .models import build_model
from .train import fit, fit_group, train_fingerprint

log = logging.getLogger("distill.image.stages")

Role = Literal["teacher", "baseline", "student"]
ROLES = ("teacher", "baseline", "student")

__all__ = [
    "ROLES",
    "CheckpointError",
    "CheckpointMismatch",
    "ModelLoadError",
    "evaluate",
    "input_example",
    "load_model",
    "manifest_sha256",
    "model_normalization",
    "point_latest",
    "prepare",
    "retained_checkpoints",
    "speed",
    "stage_fingerprint",
    "train",
    "train_group",
]


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
        max_image_side=data_cfg.max_image_side,
    )
    return {"dir": str(prep.dir), "manifest": prep.manifest, "manifest_sha256": prep.manifest_sha256}


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded (missing, truncated or edited files); the message names it."""


def _read_model_meta(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise ModelLoadError(f"model folder {model_dir}: config.json missing (not a trained model folder?)") from e
    except OSError as e:
        raise ModelLoadError(f"model folder {model_dir}: cannot read config.json: {e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"model folder {model_dir}: config.json is not valid JSON (truncated or edited?): {e}") from e
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("model"), dict)
        and isinstance(meta["model"].get("name"), str)
        and isinstance(meta["model"].get("kwargs", {}), dict)
        and type(meta.get("num_classes")) is int
        and isinstance(meta.get("weights_sha256"), str)
    )
    if not ok:
        raise ModelLoadError(f"model folder {model_dir}: config.json lacks model.name, num_classes or weights_sha256")
    if "normalization" in meta:
        stats_from_record(meta["normalization"], where=f"model folder {model_dir}: config.json", error=ModelLoadError)
    return meta


def _meta_normalization(meta: dict, model_dir: Path) -> PixelStats:
    if "normalization" not in meta:  # written before the statistics were recorded: trained with these
        return PixelStats(CIFAR10_MEAN, CIFAR10_STD)
    return stats_from_record(meta["normalization"], where=f"model folder {model_dir}: config.json", error=ModelLoadError)


def model_normalization(model_dir: str | Path) -> PixelStats:
    """The (mean, std) per channel the model in ``model_dir`` was trained with (its config.json's
    ``normalization``: the pixel statistics of its prepared training split); ``normalize(x, *stats)`` turns
    uint8 images into its input. Folders without the record (written before it existed) get the CIFAR-10
    constants they were trained with."""
    model_dir = Path(model_dir)
    return _meta_normalization(_read_model_meta(model_dir), model_dir)


def input_example(model_dir: str | Path, data_dir: str | Path, *, split: str = "test", n: int = 1) -> np.ndarray:
    """The first ``n`` images of ``split`` of the prepared ``data_dir`` as the model in ``model_dir`` takes them:
    float32 ``[n, C, H, W]``, normalised with :func:`model_normalization` (e.g. an MLflow input example)."""
    stats = model_normalization(model_dir)
    data = load_prepared(data_dir, verify=False)
    if split not in data:
        raise ValueError(f"split must be one of {sorted(data)}, got {split!r}")
    x, _ = data[split]
    return normalize(x[:n], *stats).numpy().astype(np.float32)


def load_model(model_dir: str | Path) -> nn.Module:
    """Rebuild a trained model from ``config.json`` + ``model.safetensors`` (no pickle involved). The weights
    must match the sha256 that config.json records; any defect is a :class:`ModelLoadError` naming the folder.
    The model takes normalised float input: use :func:`model_normalization` (or :func:`input_example`)."""
    model_dir = Path(model_dir)
    meta = _read_model_meta(model_dir)
    try:
        model = build_model(meta["model"]["name"], meta["num_classes"], **meta["model"].get("kwargs", {}))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"model folder {model_dir}: config.json describes no buildable model: {e}") from e
    weights = model_dir / "model.safetensors"
    try:
        blob = weights.read_bytes()
    except FileNotFoundError as e:
        raise ModelLoadError(f"model folder {model_dir}: model.safetensors missing") from e
    except OSError as e:
        raise ModelLoadError(f"model folder {model_dir}: cannot read model.safetensors: {e}") from e
    if sha256_bytes(blob) != meta["weights_sha256"]:
        raise ModelLoadError(
            f"model folder {model_dir}: checksum mismatch for model.safetensors: sha256 {sha256_bytes(blob)}, "
            f"config.json says {meta['weights_sha256']} (corrupt or modified file)"
        )
    try:
        model.load_state_dict(load_safetensors_bytes(blob))
    except (SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"model folder {model_dir}: model.safetensors does not fit the model in config.json: {e}") from e
    return model.eval()


FINGERPRINT_VERSION = 1


def _role_config(role: str, cfg: LabConfig) -> tuple[ModelSpec, TrainConfig, str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "teacher":
        return cfg.teacher, cfg.teacher_train, "teacher_train"
    return cfg.student, cfg.student_train, "student_train"


def stage_fingerprint(
    role: Role,
    cfg: LabConfig,
    *,
    data_manifest_sha256: str,
    kd: KDConfig | dict | None = None,
    teacher_weights_sha256: str | None = None,
    seed: int | None = None,
) -> dict:
    """The JSON document identifying everything that determines a training stage's result; its hash is
    ``distill.files.sha256_json(doc)`` (canonical JSON, sorted keys). Keys:

    - ``fingerprint_version``: 1 (bumped if the document's shape changes);
    - ``role``: "teacher" | "baseline" | "student";
    - ``model``: the role's ModelSpec (``cfg.teacher`` for the teacher, ``cfg.student`` otherwise);
    - ``train``: the role's TrainConfig (``teacher_train`` / ``student_train``) without the fields that do not
      change the result (``distill.image.train.NON_RESULT_FIELDS``: progress display, checkpoint retention);
    - ``kd``: students only (``kd`` or else ``cfg.kd``), else None;
    - ``data_manifest_sha256``: :func:`manifest_sha256` of the prepared data folder;
    - ``teacher_weights_sha256``: students only (required), the teacher's ``weights_sha256``; else None;
    - ``init_seed``: the seed of the initial weights (``seed``, default the role's ``train.seed``, which also
      orders the batches).

    Everything else in ``cfg`` (the other role's settings, sweep, eval, data source paths) is left out, so
    it is a content address for the stage's work. :func:`train` records it in config.json and in every
    checkpoint and refuses to resume work of another fingerprint.
    """
    spec, tcfg, _ = _role_config(role, cfg)
    if not (isinstance(data_manifest_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", data_manifest_sha256)):
        raise ValueError(f"data_manifest_sha256 must be a hex sha256, got {data_manifest_sha256!r}")
    if role == "student":
        if not (isinstance(teacher_weights_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", teacher_weights_sha256)):
            raise ValueError(f"role 'student' needs teacher_weights_sha256 (a hex sha256), got {teacher_weights_sha256!r}")
        kd = KDConfig.model_validate(kd) if isinstance(kd, dict) else (kd or cfg.kd)
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "role": role,
        "model": spec.model_dump(mode="json"),
        "train": train_fingerprint(tcfg),
        "kd": kd.model_dump(mode="json") if role == "student" else None,
        "data_manifest_sha256": data_manifest_sha256,
        "teacher_weights_sha256": teacher_weights_sha256 if role == "student" else None,
        "init_seed": tcfg.seed if seed is None else int(seed),
    }


# what train() writes into out_dir besides checkpoints/ (and evaluate()'s eval_*.json about that model)
_STAGE_OUTPUTS = ("model.safetensors", "config.json", "metrics.json", "history.json")


def _check_batch_size(field: str, tcfg: TrainConfig, n_train: int | None) -> None:
    if n_train is not None and tcfg.batch_size > n_train:
        raise ValueError(f"{field}.batch_size ({tcfg.batch_size}) is larger than the training split ({n_train} images)")


def _claim_out_dir(out_dir: Path, fingerprint: dict, resume: bool) -> None:
    """:func:`distill.stage_output.claim_out_dir` for an image stage folder (fingerprint in config.json)."""
    claim_out_dir(out_dir, fingerprint, resume, outputs=_STAGE_OUTPUTS, config_name="config.json",
                  fresh_hint="--no-resume (resume=False)")


def _teacher_weights_sha256(teacher_dir: str | Path) -> str:
    return _read_model_meta(Path(teacher_dir))["weights_sha256"]


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
    seed: int | None = None,
) -> dict:
    """Train one role into ``out_dir`` (model.safetensors, config.json, metrics.json, history.json,
    checkpoints/). Before any compute: the role's batch_size is checked against the training split, and an
    out_dir whose outputs or checkpoints belong to another :func:`stage_fingerprint` is refused with
    :class:`~distill.checkpoint.CheckpointMismatch` (``resume=False`` deletes them and starts over).
    ``on_checkpoint(folder, epoch)`` runs after each epoch's checkpoint, once old ones are pruned
    (:func:`distill.checkpoint.retained_checkpoints` lists those kept). ``seed``: of the initial weights
    (default ``train.seed``, which orders the batches in any case)."""
    spec, tcfg, field = _role_config(role, cfg)
    if role == "student" and teacher_dir is None:
        raise ValueError("role 'student' needs teacher_dir (the output folder of the teacher stage)")
    out_dir = Path(out_dir)
    manifest = read_manifest(data_dir)
    classes = manifest["classes"]
    _check_batch_size(field, tcfg, manifest.get("counts", {}).get("train", {}).get("total"))
    kd = (kd or cfg.kd) if role == "student" else None
    teacher_sha = _teacher_weights_sha256(teacher_dir) if role == "student" else None
    fingerprint = stage_fingerprint(
        role, cfg, data_manifest_sha256=manifest_sha256(data_dir), kd=kd, teacher_weights_sha256=teacher_sha, seed=seed
    )
    stats = stats_from_manifest(manifest, str(Path(data_dir) / "manifest.json"))
    teacher_stats = model_normalization(teacher_dir) if role == "student" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_out_dir(out_dir, fingerprint, resume)
    data = load_prepared(data_dir)
    _check_batch_size(field, tcfg, len(data["train"][1]))

    model = _initial_model(spec, len(classes), fingerprint["init_seed"])
    teacher = load_model(teacher_dir) if role == "student" else None
    desc = role if kd is None else f"student T={kd.temperature:g} a={kd.alpha:g}"
    t0 = time.perf_counter()
    model, res = fit(
        model, data, tcfg, teacher=teacher, kd=kd, log_fn=log_fn, ckpt_dir=out_dir / "checkpoints",
        on_checkpoint=on_checkpoint, resume=resume, desc=desc, fingerprint=fingerprint,
        stats=stats, teacher_stats=teacher_stats,
    )
    wall = time.perf_counter() - t0
    return _write_outputs(out_dir, role, cfg, model, res, wall, fingerprint, classes, spec, tcfg, kd)


def _initial_model(spec: ModelSpec, num_classes: int, seed: int) -> nn.Module:
    """The model's initial weights, from ``seed`` alone: the baseline and the students of one seed start equal."""
    torch.manual_seed(seed)
    return build_model(spec.name, num_classes, **spec.kwargs)


GROUP_FILE = "group.json"


def group_fingerprint(cfg: LabConfig, members: list[dict], *, data_manifest_sha256: str,
                      teacher_weights_sha256: str | None) -> dict:
    """The fingerprint of a lockstep group: each member's :func:`stage_fingerprint` (the one it would have if
    trained alone) under its name, in order."""
    return {"group": [{"name": m["name"], "stage": stage_fingerprint(
        m["role"], cfg, data_manifest_sha256=data_manifest_sha256, kd=m.get("kd"), seed=m.get("seed"),
        teacher_weights_sha256=teacher_weights_sha256 if m["role"] == "student" else None)} for m in members]}


def _check_group(members: list[dict]) -> None:
    names = [m.get("name") for m in members]
    if not members or len(set(names)) != len(names):
        raise ValueError(f"a lockstep group needs members with distinct names, got {names}")
    for m in members:
        if m.get("role") not in ("baseline", "student"):
            raise ValueError(f"group member {m.get('name')!r}: role must be baseline or student, got {m.get('role')!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,99}", str(m["name"])):
            raise ValueError(f"group member name {m['name']!r}: letters, digits and . _ = + - only")


def train_group(cfg: LabConfig, data_dir: str | Path, out_dir: str | Path, members: list[dict], *,
                teacher_dir: str | Path | None = None, log_fns: dict[str, Callable] | None = None,
                on_checkpoint: Callable[[Path, int], None] | None = None, resume: bool = True) -> dict[str, dict]:
    """Train the baseline and students ``members`` (``{"role", "name", "kd", "seed"}``) in lockstep
    (:func:`distill.image.train.fit_group`): one pass of the teacher per batch feeds every student. Each
    member's folder ``out_dir/<name>/`` is what :func:`train` would write for it alone (same fingerprint in its
    config.json); the group's checkpoints are in ``out_dir/checkpoints`` and its fingerprint in
    ``out_dir/group.json``. Returns {name: the member's metrics}."""
    _check_group(members)
    out_dir = Path(out_dir)
    manifest = read_manifest(data_dir)
    classes = manifest["classes"]
    tcfg = cfg.student_train
    _check_batch_size("student_train", tcfg, manifest.get("counts", {}).get("train", {}).get("total"))
    students = any(m["role"] == "student" for m in members)
    if students and teacher_dir is None:
        raise ValueError("a group with students needs teacher_dir (the output folder of the teacher stage)")
    teacher_sha = _teacher_weights_sha256(teacher_dir) if teacher_dir is not None else None
    fp = group_fingerprint(cfg, members, data_manifest_sha256=manifest_sha256(data_dir),
                           teacher_weights_sha256=teacher_sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out_dir, fp, resume, outputs=(GROUP_FILE,), config_name=GROUP_FILE,
                  fresh_hint="--no-resume (resume=False)")
    atomic_write_json(out_dir / GROUP_FILE, {"fingerprint": fp, "fingerprint_sha256": sha256_json(fp)})
    stats = stats_from_manifest(manifest, str(Path(data_dir) / "manifest.json"))
    data = load_prepared(data_dir)
    _check_batch_size("student_train", tcfg, len(data["train"][1]))
    kds = {m["name"]: (KDConfig.model_validate(m["kd"]) if m["kd"] else cfg.kd) if m["role"] == "student" else None
           for m in members}
    fps = {e["name"]: e["stage"] for e in fp["group"]}
    models = [(m["name"], _initial_model(cfg.student, len(classes), fps[m["name"]]["init_seed"]), kds[m["name"]])
              for m in members]
    t0 = time.perf_counter()
    trained = fit_group(models, data, tcfg, teacher=load_model(teacher_dir) if students else None, log_fns=log_fns,
                        ckpt_dir=out_dir / "checkpoints", on_checkpoint=on_checkpoint, resume=resume,
                        desc=f"group of {len(members)}", fingerprint=fp, stats=stats,
                        teacher_stats=model_normalization(teacher_dir) if students else None)
    wall = time.perf_counter() - t0
    out = {}
    for m in members:
        model, res = trained[m["name"]]
        folder = out_dir / m["name"]
        folder.mkdir(exist_ok=True)
        summary = _write_outputs(folder, m["role"], cfg, model, res, wall, fps[m["name"]], classes, cfg.student, tcfg,
                                 kds[m["name"]])
        out[m["name"]] = {**summary, "seed": fps[m["name"]]["init_seed"], "group_size": len(members)}
    return out


def _write_outputs(out_dir: Path, role, cfg: LabConfig, model: nn.Module, res, wall: float, fingerprint: dict,
                   classes: list, spec: ModelSpec, tcfg: TrainConfig, kd: KDConfig | None) -> dict:
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
        "data_manifest_sha256": fingerprint["data_manifest_sha256"],
        "weights_sha256": sha256_file(weights),
        "distill_version": __version__,
        "teacher_weights_sha256": fingerprint["teacher_weights_sha256"],
        "fingerprint": fingerprint,
        "fingerprint_sha256": sha256_json(fingerprint),
        # the pixel statistics of the training split the inputs were normalised with (model_normalization)
        "normalization": res.normalization,
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


def _speed_batch(eval_cfg: EvalConfig, meta: dict) -> int:
    """``eval_cfg.throughput_batch``, or (None) the student batch size of the LabConfig the model was trained
    in (its config.json's ``lab.student_train.batch_size``)."""
    lab = meta.get("lab")
    student = lab.get("student_train") if isinstance(lab, dict) else None
    bs = student.get("batch_size") if isinstance(student, dict) else None
    return throughput_batch(eval_cfg, bs if type(bs) is int and bs >= 1 else None)


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    eval_cfg: EvalConfig | None = None,
    *,
    split: str = "test",
    teacher_dir: str | Path | None = None,
    out_path: str | Path | None = None,
    speed: bool = True,
) -> dict:
    """Metrics of the model in ``model_dir`` on ``split`` of the prepared ``data_dir`` (written to
    ``out_path``, default ``model_dir/eval_<split>.json``). Images are normalised with the statistics the model
    (and the teacher, for ``agreement``) was trained with (:func:`model_normalization`). The speed metrics
    (:func:`distill.image.evaluate.speed_metrics`) are measured when ``speed`` and ``eval_cfg.speed``; with
    ``eval_cfg.throughput_batch`` None the throughput batch is the model's LabConfig's student batch size."""
    eval_cfg = eval_cfg or EvalConfig()
    model_dir = Path(model_dir)
    data = load_prepared(data_dir)
    if split not in data:
        raise ValueError(f"split must be one of {sorted(data)}, got {split!r}")
    x, y = data[split]
    meta = _read_model_meta(model_dir)
    stats = _meta_normalization(meta, model_dir)
    model = load_model(model_dir)
    teacher = load_model(teacher_dir) if teacher_dir else None
    teacher_stats = model_normalization(teacher_dir) if teacher_dir else None
    cfg = eval_cfg.model_copy(update={"speed": bool(speed and eval_cfg.speed)})
    metrics = _evaluate(model, x, y, cfg, stats=stats, classes=read_manifest(data_dir)["classes"], teacher=teacher,
                        teacher_stats=teacher_stats, speed_batch=_speed_batch(eval_cfg, meta))
    metrics["split"] = split
    atomic_write_json(out_path or model_dir / f"eval_{split}.json", metrics)
    return metrics


def speed(model_dir: str | Path, data_dir: str | Path, eval_cfg: EvalConfig | None = None, *,
          out_path: str | Path | None = None) -> dict:
    """Only the speed metrics of the model in ``model_dir`` (:func:`distill.image.evaluate.speed_metrics`:
    ``latency_ms_b1``, ``throughput``, ``throughput_batch``, ``speed_device`` and, with CUDA,
    ``latency_ms_b1_cuda``, ``throughput_cuda``), on inputs of the image shape of the prepared ``data_dir``; meant
    to run when nothing else competes for the machine. ``eval_cfg.throughput_batch`` None: the model's LabConfig's
    student batch size. Measured even if ``eval_cfg.speed`` is False (calling this is the request). Written to
    ``out_path`` if given."""
    eval_cfg = eval_cfg or EvalConfig()
    model_dir = Path(model_dir)
    meta = _read_model_meta(model_dir)
    shape = tuple(int(d) for d in read_manifest(data_dir)["image_shape"])
    model = load_model(model_dir)
    metrics = speed_metrics(model, eval_cfg, batch=_speed_batch(eval_cfg, meta), image_shape=shape)
    if out_path is not None:
        atomic_write_json(out_path, metrics)
    return metrics
