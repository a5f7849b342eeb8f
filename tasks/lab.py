"""Thin Prefect tasks over the compute core. They move files between the store and a local work folder,
call ``distill.image.stages``, and return small references (store keys, metric dicts), never tensors.

Stage work is keyed by what determines its result, not by the flow run that asked for it: a stage's store
prefix is ``stages/<key>`` where ``key`` hashes the stage fingerprint (role, model, training config, KD
config, data manifest, teacher weights; :func:`distill.image.stages.stage_fingerprint`) and the sha256 of the
core's source. So a re-run of the same work (a killed ``distill run``, a retried deployment run, a second
flow run asking for the same teacher) finds the checkpoints and outputs of the earlier attempt and resumes
or reuses them. One stage key is worked on by one process at a time (a lease lock in the store).

Layout under ``stages/<key>/``: ``checkpoints/epoch-NNNN/`` (the retained ones) and ``checkpoints/LATEST``,
``model/`` (a published folder: weights, config, metrics, history), ``eval_test.json`` and ``result.json``
(written last: the stage is complete iff it exists and its model verifies).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, Field, field_validator

import distill
from distill.image import stages
from distill.checkpoint import CheckpointError, load_checkpoint, retained_checkpoints
from distill.image.config import KDConfig, LabConfig
from distill.files import contained_path, sha256_json

from .secrets import redact_text
from .storage import Store, StoreError, is_integrity_error, open_store, validate_prefix

# Exception class names that mean corrupt or bad input rather than a passing fault (also found in the state
# message of a failed remote flow run)
INTEGRITY_MARKERS = ("ChecksumMismatch", "IntegrityError", "CheckpointError", "CheckpointMismatch", "DataError",
                     "ModelLoadError")
from .tracking import Tracker, flatten_params

MODEL_FILES = ("model.safetensors", "config.json", "metrics.json", "history.json")
STAGE_LOCK_TTL = 120.0


class TrainJob(BaseModel):
    """Everything one training stage needs; JSON-serialisable so it can cross to a work pool. It carries no
    credentials: the tracking URI is the redacted one, and workers take credentials from their environment."""

    role: Literal["teacher", "baseline", "student"]
    name: str = Field(description="stage name, e.g. teacher, baseline, student, sweep-T4-a0.7")
    lab: dict
    kd: Optional[dict] = None
    data_key: str
    out_prefix: str = Field(description="content-addressed store prefix of the stage: stages/<key>")
    teacher_prefix: Optional[str] = None
    store_url: str
    tracking_uri: Optional[str] = None
    experiment: str = "distill-cifar"
    parent_run_id: Optional[str] = None
    speed: bool = True
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("out_prefix", "data_key", "teacher_prefix")
    @classmethod
    def _key(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if not v.strip("/"):
            raise ValueError("an empty key prefix would name the whole store")
        try:
            return validate_prefix(v).rstrip("/")
        except StoreError as e:
            raise ValueError(str(e)) from None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,99}", v):
            raise ValueError(f"stage name {v!r}: letters, digits and . _ = + - only (at most 100)")
        return v


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _logger():
    if _in_prefect_run():
        return get_run_logger()
    return logging.getLogger("distill.tasks")


def work_dir() -> Path:
    root = Path(os.environ.get("DISTILL_WORK_DIR") or Path(os.environ.get("DISTILL_HOME", ".distill")) / "work")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def stage_dir(prefix: str) -> Path:
    """The local work folder of a store prefix, refused if it would leave the work folder (checked before
    anything is created)."""
    return contained_path(work_dir(), validate_prefix(prefix).rstrip("/"), follow_links=True)


def code_version() -> str:
    """sha256 of the compute core's source: work done by other code is not reused."""
    h = hashlib.sha256()
    pkg = Path(distill.__file__).parent
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str:
    if os.environ.get("DISTILL_GIT_COMMIT"):
        return os.environ["DISTILL_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def stage_key(role: str, cfg: LabConfig, *, data_manifest_sha256: str, kd: Optional[KDConfig] = None,
              teacher_weights_sha256: Optional[str] = None, salt: Optional[str] = None) -> str:
    """The content key of one stage's work: same key, same result. ``salt`` (e.g. a flow run id when the user
    asks for fresh training) makes the work unique."""
    doc = stages.stage_fingerprint(role, cfg, data_manifest_sha256=data_manifest_sha256, kd=kd,
                                   teacher_weights_sha256=teacher_weights_sha256 if role == "student" else None)
    # the baseline trains without the teacher, but its stored result holds its agreement with the teacher
    evaluated_against = teacher_weights_sha256 if role == "baseline" else None
    return sha256_json({"stage": doc, "code": code_version(), "salt": salt, "evaluated_against": evaluated_against})[:32]


