"""What a user sees in Prefect: task runs named after the stage, the table artifact with the report's formatted
columns, the report artifact leading to MLflow without broken image links, and a training pool that no worker
serves failing fast with a message that says what to do (Prefect test harness; no real worker is started)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from distill.kinds import get_kind, markdown_table  # noqa: E402
from tasks.report import artifact_markdown, formatted_rows, mlflow_run_line  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# --- 2. the table artifact ----------------------------------------------------------------------------------


def test_table_artifact_rows_are_the_markdown_tables_cells():
    kind = get_kind("cifar")
    rows = [{"model": "teacher", "role": "teacher", "val_acc": 0.3720000088214874, "test_accuracy": 0.40125,
             "gain": None},
            {"model": "student", "role": "student", "val_acc": 0.35, "test_accuracy": 0.38, "gain": 0.0123,
             "params": 123456.0}]
    table = formatted_rows(kind.columns, rows)
    headers = [c.header for c in kind.columns]
    assert [list(r) for r in table] == [headers, headers]
    assert all(isinstance(v, str) for r in table for v in r.values())
    assert table[0]["val acc"] == "37.20 %"
    body = markdown_table(kind.columns, rows).splitlines()[2:]
    assert body == ["| " + " | ".join(r[h] for h in headers) + " |" for r in table]


# --- 3. the report artifact ---------------------------------------------------------------------------------

REPORT = "\n".join([
    "# distill-cifar comparison", "",
    "| model | test acc |", "|---|---|", "| teacher | 40.00 % |", "| student | 38.00 % |", "",
    "Speed columns: each model measured on its own after every training stage had finished.", "",
    "## Quality against steps", "", "![quality vs steps](quality_vs_steps.png)", "",
    "## Samples (same noise for every model)", "", "| model | grid |", "|---|---|",
    "| teacher | ![teacher grid](samples/teacher/grid.png) |", "",
    "Remote picture kept: ![logo](https://example.org/logo.png)", "",
    "Plots: training_curves.png, quality_vs_steps.png",
]) + "\n"


def test_report_artifact_links_the_mlflow_run_on_a_server_without_credentials():
    md = artifact_markdown(REPORT, tracking_uri="https://alice:s3cret@mlflow.example.org:5000/", experiment_id="7",
                           run_id="abc123", report_uri="s3://bucket/runs/r1/report")
    first = md.splitlines()[0]
    url = "https://mlflow.example.org:5000/#/experiments/7/runs/abc123?workflowType=machine_learning"
    assert first == f"MLflow run: [{url}]({url})"
    assert "s3cret" not in md and "alice" not in md
    # no image link to a local file is left; the remote one stays; the files are still named
    assert "](quality_vs_steps.png)" not in md and "](samples/teacher/grid.png)" not in md
    assert "`quality_vs_steps.png`" in md and "`samples/teacher/grid.png`" in md
    assert "![logo](https://example.org/logo.png)" in md
    # where the plots are: right below the comparison table
    lines = md.splitlines()
    last_row = lines.index("| student | 38.00 % |")
    assert lines[last_row + 1] == ""
    note = lines[last_row + 2]
    assert "s3://bucket/runs/r1/report" in note and "`report/`" in note
    # the rest of the report is unchanged
    assert "## Samples (same noise for every model)" in md and md.rstrip().endswith("quality_vs_steps.png")


def test_report_artifact_for_a_local_store_gives_the_mlflow_ui_command():
    uri = "sqlite:////home/me/distill/mlflow.db"
    md = artifact_markdown(REPORT, tracking_uri=uri, experiment_id="1", run_id="r9", report_uri="file:///tmp/r")
    first = md.splitlines()[0]
    assert f"mlflow ui --backend-store-uri {uri}" in first
    assert "http://127.0.0.1:5000/#/experiments/1/runs/r9?workflowType=machine_learning" in first
    file_line = mlflow_run_line("file:///tmp/my runs", "0", "r1")
    assert "mlflow ui --backend-store-uri 'file:///tmp/my runs'" in file_line
    plain = mlflow_run_line(uri, "1", "r9", plain=True, mlflow_cmd=".venv/bin/mlflow")  # what `distill run` prints
    assert "`" not in plain and f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000" in plain
    assert plain.endswith("http://127.0.0.1:5000/#/experiments/1/runs/r9?workflowType=machine_learning")
    db_line = mlflow_run_line("postgresql://u:pw@db/mlflow", "0", "r1")
    assert "pw@" not in db_line and "mlflow ui" in db_line


def test_report_artifact_without_a_table_or_tracking():
    md = artifact_markdown("# x\n\nno table here\n", report_uri="file:///tmp/r")
    assert md.startswith("# x")
    assert md.rstrip().endswith("Plots and images (not shown here): the report folder `file:///tmp/r`.")


def test_publish_report_creates_formatted_artifacts(harness, tmp_path, monkeypatch):
    """publish_report end to end on a file store and a SQLite MLflow: the artifacts read back from Prefect."""
    pytest.importorskip("mlflow")
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.pipeline import publish_report
    from tasks.tracking import Tracker

    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store_url = (tmp_path / "store").as_uri()
    (tmp_path / "store").mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(tracking, "ux")
    parent = tracker.start_parent("p", {}, {})
    test = {"test_accuracy": 0.4000000059604645, "n_images": 10}
    results = {
        "teacher": {"role": "teacher", "val_acc": 0.3720000088214874, "test": dict(test), "history": []},
        "baseline": {"role": "baseline", "val_acc": 0.3, "test": {**test, "test_accuracy": 0.3}, "history": []},
        "student": {"role": "student", "main": True, "val_acc": 0.35, "test": {**test, "test_accuracy": 0.35},
                    "history": [{"epoch": 1, "train_loss": 1.0, "val_acc": 0.3}, {"epoch": 2, "train_loss": 0.5,
                                                                                    "val_acc": 0.35}]},
    }

    @flow
    def report_flow():
        return publish_report("cifar", results, None, ["a note"], store_url, "run-ux", tracking, "ux", parent)

    state = report_flow(return_state=True)
    rep = state.result()
    assert rep["uri"].endswith("runs/run-ux/report")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_type = {a.type: a for a in arts}
    import json

    table = by_type["table"].data
    table = json.loads(table) if isinstance(table, str) else table
    teacher = next(r for r in table if r["model"] == "teacher")
    assert teacher["val acc"] == "37.20 %" and teacher["test acc"] == "40.00 %"
    md = by_type["markdown"].data
    assert md.splitlines()[0].startswith("MLflow run ") and "mlflow ui --backend-store-uri" in md.splitlines()[0]
    assert f"/#/experiments/{tracker.experiment_id}/runs/{parent}" in md.splitlines()[0]
    assert "](training_curves.png)" not in md and "![" not in md
    assert rep["uri"] in md
    # the stored report.md keeps its own (relative) content
    assert "MLflow run" not in (tmp_path / "work" / "runs" / "run-ux" / "report" / "report.md").read_text()


# --- 1. task run names in distill-train ---------------------------------------------------------------------


def test_distill_train_names_its_task_runs_after_the_stage(harness, tmp_path, monkeypatch):
    from prefect import task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import flows.train as train_flow
    from tasks.lab import TrainJob

    @task(name="train-stage")
    def fake_train(job, run_id=None):
        return {"model_prefix": f"{job.out_prefix}/model", "name": job.name}

    @task(name="evaluate-stage")
    def fake_evaluate(job, trained):
        return {"test_accuracy": 0.5, "n_images": 1}

    monkeypatch.setattr(train_flow, "train_stage", fake_train)
    monkeypatch.setattr(train_flow, "evaluate_stage", fake_evaluate)
    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "work"))
    (tmp_path / "store").mkdir()
    store_url = (tmp_path / "store").as_uri()
    names = {}
    for stage in ("teacher", "progressive-4"):
        job = TrainJob(kind="cifar", role="student", name=stage, lab={}, data_key="data/d1",
                       out_prefix=f"stages/{stage}-{uuid.uuid4().hex[:6]}", store_url=store_url, tracking_uri=None,
                       experiment="e")
        state = train_flow.distill_train(job, return_state=True)
        assert state.is_completed(), state
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        names[stage] = sorted(r.name for r in runs)
    assert names == {"teacher": ["evaluate-teacher", "train-teacher"],
                     "progressive-4": ["evaluate-progressive-4", "train-progressive-4"]}


# --- 4. a training pool no worker serves --------------------------------------------------------------------


def _pool(client, name: str, *, deployment: bool = True, paused: bool = False) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    client.create_work_pool(WorkPoolCreate(name=name, type="process", is_paused=paused))
    if deployment:
        flow_id = client.create_flow_from_name("distill-train")
        client.create_deployment(flow_id, name=name, work_pool_name=name, entrypoint="flows/train.py:distill_train")


def test_missing_pool_fails_at_once_naming_it(harness):
    from flows.pipeline import PoolUnavailable, ensure_pool_served

    t0 = time.monotonic()
    with pytest.raises(PoolUnavailable) as e:
        ensure_pool_served("nosuchpool", wait_s=60)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "'nosuchpool' does not exist" in msg and "prefect work-pool create nosuchpool" in msg


def test_pool_without_worker_fails_after_the_wait(harness, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import PoolUnavailable, ensure_pool_served

    name = f"idle-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        _pool(client, name)
    monkeypatch.setenv("DISTILL_POOL_WAIT_S", "1")
    said = []
    t0 = time.monotonic()
    with pytest.raises(PoolUnavailable) as e:
        ensure_pool_served(name, poll_s=0.3, log=said.append)
    assert time.monotonic() - t0 < 10
    assert f"no worker is online on work pool {name!r}" in str(e.value)
    assert f"prefect worker start --pool {name}" in str(e.value)
    assert said and name in said[0]


def test_paused_pool_and_missing_deployment_fail_at_once(harness):
    from prefect.client.orchestration import get_client

    from flows.pipeline import PoolUnavailable, ensure_pool_served

    paused, bare = f"paused-{uuid.uuid4().hex[:6]}", f"bare-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        _pool(client, paused, paused=True)
        _pool(client, bare, deployment=False)
    with pytest.raises(PoolUnavailable, match=f"work pool '{paused}' is paused.*prefect work-pool resume {paused}"):
        ensure_pool_served(paused, wait_s=60)
    with pytest.raises(PoolUnavailable, match=f"no deployment distill-train/{bare}"):
        ensure_pool_served(bare, wait_s=60)


def test_pool_with_a_heartbeating_worker_is_served(harness):
    """A worker heartbeat (sent by the test; no worker process) makes the pool served."""
    from prefect.client.orchestration import get_client

    from flows.pipeline import ensure_pool_served

    name = f"live-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        _pool(client, name)
        client.send_worker_heartbeat(name, "fake-worker", heartbeat_interval_seconds=30)
    assert ensure_pool_served(name, wait_s=5, poll_s=0.5) == name


def test_pipeline_with_an_unserved_pool_fails_before_any_compute(harness, tmp_path, monkeypatch):
    """distill-cifar with train_pool naming a pool that no worker serves: the flow fails within seconds, naming
    the pool and the command that starts a worker, before data preparation or any dispatch."""
    from flows.cifar import distill_cifar
    import flows.pipeline as pipeline

    name = f"idle2-{uuid.uuid4().hex[:6]}"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        _pool(client, name)
    monkeypatch.setenv("DISTILL_POOL_WAIT_S", "1")
    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "work"))
    calls = []
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: calls.append("prepare"))
    monkeypatch.setattr(pipeline, "run_deployment", lambda *a, **k: calls.append("dispatch"))
    t0 = time.monotonic()
    state = distill_cifar(profile="smoke", train_pool=name, store_url=(tmp_path / "store").as_uri(),
                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", return_state=True)
    assert state.is_failed() and time.monotonic() - t0 < 60
    with pytest.raises(pipeline.PoolUnavailable, match=f"prefect worker start --pool {name}"):
        state.result()
    assert calls == []


def test_a_cross_field_error_fails_the_flow_run_at_once_with_a_state_message(harness, tmp_path, monkeypatch):
    """warmup_epochs >= epochs passes the schema (each field is valid alone) but the flow's first act is to
    validate the whole configuration: the run fails before any compute, its state message naming the field."""
    import flows.pipeline as pipeline
    from flows.cifar import distill_cifar

    calls = []
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: calls.append("prepare"))
    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "work"))
    state = distill_cifar(overrides={"student_train": {"epochs": 2, "warmup_epochs": 2}},
                          store_url=(tmp_path / "store").as_uri(), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          return_state=True)
    assert state.is_failed() and calls == []
    assert "student_train" in state.message and "warmup_epochs (2) must be smaller than epochs (2)" in state.message
    assert not (tmp_path / "store").exists()


def test_a_run_naming_one_parameter_keeps_the_deployments_others():
    """The flow's parameters are top level, as Prefect merges them: a run that sets only ``overrides`` keeps the
    deployment's profile and train_pool (it used to replace the one nested ``params`` object whole)."""
    from flows.cifar import distill_cifar

    deployment = {"profile": "seed", "train_pool": "gpu"}
    run = {"overrides": {"seeds": [0, 1, 2]}}
    merged = distill_cifar.validate_parameters({**deployment, **run})
    assert merged["profile"] == "seed" and merged["train_pool"] == "gpu" and merged["overrides"].seeds == [0, 1, 2]
    schema = distill_cifar.parameters.model_dump()
    assert {"profile", "overrides", "train_pool", "store_url", "tracking_uri", "experiment", "max_parallel",
            "register_models"} <= set(schema["properties"])
    overrides = schema["definitions"]["LabConfigOverrides"]["properties"]
    assert "profile" not in overrides  # one place for the profile
    assert all("<" not in (p.get("description") or "") for p in schema["properties"].values())


