"""tasks.tracking on a local sqlite tracking URI, plus one real `mlflow server` with S3 (moto) artifacts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mlflow = pytest.importorskip("mlflow")

from mlflow.exceptions import MlflowException  # noqa: E402

from tasks.tracking import (  # noqa: E402
    ERROR_TAG, KILLED_BY_TAG, KILLED_REASON_TAG, OWNER_FLOW_RUN_TAG, OWNER_HOST_TAG, OWNER_PID_START_TAG,
    OWNER_PID_TAG, PARENT_RUN_TAG, PROMOTION_PENDING_TAG, Tracker, TrackingError, default_tracking_uri,
)
from tests.servers import free_port, mlflow_server, moto_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))


def example() -> np.ndarray:
    return np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow-home")


@pytest.fixture(scope="module")
def tracking_uri(home):
    return default_tracking_uri(home)  # one sqlite DB for the module: migrations run once


@pytest.fixture
def tracker(tracking_uri):
    return Tracker(tracking_uri, uid("exp"))


def test_default_tracking_uri_and_required_uri(tmp_path, monkeypatch):
    uri = default_tracking_uri(tmp_path / "h")
    assert uri == f"sqlite:///{(tmp_path / 'h').resolve()}/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        Tracker(None, "x")


def test_runs_params_metrics_artifacts(tracker, home, tmp_path):
    parent = tracker.start_parent(
        "distill-cifar", params={"data": {"name": "cifar10", "aug": {"flip": True}}, "long": "x" * 7000},
        tags={"prefect.flow_run_id": "flow-1", "git_commit": "abc123"},
    )
    child = tracker.start_child(parent, "student", params={"kd": {"T": 4.0, "alpha": 0.9}}, tags={"role": "student"})

    prun, crun = tracker.client.get_run(parent), tracker.client.get_run(child)
    assert prun.info.experiment_id == crun.info.experiment_id == tracker.experiment_id
    assert crun.data.tags[PARENT_RUN_TAG] == parent and crun.data.tags["role"] == "student"
    assert PARENT_RUN_TAG not in prun.data.tags
    assert prun.data.params["data.name"] == "cifar10" and prun.data.params["data.aug.flip"] == "True"
    assert len(prun.data.params["long"]) <= 6000 and prun.data.params["long"].endswith("...")
    assert crun.data.params == {"kd.T": "4.0", "kd.alpha": "0.9"}
    tracker.log_params(child, {"kd": {"T": 4.0}})  # re-logging the same value is a no-op
    assert tracker.child_runs(parent) == [child]

    # the callback handed to the compute core
    log_fn = tracker.log_fn(child)
    for epoch in range(3):
        log_fn({"train_loss": 1.0 / (epoch + 1), "val_acc": 0.5 + 0.1 * epoch, "lr": np.float32(0.1),
                "grad_norm": torch.tensor(2.0), "per_class": [0.1, 0.2], "note": "skip me", "flag": True}, epoch)
    history = tracker.client.get_metric_history(child, "val_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    metrics = tracker.client.get_run(child).data.metrics
    assert set(metrics) == {"train_loss", "val_acc", "lr", "grad_norm"}
    assert metrics["lr"] == pytest.approx(0.1)

    # artifacts go to <home>/mlartifacts/<experiment>, not the working directory
    d = tmp_path / "report"
    d.mkdir()
    (d / "metrics.json").write_text("{}")
    tracker.log_artifacts(child, d, "report")
    tracker.log_text(child, "# summary\n", "summary.md")
    names = sorted(a.path for a in tracker.client.list_artifacts(child)) + [
        a.path for a in tracker.client.list_artifacts(child, "report")]
    assert names == ["report", "summary.md", "report/metrics.json"]
    assert crun.info.artifact_uri.startswith((home / "mlartifacts").resolve().as_uri())

    # idempotent lookup / reuse by tag (e.g. a retried Prefect flow run)
    assert tracker.find_run("prefect.flow_run_id", "flow-1") == parent
    assert tracker.find_run("prefect.flow_run_id", "nope") is None
    tracker.end_run(child)
    tracker.end_run(parent, status="FAILED")
    again = tracker.start_parent("distill-cifar", params={"data": {"name": "cifar10"}},
                                 tags={"prefect.flow_run_id": "flow-1"}, reuse_tag="prefect.flow_run_id")
    assert again == parent and tracker.client.get_run(parent).info.status == "RUNNING"
    tracker.end_run(parent)
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    assert tracker.client.get_run(child).info.status == "FINISHED"


def test_log_model_idempotent_with_lineage_and_load_by_alias(tracker, tracking_uri, monkeypatch):
    name = uid("student")
    parent = tracker.start_parent("flow", {}, {})
    run = tracker.start_child(parent, "student", {}, {})
    model = tiny_model()
    lineage = {"teacher_version": "3", "data_manifest_sha256": "ab" * 32, "prefect_flow_run_id": "flow-9",
               "git_commit": "deadbeef", "val_acc": 0.71}

    first = tracker.log_model(run, model, example(), name, lineage)
    assert first["reused"] is False and first["name"] == name and first["version"] == "1"
    assert first["model_uri"] == f"models:/{name}/1"
    second = tracker.log_model(run, model, example(), name, lineage)
    assert second["reused"] is True and second["version"] == first["version"]
    versions = tracker.client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 and versions[0].run_id == run
    tags = tracker.client.get_model_version(name, "1").tags
    assert {k: tags[k] for k in lineage} == {k: str(v) for k, v in lineage.items()}
    # exactly one LoggedModel in the run's experiment, linked to the run
    logged = tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [m.source_run_id for m in logged] == [run]

    gate = tracker.promote(name, first["version"], candidate=0.71, baseline=0.60, margin=0.02)
    assert gate["promoted"] is True and gate["champion_version_after"] == "1"

    # plain MLflow, as a serving process would do it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{name}@champion")
    x = torch.from_numpy(example())
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        batch = torch.rand(5, 3, 8, 8)
        assert torch.allclose(loaded(batch), model(batch), atol=1e-6)  # batch dim stayed dynamic
    assert isinstance(tracker.load_model(f"models:/{name}@challenger"), torch.nn.Module)


def _cheap_version(tracker: Tracker, name: str, tmp_path, value: float | None, metric: str = "val_acc") -> str:
    """A registered version without logging a model (the gate only looks at tags/aliases); ``value`` (if
    any) in the version tag ``metric``."""
    tracker._ensure_registered_model(name)
    run = tracker.start_parent("cand", {}, {})
    src = tmp_path / uid("src")
    src.mkdir()
    tags = {metric: str(value)} if value is not None else None
    return str(tracker.client.create_model_version(name, src.as_uri(), run_id=run, tags=tags).version)


def test_promotion_gate(tracker, tmp_path):
    name = uid("gate")
    v1 = _cheap_version(tracker, name, tmp_path, 0.70)
    r1 = tracker.promote(name, v1, 0.70, baseline=0.60, margin=0.02)
    assert r1["promoted"] and r1["champion_version_before"] is None and r1["champion_version_after"] == v1
    assert "no previous champion" in r1["reason"]
    assert str(tracker.client.get_model_version_by_alias(name, "challenger").version) == v1

    # beats the baseline but not the champion: not promoted, champion unchanged
    v2 = _cheap_version(tracker, name, tmp_path, 0.65)
    r2 = tracker.promote(name, v2, 0.65, baseline=0.60, margin=0.02)
    assert not r2["promoted"] and "champion" in r2["reason"]
    assert r2["champion_version_before"] == r2["champion_version_after"] == v1
    assert r2["champion_before"] == pytest.approx(0.70)
    assert str(tracker.client.get_model_version_by_alias(name, "challenger").version) == v2
    assert tracker.client.get_model_version(name, v2).tags["promotion.decision"] == "rejected"

    # does not beat baseline + margin: not promoted
    v3 = _cheap_version(tracker, name, tmp_path, 0.61)
    r3 = tracker.promote(name, v3, 0.61, baseline=0.60, margin=0.02)
    assert not r3["promoted"] and "baseline" in r3["reason"] and r3["champion_version_after"] == v1

    # better than both: promoted; a retry of the same promotion is a no-op success
    v4 = _cheap_version(tracker, name, tmp_path, None)  # val_acc tag filled in by promote
    r4 = tracker.promote(name, v4, 0.80, baseline=0.60, margin=0.02)
    assert r4["promoted"] and r4["champion_version_before"] == v1 and r4["champion_version_after"] == v4
    assert tracker.client.get_model_version(name, v4).tags["val_acc"] == "0.8"
    r4b = tracker.promote(name, v4, 0.80, baseline=0.60, margin=0.02)
    assert r4b["promoted"] and "already" in r4b["reason"] and r4b["champion_version_after"] == v4

    # a first candidate that does not beat the baseline: no champion at all
    other = uid("gate")
    w1 = _cheap_version(tracker, other, tmp_path, 0.55)
    r = tracker.promote(other, w1, 0.55, baseline=0.60, margin=0.0)
    assert not r["promoted"] and r["champion_version_after"] is None
    assert tracker.get_alias(other, "champion") is None
    # exactly baseline + margin is enough (>=)
    w2 = _cheap_version(tracker, other, tmp_path, 0.75)
    assert tracker.promote(other, w2, 0.75, baseline=0.5, margin=0.25)["promoted"]
    assert set(r) == {"promoted", "reason", "metric", "direction", "candidate_version", "candidate", "baseline",
                      "margin", "threshold", "champion_version_before", "champion_before", "champion_version_after"}
    assert (r["metric"], r["direction"], r["threshold"]) == ("val_acc", "max", pytest.approx(0.60))
    assert r["reason"] == "candidate val_acc 0.5500 < baseline 0.6000 + margin 0.0000 = 0.6000"


def test_promotion_gate_lower_is_better(tracker, tmp_path):
    """direction="min" (e.g. perplexity): the candidate must reach baseline - margin and be strictly lower than
    the champion's value, read from the version tag named by ``metric``."""
    name = uid("ppl")
    kw = {"metric": "val_ppl", "direction": "min"}
    # passes: 39.0 <= 40.0 - 0.5; no champion yet; the val_ppl tag is filled in where missing
    v1 = _cheap_version(tracker, name, tmp_path, None)
    r1 = tracker.promote(name, v1, 39.0, 40.0, 0.5, **kw)
    assert r1["promoted"] and r1["champion_version_after"] == v1 and r1["champion_before"] is None
    assert (r1["metric"], r1["direction"], r1["threshold"]) == ("val_ppl", "min", pytest.approx(39.5))
    assert r1["reason"] == ("candidate val_ppl 39.0000 <= baseline 40.0000 - margin 0.5000 = 39.5000; "
                            "no previous champion")
    tags = tracker.client.get_model_version(name, v1).tags
    assert tags["val_ppl"] == "39.0" and "val_acc" not in tags and tags["promotion.decision"] == "promoted"

    # fails at the margin: better than the baseline, not by the margin
    v2 = _cheap_version(tracker, name, tmp_path, 39.7, "val_ppl")
    r2 = tracker.promote(name, v2, 39.7, 40.0, 0.5, **kw)
    assert not r2["promoted"] and r2["champion_version_after"] == v1
    assert r2["reason"] == "candidate val_ppl 39.7000 > baseline 40.0000 - margin 0.5000 = 39.5000"
    assert str(tracker.client.get_model_version_by_alias(name, "challenger").version) == v2
    # exactly baseline - margin passes that test (<=), but a higher value than the champion's does not beat it
    v3 = _cheap_version(tracker, name, tmp_path, 39.5, "val_ppl")
    r3 = tracker.promote(name, v3, 39.5, 40.0, 0.5, **kw)
    assert not r3["promoted"] and r3["champion_version_after"] == v1 and r3["champion_before"] == pytest.approx(39.0)
    assert r3["reason"] == f"candidate val_ppl 39.5000 does not beat champion v{v1} (val_ppl 39.0000)"
    # equal to the champion: not strictly lower
    v4 = _cheap_version(tracker, name, tmp_path, 39.0, "val_ppl")
    assert not tracker.promote(name, v4, 39.0, 40.0, 0.5, **kw)["promoted"]
    # NaN or inf (a diverged run, also a diverged baseline) never passes
    v5 = _cheap_version(tracker, name, tmp_path, None)
    r5 = tracker.promote(name, v5, float("nan"), 40.0, 0.5, **kw)
    assert not r5["promoted"] and "not all finite" in r5["reason"]
    assert not tracker.promote(name, v5, float("-inf"), 40.0, 0.5, **kw)["promoted"]
    assert not tracker.promote(name, v5, 30.0, float("inf"), 0.5, **kw)["promoted"]
    # lower than the champion: promoted; a retry is a no-op success
    v6 = _cheap_version(tracker, name, tmp_path, 38.25, "val_ppl")
    r6 = tracker.promote(name, v6, 38.25, 40.0, 0.5, **kw)
    assert r6["promoted"] and r6["champion_version_before"] == v1 and r6["champion_version_after"] == v6
    assert r6["reason"].endswith(f"and beats champion v{v1} (val_ppl 39.0000)")
    assert "already" in tracker.promote(name, v6, 38.25, 40.0, 0.5, **kw)["reason"]
    # a higher-is-better candidate on the same model is not compared with the val_ppl champion: its champion
    # has no val_acc tag, so it is not replaced automatically
    v7 = _cheap_version(tracker, name, tmp_path, 0.9)
    r7 = tracker.promote(name, v7, 0.9, 0.5, 0.0)
    assert not r7["promoted"] and "no usable 'val_acc' tag" in r7["reason"] and r7["champion_version_after"] == v6

    with pytest.raises(TrackingError, match="direction"):
        tracker.promote(name, v6, 38.0, 40.0, 0.5, metric="val_ppl", direction="lower")
    with pytest.raises(TrackingError, match="metric"):
        tracker.promote(name, v6, 38.0, 40.0, 0.5, metric="", direction="min")


