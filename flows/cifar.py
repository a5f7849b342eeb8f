"""``distill-cifar``: prepare data -> teacher (reused when its key matches) -> baseline, student and the
temperature sweep concurrently -> evaluation on one test split -> MLflow registration and promotion gate ->
comparison report (Prefect artifact, MLflow artifacts, printed table).

Run it with ``distill run cifar --profile smoke`` (in-process, embedded default) or
``prefect deployment run distill-cifar/local``.
"""

from __future__ import annotations

import json
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from distill.config import KDConfig, LabConfig
from tasks.lab import TrainJob, prepare_data, teacher_key, git_commit, work_dir
from tasks.registry import register_models
from tasks.report import build_report
from tasks.storage import open_store
from tasks.tracking import Tracker, flatten_params

from .params import PipelineParams, resolve_store_url, resolve_tracking_uri
from .train import distill_train


@task(name="run-training", retries=1, retry_delay_seconds=5)
def run_training(job: TrainJob, train_pool: Optional[str]) -> dict:
    """Run one training stage in-process, or on ``train_pool`` through the ``distill-train/<pool>`` deployment.
    A retry reuses the stage's store prefix, so it resumes from the last uploaded checkpoint."""
    if not train_pool:
        return distill_train(job)
    fr = run_deployment(
        f"distill-train/{train_pool}", parameters={"job": job.model_dump(mode="json")},
        flow_run_name=job.name, timeout=None, poll_interval=2, tags=["distill", job.role],
    )
    if not fr.state or not fr.state.is_completed():
        raise RuntimeError(f"training stage {job.name} on pool {train_pool!r} ended {fr.state.name if fr.state else 'without state'} (flow run {fr.id})")
    return open_store(job.store_url).get_json(f"{job.out_prefix}/result.json")


def _run_batch(jobs: list[TrainJob], pool: Optional[str], max_parallel: int) -> list[dict]:
    out: list[dict] = []
    for i in range(0, len(jobs), max_parallel):
        futures = [run_training.submit(j, pool) for j in jobs[i : i + max_parallel]]
        out.extend(f.result() for f in futures)
    return out


def _kd_name(kd: KDConfig) -> str:
    return f"sweep-T{kd.temperature:g}-a{kd.alpha:g}"