def not_integrity_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: a checksum or integrity failure is not transient; fail at once."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001
            exc = e
    return not (isinstance(exc, BaseException) and is_integrity_error(exc))


# --- store <-> local folders ------------------------------------------------------------------------------


def fetch_dir(store: Store, prefix: str, kind: str) -> Path:
    """A published store folder in the local cache, checked against the store's manifest on every call."""
    return store.fetch_dir(prefix, work_dir() / "cache" / kind)


def upload_model(store: Store, out_dir: Path, prefix: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_FILES:
            shutil.copy2(out_dir / name, Path(tmp) / name)
        return store.put_dir(tmp, prefix)


def delete_prefix(store: Store, prefix: str) -> None:
    """Remove a published folder: its manifest first (readers then see it as absent), then its objects."""
    keys = store.list(prefix)
    manifest = f"{prefix}/MANIFEST.json"
    for key in sorted(keys, key=lambda k: k != manifest):
        store.delete(key)


def stage_result(store: Store, prefix: str) -> Optional[dict]:
    """The result of a completed stage whose published model verifies, else None. A result whose model fails
    verification is dropped (logged), so the stage is redone instead of every later run failing on it."""
    key = f"{prefix}/result.json"
    if not store.exists(key):
        return None
    log = _logger()
    try:
        result = store.get_json(key)
        for rel in store.dir_manifest(f"{prefix}/model"):
            store.get_dir_file(f"{prefix}/model", rel)  # re-hash every object against the recorded sha256
        return result
    except Exception as e:  # noqa: BLE001
        if not is_integrity_error(e) and not isinstance(e, (StoreError, ValueError)):
            raise
        log.warning("stored stage %s failed verification (%s); it is dropped and redone (from its last verified "
                    "checkpoint if one exists)", store.uri(prefix), redact_text(str(e)))
        store.delete(key)
        delete_prefix(store, f"{prefix}/model")
        return None


def _mirror_checkpoints(store: Store, prefix: str):
    """``on_checkpoint`` hook: upload the new checkpoint, move the store's LATEST to it, and delete from the
    store every checkpoint the local retention policy dropped (last N + best)."""

    def upload(folder: Path, epoch: int) -> None:
        root = folder.parent
        store.put_dir(folder, f"{prefix}/checkpoints/{folder.name}")
        store.put_bytes((root / "LATEST").read_bytes(), f"{prefix}/checkpoints/LATEST")
        keep = set(retained_checkpoints(root))
        for name in _store_checkpoints(store, prefix):
            if name not in keep:
                delete_prefix(store, f"{prefix}/checkpoints/{name}")

    return upload


def _store_checkpoints(store: Store, prefix: str) -> list[str]:
    names = set()
    for key in store.list(f"{prefix}/checkpoints"):
        parts = key[len(prefix) + 1:].split("/")
        if len(parts) >= 3 and re.fullmatch(r"epoch-\d+", parts[1]):
            names.add(parts[1])
    return sorted(names)


def _restore_checkpoint(store: Store, prefix: str, local_ckpts: Path) -> Optional[str]:
    """Bring the newest checkpoint of the store that verifies into ``local_ckpts`` and point LATEST at it.
    Tries the store's LATEST first, then the other retained checkpoints, newest first."""
    log = _logger()
    names = _store_checkpoints(store, prefix)
    if not names:
        return None
    latest = None
    if store.exists(f"{prefix}/checkpoints/LATEST"):
        latest = store.get_bytes(f"{prefix}/checkpoints/LATEST").decode().split()[0]
    order = ([latest] if latest in names else []) + [n for n in reversed(names) if n != latest]
    for name in order:
        dest = local_ckpts / name
        tmp = local_ckpts / f".restore-{name}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            store.get_dir(f"{prefix}/checkpoints/{name}", tmp)
            (tmp / "MANIFEST.json").unlink(missing_ok=True)
            load_checkpoint(tmp)  # verifies every file of the checkpoint
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
            stages.point_latest(local_ckpts, name)
            return name
        except (CheckpointError, StoreError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("checkpoint %s in the store does not verify (%s); trying an older one",
                        store.uri(f"{prefix}/checkpoints/{name}"), redact_text(str(e)))
    return None


# --- tracking helpers ---------------------------------------------------------------------------------------


def prefect_run_alive(run: Any) -> Optional[bool]:
    """``is_alive`` callback for :meth:`Tracker.end_dead_runs`: asks the Prefect API about the flow run that
    owns an MLflow run (tag ``distill.owner.flow_run_id``). Final state -> dead; otherwise alive; unknown ->
    None."""
    fr_id = run.data.tags.get("distill.owner.flow_run_id") if hasattr(run, "data") else None
    if not fr_id:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(fr_id)
        if fr.state is None:
            return None
        return not fr.state.is_final()
    except Exception:  # noqa: BLE001
        return None


def _progress_log_fn(tracker: Optional[Tracker], run_id: Optional[str], epochs: int, name: str):
    sink = tracker.log_fn(run_id) if tracker and run_id else None
    artifact_id = None
    if _in_prefect_run():  # outside a run, an artifact call would start a temporary Prefect server
        try:
            artifact_id = create_progress_artifact(progress=0.0, description=f"{name}: epochs done")
        except Exception:
            pass
    log = _logger()

    def log_fn(metrics: dict, step: int) -> None:
        if sink is not None:
            try:  # Tracker retries transient errors; one that persists must not kill a training
                sink(metrics, step)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: could not log epoch %d metrics to MLflow: %s", name, step, redact_text(str(e)))
        if artifact_id is not None:
            try:
                update_progress_artifact(artifact_id=artifact_id, progress=100.0 * step / epochs)
            except Exception:
                pass
        log.info("%s epoch %d/%d: train_loss %.4f val_acc %.4f", name, step, epochs, metrics["train_loss"], metrics["val_acc"])

    return log_fn


def start_stage_run(job: TrainJob, tracker: Tracker, flow_run_id: Optional[str]) -> str:
    """A nested MLflow run for this attempt at the stage; earlier attempts whose owner died are marked KILLED."""
    cfg = LabConfig.model_validate(job.lab)
    killed = tracker.end_dead_runs("distill.stage_key", job.out_prefix, is_alive=prefect_run_alive)
    if killed:
        _logger().info("%s: marked %d dead earlier attempt(s) KILLED in MLflow", job.name, len(killed))
    params = {"role": job.role, "stage": job.name, **flatten_params(cfg.model_dump(mode="json"))}
    if job.kd:
        params.update({f"kd.{k}": v for k, v in job.kd.items()})
    tags = {"distill.stage_key": job.out_prefix, "distill.role": job.role, "distill.stage": job.name, **job.tags}
    if flow_run_id:
        tags["distill.owner.flow_run_id"] = flow_run_id
    if job.parent_run_id:
        return tracker.start_child(job.parent_run_id, job.name, params, tags)
    return tracker.start_parent(job.name, params, tags)


def log_history(tracker: Tracker, run_id: str, history: list[dict], upto_epoch: int) -> None:
    """Per-epoch metrics of epochs trained by an earlier attempt (resumed runs), so each run's curves are whole."""
    for row in history:
        if row.get("epoch", 0) <= upto_epoch:
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


# --- tasks ------------------------------------------------------------------------------------------------


@task(name="prepare-data", retries=1, retry_condition_fn=not_integrity_error)
def prepare_data(lab: dict, store_url: str) -> dict:
    """Decode the data set into the uint8 cache and snapshot it in the store, content-addressed."""
    log = _logger()
    cfg = LabConfig.model_validate(lab)
    prep = stages.prepare(cfg.data, progress=False)
    sha = prep["manifest_sha256"]
    store = open_store(store_url)
    key = f"data/{sha}"
    if store.exists(f"{key}/MANIFEST.json"):
        log.info("data snapshot %s already in the store", key)
    else:
        store.put_dir(prep["dir"], key)
        log.info("data snapshot uploaded to %s", store.uri(key))
    m = prep["manifest"]
    return {"data_key": key, "manifest_sha256": sha, "classes": m["classes"], "counts": m["counts"], "uri": store.uri(key)}


@task(name="train-stage", retries=1, retry_delay_seconds=2, retry_condition_fn=not_integrity_error)
def train_stage(job: TrainJob, run_id: Optional[str] = None) -> dict:
    """Train one model. Checkpoints go to the store every epoch; a retry or a re-run of the same work (same
    stage key) resumes from the newest checkpoint in the store that verifies."""
    log = _logger()
    out_dir = stage_dir(job.out_prefix)  # validated before anything touches the disk
    store = open_store(job.store_url)
    cfg = LabConfig.model_validate(job.lab)
    kd = KDConfig.model_validate(job.kd) if job.kd else None
    data_dir = fetch_dir(store, job.data_key, "data")
    # the teacher trains the student; the baseline only uses it at evaluation time (top-1 agreement)
    teacher_dir = fetch_dir(store, job.teacher_prefix, "models") if (job.teacher_prefix and job.role == "student") else None
    out_dir.mkdir(parents=True, exist_ok=True)
    restored = _restore_checkpoint(store, job.out_prefix, out_dir / "checkpoints")
    if restored:
        log.info("%s: resuming from checkpoint %s of %s", job.name, restored, store.uri(job.out_prefix))

    tracker = Tracker(job.tracking_uri, job.experiment) if (job.tracking_uri and run_id) else None
    epochs = (cfg.teacher_train if job.role == "teacher" else cfg.student_train).epochs
    res = stages.train(
        job.role, cfg, data_dir, out_dir, teacher_dir=teacher_dir, kd=kd,
        log_fn=_progress_log_fn(tracker, run_id, epochs, job.name),
        on_checkpoint=_mirror_checkpoints(store, job.out_prefix), resume=True,
    )
    if tracker is not None and res.get("resumed_from_epoch"):
        history = json.loads((out_dir / "history.json").read_text())
        log_history(tracker, run_id, history, res["resumed_from_epoch"])
    model_prefix = f"{job.out_prefix}/model"
    upload_model(store, out_dir, model_prefix)
    weights_sha = json.loads((out_dir / "config.json").read_text())["weights_sha256"]
    res.update({"model_prefix": model_prefix, "mlflow_run_id": run_id, "name": job.name, "role": job.role,
                "weights_sha256": weights_sha, "stage_key": job.out_prefix})
    res["model_path"] = store.uri(f"{model_prefix}/model.safetensors")
    return res


@task(name="evaluate-stage", retries=1, retry_condition_fn=not_integrity_error)
def evaluate_stage(job: TrainJob, trained: dict) -> dict:
    """Evaluate on the test split of the same data snapshot; agreement with the teacher for students."""
    store = open_store(job.store_url)
    cfg = LabConfig.model_validate(job.lab)
    data_dir = fetch_dir(store, job.data_key, "data")
    model_dir = fetch_dir(store, trained["model_prefix"], "models")
    teacher_dir = fetch_dir(store, job.teacher_prefix, "models") if job.teacher_prefix else None
    ev_cfg = cfg.eval.model_copy(update={"speed": job.speed and cfg.eval.speed})
    out = stage_dir(job.out_prefix) / "eval_test.json"
    m = stages.evaluate(model_dir, data_dir, ev_cfg, split="test", teacher_dir=teacher_dir, out_path=out)
    store.put_file(out, f"{job.out_prefix}/eval_test.json")
    flat = {f"test_{k}" if k in ("accuracy", "loss", "ece") else k: v for k, v in m.items() if isinstance(v, (int, float))}
    if job.tracking_uri and trained.get("mlflow_run_id"):
        tracker = Tracker(job.tracking_uri, job.experiment)
        tracker.log_metrics(trained["mlflow_run_id"], {**flat, "val_acc_best": trained["val_acc"], "train_seconds": trained["train_seconds"]})
    return flat


