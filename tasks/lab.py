"""Thin Prefect tasks over the compute core. They move files between the store and a local work folder,
call ``distill.stages``, and return small references (store keys, metric dicts), never tensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, Field

import distill
from distill import stages
from distill.config import KDConfig, LabConfig

from .storage import Store, open_store
from .tracking import Tracker, flatten_params

MODEL_FILES = ("model.safetensors", "config.json", "metrics.json", "history.json")


class TrainJob(BaseModel):
    """Everything one training stage needs; JSON-serialisable so it can cross to a work pool."""

    role: Literal["teacher", "baseline", "student"]
    name: str = Field(description="stage name, e.g. teacher, baseline, student, sweep-T4-a0.7")
    lab: dict
    kd: Optional[dict] = None
    data_key: str
    out_prefix: str = Field(description="run-scoped store prefix: checkpoints/, model/, result.json")
    teacher_prefix: Optional[str] = None
    store_url: str
    tracking_uri: Optional[str] = None
    experiment: str = "distill-cifar"
    parent_run_id: Optional[str] = None
    speed: bool = True
    tags: dict[str, str] = Field(default_factory=dict)


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


def code_version() -> str:
    """sha256 of the compute core's source: a teacher trained by other code is not reused."""
    h = hashlib.sha256()
    pkg = Path(distill.__file__).parent
    for p in sorted(pkg.glob("*.py")):
        h.update(p.name.encode())
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


def teacher_key(manifest_sha256: str, cfg: LabConfig) -> str:
    """Teacher training is keyed on (data manifest, teacher config, code version)."""
    doc = {
        "data": manifest_sha256,
        "teacher": cfg.teacher.model_dump(),
        "train": cfg.teacher_train.model_dump(),
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


# --- store <-> local folders ------------------------------------------------------------------------------


def fetch_dir(store: Store, prefix: str, kind: str) -> Path:
    """Download a store folder (with MANIFEST) into the local work cache once; verified on every fetch."""
    local = work_dir() / "cache" / kind / hashlib.sha256(f"{store.url}|{prefix}".encode()).hexdigest()[:20]
    marker = local / ".complete"
    if marker.exists():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=".fetch-"))
    try:
        store.get_dir(prefix, tmp)
        (tmp / ".complete").write_text(prefix + "\n")
        try:
            os.rename(tmp, local)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return local


def upload_model(store: Store, out_dir: Path, prefix: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_FILES:
            shutil.copy2(out_dir / name, Path(tmp) / name)
        return store.put_dir(tmp, prefix)


# --- tasks ------------------------------------------------------------------------------------------------


@task(name="prepare-data", retries=1)
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


def _checkpoint_uploader(store: Store, prefix: str):
    def upload(folder: Path, epoch: int) -> None:
        store.put_dir(folder, f"{prefix}/checkpoints/{folder.name}")
        store.put_bytes((folder.name + "\n").encode(), f"{prefix}/checkpoints/LATEST")

    return upload


def _restore_checkpoint(store: Store, prefix: str, local_ckpts: Path) -> Optional[str]:
    key = f"{prefix}/checkpoints/LATEST"
    if not store.exists(key):
        return None
    name = store.get_bytes(key).decode().strip()
    if not (local_ckpts / name / "state.json").exists():
        store.get_dir(f"{prefix}/checkpoints/{name}", local_ckpts / name)
        (local_ckpts / name / "MANIFEST.json").unlink(missing_ok=True)
    (local_ckpts / "LATEST").write_text(name + "\n")
    return name


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
                log.warning("%s: could not log epoch %d metrics to MLflow: %s", name, step, e)
        if artifact_id is not None:
            try:
                update_progress_artifact(artifact_id=artifact_id, progress=100.0 * step / epochs)
            except Exception:
                pass
        log.info("%s epoch %d/%d: train_loss %.4f val_acc %.4f", name, step, epochs, metrics["train_loss"], metrics["val_acc"])

    return log_fn


@task(name="train-stage", retries=1, retry_delay_seconds=2)
def train_stage(job: TrainJob) -> dict:
    """Train one model. Checkpoints go to the store every epoch; a retry or re-run resumes from them."""
    log = _logger()
    store = open_store(job.store_url)
    cfg = LabConfig.model_validate(job.lab)
    kd = KDConfig.model_validate(job.kd) if job.kd else None
    data_dir = fetch_dir(store, job.data_key, "data")
    # the teacher trains the student; the baseline only uses it at evaluation time (top-1 agreement)
    teacher_dir = fetch_dir(store, job.teacher_prefix, "models") if (job.teacher_prefix and job.role == "student") else None
    out_dir = work_dir() / job.out_prefix
    out_dir.mkdir(parents=True, exist_ok=True)
    restored = _restore_checkpoint(store, job.out_prefix, out_dir / "checkpoints")
    if restored:
        log.info("%s: resuming from checkpoint %s in the store", job.name, restored)

    tracker = run_id = None
    if job.tracking_uri:
        tracker = Tracker(job.tracking_uri, job.experiment)
        run_id = tracker.find_run("distill.stage_key", job.out_prefix)
        if run_id is None:
            params = {"role": job.role, "stage": job.name, **flatten_params(cfg.model_dump(mode="json"))}
            if kd:
                params.update({"kd.temperature": kd.temperature, "kd.alpha": kd.alpha, "kd.loss": kd.loss})
            tags = {"distill.stage_key": job.out_prefix, "distill.role": job.role, "distill.stage": job.name, **job.tags}
            if job.parent_run_id:
                run_id = tracker.start_child(job.parent_run_id, job.name, params, tags)
            else:
                run_id = tracker.start_parent(job.name, params, tags)
    epochs = (cfg.teacher_train if job.role == "teacher" else cfg.student_train).epochs
    res = stages.train(
        job.role, cfg, data_dir, out_dir, teacher_dir=teacher_dir, kd=kd,
        log_fn=_progress_log_fn(tracker, run_id, epochs, job.name),
        on_checkpoint=_checkpoint_uploader(store, job.out_prefix), resume=True,
    )
    model_prefix = f"{job.out_prefix}/model"
    upload_model(store, out_dir, model_prefix)
    res.update({"model_prefix": model_prefix, "mlflow_run_id": run_id, "name": job.name, "role": job.role})
    return res


@task(name="evaluate-stage", retries=1)
def evaluate_stage(job: TrainJob, trained: dict) -> dict:
    """Evaluate on the test split of the same data snapshot; agreement with the teacher for students."""
    store = open_store(job.store_url)
    cfg = LabConfig.model_validate(job.lab)
    data_dir = fetch_dir(store, job.data_key, "data")
    model_dir = work_dir() / job.out_prefix
    teacher_dir = fetch_dir(store, job.teacher_prefix, "models") if job.teacher_prefix else None
    ev_cfg = cfg.eval.model_copy(update={"speed": job.speed and cfg.eval.speed})
    m = stages.evaluate(model_dir, data_dir, ev_cfg, split="test", teacher_dir=teacher_dir, out_path=model_dir / "eval_test.json")
    store.put_file(model_dir / "eval_test.json", f"{job.out_prefix}/eval_test.json")
    flat = {f"test_{k}" if k in ("accuracy", "loss", "ece") else k: v for k, v in m.items() if isinstance(v, (int, float))}
    if job.tracking_uri and trained.get("mlflow_run_id"):
        tracker = Tracker(job.tracking_uri, job.experiment)
        tracker.log_metrics(trained["mlflow_run_id"], {**flat, "val_acc_best": trained["val_acc"], "train_seconds": trained["train_seconds"]})
    return flat