@pytest.mark.e2e
def test_mlflow_server_with_s3_artifacts_on_moto(tmp_path, monkeypatch):
    import boto3

    with moto_server(tmp_path / "moto") as moto:
        s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="mlflow-artifacts")
        with mlflow_server(tmp_path / "mlflow", "s3://mlflow-artifacts/mlflow", moto.env) as server:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
            tracker = Tracker(server.url, "e2e")
            run = tracker.start_parent("student", {"kd": {"T": 4}}, {"role": "student"})
            tracker.log_fn(run)({"val_acc": 0.7}, 1)
            tracker.log_text(run, "hello", "notes/hello.txt")
            info = tracker.log_model(run, tiny_model(), example(), "e2e-student", {"val_acc": 0.7})
            assert tracker.log_model(run, tiny_model(), example(), "e2e-student", {})["reused"] is True
            tracker.promote("e2e-student", info["version"], 0.7, 0.5, 0.0)
            tracker.end_run(run)

            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow-artifacts")
                    for o in page.get("Contents", [])]
            model_id = info["logged_model_uri"].split("/")[-1]
            assert any(k.endswith(f"/models/{model_id}/artifacts/data/model.pt2") for k in keys), keys
            assert any(k.endswith(f"/models/{model_id}/artifacts/MLmodel") for k in keys), keys
            assert any(k.endswith(f"/{run}/artifacts/notes/hello.txt") for k in keys), keys
            assert all(k.startswith("mlflow/") for k in keys)

            loaded = tracker.load_model("models:/e2e-student@champion")  # downloaded through the server
            assert loaded(torch.rand(3, 3, 8, 8)).shape == (3, 10)


