"""The distill-lm flow in-process (Prefect test harness, file store, SQLite MLflow) on a tiny random Llama
teacher: teacher -> pruned init -> baseline, student and a loss sweep -> registration gated on validation
perplexity (lower wins) -> report; then a second run that reuses everything but the students."""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("prefect")
pytest.importorskip("mlflow")
pytest.importorskip("transformers")

from _tinylm import available, make_tiny_lm, tiny_lm_overrides  # noqa: E402

if not available():
    pytest.skip("../shared/data (GPT-2 tokenizer, Tiny Shakespeare) is missing", allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    tmp = tmp_path_factory.mktemp("flowlm")
    lab = make_tiny_lm(tmp / "lab")
    old = dict(os.environ)
    os.environ["DISTILL_WORK_DIR"] = str(tmp / "work")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with prefect_test_harness(server_startup_timeout=120):
        yield {"tmp": tmp, "lab": lab, "store": (tmp / "store").as_uri(), "mlflow": f"sqlite:///{tmp / 'mlflow.db'}"}
    os.environ.clear()
    os.environ.update(old)


def _run(env, **ov_kw):
    from flows.lm import LMPipelineParams, distill_lm

    ov = tiny_lm_overrides(env["lab"], env["tmp"] / "cache", **ov_kw)
    params = LMPipelineParams(profile="smoke", overrides=ov, store_url=env["store"], tracking_uri=env["mlflow"])
    return distill_lm(**{k: getattr(params, k) for k in LMPipelineParams.model_fields})


def test_lm_pipeline_in_process_then_reuse(env):
    from mlflow import MlflowClient

    from tasks.storage import open_store

    first = _run(env)
    res = first["results"]
    assert first["kind"] == "lm" and first["teacher_reused"] is False
    assert set(res) == {"teacher", "student-init", "baseline", "student", "sweep-rkl"}
    for name, r in res.items():
        ppl = r["test"]["test_ppl"]
        assert math.isfinite(ppl) and ppl > 1, (name, ppl)
        assert r["test"]["speed_measured"] == "alone" and r["test"]["tokens_per_second"] > 0
    # the distilled student stays closer to the teacher (KL on held-out tokens) than the hard-label baseline
    assert res["student"]["test"]["kl_to_teacher"] < res["baseline"]["test"]["kl_to_teacher"]
    assert "agreement_top1" in res["baseline"]["test"]

    client = MlflowClient(tracking_uri=env["mlflow"])
    for role in ("teacher", "baseline", "student"):
        (mv,) = client.search_model_versions(f"name='distill-lm-{role}'")
        assert mv.tags["distill.kind"] == "lm" and mv.tags["prefect_flow_run_id"] == first["flow_run_id"]
        assert float(mv.tags["test_ppl"]) == pytest.approx(res[role]["test"]["test_ppl"], rel=1e-5)
    promo = first["registration"]["promotion"]
    assert promo["metric"] == "val_ppl" and promo["direction"] == "min"
    assert promo["promoted"] == (res["student"]["val_ppl"] <= res["baseline"]["val_ppl"])

    store = open_store(env["store"])
    report = store.get_dir_file(f"runs/{first['flow_run_id']}/report", "report.md").decode()
    assert "# distill-lm comparison" in report and "test ppl" in report and "Samples" in report
    assert "rkl" in report and "Promotion gate" in report and "val_ppl" in report
    parent_art = {a.path for a in client.list_artifacts(first["mlflow_parent_run_id"], "report")}
    assert {"report/report.md", "report/training_curves.png", "report/test_ppl_across_sweep.png"} <= parent_art
    exp = client.get_experiment_by_name("distill-lm")
    runs = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{first['flow_run_id']}'")
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) >= 6
    student_run = client.get_run(res["student"]["mlflow_run_id"])
    assert [m.step for m in client.get_metric_history(student_run.info.run_id, "val_ppl")] == [3, 6]

    # ---- a second run with another main loss: teacher, init and baseline are reused, only students train ----
    second = _run(env, kd_kind="jsd")
    res2 = second["results"]
    assert set(res2) == {"teacher", "student-init", "baseline", "student", "sweep-fkl", "sweep-rkl"}
    assert second["teacher_reused"] is True
    # same work, same key: sweep-fkl is the first run's main student
    assert res2["student-init"]["reused"] and res2["baseline"]["reused"] and res2["sweep-rkl"]["reused"]
    assert res2["sweep-fkl"]["reused"] and res2["sweep-fkl"]["stage_key"] == res["student"]["stage_key"]
    assert not res2["student"]["reused"]
    assert len(client.search_model_versions("name='distill-lm-teacher'")) == 1
    assert len(client.search_model_versions("name='distill-lm-student'")) == 2