@flow(name="distill-cifar", log_prints=True)
def distill_cifar(params: PipelineParams = PipelineParams()) -> dict:
    log = get_run_logger()
    cfg: LabConfig = params.lab()  # validated before any compute
    run_id = str(flow_run.id or "local")
    store_url = resolve_store_url(params.store_url)
    tracking_uri = resolve_tracking_uri(params.tracking_uri)
    store = open_store(store_url)
    tracker = Tracker(tracking_uri, params.experiment)
    commit = git_commit()
    lab = cfg.model_dump(mode="json")

    parent = tracker.find_run("prefect_flow_run_id", run_id) or tracker.start_parent(
        f"{cfg.profile}-{flow_run.name or run_id[:8]}",
        {"profile": cfg.profile, "train_pool": params.train_pool or "in-process", **flatten_params(lab)},
        {"prefect_flow_run_id": run_id, "git_commit": commit, "profile": cfg.profile},
    )

    data = prepare_data(lab, store_url)
    common = dict(lab=lab, data_key=data["data_key"], store_url=store_url, tracking_uri=tracking_uri,
                  experiment=params.experiment, parent_run_id=parent,
                  tags={"prefect_flow_run_id": run_id, "git_commit": commit, "data_manifest_sha256": data["manifest_sha256"]})
    notes: list[str] = []

    # --- teacher: reused when (data manifest, teacher config, code version) matches a stored teacher --------
    tkey = teacher_key(data["manifest_sha256"], cfg)
    pointer = f"teachers/{tkey}.json"
    if store.exists(pointer):
        teacher = store.get_json(pointer)
        teacher["reused"] = True
        msg = f"teacher reused from store key {pointer} (trained by flow run {teacher.get('trained_by_flow_run')}); no teacher training this run"
        log.info(msg)
        notes.append(msg)
        tracker.set_tags(parent, {"teacher_reused": "true", "teacher_key": tkey})
    else:
        teacher = _run_batch([TrainJob(role="teacher", name="teacher", out_prefix=f"runs/{run_id}/teacher", **common)], params.train_pool, 1)[0]
        teacher.update({"reused": False, "trained_by_flow_run": run_id, "teacher_key": tkey})
        store.put_json(teacher, pointer)  # published only once complete; concurrent runs write equivalent pointers
        notes.append(f"teacher trained in this run and published as {pointer}")
        tracker.set_tags(parent, {"teacher_reused": "false", "teacher_key": tkey})
    teacher_prefix = teacher["model_prefix"]

    # --- baseline, student and sweep, concurrently ---------------------------------------------------------
    jobs = [
        TrainJob(role="baseline", name="baseline", teacher_prefix=teacher_prefix, out_prefix=f"runs/{run_id}/baseline", **common),
        TrainJob(role="student", name="student", kd=cfg.kd.model_dump(), teacher_prefix=teacher_prefix,
                 out_prefix=f"runs/{run_id}/student", **common),
    ]
    sweep_members = cfg.sweep.members() if cfg.sweep.enabled else []
    for kd in sweep_members:
        if (kd.temperature, kd.alpha) == (cfg.kd.temperature, cfg.kd.alpha):
            continue  # identical to the main student: its result is reused for the sweep
        jobs.append(TrainJob(role="student", name=_kd_name(kd), kd=kd.model_dump(), teacher_prefix=teacher_prefix,
                             out_prefix=f"runs/{run_id}/{_kd_name(kd)}", speed=False, **common))
    done = _run_batch(jobs, params.train_pool, params.max_parallel)
    results = {"teacher": teacher, **{r["name"]: r for r in done}}
    for name, r in results.items():
        r.setdefault("history", _history(store, r))

    # every model was evaluated on the same test split of the same snapshot
    sizes = {name: r["test"].get("n_images") for name, r in results.items()}
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"models were evaluated on different test splits: {sizes}")

    sweep = []
    for kd in sweep_members:
        r = results["student"] if (kd.temperature, kd.alpha) == (cfg.kd.temperature, cfg.kd.alpha) else results[_kd_name(kd)]
        sweep.append({"temperature": kd.temperature, "alpha": kd.alpha, "test_accuracy": r["test"]["test_accuracy"], "val_acc": r["val_acc"]})
        if r.get("mlflow_run_id") and "baseline" in results:
            tracker.log_metrics(r["mlflow_run_id"], {"kd_gain": r["test"]["test_accuracy"] - results["baseline"]["test"]["test_accuracy"]})

    registration = None
    if params.register_models:
        registration = register_models(
            {k: results[k] for k in ("teacher", "baseline", "student")},
            store_url=store_url, tracking_uri=tracking_uri, experiment=params.experiment, data_key=data["data_key"],
            lineage={"data_manifest_sha256": data["manifest_sha256"], "prefect_flow_run_id": run_id, "git_commit": commit,
                     "teacher_key": tkey},
            margin=cfg.promotion_margin,
        )

    report = publish_report(results, sweep, registration, notes, store_url, run_id, tracking_uri, params.experiment, parent)
    tracker.log_metrics(parent, {
        "teacher_test_accuracy": results["teacher"]["test"]["test_accuracy"],
        "baseline_test_accuracy": results["baseline"]["test"]["test_accuracy"],
        "student_test_accuracy": results["student"]["test"]["test_accuracy"],
        "kd_gain": results["student"]["test"]["test_accuracy"] - results["baseline"]["test"]["test_accuracy"],
    })
    tracker.end_run(parent)
    summary = {
        "flow_run_id": run_id,
        "mlflow_parent_run_id": parent,
        "experiment": params.experiment,
        "tracking_uri": tracking_uri,
        "store_url": store_url,
        "data": data,
        "teacher_reused": teacher["reused"],
        "teacher_key": tkey,
        "results": {k: {kk: v[kk] for kk in ("val_acc", "test", "model_prefix", "mlflow_run_id", "executed_by") if kk in v} for k, v in results.items()},
        "registration": registration,
        "report": report,
    }
    store.put_json(summary, f"runs/{run_id}/summary.json")
    print(report["table"])
    return summary


def _history(store, r: dict) -> list:
    try:
        return json.loads(store.get_bytes(f"{r['model_prefix']}/history.json"))
    except Exception:
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
              store_url: Optional[str] = None, tracking_uri: Optional[str] = None) -> dict:
    """Entry point of ``distill run cifar``: the flow in-process on Prefect's ephemeral API (embedded default)."""
    params = PipelineParams(profile=profile, overrides=overrides or {}, train_pool=train_pool,
                            store_url=store_url, tracking_uri=tracking_uri)
    summary = distill_cifar(params)
    uri = summary["tracking_uri"]
    print()
    print(f"MLflow runs: experiment {summary['experiment']!r}, parent run {summary['mlflow_parent_run_id']}")
    print(f"Open the MLflow UI on these runs:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")
    print(f"Report: {summary['report']['uri']}")
    return summary
