"""The distill-diffusion flow in-process (Prefect test harness, file store, SQLite MLflow) on tiny generated
images: teacher -> baseline (the teacher in fewer steps), progressive rounds 4 -> 2 (each taught by the one
before) and consistency -> registration of diffusers folders gated on validation FID (lower wins) -> report with
the quality-vs-steps plot and sample grids; then a second run that reuses every stage."""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("prefect")
pytest.importorskip("mlflow")
pytest.importorskip("diffusers")

from _imagefolder import make_imagefolder  # noqa: E402
from _tinydiff import tiny_diffusion_overrides  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    tmp = tmp_path_factory.mktemp("flowdiff")
    src = make_imagefolder(tmp / "src", n_train=20, n_test=6, size=16)
    old = dict(os.environ)
    os.environ["DISTILL_WORK_DIR"] = str(tmp / "work")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with prefect_test_harness(server_startup_timeout=120):
        yield {"tmp": tmp, "src": src, "store": (tmp / "store").as_uri(), "mlflow": f"sqlite:///{tmp / 'mlflow.db'}"}
    os.environ.clear()
    os.environ.update(old)


def _run(env):
    from flows.diffusion import DiffusionPipelineParams, distill_diffusion

    ov = tiny_diffusion_overrides(env["src"], env["tmp"] / "cache")
    params = DiffusionPipelineParams(profile="smoke", overrides=ov, store_url=env["store"], tracking_uri=env["mlflow"],
                                     max_parallel=2)
    return distill_diffusion(**{k: getattr(params, k) for k in DiffusionPipelineParams.model_fields})


def test_diffusion_pipeline_in_process_then_reuse(env):
    from diffusers import DiffusionPipeline
    from mlflow import MlflowClient

    from tasks.storage import open_store

    first = _run(env)
    res = first["results"]
    assert first["kind"] == "diffusion" and first["teacher_reused"] is False
    assert list(res) == ["teacher", "baseline", "progressive-4", "progressive-2", "consistency"]
    for name, r in res.items():
        assert math.isfinite(r["test"]["fid"]) and r["test"]["fid"] >= 0, name
        assert r["test"]["speed_measured"] == "alone" and r["test"]["images_per_s"] > 0
    assert res["teacher"]["test"]["steps"] == 8 and res["baseline"]["test"]["steps"] == 2
    # the second round learned from the first: its stage key hashes the first round's weights
    assert res["progressive-2"]["teacher_name"] == "progressive-4"
    assert res["progressive-2"]["test"]["psnr_s2"] > 0  # compared with the run's teacher, same noise

    client = MlflowClient(tracking_uri=env["mlflow"])
    for role, name in (("teacher", "teacher"), ("baseline", "baseline"), ("student", "progressive-2")):
        (mv,) = client.search_model_versions(f"name='distill-diffusion-{role}'")
        assert mv.tags["distill.kind"] == "diffusion" and mv.run_id == res[name]["mlflow_run_id"]
        assert float(mv.tags["fid"]) == pytest.approx(res[name]["test"]["fid"], rel=1e-5)
    promo = first["registration"]["promotion"]
    assert promo["metric"] == "val_fid" and promo["direction"] == "min"
    assert promo["promoted"] == (res["progressive-2"]["val_fid"] <= res["baseline"]["val_fid"])

    store = open_store(env["store"])
    # the published student folder is a diffusers pipeline
    from tasks.lab import fetch_dir

    pipe = DiffusionPipeline.from_pretrained(str(fetch_dir(store, res["progressive-2"]["model_prefix"], "models")))
    assert type(pipe).__name__ == "DDIMPipeline"
    report_prefix = f"runs/{first['flow_run_id']}/report"
    report = store.get_dir_file(report_prefix, "report.md").decode()
    assert "# distill-diffusion comparison" in report and "Samples (same noise for every model)" in report
    names = set(store.dir_manifest(report_prefix))
    assert "quality_vs_steps.png" in names and any(n.endswith(".png") and "grid" in n for n in names)

    # ---- the same run again: every stage is reused, nothing trains ----
    second = _run(env)
    assert second["teacher_reused"] is True
    assert all(r["reused"] for n, r in second["results"].items() if n != "teacher")
    assert len(client.search_model_versions("name='distill-diffusion-student'")) == 1
