"""The distill-cifar flow in-process (Prefect test harness, file store, SQLite MLflow) on tiny generated data,
plus the store-backed kill-and-resume of a training stage in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from _imagefolder import make_imagefolder, tiny_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory, harness):
    tmp = tmp_path_factory.mktemp("flow")
    src = make_imagefolder(tmp / "src", n_train=40, n_test=10, as_tarballs=True)
    old = dict(os.environ)
    os.environ["DISTILL_WORK_DIR"] = str(tmp / "work")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    yield {"tmp": tmp, "src": src, "store": (tmp / "store").as_uri(), "mlflow": f"sqlite:///{tmp / 'mlflow.db'}"}
    os.environ.clear()
    os.environ.update(old)


def _run(env, overrides_extra=None, **kw):
    from flows.cifar import distill_cifar
    from flows.params import PipelineParams

    ov = tiny_overrides(env["src"], env["tmp"] / "cache")
    ov.update(overrides_extra or {})
    params = PipelineParams(profile="smoke", overrides=ov, store_url=env["store"], tracking_uri=env["mlflow"], **kw)
    return distill_cifar(**{k: getattr(params, k) for k in PipelineParams.model_fields})


def test_pipeline_in_process_then_teacher_reuse(env, monkeypatch):
    from mlflow import MlflowClient

    from tasks.storage import open_store

    first = _run(env)
    assert first["teacher_reused"] is False
    names = set(first["results"])
    assert names == {"teacher", "baseline", "student", "sweep-T1-a0.7"}  # T=4 is the main student: not trained twice
    for r in first["results"].values():
        assert 0.0 <= r["test"]["test_accuracy"] <= 1.0
    assert "agreement" in first["results"]["student"]["test"] and "agreement" in first["results"]["baseline"]["test"]

    client = MlflowClient(tracking_uri=env["mlflow"])
    for role in ("teacher", "baseline", "student"):
        mv = client.search_model_versions(f"name='distill-cifar-{role}'")
        assert len(mv) == 1, role
        tags = mv[0].tags
        for k in ("data_manifest_sha256", "prefect_flow_run_id", "git_commit", "teacher_version"):
            assert tags.get(k), (role, k, tags)
        assert tags["prefect_flow_run_id"] == first["flow_run_id"]
    challenger = client.get_model_version_by_alias("distill-cifar-student", "challenger")
    assert str(challenger.version) == "1"
    promo = first["registration"]["promotion"]
    assert str(promo["candidate_version"]) == "1"

    _assert_consumable_registration(client, env, first, monkeypatch)

    # torch threads: the teacher trains alone with every core; the members' stages (one lockstep group, or one
    # stage each) share the cores among min(max_parallel = 2, stages); speed is measured alone with every core
    from distill.runtime import usable_cpus

    cpus = usable_cpus()
    members = ("baseline", "student", "sweep-T1-a0.7")
    stages = {first["results"][n].get("group") or n for n in members}
    assert first["results"]["teacher"]["executed_by"]["torch_threads"] == cpus
    for name in members:
        assert first["results"][name]["executed_by"]["torch_threads"] == max(1, cpus // min(2, len(stages))), name
    assert {r["test"]["speed_threads"] for r in first["results"].values()} == {cpus}

    # nested runs: one parent, a child per stage, with per-epoch metrics under the same keys
    exp = client.get_experiment_by_name("distill-cifar")
    runs = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{first['flow_run_id']}'")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["mlflow_parent_run_id"]]
    assert {r.data.tags["distill.stage"] for r in children} == names
    for r in children:
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        assert [m.step for m in hist] == [1, 2]
        assert "test_accuracy" in r.data.metrics
    parent_art = {a.path for a in client.list_artifacts(first["mlflow_parent_run_id"], "report")}
    assert {"report/report.md", "report/training_curves.png", "report/test_accuracy_across_sweep.png"} <= parent_art

    # the report is also a Prefect artifact (markdown + table), and per-stage progress artifacts exist
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["distill-cifar-report"])))
        assert arts and "KD gain" in arts[0].data
        assert any(a.type == "progress" for a in pc.read_artifacts(limit=200))

    store = open_store(env["store"])
    report = store.get_dir_file(f"runs/{first['flow_run_id']}/report", "report.md").decode()
    assert "| teacher |" in report and "Promotion gate" in report and "KD gain" in report

    # every MLflow run of the flow ended: the parent and every nested stage run are FINISHED
    assert client.get_run(first["mlflow_parent_run_id"]).info.status == "FINISHED"
    assert {r.info.status for r in children} == {"FINISHED"}

    # a completed stage's checkpoints are deleted (store and local folder); its published model stays
    from tasks.lab import stage_dir

    for r in first["results"].values():
        if isinstance(r, dict) and r.get("stage_key"):
            assert store.list(f"{r['stage_key']}/checkpoints") == []
            assert not (stage_dir(r["stage_key"]) / "checkpoints").exists()
            assert "model.safetensors" in store.dir_manifest(r["model_prefix"])

    # --- second run: a different alpha. Teacher and baseline (same data, config, code) are reused; ---------
    # --- the student, whose work differs, is trained; no stage is trained twice -------------------------
    second = _run(env, overrides_extra={"kd": {"alpha": 0.5}})
    assert second["teacher_reused"] is True
    assert second["results"]["teacher"]["model_prefix"] == first["results"]["teacher"]["model_prefix"]
    assert second["results"]["baseline"]["reused"] is True
    assert second["results"]["baseline"]["stage_key"] == first["results"]["baseline"]["stage_key"]
    assert second["results"]["student"]["reused"] is False
    assert second["results"]["student"]["stage_key"] != first["results"]["student"]["stage_key"]
    report2 = store.get_dir_file(f"runs/{second['flow_run_id']}/report", "report.md").decode()
    assert "teacher reused" in report2 and "baseline" in report2.split("reused:")[-1]
    # registration did not duplicate the reused teacher and baseline; the new student got a new version
    assert len(client.search_model_versions("name='distill-cifar-teacher'")) == 1
    assert len(client.search_model_versions("name='distill-cifar-baseline'")) == 1
    assert len(client.search_model_versions("name='distill-cifar-student'")) == 2
    assert client.get_run(second["mlflow_parent_run_id"]).info.status == "FINISHED"
    # the reused teacher's version keeps the lineage of the run that trained it; the reuse is on the new run
    teacher_v = client.get_model_version("distill-cifar-teacher", "1")
    assert teacher_v.tags["prefect_flow_run_id"] == first["flow_run_id"] != second["flow_run_id"]
    assert "KD gain" not in (teacher_v.description or "") and "teacher of distill-cifar" in teacher_v.description
    reuse_tags = client.get_run(second["mlflow_parent_run_id"]).data.tags
    assert reuse_tags["distill.reused_version.teacher"] == "distill-cifar-teacher/1"
    assert reuse_tags["distill.reused_version.baseline"] == "distill-cifar-baseline/1"
    assert "distill.reused_version.student" not in reuse_tags

    # --- third run, the same work as the second: everything is reused, nothing trains ------------------
    third = _run(env, overrides_extra={"kd": {"alpha": 0.5}})
    assert all(r["reused"] for r in third["results"].values())
    assert len(client.search_model_versions("name='distill-cifar-student'")) == 2


def _assert_consumable_registration(client, env, summary, monkeypatch):
    """The registered student as a consumer meets it: plain MLflow (pyfunc), raw uint8 images, no normalisation on
    the user's side, class names in the metadata; LoggedModels named by role; descriptions; the standard source
    tags and the data snapshot as a dataset input; per-class metrics under their own prefix."""
    import mlflow
    import numpy as np

    from distill.image.data import load_prepared, normalize
    from distill.image.stages import load_model, model_normalization
    from tasks.lab import fetch_dir
    from tasks.storage import open_store

    store = open_store(env["store"])
    data_dir = fetch_dir(store, summary["data"]["data_key"], "data")
    x_u8, y = load_prepared(data_dir, verify=False)["test"]
    raw = np.ascontiguousarray(x_u8.permute(0, 2, 3, 1).numpy())  # [N, H, W, C] uint8, as decoded
    # as a consumer points MLflow at the server: by the environment (mlflow.set_tracking_uri would be global
    # state that outlives this test and overrides the URI later tests set)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["mlflow"])
    pyfunc = mlflow.pyfunc.load_model("models:/distill-cifar-student/1")
    probs = np.asarray(pyfunc.predict(raw))
    assert probs.shape == (len(y), 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    model_dir = fetch_dir(store, summary["results"]["student"]["model_prefix"], "models")
    with torch.no_grad():  # our own loader with its normalisation: the same classes
        ours = load_model(model_dir)(normalize(x_u8, *model_normalization(model_dir))).argmax(dim=1).numpy()
    assert (probs.argmax(axis=1) == ours).all()
    info = mlflow.models.get_model_info("models:/distill-cifar-student/1")
    assert info.metadata["classes"] == ["cat", "dog", "frog"] and "uint8" in info.metadata["input"]
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"

    exp = client.get_experiment_by_name("distill-cifar")
    logged = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert {"teacher", "baseline", "student"} <= {m.name for m in logged}
    for role in ("teacher", "baseline", "student"):
        assert f"distill-cifar {role} models" in client.get_registered_model(f"distill-cifar-{role}").description
    desc = client.get_model_version("distill-cifar-student", "1").description
    assert "test accuracy" in desc and "KD gain over the baseline" in desc and "distill-cifar-teacher version 1" in desc

    parent = client.get_run(summary["mlflow_parent_run_id"])
    commit = parent.data.tags["git_commit"]
    if commit != "unknown":
        assert parent.data.tags["mlflow.source.git.commit"] == commit
    assert parent.data.tags["mlflow.source.name"] == "distill-cifar"
    student = client.get_run(summary["results"]["student"]["mlflow_run_id"])
    for run in (parent, student):
        (ds,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert ds.digest == summary["data"]["manifest_sha256"][:36] and ds.name == "distill-cifar-data"
        assert json.loads(ds.profile)["manifest_sha256"] == summary["data"]["manifest_sha256"]
    assert {"per_class/cat", "per_class/dog", "per_class/frog", "test_accuracy"} <= set(student.data.metrics)
    assert not any(k.startswith("acc_") for k in student.data.metrics)


def test_registration_is_idempotent(env):
    from mlflow import MlflowClient

    from tasks.registry import register_models

    summary = _run(env, experiment="idem")
    client = MlflowClient(tracking_uri=env["mlflow"])
    before = {r: len(client.search_model_versions(f"name='idem-{r}'")) for r in ("teacher", "baseline", "student")}
    full = {}
    from tasks.storage import open_store

    store = open_store(env["store"])
    for role in ("teacher", "baseline", "student"):
        prefix = summary["results"][role]["model_prefix"].rsplit("/", 1)[0]
        # the stages were reused from the distill-cifar experiment: this experiment registered them from the
        # nested runs that adopted them, which the summary names
        full[role] = {**store.get_json(f"{prefix}/result.json"), "role": role,
                      "mlflow_run_id": summary["results"][role]["mlflow_run_id"]}
    again = register_models.fn(
        "cifar", full, store_url=env["store"], tracking_uri=env["mlflow"], experiment="idem", data_key=summary["data"]["data_key"],
        lineage={"prefect_flow_run_id": summary["flow_run_id"]}, margin=0.0,
    )
    after = {r: len(client.search_model_versions(f"name='idem-{r}'")) for r in ("teacher", "baseline", "student")}
    assert before == after == {"teacher": 1, "baseline": 1, "student": 1}
    assert all(v["reused"] for v in again["versions"].values())


def test_no_register_registers_nothing(env):
    """``register_models=False`` (``distill run --no-register``): the runs are tracked, no model is registered."""
    from mlflow import MlflowClient

    summary = _run(env, experiment="noreg", register_models=False)
    client = MlflowClient(tracking_uri=env["mlflow"])
    assert summary["registration"] is None
    assert client.search_registered_models("name LIKE 'noreg%'") == []
    exp = client.get_experiment_by_name("noreg")
    assert client.search_logged_models(experiment_ids=[exp.experiment_id]) == []
    assert client.get_run(summary["mlflow_parent_run_id"]).info.status == "FINISHED"


def test_corrupt_stored_teacher_is_redone_not_fatal(env):
    """A stored stage whose model no longer verifies must not fail every later run: it is dropped and redone.
    Its checkpoints were deleted when it completed, so it trains from the start; on CPU that gives the same
    weights again."""
    from tasks.lab import stage_result
    from tasks.storage import open_store

    first = _run(env)  # everything reused from the first test
    store = open_store(env["store"])
    tstage = first["results"]["teacher"]["stage_key"]
    weights = next(k for k in store.list(f"{tstage}/model") if k.endswith("model.safetensors"))
    path = Path(store.root, *weights.split("/"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    again = _run(env)
    assert again["teacher_reused"] is False
    teacher = again["results"]["teacher"]
    assert teacher["stage_key"] == tstage and not teacher.get("resumed_from_epoch")  # no checkpoint was left
    assert stage_result(store, tstage) is not None  # published again, and it verifies
    # the teacher's weights are the same as before, so the students' work (keyed on them) is still reused
    assert again["results"]["student"]["reused"] is True


def test_integrity_errors_are_not_retried(env):
    from prefect import flow, task

    from tasks.lab import not_integrity_error
    from tasks.storage import ChecksumMismatch

    calls: list[str] = []

    @task(retries=3, retry_condition_fn=not_integrity_error)
    def fragile(kind: str):
        calls.append(kind)
        if kind == "integrity":
            raise ChecksumMismatch("stages/x/model.safetensors", "a" * 64, "b" * 64)
        raise ConnectionError("a passing fault")

    @flow
    def run(kind: str) -> bool:
        return fragile(kind, return_state=True).is_failed()

    assert run("integrity") is True
    assert run("transient") is True
    assert calls.count("integrity") == 1  # failed at once
    assert calls.count("transient") == 4  # retried


@pytest.mark.parametrize("prefix", ["../outside", "/etc/x", "stages/../../x", "stages//x", ""])
def test_train_job_refuses_bad_prefixes_before_touching_the_disk(env, prefix, tmp_path):
    from pydantic import ValidationError

    from tasks.lab import TrainJob

    with pytest.raises(ValidationError, match="out_prefix"):
        TrainJob(role="teacher", name="teacher", lab={}, data_key="data/x", out_prefix=prefix, store_url="file:///tmp/x")


def test_stage_dir_is_contained_in_the_work_folder(env, tmp_path):
    from distill.files import PathEscapeError
    from tasks.lab import stage_dir, work_dir

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = work_dir() / "evil"
    link.symlink_to(outside)
    try:
        with pytest.raises(PathEscapeError):
            stage_dir("evil/stage")
        assert not any(outside.iterdir())
    finally:
        link.unlink()


def test_bad_parameters_fail_before_compute(env):
    from pydantic import ValidationError

    from flows.cifar import distill_cifar
    from flows.params import PipelineParams

    with pytest.raises(ValidationError, match=r"kd\.temperature"):
        PipelineParams(overrides={"kd": {"temperature": 0}})
    with pytest.raises(ValidationError, match=r"student_train\.epochs"):
        PipelineParams(overrides={"student_train": {"epochs": 0}})
    with pytest.raises(ValidationError, match="unknown model"):
        PipelineParams(overrides={"student": {"name": "resnet9000"}})
    # the JSON schema Prefect stores for the deployment carries the constraints (checked at submission)
    schema = json.dumps(PipelineParams.model_json_schema())
    assert '"exclusiveMinimum": 0' in schema
    # a dict parameter is validated by Prefect before the flow body runs: nothing is written
    work = Path(os.environ["DISTILL_WORK_DIR"])
    before = set(work.rglob("*")) if work.exists() else set()
    with pytest.raises(Exception, match="temperature"):
        distill_cifar(profile="smoke", overrides={"kd": {"temperature": -1}})
    after = set(work.rglob("*")) if work.exists() else set()
    assert before == after


# --- kill a training stage mid-run; the re-run resumes from the store's checkpoint ----------------------

_RUNNER = """
import json, sys
from tasks.lab import TrainJob, train_stage
job = TrainJob.model_validate_json(open(sys.argv[1]).read())
res = train_stage.fn(job)
print("RESULT " + json.dumps(res))
"""


def _train_proc(job_path: Path, work: Path) -> subprocess.Popen:
    env = {**os.environ, "DISTILL_WORK_DIR": str(work), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.Popen([sys.executable, "-c", _RUNNER, str(job_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_training_stage_resumes_from_store(tmp_path):
    from distill.image.config import load_profile
    from tasks.lab import TrainJob, prepare_data
    from tasks.storage import open_store

    src = make_imagefolder(tmp_path / "src", n_train=80, n_test=5, as_tarballs=True)
    ov = tiny_overrides(src, tmp_path / "cache", n_train=80, n_test=5, teacher_train={"epochs": 6, "batch_size": 30})
    lab = load_profile("smoke", ov).model_dump(mode="json")
    store_url = (tmp_path / "store").as_uri()
    store = open_store(store_url)
    data = prepare_data.fn("cifar", lab, store_url)

    def job(prefix):
        p = tmp_path / f"{prefix}.json"
        p.write_text(TrainJob(role="teacher", name="teacher", lab=lab, data_key=data["data_key"], out_prefix=prefix,
                              store_url=store_url).model_dump_json())
        return p

    # uninterrupted reference
    ref = _train_proc(job("ref"), tmp_path / "work-ref")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out

    # killed after its first checkpoint reached the store
    victim = _train_proc(job("run"), tmp_path / "work-a")
    deadline = time.time() + 300
    while not store.exists("run/checkpoints/LATEST"):
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert not store.exists("run/model/MANIFEST.json"), "the stage finished before it was killed"
    done_epoch = int(store.get_bytes("run/checkpoints/LATEST").decode().split()[0].split("-")[1])
    assert 1 <= done_epoch < 6

    # re-run on another machine (another work folder): resumes from the store, not from epoch 0
    again = _train_proc(job("run"), tmp_path / "work-b")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    res = json.loads(out.split("RESULT ", 1)[1])
    assert res["resumed_from_epoch"] >= done_epoch and res["epochs_run"] == 6 - res["resumed_from_epoch"]

    a = load_file(str(tmp_path / "work-ref" / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "work-b" / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    for key in store.list("run/"):
        store.verify(key)


@pytest.mark.parametrize("keep", [False, True])
def test_completed_stage_drops_its_checkpoints_unless_kept(tmp_path, monkeypatch, keep):
    from tasks.lab import TrainJob, drop_checkpoints, stage_dir
    from tasks.storage import open_store

    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "work"))
    store_url = (tmp_path / "store").as_uri()
    store = open_store(store_url)
    store.put_bytes(b"weights and moments", "stages/abc/checkpoints/epoch-0001/state.safetensors")
    store.put_bytes(b"epoch-0001 00", "stages/abc/checkpoints/LATEST")
    store.put_bytes(b"model", "stages/abc/model/model.safetensors")
    store.put_bytes(b"{}", "stages/abc/result.json")
    local = stage_dir("stages/abc") / "checkpoints" / "epoch-0001"
    local.mkdir(parents=True)
    (local / "state.safetensors").write_bytes(b"weights and moments")
    (stage_dir("stages/abc") / "model.safetensors").write_bytes(b"model")

    job = TrainJob(role="teacher", name="teacher", lab={}, data_key="data/x", out_prefix="stages/abc",
                   store_url=store_url, keep_checkpoints=keep)
    drop_checkpoints(store, job)
    assert bool(store.list("stages/abc/checkpoints")) is keep
    assert local.exists() is keep
    # the stage's product stays either way
    assert store.exists("stages/abc/model/model.safetensors") and store.exists("stages/abc/result.json")
    assert (stage_dir("stages/abc") / "model.safetensors").exists()


def test_seeds_train_as_one_lockstep_stage_with_a_run_per_member(env):
    """seeds [0, 1]: every member but the teacher is trained per seed, all in ONE lockstep stage (one
    train-lockstep task run); each member gets its own nested MLflow run and its own stage key, the KD gain of a
    replica is paired with the baseline of its seed, and the report shows the across-seed section."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.storage import open_store

    fresh = {"student_train": {"epochs": 2, "batch_size": 30, "lr": 0.049}}  # student work no other test did
    out = _run(env, overrides_extra={"seeds": [0, 1], **fresh}, experiment="seeds")
    res = out["results"]
    replicas = {"baseline", "student", "sweep-T1-a0.7", "baseline-s1", "student-s1", "sweep-T1-a0.7-s1"}
    assert set(res) == {"teacher"} | replicas
    assert {res[n]["seed"] for n in replicas} == {0, 1} and res["student-s1"]["replica_of"] == "student"
    assert len({res[n]["stage_key"] for n in replicas}) == 6  # each member under its own key
    assert res["baseline"]["stage_key"] != res["baseline-s1"]["stage_key"]

    with get_client(sync_client=True) as pc:
        runs = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[out["flow_run_id"]])))
    trains = sorted(r.name for r in runs if r.name.startswith("train-") and r.name != "train-teacher")
    assert trains == ["train-lockstep"], trains

    client = MlflowClient(tracking_uri=env["mlflow"])
    exp = client.get_experiment_by_name("seeds")
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == out["mlflow_parent_run_id"]]
    assert {r.data.tags["distill.stage"] for r in children} == set(res)
    for r in children:
        assert r.info.status == "FINISHED"
        if r.data.tags["distill.stage"] != "teacher":
            assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] == [1, 2]
    gain = {r.data.tags["distill.stage"]: r.data.metrics.get("kd_gain") for r in children}
    acc = {n: res[n]["test"]["test_accuracy"] for n in res}
    assert gain["student-s1"] == pytest.approx(acc["student-s1"] - acc["baseline-s1"])
    assert gain["student"] == pytest.approx(acc["student"] - acc["baseline"])

    report = open_store(env["store"]).get_dir_file(f"runs/{out['flow_run_id']}/report", "report.md").decode()
    assert "Across seeds" in report

    # a second run with one more seed reuses the six members trained above and trains only the new seed's
    # (with gate ci_lower and a margin no interval reaches: the student is not promoted, the report says why)
    again = _run(env, overrides_extra={"seeds": [0, 1, 2], **fresh, "gate": "ci_lower", "promotion_margin": 0.5},
                 experiment="seeds")
    assert {n for n, r in again["results"].items() if r.get("reused")} == {"teacher"} | replicas
    assert not again["results"]["baseline-s2"].get("reused")
    promo = again["registration"]["promotion"]
    assert promo["rule"] == "ci_lower" and not promo["promoted"] and promo["evidence"]["n"] == 3
    assert promo["reason"].startswith("ci_lower: the 95 % interval of the paired val_acc gain over 3 seeds")
    report = open_store(env["store"]).get_dir_file(f"runs/{again['flow_run_id']}/report", "report.md").decode()
    assert "rule ci_lower" in report