# --------------------------------------------------------------------------- run lifecycle


def _proc_start(pid: int) -> str:
    """Field 22 (starttime) of /proc/<pid>/stat, read independently of tasks.tracking."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()[19]


def _status(tracker: Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


def test_runs_carry_owner_tags(tracking_uri):
    tracker = Tracker(tracking_uri, uid("exp"), owner_flow_run_id="flow-run-42")
    parent = tracker.start_parent("p", {}, {"work": "w"})
    child = tracker.start_child(parent, "c", {}, {})
    for run_id in (parent, child):
        tags = tracker.client.get_run(run_id).data.tags
        assert tags[OWNER_HOST_TAG] == socket.gethostname()
        assert tags[OWNER_PID_TAG] == str(os.getpid())
        assert tags[OWNER_PID_START_TAG] == _proc_start(os.getpid())
        assert tags[OWNER_FLOW_RUN_TAG] == "flow-run-42"
    plain = Tracker(tracking_uri, tracker.experiment_name).start_parent("q", {}, {})
    assert OWNER_FLOW_RUN_TAG not in tracker.client.get_run(plain).data.tags  # not in a Prefect flow run


def test_run_scope_ends_every_run_with_the_matching_status(tracker):
    def scoped(exc: BaseException | None) -> str:
        run = tracker.start_parent("scoped", {}, {})
        if exc is None:
            with tracker.run_scope(run) as rid:
                assert rid == run and _status(tracker, run) == "RUNNING"
        else:
            with pytest.raises(type(exc)):
                with tracker.run_scope(run):
                    raise exc
        return run

    assert _status(tracker, scoped(None)) == "FINISHED"
    failed = scoped(ValueError("boom"))
    assert _status(tracker, failed) == "FAILED"
    assert tracker.client.get_run(failed).data.tags[ERROR_TAG] == "ValueError: boom"
    for exc in (KeyboardInterrupt(), SystemExit(3), asyncio.CancelledError()):
        assert _status(tracker, scoped(exc)) == "KILLED", exc

    # nested stages: the failing stage and its parent end FAILED, an earlier stage FINISHED
    parent = tracker.start_parent("flow", {}, {})
    ok, bad = tracker.start_child(parent, "ok", {}, {}), tracker.start_child(parent, "bad", {}, {})
    with pytest.raises(RuntimeError):
        with tracker.run_scope(parent):
            with tracker.run_scope(ok):
                pass
            with tracker.run_scope(bad):
                raise RuntimeError("stage failed")
    assert [_status(tracker, r) for r in (parent, ok, bad)] == ["FAILED", "FINISHED", "FAILED"]

    # a retried stage reopens (claims) its terminated run: RUNNING again, owned by this process
    tracker.end_run(ok, "KILLED")
    tracker.set_tags(ok, {OWNER_PID_TAG: "1"})
    with tracker.run_scope(ok):
        assert _status(tracker, ok) == "RUNNING"
        assert tracker.client.get_run(ok).data.tags[OWNER_PID_TAG] == str(os.getpid())
    assert _status(tracker, ok) == "FINISHED"


def test_run_scope_retries_transient_errors_and_never_masks_the_cause(tracker, monkeypatch):
    monkeypatch.setattr(tracker, "retry_delay", 0.01)
    real = tracker.client.set_terminated
    calls = []

    def flaky(run_id, status=None, end_time=None):
        calls.append(status)
        if len(calls) <= 2:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(run_id, status=status, end_time=end_time)

    monkeypatch.setattr(tracker.client, "set_terminated", flaky)
    run = tracker.start_parent("flaky", {}, {})
    with tracker.run_scope(run):
        pass
    assert calls == ["FINISHED"] * 3 and _status(tracker, run) == "FINISHED"

    def broken(run_id, status=None, end_time=None):
        raise MlflowException("tracking server unavailable")

    monkeypatch.setattr(tracker.client, "set_terminated", broken)
    run = tracker.start_parent("broken", {}, {})
    with pytest.raises(ValueError, match="the real cause"):
        with tracker.run_scope(run):
            raise ValueError("the real cause")
    with pytest.raises(TrackingError, match="FINISHED"):
        with tracker.run_scope(run):
            pass


_VICTIM = textwrap.dedent("""
    import sys, time
    from tasks.tracking import Tracker
    tracker = Tracker(sys.argv[1], sys.argv[2])
    parent = tracker.start_parent("victim", {}, {"work": sys.argv[3]})
    child = tracker.start_child(parent, "stage", {}, {"work": sys.argv[3]})
    print(parent, child, flush=True)
    time.sleep(600)