def test_a_dispatched_stage_no_worker_picks_up_is_cancelled_naming_the_pool(harness, monkeypatch):
    """A stage's flow run waiting on a pool whose workers are gone does not wait forever: once no worker has
    been online for $DISTILL_POOL_WAIT_S the run is cancelled and the error names the pool; a stage past
    $DISTILL_STAGE_TIMEOUT_S is cancelled with a TimeoutError."""
    from prefect.client.orchestration import get_client

    from flows.pipeline import PoolUnavailable, wait_for_stage

    gone, live = f"gone-{uuid.uuid4().hex[:6]}", f"busy-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        _pool(client, gone)
        _pool(client, live)
        client.send_worker_heartbeat(live, "fake-worker", heartbeat_interval_seconds=30)
        runs = {pool: client.create_flow_run_from_deployment(
            client.read_deployment_by_name(f"distill-train/{pool}").id) for pool in (gone, live)}
    monkeypatch.setenv("DISTILL_POOL_WAIT_S", "1")
    t0 = time.monotonic()
    with pytest.raises(PoolUnavailable, match=f"no worker is online on work pool '{gone}'"):
        wait_for_stage(runs[gone].id, gone, "teacher", poll_s=0.1)
    assert time.monotonic() - t0 < 30
    with pytest.raises(TimeoutError, match=f"training stage student on pool '{live}' did not finish within 0.5 s"):
        wait_for_stage(runs[live].id, live, "student", poll_s=0.1, timeout_s=0.5)
    with get_client(sync_client=True) as client:
        for fr in runs.values():
            assert client.read_flow_run(fr.id).state.is_cancelled()


