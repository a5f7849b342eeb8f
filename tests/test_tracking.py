"""tasks.tracking on a local sqlite tracking URI, plus one real `mlflow server` with S3 (moto) artifacts."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mlflow = pytest.importorskip("mlflow")

from tasks.tracking import PARENT_RUN_TAG, Tracker, TrackingError, default_tracking_uri  # noqa: E402
from tests.servers import mlflow_server, moto_server  # noqa: E402


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

    gate = tracker.promote(name, first["version"], candidate_val_acc=0.71, baseline_val_acc=0.60, margin=0.02)
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


def _cheap_version(tracker: Tracker, name: str, tmp_path, val_acc: float | None) -> str:
    """A registered version without logging a model (the gate only looks at tags/aliases)."""
    tracker._ensure_registered_model(name)
    run = tracker.start_parent("cand", {}, {})
    src = tmp_path / uid("src")
    src.mkdir()
    tags = {"val_acc": str(val_acc)} if val_acc is not None else None
    return str(tracker.client.create_model_version(name, src.as_uri(), run_id=run, tags=tags).version)


def test_promotion_gate(tracker, tmp_path):
    name = uid("gate")
    v1 = _cheap_version(tracker, name, tmp_path, 0.70)
    r1 = tracker.promote(name, v1, 0.70, baseline_val_acc=0.60, margin=0.02)
    assert r1["promoted"] and r1["champion_version_before"] is None and r1["champion_version_after"] == v1
    assert "no previous champion" in r1["reason"]
    assert str(tracker.client.get_model_version_by_alias(name, "challenger").version) == v1

    # beats the baseline but not the champion: not promoted, champion unchanged
    v2 = _cheap_version(tracker, name, tmp_path, 0.65)
    r2 = tracker.promote(name, v2, 0.65, baseline_val_acc=0.60, margin=0.02)
    assert not r2["promoted"] and "champion" in r2["reason"]
    assert r2["champion_version_before"] == r2["champion_version_after"] == v1
    assert r2["champion_val_acc_before"] == pytest.approx(0.70)
    assert str(tracker.client.get_model_version_by_alias(name, "challenger").version) == v2
    assert tracker.client.get_model_version(name, v2).tags["promotion.decision"] == "rejected"

    # does not beat baseline + margin: not promoted
    v3 = _cheap_version(tracker, name, tmp_path, 0.61)
    r3 = tracker.promote(name, v3, 0.61, baseline_val_acc=0.60, margin=0.02)
    assert not r3["promoted"] and "baseline" in r3["reason"] and r3["champion_version_after"] == v1

    # better than both: promoted; a retry of the same promotion is a no-op success
    v4 = _cheap_version(tracker, name, tmp_path, None)  # val_acc tag filled in by promote
    r4 = tracker.promote(name, v4, 0.80, baseline_val_acc=0.60, margin=0.02)
    assert r4["promoted"] and r4["champion_version_before"] == v1 and r4["champion_version_after"] == v4
    assert tracker.client.get_model_version(name, v4).tags["val_acc"] == "0.8"
    r4b = tracker.promote(name, v4, 0.80, baseline_val_acc=0.60, margin=0.02)
    assert r4b["promoted"] and "already" in r4b["reason"] and r4b["champion_version_after"] == v4

    # a first candidate that does not beat the baseline: no champion at all
    other = uid("gate")
    w1 = _cheap_version(tracker, other, tmp_path, 0.55)
    r = tracker.promote(other, w1, 0.55, baseline_val_acc=0.60, margin=0.0)
    assert not r["promoted"] and r["champion_version_after"] is None
    assert tracker.get_alias(other, "champion") is None
    # exactly baseline + margin is enough (>=)
    w2 = _cheap_version(tracker, other, tmp_path, 0.75)
    assert tracker.promote(other, w2, 0.75, baseline_val_acc=0.5, margin=0.25)["promoted"]
    assert set(r) == {"promoted", "reason", "candidate_version", "candidate_val_acc", "baseline_val_acc", "margin",
                      "champion_version_before", "champion_val_acc_before", "champion_version_after"}


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
