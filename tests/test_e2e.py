"""End to end with real servers on 127.0.0.1: moto (the MinIO stand-in), a PostgreSQL server holding the MLflow
and Prefect databases (as the compose stack does), an MLflow server with S3 artifacts, a Prefect server, and process
workers for a `cpu` and a `gpu` pool.

`prefect deployment run distill-cifar/local` with the smoke profile (on tiny generated data) and the `gpu`
pool named; then a second run that must reuse the teacher.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")
pytest.importorskip("mlflow")
pytest.importorskip("moto")

from _imagefolder import make_imagefolder, tiny_overrides  # noqa: E402
from servers import VENV_BIN, mlflow_server, moto_server, postgres_server, prefect_server, prefect_worker  # noqa: E402

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
BUCKET = "distill"


def _prefect(args, env, cwd=ROOT, timeout=600):
    r = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return r


def _api(api: str, method: str, path: str, body=None):
    import httpx

    with httpx.Client(base_url=api, timeout=30, trust_env=False) as c:
        r = c.request(method, path, json=body)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import boto3

    base = tmp_path_factory.mktemp("e2e")
    src = make_imagefolder(base / "data", n_train=40, n_test=10, as_tarballs=True)
    with moto_server(base / "moto") as s3:
        boto3.client("s3", endpoint_url=s3.endpoint, **{k.lower(): v for k, v in s3.env.items()
                     if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        with postgres_server(databases=("mlflow", "prefect")) as pg, \
             mlflow_server(base / "mlflow", f"s3://{BUCKET}/mlflow", s3.env, backend_store_uri=pg.url("mlflow", "psycopg2")) as ml, \
             prefect_server(base / "prefect", database_url=pg.url("prefect", "asyncpg")) as pf:
            env = {**pf.env, **s3.env, "MLFLOW_TRACKING_URI": ml.url, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DISTILL_STORE_URL": f"s3://{BUCKET}/store",
                   "DISTILL_PROJECT_DIR": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "2",
                   "PREFECT_LOGGING_EXTRA_LOGGERS": "distill"}
            for pool in ("cpu", "gpu"):
                r = _prefect(["work-pool", "create", pool, "--type", "process"], env)
                assert r.returncode == 0, r.stdout + r.stderr
            # The gpu pool is a docker/kubernetes pool in production, whose image holds the code at /opt/distill.
            # Here a process worker stands in for it, so its deployment pulls from this checkout instead.
            spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
            for d in spec["deployments"]:
                if d["work_pool"]["name"] == "gpu":
                    d["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            pfile = base / "prefect.yaml"
            pfile.write_text(yaml.safe_dump(spec, sort_keys=False))
            r = _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(pfile)], env)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            homes = {p: base / f"home-{p}" for p in ("cpu", "gpu")}
            with prefect_worker("cpu", {**env, "DISTILL_HOME": str(homes["cpu"]), "DISTILL_WORKER_NAME": "worker-cpu"}, base, ROOT) as wc, \
                 prefect_worker("gpu", {**env, "DISTILL_HOME": str(homes["gpu"]), "DISTILL_WORKER_NAME": "worker-gpu"}, base, ROOT) as wg:
                yield {"env": env, "api": pf.api, "mlflow": ml.url, "s3": s3, "src": src, "base": base, "homes": homes,
                       "workers": (wc, wg), "pg": pg}


def _params(stack, alpha: float = 0.7) -> dict:
    ov = tiny_overrides(stack["src"], stack["base"] / "cache")
    ov["sweep"] = {"temperatures": [2.0, 4.0], "alphas": [alpha]}
    ov["kd"] = {"alpha": alpha}
    return {"profile": "smoke", "train_pool": "gpu", "overrides": ov}


def _deployment_run(stack, alpha: float = 0.7, *, deployment: str = "distill-cifar/local",
                    params: dict | None = None) -> str:
    """`prefect deployment run <deployment> --watch` (default: distill-cifar/local with _params); the flow run id."""
    params = _params(stack, alpha) if params is None else params
    r = _prefect(["deployment", "run", deployment, "--params", json.dumps(params),
                  "--watch", "--watch-timeout", "1500"], stack["env"], timeout=1600)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for w in stack["workers"] for p in (w.log, w.stdout) if p.exists())
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-2000:]}\n--- workers ---\n{logs}"
    line = next(l for l in r.stdout.splitlines() if "UUID:" in l)
    return line.split("UUID:")[1].strip()


def _train_runs(stack, parent_id: str) -> list[dict]:
    runs = _api(stack["api"], "POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["distill-train"]}}, "limit": 200})
    return [r for r in runs if r["parameters"]["job"]["tags"].get("prefect_flow_run_id") == parent_id]


def test_deployment_run_on_gpu_pool_then_teacher_reuse(stack):
    import boto3
    from mlflow import MlflowClient

    old = dict(os.environ)
    os.environ.update(stack["s3"].env)
    try:
        from tasks.storage import open_store

        store = open_store(f"s3://{BUCKET}/store")

        # ---- a bad parameter is refused at submission by the server's schema check, naming the field -----
        bad = _params(stack)
        bad["overrides"]["kd"] = {"temperature": 0}
        r = _prefect(["deployment", "run", "distill-cifar/local", "--params", json.dumps(bad)], stack["env"], timeout=120)
        assert r.returncode != 0 and "temperature" in (r.stdout + r.stderr), r.stdout + r.stderr
        cifar_runs = _api(stack["api"], "POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["distill-cifar"]}}})
        assert not [fr for fr in cifar_runs if (fr["parameters"].get("overrides") or {}).get("kd")]
        # no distill-cifar run exists: the refused one was never created, and `deploy --all` left the weekly
        # schedule inactive (production resumes it; tests/test_infra.py covers that)
        assert cifar_runs == []

        # ---- first run ----------------------------------------------------------------------------------
        run1 = _deployment_run(stack)
        parent = _api(stack["api"], "GET", f"/flow_runs/{run1}")
        assert parent["state_type"] == "COMPLETED" and parent["work_pool_name"] == "cpu"
        trains = _train_runs(stack, run1)
        # the teacher, then baseline, student and sweep as one lockstep stage
        assert sorted(r["name"] for r in trains) == ["lockstep", "teacher"]
        for r in trains:  # every training flow ran through the gpu pool's deployment, and finished
            assert r["work_pool_name"] == "gpu" and r["state_type"] == "COMPLETED", r
        summary = store.get_json(f"runs/{run1}/summary.json")
        assert summary["teacher_reused"] is False
        stages = {name: r["stage_key"] for name, r in summary["results"].items()}
        for name in ("teacher", "baseline", "student"):
            res = store.get_json(f"{stages[name]}/result.json")  # a group member completes under its own key
            assert res["executed_by"]["worker"] == "worker-gpu" and res["executed_by"]["pool"] == "gpu"
            # the weights were produced in the gpu worker's work folder, not the orchestrator's
            local = stages[name] if name == "teacher" else f"{res['group_prefix']}/{name}"
            assert (stack["homes"]["gpu"] / "work" / local / "model.safetensors").exists()
            assert not (stack["homes"]["cpu"] / "work" / local / "model.safetensors").exists()

        # weights are in the bucket (content-addressed stage prefixes) and their checksums verify; the
        # checkpoints of the completed stages were deleted
        keys = store.list(f"runs/{run1}")
        for name in ("teacher", "baseline", "student", "sweep-T2-a0.7"):
            assert "model.safetensors" in store.dir_manifest(f"{stages[name]}/model")
            assert store.list(f"{stages[name]}/checkpoints") == []
            keys += store.list(stages[name])
        for key in keys + store.list(summary["data"]["data_key"]):
            store.verify(key)
        s3 = boto3.client("s3", endpoint_url=stack["s3"].endpoint, region_name="us-east-1")
        mlflow_objects = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith("training_curves.png") for k in mlflow_objects)
        assert any("model" in k for k in mlflow_objects)

        # registered models, versions and aliases
        client = MlflowClient(tracking_uri=stack["mlflow"])
        versions = {}
        for role in ("teacher", "baseline", "student"):
            mvs = client.search_model_versions(f"name='distill-cifar-{role}'")
            assert len(mvs) == 1
            versions[role] = mvs[0]
            assert mvs[0].tags["prefect_flow_run_id"] == run1
            assert mvs[0].tags["data_manifest_sha256"] == summary["data"]["manifest_sha256"]
        assert versions["student"].tags["teacher_version"] == str(versions["teacher"].version)
        challenger = client.get_model_version_by_alias("distill-cifar-student", "challenger")
        assert str(challenger.version) == str(versions["student"].version)
        promo = summary["registration"]["promotion"]
        if promo["promoted"]:
            assert str(client.get_model_version_by_alias("distill-cifar-student", "champion").version) == str(challenger.version)
        else:
            assert "champion" not in client.get_registered_model("distill-cifar-student").aliases

        # every MLflow run of the flow ended FINISHED: the parent and each nested stage run
        exp = client.get_experiment_by_name("distill-cifar")
        runs1 = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{run1}'")
        assert len(runs1) >= 5 and {r.info.status for r in runs1} == {"FINISHED"}

        # ---- second run, another alpha: teacher and baseline (same work) are reused, the students train ---
        run2 = _deployment_run(stack, alpha=0.5)
        summary2 = store.get_json(f"runs/{run2}/summary.json")
        assert summary2["teacher_reused"] is True and summary2["results"]["baseline"]["reused"] is True
        assert sorted(r["name"] for r in _train_runs(stack, run2)) == ["lockstep"]  # student + sweep-T2-a0.5
        assert "teacher reused" in store.get_dir_file(f"runs/{run2}/report", "report.md").decode()
        assert len(client.search_model_versions("name='distill-cifar-teacher'")) == 1
        assert len(client.search_model_versions("name='distill-cifar-baseline'")) == 1
        assert len(client.search_model_versions("name='distill-cifar-student'")) == 2
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_lm_deployment_run_on_gpu_pool(stack):
    """`prefect deployment run distill-lm/local` on a tiny Llama teacher, every stage (teacher, pruned init,
    baseline, student, sweep) dispatched to the gpu pool's process worker; S3 store, MLflow server."""
    from mlflow import MlflowClient

    from _tinylm import available, make_tiny_lm, tiny_lm_overrides

    if not available():
        pytest.skip("../shared/data (GPT-2 tokenizer, Tiny Shakespeare) is missing")
    lab = make_tiny_lm(stack["base"] / "tinylm")
    params = {"profile": "smoke", "train_pool": "gpu", "overrides": tiny_lm_overrides(lab, stack["base"] / "lmcache")}
    old = dict(os.environ)
    os.environ.update(stack["s3"].env)
    try:
        from tasks.storage import open_store

        store = open_store(f"s3://{BUCKET}/store")
        run_id = _deployment_run(stack, deployment="distill-lm/local", params=params)
        trains = _train_runs(stack, run_id)
        assert sorted(t["name"] for t in trains) == ["baseline", "student", "student-init", "sweep-rkl", "teacher"]
        assert all(t["work_pool_name"] == "gpu" and t["state_type"] == "COMPLETED" for t in trains)
        summary = store.get_json(f"runs/{run_id}/summary.json")
        assert summary["kind"] == "lm"
        for name, res in summary["results"].items():
            stored = store.get_json(f"{res['stage_key']}/result.json")
            assert stored["executed_by"]["pool"] == "gpu" and stored["kind"] == "lm"
            assert "model.safetensors" in store.dir_manifest(f"{res['stage_key']}/model")
            assert res["test"]["test_ppl"] > 1
        client = MlflowClient(tracking_uri=stack["mlflow"])
        for role in ("teacher", "baseline", "student"):
            (mv,) = client.search_model_versions(f"name='distill-lm-{role}'")
            assert mv.tags["prefect_flow_run_id"] == run_id and mv.tags["distill.kind"] == "lm"
        promo = summary["registration"]["promotion"]
        assert promo["metric"] == "val_ppl" and promo["direction"] == "min"
        report = store.get_dir_file(f"runs/{run_id}/report", "report.md").decode()
        assert "# distill-lm comparison" in report and "gap closed" in report
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_diffusion_deployment_run_on_gpu_pool(stack, tmp_path):
    """`prefect deployment run distill-diffusion/local` on tiny generated images, every stage dispatched to the
    gpu pool's process worker: the progressive rounds run as deployment runs one after the other (the second is
    keyed on the first's weights), the models are diffusers folders in the S3 store and in the MLflow server."""
    from mlflow import MlflowClient

    from _tinydiff import tiny_diffusion_overrides

    src = make_imagefolder(tmp_path / "src", n_train=20, n_test=6, size=16)
    params = {"profile": "smoke", "train_pool": "gpu",
              "overrides": tiny_diffusion_overrides(src, stack["base"] / "diffcache")}
    old = dict(os.environ)
    os.environ.update(stack["s3"].env)
    try:
        from tasks.storage import open_store

        store = open_store(f"s3://{BUCKET}/store")
        run_id = _deployment_run(stack, deployment="distill-diffusion/local", params=params)
        trains = _train_runs(stack, run_id)
        assert sorted(t["name"] for t in trains) == ["baseline", "consistency", "progressive-2", "progressive-4",
                                                     "teacher"]
        assert all(t["work_pool_name"] == "gpu" and t["state_type"] == "COMPLETED" for t in trains)
        summary = store.get_json(f"runs/{run_id}/summary.json")
        res = summary["results"]
        assert summary["kind"] == "diffusion" and res["progressive-2"]["teacher_name"] == "progressive-4"
        for name, r_ in res.items():
            files = store.dir_manifest(f"{r_['stage_key']}/model")
            assert {"model_index.json", "distill.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
        client = MlflowClient(tracking_uri=stack["mlflow"])
        (mv,) = client.search_model_versions("name='distill-diffusion-student'")
        assert mv.tags["prefect_flow_run_id"] == run_id and mv.tags["distill.kind"] == "diffusion"
        report = store.get_dir_file(f"runs/{run_id}/report", "report.md").decode()
        assert "# distill-diffusion comparison" in report and "quality_vs_steps.png" in report
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_mlflow_and_prefect_state_is_in_postgres(stack):
    """The servers above keep their state in PostgreSQL, not in a SQLite file: the runs the deployment runs made
    are rows of the MLflow and Prefect databases (this test runs after them, in file order)."""
    import psycopg2

    pg = stack["pg"]
    counts = {}
    for db, table in (("mlflow", "runs"), ("mlflow", "model_versions"), ("prefect", "flow_run")):
        with psycopg2.connect(pg.url(db)) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            counts[(db, table)] = cur.fetchone()[0]
    assert counts[("mlflow", "runs")] >= 4 and counts[("mlflow", "model_versions")] >= 3, counts
    assert counts[("prefect", "flow_run")] >= 3, counts
    assert not list(stack["base"].rglob("mlflow.db")) and not list(stack["base"].rglob("prefect.db"))