def test_failure_alert_automation_is_created_once_and_matches_the_distill_flows(harness):
    """infra/notify_on_failure.py against a real Prefect server: the block and the automation exist after one
    call, a second call updates them in place, and the trigger listens for failed, crashed and timed-out runs of
    the four distill flows."""
    import importlib.util

    from prefect.client.orchestration import get_client

    spec = importlib.util.spec_from_file_location("notify", Path(__file__).resolve().parents[1] / "infra" /
                                                  "notify_on_failure.py")
    notify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(notify)
    first = notify.apply("http://127.0.0.1:9/hook", kind="webhook")
    second = notify.apply("http://127.0.0.1:9/other", kind="webhook")
    assert first == second
    with get_client(sync_client=True) as client:
        (auto,) = client.read_automations_by_name(notify.AUTOMATION_NAME)
    assert auto.enabled
    assert set(auto.trigger.expect) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                                        "prefect.flow-run.TimedOut"}
    related = auto.trigger.match_related
    related = related[0] if isinstance(related, list) else related
    assert set(related.root["prefect.resource.name"]) == {"distill-cifar", "distill-lm", "distill-diffusion",
                                                          "distill-train"}
    (action,) = auto.actions
    assert action.type == "send-notification" and "flow_run.state.message" in action.body
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    assert str(CustomWebhookNotificationBlock.load(notify.BLOCK_NAME).url) == "http://127.0.0.1:9/other"
    with pytest.raises(ValueError, match="slack' or 'webhook"):
        notify.save_block("http://x", kind="pager")
