"""``distill-cifar``: prepare data -> teacher (reused when its key matches) -> baseline, student and the
temperature sweep concurrently -> evaluation on one test split -> MLflow registration and promotion gate ->
comparison report (Prefect artifact, MLflow artifacts, printed table).

Run it with ``distill run cifar --profile smoke`` (in-process, embedded default) or
``prefect deployment run distill-cifar/local``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from distill.image.config import KDConfig, LabConfig
from distill.files import sha256_json
from tasks.lab import (
    INTEGRITY_MARKERS, TrainJob, git_commit, not_integrity_error, prefect_run_alive, prepare_data, stage_key, stage_result, work_dir,
)
from tasks.registry import register_models
from tasks.report import build_report
from tasks.secrets import redact, redact_text, strip_userinfo
from tasks.storage import IntegrityError, open_store
from tasks.tracking import Tracker, flatten_params

from .embedded import embedded_prefect_server
from .params import PipelineParams, project_home, resolve_store_url, resolve_tracking_uri
from .train import distill_train


@task(name="run-training", retries=1, retry_delay_seconds=5, retry_condition_fn=not_integrity_error)
def run_training(job: TrainJob, train_pool: Optional[str]) -> dict:
    """Run one training stage in-process, or on ``train_pool`` through the ``distill-train/<pool>`` deployment.
    A retry (or a later flow run) uses the same content-addressed stage prefix, so it resumes from the newest
    verified checkpoint; an integrity failure is not retried."""
    if not train_pool:
        return distill_train(job)
    fr = run_deployment(
        f"distill-train/{train_pool}", parameters={"job": job.model_dump(mode="json")},
        flow_run_name=job.name, timeout=None, poll_interval=2, tags=["distill", job.role],
    )
    if not fr.state or not fr.state.is_completed():
        message = (fr.state.message or "") if fr.state else ""
        text = (f"training stage {job.name} on pool {train_pool!r} ended {fr.state.name if fr.state else 'without state'}"
                f" (flow run {fr.id}): {redact_text(message)}")
        if any(marker in message for marker in INTEGRITY_MARKERS):
            raise IntegrityError(text)
        raise RuntimeError(text)
    return open_store(job.store_url).get_json(f"{job.out_prefix}/result.json")


def _run_batch(jobs: list[TrainJob], pool: Optional[str], max_parallel: int) -> list[dict]:
    out: list[dict] = []
    for i in range(0, len(jobs), max_parallel):
        futures = [run_training.with_options(task_run_name=f"train-{j.name}").submit(j, pool) for j in jobs[i : i + max_parallel]]
        out.extend(f.result() for f in futures)
    return out


def _kd_name(kd: KDConfig) -> str:
    return f"sweep-T{kd.temperature:g}-a{kd.alpha:g}"


@flow(name="distill-cifar", log_prints=True)
def distill_cifar(params: PipelineParams = PipelineParams()) -> dict:
    cfg: LabConfig = params.lab()  # validated before any compute
    run_id = str(flow_run.id or "local")
    store_url = resolve_store_url(params.store_url)
    store = open_store(store_url)
    tracker = Tracker(resolve_tracking_uri(params.tracking_uri), params.experiment)
    lab = cfg.model_dump(mode="json")
    salt = run_id if getattr(params, "fresh", False) else None
    work_key = sha256_json({"lab": lab, "experiment": params.experiment, "salt": salt})[:24]
    killed = tracker.end_dead_runs("distill.work_key", work_key, is_alive=prefect_run_alive)
    for dead_parent in list(killed):  # their stage runs too, unless a live worker still owns one
        killed += tracker.end_dead_runs("mlflow.parentRunId", dead_parent, is_alive=prefect_run_alive)
    if killed:
        get_run_logger().info("marked %d MLflow run(s) of dead earlier attempts at this work KILLED", len(killed))
    commit = git_commit()
    parent = tracker.start_parent(
        f"{cfg.profile}-{flow_run.name or run_id[:8]}",
        {"profile": cfg.profile, "train_pool": params.train_pool or "in-process", **flatten_params(lab)},
        {"prefect_flow_run_id": run_id, "git_commit": commit, "profile": cfg.profile, "distill.work_key": work_key,
         "distill.owner.flow_run_id": run_id},
        reuse_tag="prefect_flow_run_id",
    )
    with tracker.run_scope(parent):
        return _pipeline(params, cfg, lab, store, store_url, tracker, parent, run_id, commit, salt)


def _pipeline(params, cfg, lab, store, store_url, tracker, parent, run_id, commit, salt) -> dict:
    log = get_run_logger()
    data = prepare_data(lab, store_url)
    n_train = data["counts"]["train"]["total"]
    for field in ("teacher_train", "student_train"):  # a config error, before any stage is dispatched
        if getattr(cfg, field).batch_size > n_train:
            raise ValueError(f"{field}.batch_size ({getattr(cfg, field).batch_size}) is larger than the training "
                             f"split ({n_train} images)")
    common = dict(lab=lab, data_key=data["data_key"], store_url=store_url, tracking_uri=tracker.tracking_uri,
                  experiment=params.experiment, parent_run_id=parent,
                  tags={"prefect_flow_run_id": run_id, "git_commit": commit, "data_manifest_sha256": data["manifest_sha256"]})
    notes: list[str] = []
    sha = data["manifest_sha256"]

    # --- teacher: reused when a completed stage with the same key verifies in the store ----------------------
    tkey = stage_key("teacher", cfg, data_manifest_sha256=sha, salt=salt)
    tjob = TrainJob(role="teacher", name="teacher", out_prefix=f"stages/{tkey}", **common)
    teacher = stage_result(store, tjob.out_prefix)
    if teacher is not None:
        teacher["reused"] = True
        msg = (f"teacher reused from {store.uri(tjob.out_prefix)} (trained by flow run "
               f"{teacher.get('executed_by', {}).get('flow_run_id') or '?'}); no teacher training this run")
        log.info(msg)
        notes.append(msg)
    else:
        teacher = _run_batch([tjob], params.train_pool, 1)[0]
        notes.append(f"teacher trained in this run ({store.uri(tjob.out_prefix)})")
    tracker.set_tags(parent, {"teacher_reused": str(bool(teacher.get("reused"))).lower(), "teacher_key": tkey})
    teacher_prefix = teacher["model_prefix"]
    tsha = teacher["weights_sha256"]

    # --- baseline, student and sweep, concurrently; each keyed by its own work --------------------------------
    def job(role: str, name: str, kd: Optional[KDConfig], speed: bool = True) -> TrainJob:
        key = stage_key(role, cfg, data_manifest_sha256=sha, kd=kd, teacher_weights_sha256=tsha, salt=salt)
        return TrainJob(role=role, name=name, kd=kd.model_dump() if kd else None, teacher_prefix=teacher_prefix,
                        out_prefix=f"stages/{key}", speed=speed, **common)

    jobs = [job("baseline", "baseline", None), job("student", "student", cfg.kd)]
    sweep_members = cfg.sweep.members() if cfg.sweep.enabled else []
    for kd in sweep_members:
        if (kd.temperature, kd.alpha) == (cfg.kd.temperature, cfg.kd.alpha):
            continue  # identical to the main student: its result is reused for the sweep
        jobs.append(job("student", _kd_name(kd), kd, speed=False))
    reused = {j.name: r for j in jobs if (r := stage_result(store, j.out_prefix)) is not None}
    todo = [j for j in jobs if j.name not in reused]
    done = _run_batch(todo, params.train_pool, params.max_parallel) if todo else []
    results = {"teacher": teacher}
    for j in jobs:
        r = reused.get(j.name) or next(d for d in done if d["stage_key"] == j.out_prefix)
        # reused: found complete here, or by the stage itself (another run completed it meanwhile)
        results[j.name] = {**r, "name": j.name, "role": j.role, "reused": j.name in reused or bool(r.get("reused"))}
    if reused:
        notes.append(f"completed earlier with the same data, config and code, reused: {', '.join(sorted(reused))}")
    for name, r in results.items():
        r.setdefault("history", _history(store, r))
        if r.get("reused"):
            _adopt_reused(tracker, parent, name, r, run_id)
    return _finish(params, cfg, store, store_url, tracker, parent, run_id, commit, data, tkey, teacher, results,
                   sweep_members, notes)


def _finish(params, cfg, store, store_url, tracker, parent, run_id, commit, data, tkey, teacher, results,
            sweep_members, notes) -> dict:
    # every model was evaluated on the same test split of the same snapshot
    sizes = {name: r["test"].get("n_images") for name, r in results.items()}
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"models were evaluated on different test splits: {sizes}")

    sweep = []
    for kd in sweep_members:
        r = results["student"] if (kd.temperature, kd.alpha) == (cfg.kd.temperature, cfg.kd.alpha) else results[_kd_name(kd)]
        sweep.append({"temperature": kd.temperature, "alpha": kd.alpha, "test_accuracy": r["test"]["test_accuracy"], "val_acc": r["val_acc"]})
        if r.get("mlflow_run_id") and not r.get("reused") and "baseline" in results:
            tracker.log_metrics(r["mlflow_run_id"], {"kd_gain": r["test"]["test_accuracy"] - results["baseline"]["test"]["test_accuracy"]})

    registration = None
    if params.register_models:
        registration = register_models(
            {k: results[k] for k in ("teacher", "baseline", "student")},
            store_url=store_url, tracking_uri=tracker.tracking_uri, experiment=params.experiment, data_key=data["data_key"],
            lineage={"data_manifest_sha256": data["manifest_sha256"], "prefect_flow_run_id": run_id, "git_commit": commit,
                     "teacher_key": tkey},
            margin=cfg.promotion_margin,
        )

    report = publish_report(results, sweep, registration, notes, store_url, run_id, tracker.tracking_uri, params.experiment, parent)
    tracker.log_metrics(parent, {
        "teacher_test_accuracy": results["teacher"]["test"]["test_accuracy"],
        "baseline_test_accuracy": results["baseline"]["test"]["test_accuracy"],
        "student_test_accuracy": results["student"]["test"]["test_accuracy"],
        "kd_gain": results["student"]["test"]["test_accuracy"] - results["baseline"]["test"]["test_accuracy"],
    })
    summary = redact({
        "flow_run_id": run_id,
        "mlflow_parent_run_id": parent,
        "experiment": params.experiment,
        "tracking_uri": tracker.tracking_uri,
        "store_url": store_url,
        "data": data,
        "teacher_reused": bool(teacher.get("reused")),
        "teacher_key": tkey,
        "results": {k: {kk: v[kk] for kk in ("val_acc", "test", "model_prefix", "mlflow_run_id", "executed_by", "reused",
                                             "stage_key", "resumed_from_epoch") if kk in v} for k, v in results.items()},
        "registration": registration,
        "report": report,
    })
    store.put_json(summary, f"runs/{run_id}/summary.json")
    print(report["table"])
    return summary


def _adopt_reused(tracker: Tracker, parent: str, name: str, r: dict, run_id: str) -> None:
    """A reused stage gets a nested run under this flow run's parent (FINISHED at once) carrying its history and
    test metrics and a tag naming the run that trained it, so this run's comparison and registration are whole
    even when the original run lives in another experiment or on another tracking server."""
    original = r.get("mlflow_run_id")
    tags = {"distill.stage_key": r.get("stage_key") or r.get("out_prefix") or "", "distill.role": r["role"],
            "distill.stage": name, "distill.reused": "true", "distill.reused_from_run": original or "",
            "prefect_flow_run_id": run_id}
    child = tracker.start_child(parent, name, {"role": r["role"], "stage": name}, tags)
    with tracker.run_scope(child):
        for row in r.get("history") or []:
            tracker.log_metrics(child, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        tracker.log_metrics(child, {**r.get("test", {}), "val_acc_best": r.get("val_acc")})
    tracker.set_tags(parent, {f"distill.reused.{name}": original or ""})
    # registration stays keyed on the run that trained the model when it is in this experiment, so a reused
    # model is not registered again as a new version
    r["adopted_run_id"] = child
    r["mlflow_run_id"] = original if original and _in_experiment(tracker, original) else child


def _in_experiment(tracker: Tracker, run_id: str) -> bool:
    try:
        return tracker.client.get_run(run_id).info.experiment_id == tracker.experiment_id
    except Exception:  # noqa: BLE001 - deleted, or another server
        return False


def _history(store, r: dict) -> list:
    try:
        return json.loads(store.get_dir_file(r["model_prefix"], "history.json"))
    except Exception:  # noqa: BLE001 - the curves are a convenience of the report
        return []


@task(name="publish-report")
def publish_report(results, sweep, registration, notes, store_url, run_id, tracking_uri, experiment, parent_run_id) -> dict:
    out_dir = work_dir() / "runs" / run_id / "report"
    rep = build_report(results, sweep, (registration or {}).get("promotion"), notes, out_dir)
    store = open_store(store_url)
    store.put_dir(out_dir, f"runs/{run_id}/report")
    try:
        create_markdown_artifact(rep["markdown"], key="distill-cifar-report", description="teacher vs baseline vs students")
        create_table_artifact(rep["rows"], key="distill-cifar-table")
    except Exception as e:  # artifacts are a convenience; the report is in the store and MLflow regardless
        get_run_logger().warning("could not create Prefect artifacts: %s", e)
    tracker = Tracker(tracking_uri, experiment)
    tracker.log_artifacts(parent_run_id, out_dir, "report")
    return {"table": rep["table"], "uri": store.uri(f"runs/{run_id}/report"), "files": rep["files"]}


def run_local(profile: str = "smoke", overrides: Optional[dict] = None, train_pool: Optional[str] = None,
              store_url: Optional[str] = None, tracking_uri: Optional[str] = None, fresh: bool = False,
              register_models: bool = True) -> dict:
    """Entry point of ``distill run cifar``: the flow in-process (embedded default). Without PREFECT_API_URL a
    Prefect server is started for the run and dies with this process, even on SIGKILL (flows/embedded.py).
    Credentials in the tracking URI are moved to MLflow's variables first, so no copy of them is stored."""
    if tracking_uri:
        tracking_uri, user, password = strip_userinfo(tracking_uri)
        if user:
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
        if password:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    params = PipelineParams(profile=profile, overrides=overrides or {}, train_pool=train_pool,
                            store_url=store_url, tracking_uri=tracking_uri, fresh=fresh, register_models=register_models)
    home = Path(os.environ.get("PREFECT_HOME") or project_home() / "prefect")
    with embedded_prefect_server(home):
        summary = distill_cifar(params)
    uri = summary["tracking_uri"]
    print()
    print(f"MLflow runs: experiment {summary['experiment']!r}, parent run {summary['mlflow_parent_run_id']}")
    print(f"Open the MLflow UI on these runs:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")
    print(f"Report: {summary['report']['uri']}")
    return summary