""")


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from pid {proc.pid} within {timeout}s"
    return proc.stdout.readline()


def test_end_dead_runs_kills_the_runs_of_a_sigkilled_process(tracker, tracking_uri, monkeypatch):
    monkeypatch.setattr(tracker, "retry_delay", 0.01)
    work = uid("work")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-c", _VICTIM, tracking_uri, tracker.experiment_name, work],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        victim_parent, victim_child = _readline(proc, 120).split()
        tags = tracker.client.get_run(victim_child).data.tags
        assert tags[OWNER_PID_TAG] == str(proc.pid) and tags[OWNER_PID_START_TAG] == _proc_start(proc.pid)
        assert tracker.end_dead_runs("work", work) == []  # its owner is alive
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()

    mine = tracker.start_parent("mine", {}, {"work": work})  # owned by this (live) process
    recycled = tracker.start_parent("recycled", {}, {"work": work})
    tracker.set_tags(recycled, {OWNER_PID_START_TAG: "1"})  # our pid, but another process's start time
    remote = {n: tracker.start_parent(n, {}, {"work": work}) for n in ("remote-dead", "remote-alive", "remote-unknown")}
    for run_id in remote.values():
        tracker.set_tags(run_id, {OWNER_HOST_TAG: "elsewhere.example"})
    legacy = tracker.client.create_run(tracker.experiment_id, tags={"work": work}, run_name="legacy").info.run_id
    other_work = tracker.start_parent("other", {}, {"work": "unrelated"})
    tracker.set_tags(other_work, {OWNER_PID_START_TAG: "1"})

    asked = []

    def is_alive(run):
        asked.append(run.info.run_name)
        return {"remote-dead": False, "remote-alive": True, "legacy": False}.get(run.info.run_name)

    killed = tracker.end_dead_runs("work", work, is_alive=is_alive)
    assert set(killed) == {victim_parent, victim_child, recycled, remote["remote-dead"], legacy}
    assert sorted(asked) == ["legacy", "remote-alive", "remote-dead", "remote-unknown"]  # never for local runs
    for run_id in killed:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags[KILLED_BY_TAG] == f"{socket.gethostname()}:{os.getpid()}"
    reasons = {r: tracker.client.get_run(r).data.tags[KILLED_REASON_TAG] for r in killed}
    assert f"owner process {proc.pid}" in reasons[victim_child] and "no longer exists" in reasons[victim_child]
    assert "another process" in reasons[recycled] and "is_alive" in reasons[remote["remote-dead"]]
    for run_id in (mine, remote["remote-alive"], remote["remote-unknown"], other_work):
        assert _status(tracker, run_id) == "RUNNING"
    assert tracker.end_dead_runs("work", work, is_alive=lambda run: 1 / 0) == []  # a failing callback: unknown

    # the re-run takes over its predecessor's run
    with tracker.run_scope(victim_parent):
        assert _status(tracker, victim_parent) == "RUNNING"
    assert _status(tracker, victim_parent) == "FINISHED"


# --------------------------------------------------------------------------- promotion: order of candidates


def test_promotion_prefers_the_stronger_concurrent_candidate(tracker, tmp_path):
    name = uid("order")
    weak = _cheap_version(tracker, name, tmp_path, 0.70)
    strong = _cheap_version(tracker, name, tmp_path, 0.80)
    # another process announced the stronger candidate and waits for the lock: the weaker one, deciding
    # first, must not become champion; the announcement's own gate (threshold) counts
    tracker.client.set_model_version_tag(name, strong, PROMOTION_PENDING_TAG, json.dumps(
        {"val_acc": 0.80, "threshold": 0.62, "ts": time.time(), OWNER_HOST_TAG: "elsewhere"}))
    r_weak = tracker.promote(name, weak, 0.70, 0.60, 0.02, lock=threading.Lock())
    assert not r_weak["promoted"] and f"version {strong}" in r_weak["reason"] and "stronger" in r_weak["reason"]
    assert r_weak["champion_version_after"] is None
    assert PROMOTION_PENDING_TAG not in tracker.client.get_model_version(name, weak).tags
    r_strong = tracker.promote(name, strong, 0.80, 0.60, 0.02, lock=threading.Lock)  # a factory works too
    assert r_strong["promoted"] and r_strong["champion_version_after"] == strong
    assert PROMOTION_PENDING_TAG not in tracker.client.get_model_version(name, strong).tags

    # a stronger announcement that fails its own gate, or whose owner on this host is dead, does not block
    other = uid("order")
    a = _cheap_version(tracker, other, tmp_path, 0.70)
    b = _cheap_version(tracker, other, tmp_path, 0.90)
    c = _cheap_version(tracker, other, tmp_path, 0.95)
    now = time.time()
    tracker.client.set_model_version_tag(other, b, PROMOTION_PENDING_TAG, json.dumps(
        {"val_acc": 0.90, "threshold": 0.95, "ts": now, OWNER_HOST_TAG: "elsewhere"}))
    tracker.client.set_model_version_tag(other, c, PROMOTION_PENDING_TAG, json.dumps(
        {"val_acc": 0.95, "threshold": 0.5, "ts": now, OWNER_HOST_TAG: socket.gethostname(),
         OWNER_PID_TAG: str(os.getpid()), OWNER_PID_START_TAG: "1"}))
    r = tracker.promote(other, a, 0.70, 0.60, 0.02)
    assert r["promoted"] and r["champion_version_after"] == a


def test_promotion_prefers_the_stronger_concurrent_candidate_lower_is_better(tracker, tmp_path):
    """With direction="min" the stronger rival is the one with the lower value; rivals announced on another
    metric or direction are not compared; an announcement of an earlier release (val_acc only) still counts
    for a val_acc / max gate."""
    name = uid("order-min")
    kw = {"metric": "val_ppl", "direction": "min"}
    weak = _cheap_version(tracker, name, tmp_path, 30.0, "val_ppl")
    strong = _cheap_version(tracker, name, tmp_path, 25.0, "val_ppl")
    now = time.time()
    tracker.client.set_model_version_tag(name, strong, PROMOTION_PENDING_TAG, json.dumps(
        {"metric": "val_ppl", "direction": "min", "value": 25.0, "threshold": 39.5, "ts": now,
         OWNER_HOST_TAG: "elsewhere"}))
    r_weak = tracker.promote(name, weak, 30.0, 40.0, 0.5, lock=threading.Lock(), **kw)
    assert not r_weak["promoted"] and f"version {strong} (val_ppl 25.0000)" in r_weak["reason"]
    assert "stronger" in r_weak["reason"] and r_weak["champion_version_after"] is None
    assert PROMOTION_PENDING_TAG not in tracker.client.get_model_version(name, weak).tags
    r_strong = tracker.promote(name, strong, 25.0, 40.0, 0.5, **kw)
    assert r_strong["promoted"] and r_strong["champion_version_after"] == strong

    # a higher value announced does not block; neither does a rival that fails its own gate (threshold), nor
    # one that would not beat the champion, nor one on another metric / direction
    other = uid("order-min")
    champ = _cheap_version(tracker, other, tmp_path, 20.0, "val_ppl")
    assert tracker.promote(other, champ, 20.0, 40.0, 0.5, **kw)["promoted"]
    a = _cheap_version(tracker, other, tmp_path, 18.0, "val_ppl")
    rivals = {
        "weaker": {"metric": "val_ppl", "direction": "min", "value": 19.0, "threshold": 39.5},
        "fails its gate": {"metric": "val_ppl", "direction": "min", "value": 10.0, "threshold": 5.0},
        "other metric": {"metric": "fid", "direction": "min", "value": 1.0, "threshold": 50.0},
        "other direction": {"metric": "val_ppl", "direction": "max", "value": 99.0, "threshold": 0.0},
        "val_acc (earlier release)": {"val_acc": 0.99, "threshold": 0.5},
    }
    for info in rivals.values():
        v = _cheap_version(tracker, other, tmp_path, None)
        tracker.client.set_model_version_tag(other, v, PROMOTION_PENDING_TAG, json.dumps(
            {**info, "ts": time.time(), OWNER_HOST_TAG: "elsewhere"}))
    r = tracker.promote(other, a, 18.0, 40.0, 0.5, **kw)
    assert r["promoted"] and r["champion_version_after"] == a, r

    # a tie goes to the lower version; an earlier release's val_acc announcement blocks a weaker val_acc one
    tie = uid("order-min")
    low, high = (_cheap_version(tracker, tie, tmp_path, 12.0, "val_ppl") for _ in range(2))
    tracker.client.set_model_version_tag(tie, low, PROMOTION_PENDING_TAG, json.dumps(
        {"metric": "val_ppl", "direction": "min", "value": 12.0, "threshold": 39.5, "ts": time.time(),
         OWNER_HOST_TAG: "elsewhere"}))
    r_high = tracker.promote(tie, high, 12.0, 40.0, 0.5, **kw)
    assert not r_high["promoted"] and f"version {low}" in r_high["reason"]
    acc = uid("order-legacy")
    old, new = _cheap_version(tracker, acc, tmp_path, 0.9), _cheap_version(tracker, acc, tmp_path, 0.8)
    tracker.client.set_model_version_tag(acc, old, PROMOTION_PENDING_TAG, json.dumps(
        {"val_acc": 0.9, "threshold": 0.62, "ts": time.time(), OWNER_HOST_TAG: "elsewhere"}))
    r_new = tracker.promote(acc, new, 0.8, 0.60, 0.02)
    assert not r_new["promoted"] and f"version {old} (val_acc 0.9000)" in r_new["reason"]


# --------------------------------------------------------------------------- credentials in the tracking URI

PASSWORD = "s3cr3t%2Fpw"  # percent-encoded in the URL: the password is "s3cr3t/pw"


@pytest.fixture
def no_mlflow_creds(monkeypatch):
    """MLFLOW_TRACKING_USERNAME/PASSWORD unset now and restored after (whatever the Tracker sets)."""
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _no_secret(text: str) -> None:
    assert PASSWORD not in text and "s3cr3t/pw" not in text and "s3cr3t" not in text, text


def test_credentials_in_uri_not_shown_in_errors(no_mlflow_creds):
    port = free_port()  # nothing listens there
    with pytest.raises(TrackingError) as info:
        Tracker(f"http://alice:{PASSWORD}@127.0.0.1:{port}", "x")
    message = str(info.value)
    _no_secret(message)
    _no_secret("".join(traceback.format_exception(info.value)))
    assert f"127.0.0.1:{port}" in message
    # the credentials went to MLflow's own variables, decoded
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t/pw"


class _Recorder(BaseHTTPRequestHandler):
    """Just enough of the MLflow REST API for Tracker(): no experiment yet, then create it."""

    seen: list = []

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.seen.append((self.requestline, self.headers.get("Authorization")))
        self._reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.requestline, self.headers.get("Authorization")))
        if self.path.endswith("/experiments/create"):
            self._reply(200, {"experiment_id": "7"})
        else:
            self._reply(500, {"error_code": "INTERNAL_ERROR", "message": "not implemented here"})

    def log_message(self, *args):
        pass


def test_credentials_in_uri_go_to_mlflow_as_basic_auth_not_in_the_uri(no_mlflow_creds, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        clean = f"http://127.0.0.1:{server.server_address[1]}"
        tracker = Tracker(f"http://alice:{PASSWORD}@{clean[len('http://'):]}/", "exp")
        assert tracker.experiment_id == "7"
        assert tracker.tracking_uri == clean + "/" and tracker.display_uri == clean + "/"
        for shown in (repr(tracker), tracker.display_uri, tracker.tracking_uri, str(vars(tracker.client))):
            _no_secret(shown)
        expected = "Basic " + base64.b64encode(b"alice:s3cr3t/pw").decode()
        assert _Recorder.seen and all(auth == expected for _, auth in _Recorder.seen)
        assert all("alice" not in line for line, _ in _Recorder.seen)

        # credentials already in the environment win; the URI's are not used (nor shown)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bobs-password")
        _Recorder.seen = []
        other = Tracker(f"http://alice:{PASSWORD}@{clean[len('http://'):]}", "exp")
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "bobs-password"
        assert _Recorder.seen[0][1] == "Basic " + base64.b64encode(b"bob:bobs-password").decode()
        _no_secret(repr(other))
    finally:
        server.shutdown()
        server.server_close()


def test_database_uri_credentials_are_redacted_for_display(no_mlflow_creds):
    with pytest.raises(TrackingError) as info:  # the driver is not installed / nothing listens: an error
        Tracker(f"postgresql://alice:{PASSWORD}@127.0.0.1:{free_port()}/mlflow", "x")
    _no_secret(str(info.value))
    assert "***@127.0.0.1" in str(info.value)


def test_promotion_veto_keeps_the_champion_and_tags_the_candidate(tracker, tmp_path):
    """gate ci_lower: a student whose interval crosses the margin is vetoed (challenger, tags, no champion move)
    even though its mean beats the baseline and the champion; without a veto the same numbers promote."""
    from tasks.registry import ci_lower_veto

    name = uid("veto")
    v1 = _cheap_version(tracker, name, tmp_path, 0.70)
    assert tracker.promote(name, v1, 0.70, baseline=0.60, margin=0.0)["promoted"]
    v2 = _cheap_version(tracker, name, tmp_path, 0.80)
    veto = ci_lower_veto({"rule": "ci_lower", "metric": "val_acc", "n": 3, "mean": 0.004, "lo": -0.002, "hi": 0.010},
                         0.0)
    assert veto and "lower bound -0.0020 < margin 0.0000" in veto and "3 seeds" in veto
    r = tracker.promote(name, v2, 0.80, baseline=0.60, margin=0.0, veto=veto)
    assert not r["promoted"] and r["reason"] == veto and r["champion_version_after"] == v1
    assert str(tracker.client.get_model_version_by_alias(name, "challenger").version) == v2
    assert tracker.client.get_model_version(name, v2).tags["promotion.decision"] == "rejected"
    assert PROMOTION_PENDING_TAG not in tracker.client.get_model_version(name, v2).tags
    # the interval clears the margin: no veto, the normal gate promotes
    ok = ci_lower_veto({"rule": "ci_lower", "metric": "val_acc", "n": 3, "mean": 0.01, "lo": 0.003, "hi": 0.02}, 0.002)
    assert ok is None
    assert tracker.promote(name, v2, 0.80, baseline=0.60, margin=0.0, veto=ok)["promoted"]
    assert "at least 2 seeds" in ci_lower_veto({"rule": "ci_lower", "metric": "val_acc", "n": 1, "lo": None}, 0.0)
    assert ci_lower_veto({"rule": "mean"}, 0.0) is None and ci_lower_veto(None, 0.0) is None
