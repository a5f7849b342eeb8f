"""Thin Prefect tasks over the compute core, the same for every distillation kind. They move files between the
store and a local work folder, call the kind's functions (:class:`distill.kinds.Kind`), and return small
references (store keys, metric dicts), never tensors.

Stage work is keyed by what determines its result, not by the flow run that asked for it: a stage's store
prefix is ``stages/<key>`` where ``key`` hashes the stage fingerprint (the kind's ``fingerprint``: role, model, training config, KD
config, data manifest, teacher / init weights) and the sha256 of the source of the shared core and of the
kind's own package (a change to the LM code does not retrain image stages). So a re-run of the same work (a killed ``distill run``, a retried deployment run, a second
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
from pydantic import BaseModel, Field, field_validator, model_validator

import distill
from distill import home
from distill.checkpoint import CheckpointError, load_checkpoint, point_latest, retained_checkpoints
from distill.files import contained_path, sha256_json
from distill.kinds import Kind, get_kind

from .secrets import redact_text
from .storage import Store, StoreError, is_integrity_error, open_store, validate_prefix

# Exception class names that mean corrupt or bad input rather than a passing fault (also found in the state
# message of a failed remote flow run)
INTEGRITY_MARKERS = ("ChecksumMismatch", "IntegrityError", "CheckpointError", "CheckpointMismatch", "DataError",
                     "ModelLoadError", "TokenizerMismatch")
from .tracking import Tracker, flatten_params

# what a stage folder holds besides the model folder it publishes
NOT_MODEL_FILES = ("checkpoints", "result.json")
STAGE_LOCK_TTL = 120.0


class TrainJob(BaseModel):
    """Everything one training stage needs; JSON-serialisable so it can cross to a work pool. It carries no
    credentials: the tracking URI is the redacted one, and workers take credentials from their environment."""

    kind: str = Field("cifar", description="distillation kind (distill.kinds): cifar, lm")
    role: Literal["teacher", "init", "baseline", "student", "group"]
    name: str = Field(description="stage name, e.g. teacher, baseline, student, sweep-T4-a0.7")
    lab: dict = Field(description="the kind's config (validated by its config model)")
    kd: Optional[dict] = None
    data_key: str
    out_prefix: str = Field(description="content-addressed store prefix of the stage: stages/<key>")
    teacher_prefix: Optional[str] = None
    init_prefix: Optional[str] = Field(None, description="model prefix of the kind's init stage (students' start)")
    eval_teacher_prefix: Optional[str] = Field(
        None, description="model prefix the evaluation compares with, when not teacher_prefix (a member that "
                          "learns from an earlier member is still evaluated against the run's teacher)")
    store_url: str
    tracking_uri: Optional[str] = None
    experiment: str = "distill-cifar"
    parent_run_id: Optional[str] = None
    speed: bool = True
    keep_checkpoints: bool = Field(False, description="keep the training checkpoints once the stage is complete")
    tags: dict[str, str] = Field(default_factory=dict)
    seed: Optional[int] = Field(None, ge=0, description="seed of the initial weights (kinds that train replicas per seed)")
    members: Optional[list[dict]] = Field(
        None, description="role 'group': the members trained together in this stage, each {role, name, kd, seed}")
    concurrent: int = Field(1, ge=1, description="training stages that may run at once (the flow's max_parallel): "
                                                 "a CPU stage takes its share of the cores as torch threads")

    @model_validator(mode="after")
    def _group(self):
        if (self.role == "group") != bool(self.members):
            raise ValueError("role 'group' and members go together: a group job lists its members, no other job does")
        for m in self.members or []:
            if (not isinstance(m, dict) or set(m) - {"role", "name", "kd", "seed", "out_prefix"}
                    or m.get("role") not in ("baseline", "student") or not m.get("out_prefix")):
                raise ValueError(f"group member {m!r}: a dict with role (baseline or student), name, kd, seed and "
                                 f"out_prefix (the member's own stage prefix)")
            self._name(str(m.get("name")))
            self._key(str(m["out_prefix"]))
        return self

    def member_views(self) -> list["TrainJob"]:
        """A group job's members as the single-stage jobs they would be alone (their own content-addressed
        ``out_prefix``): a member trained in a group is published, evaluated and reused exactly as one trained
        alone."""
        return [self.model_copy(update={"role": m["role"], "name": m["name"], "kd": m.get("kd"), "seed": m.get("seed"),
                                        "members": None, "out_prefix": m["out_prefix"]})
                for m in self.members or []]

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        get_kind(v)  # unknown kinds fail here, naming the known ones
        return v

    def kind_and_config(self) -> tuple[Kind, Any]:
        kind = get_kind(self.kind)
        return kind, kind.config_model.model_validate(self.lab)

    @field_validator("out_prefix", "data_key", "teacher_prefix", "init_prefix", "eval_teacher_prefix")
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
    return home.work_dir()


def stage_dir(prefix: str) -> Path:
    """The local work folder of a store prefix, refused if it would leave the work folder (checked before
    anything is created)."""
    return contained_path(work_dir(), validate_prefix(prefix).rstrip("/"), follow_links=True)


#: the core packages whose source computes a kind's stages (diffusion reads its images with the image kind's data code)
KIND_PACKAGES = {"cifar": ("image",), "lm": ("lm",), "diffusion": ("diffusion", "image")}


def code_version(kind: str = "cifar") -> str:
    """sha256 of the source that computes a stage of ``kind``: the shared core (``distill/*.py``) and the kind's
    packages (``distill/<package>/``). Work done by other code is not reused; a change to a package the kind
    does not use changes nothing here."""
    h = hashlib.sha256()
    pkg = Path(distill.__file__).parent
    files = sorted(pkg.glob("*.py"))
    for name in KIND_PACKAGES.get(kind, (kind,)):
        sub = pkg / name
        files += sorted(sub.rglob("*.py")) if sub.is_dir() else []
    for p in files:
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


def stage_key(kind: Kind, role: str, cfg: Any, *, data_manifest_sha256: str, kd: Optional[dict] = None,
              teacher_weights_sha256: Optional[str] = None, init_weights_sha256: Optional[str] = None,
              salt: Optional[str] = None, seed: Optional[int] = None) -> str:
    """The content key of one stage's work: same key, same result. ``salt`` (e.g. a flow run id when the user
    asks for fresh training) makes the work unique."""
    doc = kind.fingerprint(role, cfg, data_sha256=data_manifest_sha256, kd=kd, teacher_sha256=teacher_weights_sha256,
                           init_sha256=init_weights_sha256, **({"seed": seed} if seed is not None else {}))
    # a baseline trains without the teacher, but its stored result holds its agreement with the teacher
    evaluated_against = teacher_weights_sha256 if role in ("baseline", "init") else None
    return sha256_json({"kind": kind.name, "stage": doc, "code": code_version(kind.name), "salt": salt,
                        "evaluated_against": evaluated_against})[:32]


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


def fetch_dir(store: Store, prefix: str, what: str) -> Path:
    """A published store folder in the local cache, checked against the store's manifest on every call."""
    return store.fetch_dir(prefix, work_dir() / "cache" / what)


def upload_model(store: Store, out_dir: Path, prefix: str) -> dict:
    """Publish the stage's model folder: every file and subfolder of ``out_dir`` except checkpoints, evaluations
    and the stage result (weights, config, tokenizer files, a diffusers pipeline's unet/ and scheduler/,
    metrics, history)."""
    with tempfile.TemporaryDirectory() as tmp:
        for p in sorted(out_dir.iterdir()):
            if p.name in NOT_MODEL_FILES or p.name == "eval" or p.name.startswith(("eval_", ".")) or p.is_symlink():
                continue
            if p.is_dir():
                shutil.copytree(p, Path(tmp) / p.name, symlinks=False)
            elif p.is_file():
                shutil.copy2(p, Path(tmp) / p.name)
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


def group_result(store: Store, job: TrainJob) -> Optional[dict]:
    """The results of a lockstep group whose every member is a completed stage (:func:`stage_result`, under the
    member's own prefix), as ``{"members": {name: result}}``; else None."""
    found = {v.name: stage_result(store, v.out_prefix) for v in job.member_views()}
    if any(r is None for r in found.values()):
        return None
    return {"members": found}


def drop_checkpoints(store: Store, job: TrainJob) -> None:
    """After a stage completed: its training checkpoints only served to resume it, and no run resumes it again
    (its result is reused by key), so they leave the store and the local stage folder unless the job keeps
    them. For a language model they are several times the model's size (weights plus optimiser moments).
    ``LATEST`` goes first, so a reader never sees a pointer to a half-deleted checkpoint."""
    if job.keep_checkpoints:
        return
    root = f"{job.out_prefix}/checkpoints"
    for key in sorted(store.list(root), key=lambda k: not k.endswith("/LATEST")):
        store.delete(key)
    shutil.rmtree(stage_dir(job.out_prefix) / "checkpoints", ignore_errors=True)


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
            point_latest(local_ckpts, name)
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


def _progress_log_fn(tracker: Optional[Tracker], run_id: Optional[str], total: int, name: str):
    """``log_fn`` of a training stage: metrics to MLflow (never fatal), progress to a Prefect progress artifact,
    and one log line per call naming the stage; ``step`` is an epoch (images) or an optimiser step (LMs)."""
    sink = tracker.log_fn(run_id) if tracker and run_id else None
    artifact_id = None
    if _in_prefect_run():  # outside a run, an artifact call would start a temporary Prefect server
        try:
            artifact_id = create_progress_artifact(progress=0.0, description=f"{name}: training progress")
        except Exception:
            pass
    log = _logger()

    def log_fn(metrics: dict, step: int) -> None:
        if sink is not None:
            try:  # Tracker retries transient errors; one that persists must not kill a training
                sink(metrics, step)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: could not log step %d metrics to MLflow: %s", name, step, redact_text(str(e)))
        if artifact_id is not None:
            try:
                update_progress_artifact(artifact_id=artifact_id, progress=min(100.0, 100.0 * step / max(total, 1)))
            except Exception:
                pass
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and k != "lr")
        log.info("%s %d/%d: %s", name, step, total, shown)

    return log_fn


def start_stage_run(job: TrainJob, tracker: Tracker, flow_run_id: Optional[str], store: Store) -> str:
    """A nested MLflow run for this attempt at the stage; earlier attempts whose owner died are marked KILLED."""
    _, cfg = job.kind_and_config()
    killed = tracker.end_dead_runs("distill.stage_key", job.out_prefix, is_alive=prefect_run_alive)
    if killed:
        _logger().info("%s: marked %d dead earlier attempt(s) KILLED in MLflow", job.name, len(killed))
    params = {"kind": job.kind, "role": job.role, "stage": job.name, **flatten_params(cfg.model_dump(mode="json"))}
    if job.kd:
        params.update({f"kd.{k}": v for k, v in job.kd.items()})
    tags = {"distill.stage_key": job.out_prefix, "distill.role": job.role, "distill.stage": job.name,
            "distill.kind": job.kind, **job.tags}
    if flow_run_id:
        tags["distill.owner.flow_run_id"] = flow_run_id
    if job.parent_run_id:
        run_id = tracker.start_child(job.parent_run_id, job.name, params, tags)
    else:
        run_id = tracker.start_parent(job.name, params, tags)
    # the data snapshot this stage trains on (its key is data/<manifest sha256>): the UI's Dataset column
    tracker.log_dataset(run_id, name=f"distill-{job.kind}-data", digest=job.data_key.rsplit("/", 1)[-1],
                        source=store.uri(job.data_key))
    return run_id


def log_history(tracker: Tracker, run_id: str, history: list[dict], upto_epoch: int) -> None:
    """Metrics of the epochs (or optimiser steps) trained by an earlier attempt (resumed runs), so each run's
    curves are whole."""
    for row in history:
        step = row.get("epoch", row.get("step"))
        if step is not None and step <= upto_epoch:
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k not in ("epoch", "step")}, step=int(step))


# --- tasks ------------------------------------------------------------------------------------------------


@task(name="prepare-data", retries=1, retry_condition_fn=not_integrity_error)
def prepare_data(kind_name: str, lab: dict, store_url: str) -> dict:
    """Prepare the kind's data (decoded images, token cache) and snapshot it in the store, content-addressed."""
    log = _logger()
    kind = get_kind(kind_name)
    cfg = kind.config_model.model_validate(lab)
    prep = kind.prepare(cfg, progress=False)
    sha = prep["manifest_sha256"]
    store = open_store(store_url)
    key = f"data/{sha}"
    if store.exists(f"{key}/MANIFEST.json"):
        log.info("data snapshot %s already in the store", key)
    else:
        store.put_dir(prep["dir"], key)
        log.info("data snapshot uploaded to %s", store.uri(key))
    return {"data_key": key, "manifest_sha256": sha, "n_train": prep["n_train"], **prep.get("summary", {}),
            "uri": store.uri(key)}


def _total_steps(cfg: Any, job: TrainJob) -> int:
    """Denominator of the progress artifact: epochs (images) or optimiser steps (LMs, diffusion)."""
    fn = get_kind(job.kind).extras.get("total_steps")
    if fn is not None:
        return int(fn(job.role, cfg, job.kd))
    for section in (("teacher_train",) if job.role == "teacher" else ()) + ("student_train", "train"):
        tc = getattr(cfg, section, None)
        if tc is not None:
            return int(getattr(tc, "epochs", None) or getattr(tc, "steps", 1))
    return 1


@task(name="train-stage", retries=1, retry_delay_seconds=2, retry_condition_fn=not_integrity_error)
def train_stage(job: TrainJob, run_id: Optional[str] = None) -> dict:
    """Train one model. Checkpoints go to the store as they are written; a retry or a re-run of the same work
    (same stage key) resumes from the newest checkpoint in the store that verifies."""
    log = _logger()
    out_dir = stage_dir(job.out_prefix)  # validated before anything touches the disk
    store = open_store(job.store_url)
    kind, cfg = job.kind_and_config()
    data_dir = fetch_dir(store, job.data_key, "data")
    # students learn from the teacher; the init stage is made from it; the baseline only meets it at evaluation,
    # except for a kind whose baseline is made from the teacher (diffusion: the teacher sampled in fewer steps)
    needs_teacher = job.role in ("student", "init") or (job.role == "baseline" and kind.extras.get("baseline_needs_teacher"))
    teacher_dir = fetch_dir(store, job.teacher_prefix, "models") if (job.teacher_prefix and needs_teacher) else None
    init_dir = fetch_dir(store, job.init_prefix, "models") if job.init_prefix else None
    out_dir.mkdir(parents=True, exist_ok=True)
    restored = _restore_checkpoint(store, job.out_prefix, out_dir / "checkpoints")
    if restored:
        log.info("%s: resuming from checkpoint %s of %s", job.name, restored, store.uri(job.out_prefix))

    tracker = Tracker(job.tracking_uri, job.experiment) if (job.tracking_uri and run_id) else None
    res = kind.train(
        job.role, cfg, data_dir, out_dir, teacher_dir=teacher_dir, init_dir=init_dir, kd=job.kd,
        log_fn=_progress_log_fn(tracker, run_id, _total_steps(cfg, job), job.name),
        on_checkpoint=_mirror_checkpoints(store, job.out_prefix), resume=True,
        **({"seed": job.seed} if job.seed is not None else {}),
    )
    resumed = res.get("resumed_from_epoch") or res.get("resumed_from_step")
    if tracker is not None and resumed and (out_dir / "history.json").exists():
        history = json.loads((out_dir / "history.json").read_text())
        log_history(tracker, run_id, history, resumed)
    model_prefix = f"{job.out_prefix}/model"
    upload_model(store, out_dir, model_prefix)
    res.update({"model_prefix": model_prefix, "mlflow_run_id": run_id, "name": job.name, "role": job.role,
                "kind": job.kind, "weights_sha256": kind.weights_sha256(out_dir), "stage_key": job.out_prefix,
                "model_uri": store.uri(model_prefix)})
    return res


@task(name="train-group", retries=1, retry_delay_seconds=2, retry_condition_fn=not_integrity_error)
def train_group_stage(job: TrainJob, run_ids: dict[str, Optional[str]]) -> dict[str, dict]:
    """Train a lockstep group (``job.members``) in one stage: one checkpoint of the whole group per epoch in the
    store (a retry resumes from it), then each member's model folder published under its own stage prefix.
    ``run_ids``: each member's MLflow run (its epochs are logged there). Returns {name: result}."""
    log = _logger()
    out_dir = stage_dir(job.out_prefix)
    store = open_store(job.store_url)
    kind, cfg = job.kind_and_config()
    if kind.train_group is None:
        raise ValueError(f"kind {kind.name!r} has no lockstep groups")
    data_dir = fetch_dir(store, job.data_key, "data")
    students = any(m["role"] == "student" for m in job.members or [])
    teacher_dir = fetch_dir(store, job.teacher_prefix, "models") if (job.teacher_prefix and students) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    restored = _restore_checkpoint(store, job.out_prefix, out_dir / "checkpoints")
    if restored:
        log.info("%s: resuming from checkpoint %s of %s", job.name, restored, store.uri(job.out_prefix))
    tracker = Tracker(job.tracking_uri, job.experiment) if job.tracking_uri else None
    total = _total_steps(cfg, job)
    log_fns = {v.name: _progress_log_fn(tracker if run_ids.get(v.name) else None, run_ids.get(v.name), total, v.name)
               for v in job.member_views()}
    res = kind.train_group(cfg, data_dir, out_dir, job.members, teacher_dir=teacher_dir, log_fns=log_fns,
                           on_checkpoint=_mirror_checkpoints(store, job.out_prefix), resume=True)
    for v in job.member_views():
        r, folder, run_id = res[v.name], out_dir / v.name, run_ids.get(v.name)
        if tracker is not None and run_id and r.get("resumed_from_epoch") and (folder / "history.json").exists():
            log_history(tracker, run_id, json.loads((folder / "history.json").read_text()), r["resumed_from_epoch"])
        model_prefix = f"{v.out_prefix}/model"
        upload_model(store, folder, model_prefix)
        r.update({"model_prefix": model_prefix, "mlflow_run_id": run_id, "name": v.name, "role": v.role,
                  "kind": job.kind, "weights_sha256": kind.weights_sha256(folder), "stage_key": v.out_prefix,
                  "model_uri": store.uri(model_prefix), "group": job.name, "group_prefix": job.out_prefix})
    return res


@task(name="evaluate-stage", retries=1, retry_condition_fn=not_integrity_error)
def evaluate_stage(job: TrainJob, trained: dict) -> dict:
    """Evaluate on the held-out test split of the same data snapshot (against the run's teacher when there is
    one: ``eval_teacher_prefix``, else ``teacher_prefix``). Files the kind's evaluate wrote (``"files": {name: path relative to out_path's folder}``, e.g. image grids)
    go to the store under ``<out_prefix>/eval/`` and to the stage's MLflow run as artifacts; the returned
    metrics name them by store key. The kind writes into ``<stage folder>/eval/``, which is never part of the
    published model folder."""
    store = open_store(job.store_url)
    kind, cfg = job.kind_and_config()
    data_dir = fetch_dir(store, job.data_key, "data")
    model_dir = fetch_dir(store, trained["model_prefix"], "models")
    against = job.eval_teacher_prefix or job.teacher_prefix  # the run's teacher, for every model of the run
    teacher_dir = fetch_dir(store, against, "models") if against else None
    out = stage_dir(job.out_prefix) / "eval" / "eval_test.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    m = kind.evaluate(model_dir, data_dir, cfg, split="test", teacher_dir=teacher_dir, speed=job.speed, out_path=out)
    store.put_file(out, f"{job.out_prefix}/eval_test.json")
    tracker = Tracker(job.tracking_uri, job.experiment) if (job.tracking_uri and trained.get("mlflow_run_id")) else None
    if "files" in m:
        m = {**m, "files": upload_eval_files(store, out.parent, m["files"], f"{job.out_prefix}/eval",
                                             tracker, trained.get("mlflow_run_id"))}
    flat = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if tracker is not None:
        sel = kind.selection.key
        extra = {f"{sel}_best": trained[sel]} if isinstance(trained.get(sel), (int, float)) else {}
        tracker.log_metrics(trained["mlflow_run_id"], {**flat, **extra, "train_seconds": trained.get("train_seconds", 0.0)})
    return m


def upload_eval_files(store: Store, folder: Path, files: Any, prefix: str, tracker: Optional[Tracker] = None,
                      run_id: Optional[str] = None) -> dict[str, str]:
    """Upload the files an evaluation wrote (``{name: path relative to folder}``) to ``<prefix>/<path>`` and log
    them to the MLflow run ``run_id`` under ``eval/``; returns {name: store key}. A path that leaves ``folder``
    is refused; a file the evaluation named but did not write is left out (a warning), so a missing picture
    never loses a stage's metrics."""
    if not isinstance(files, dict):
        raise ValueError(f"evaluate's 'files' must be a dict of name -> relative path, got {type(files).__name__}")
    log = _logger()
    keys: dict[str, str] = {}
    for name, rel in files.items():
        path = contained_path(folder, str(rel), follow_links=True)  # PathEscapeError (a ValueError) if outside
        if not path.is_file():
            log.warning("evaluation named the file %s (%s) but did not write it; left out", rel, name)
            continue
        rel_key = path.relative_to(folder.resolve()).as_posix()
        key = f"{prefix}/{rel_key}"
        store.put_file(path, key)
        keys[str(name)] = key
        if tracker is not None and run_id:
            sub = Path("eval", rel_key).parent.as_posix()
            tracker.log_artifact(run_id, path, sub)
    return keys


@task(name="measure-speed", retries=1, retry_condition_fn=not_integrity_error)
def measure_speed(kind_name: str, lab: dict, store_url: str, data_key: str, model_prefix: str) -> dict:
    """Latency and throughput of one model, measured while nothing else trains (the pipeline calls it for
    each model after the training stages have finished, one at a time), with a fixed torch thread count
    (``speed_threads`` in the result)."""
    import torch

    from distill.runtime import stage_threads, usable_cpus

    kind = get_kind(kind_name)
    cfg = kind.config_model.model_validate(lab)
    store = open_store(store_url)
    model_dir, data_dir = fetch_dir(store, model_prefix, "models"), fetch_dir(store, data_key, "data")
    # a fixed thread count, recorded with the figures: every core (or $DISTILL_TORCH_THREADS), as nothing else runs
    threads = stage_threads(usable_cpus(), 1, os.environ.get("DISTILL_TORCH_THREADS"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {**kind.speed(model_dir, data_dir, cfg), "speed_threads": threads}
    finally:
        torch.set_num_threads(before)
