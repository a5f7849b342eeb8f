"""Pipeline features every kind gets, checked with fakes (no Prefect run, no MLflow server, no training):

- scheduling the plan's members when some learn from an earlier member (progressive distillation rounds);
- files written by a kind's evaluate (uploaded to the store and MLflow, named by store key);
- registration of diffusers pipeline folders;
- the report's quality-vs-steps plot and image grids.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from distill import kinds
from distill.kinds import Column, Kind, Member, Metric
from flows import pipeline
from flows.pipeline import Reused, member_order, schedule_members
from tasks.storage import FileStore
from tasks.tracking import Tracker

# --------------------------------------------------------------------------------------------------------------
# scheduling: a simulated clock; a stage runs for its duration in ticks, every poll sleep advances one tick
# --------------------------------------------------------------------------------------------------------------


class Sim:
    """Fake build_job / submit / sleep over a tick clock, recording what started when."""

    def __init__(self, durations: dict[str, int], *, reused=(), fail=(), fail_build=()):
        self.t = 0
        self.durations, self.reused, self.fail, self.fail_build = durations, set(reused), set(fail), set(fail_build)
        self.built: dict[str, dict] = {}  # name -> {"t", "teacher_result", "seen"}
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}  # when done() was first observed true
        self.running_peak = 0
        self.handles: list[Handle] = []

    def build_job(self, m: Member, so_far: dict) -> object:
        if m.name in self.fail_build:
            raise RuntimeError(f"cannot build {m.name}")
        teacher = so_far[m.teacher] if m.teacher else {"weights_sha256": "run-teacher"}
        self.built[m.name] = {"t": self.t, "teacher_result": teacher, "seen": sorted(so_far)}
        # the stage key hashes the teacher's weights, as the real r.job does
        key = f"{m.name}@{teacher['weights_sha256']}"
        if m.name in self.reused:
            return Reused({"name": m.name, "weights_sha256": f"w-{m.name}", "key": key, "reused": True})
        return {"name": m.name, "key": key}

    def submit(self, job: dict) -> "Handle":
        name = job["name"]
        self.started[name] = self.t
        h = Handle(self, job)
        self.handles.append(h)
        self.running_peak = max(self.running_peak, self.running())
        return h

    def running(self) -> int:
        return sum(1 for h in self.handles if not h.finished_at_or_before(self.t))

    def sleep(self, _s: float) -> None:
        self.t += 1

    def run(self, members, max_parallel):
        return schedule_members(members, self.build_job, self.submit, max_parallel, poll_s=0, sleep=self.sleep)


class Handle:
    def __init__(self, sim: Sim, job: dict):
        self.sim, self.job, self.start = sim, job, sim.t
        self.end = sim.t + sim.durations.get(job["name"], 1)

    def finished_at_or_before(self, t: int) -> bool:
        return t >= self.end

    def done(self) -> bool:
        if self.sim.t >= self.end:
            self.sim.finished.setdefault(self.job["name"], self.sim.t)
            return True
        return False

    def result(self) -> dict:
        name = self.job["name"]
        if name in self.sim.fail:
            raise RuntimeError(f"stage {name} failed")
        return {"name": name, "weights_sha256": f"w-{name}", "key": self.job["key"]}


def progressive_plan() -> list[Member]:
    return [
        Member("baseline", "baseline"),
        Member("student", "progressive-32", kd={"steps": 32}),
        Member("student", "progressive-16", kd={"steps": 16}, teacher="progressive-32"),
        Member("student", "progressive-8", kd={"steps": 8}, teacher="progressive-16"),
        Member("student", "progressive-4", kd={"steps": 4}, teacher="progressive-8", main=True),
        Member("student", "consistency", kd={"kind": "consistency"}),
    ]


CHAIN = ["progressive-32", "progressive-16", "progressive-8", "progressive-4"]


def test_dependants_start_after_their_teacher_member_and_are_keyed_on_its_result():
    sim = Sim({"baseline": 3, "progressive-32": 2, "progressive-16": 2, "progressive-8": 2, "progressive-4": 2,
               "consistency": 9})
    out = sim.run(progressive_plan(), max_parallel=3)
    assert list(out) == [m.name for m in progressive_plan()]  # the plan's order, not the finishing order
    for parent, child in zip(CHAIN, CHAIN[1:]):
        assert sim.started[child] >= sim.finished[parent]  # started only once its teacher member finished
        assert sim.built[child]["t"] >= sim.finished[parent]  # and built (keyed) only then
        assert sim.built[child]["teacher_result"] == out[parent]  # with that member's result as teacher
        assert out[child]["key"] == f"{child}@w-{parent}"
    assert out["progressive-32"]["key"] == "progressive-32@run-teacher"
    assert out["consistency"]["key"] == "consistency@run-teacher"
    assert sim.running_peak <= 3


def test_independent_members_overlap_and_a_slow_stage_does_not_idle_the_others():
    members = [Member("baseline", "slow"), *(Member("student", f"fast-{i}") for i in range(4))]
    sim = Sim({"slow": 20, **{f"fast-{i}": 2 for i in range(4)}})
    sim.run(members, max_parallel=2)
    assert sim.started["slow"] == sim.started["fast-0"] == 0  # both slots used at once
    # the fast ones follow each other in the second slot while the slow one still runs
    assert all(sim.finished[f"fast-{i}"] < sim.finished["slow"] for i in range(4))
    assert sim.running_peak == 2


@pytest.mark.parametrize("max_parallel", [1, 2, 3])
def test_max_parallel_is_respected(max_parallel):
    members = [Member("student", f"m{i}") for i in range(6)]
    sim = Sim({f"m{i}": 1 + i % 3 for i in range(6)})
    out = sim.run(members, max_parallel)
    assert set(out) == {m.name for m in members}
    assert sim.running_peak == max_parallel
    assert len(sim.started) == 6


def test_a_reused_member_unblocks_its_dependants_at_once():
    sim = Sim({"baseline": 5, "progressive-16": 3, "progressive-8": 3, "progressive-4": 3, "consistency": 5},
              reused={"progressive-32"})
    out = sim.run(progressive_plan(), max_parallel=2)
    assert "progressive-32" not in sim.started  # nothing ran for it
    assert sim.built["progressive-16"]["t"] == 0  # built before any stage ended
    assert sim.built["progressive-16"]["teacher_result"] == out["progressive-32"]
    assert out["progressive-16"]["key"] == "progressive-16@w-progressive-32"
    assert out["progressive-32"]["reused"] is True
    # the plan's order decides who gets the two slots first: baseline and progressive-16
    assert sim.started["baseline"] == sim.started["progressive-16"] == 0


def test_a_whole_reused_chain_runs_nothing():
    sim = Sim({}, reused={m.name for m in progressive_plan()})
    out = sim.run(progressive_plan(), max_parallel=2)
    assert not sim.started and list(out) == [m.name for m in progressive_plan()]
    assert out["progressive-4"]["key"] == "progressive-4@w-progressive-8"


def test_a_failed_member_fails_its_dependants_while_running_stages_end():
    sim = Sim({"baseline": 6, "progressive-32": 2, "consistency": 2}, fail={"progressive-32"})
    members = progressive_plan()
    with pytest.raises(RuntimeError, match="stage progressive-32 failed"):
        sim.run(members, max_parallel=2)
    assert "progressive-16" not in sim.built and "progressive-16" not in sim.started  # dependants never start
    assert "consistency" not in sim.started  # nothing new starts after a failure
    assert sim.finished["baseline"] == 6  # the running stage was waited for, not abandoned
    assert sim.t == 6


def test_a_build_error_lets_the_running_stages_end_then_raises():
    sim = Sim({"baseline": 4, "progressive-32": 1}, fail_build={"progressive-16"})
    with pytest.raises(RuntimeError, match="cannot build progressive-16"):
        sim.run(progressive_plan(), max_parallel=2)
    assert sim.finished["baseline"] == 4
    assert "consistency" not in sim.started


@pytest.mark.parametrize("members,named", [
    ([Member("student", "a", teacher="nope")], "'a' learns from 'nope'"),
    ([Member("student", "a", teacher="teacher")], "'a' learns from 'teacher'"),
    ([Member("student", "a", teacher="a")], "'a' learns from itself through a -> a"),
    ([Member("baseline", "b"), Member("student", "a", teacher="c"), Member("student", "c", teacher="a")],
     "learns from itself through a -> c -> a"),
    ([Member("student", "x", teacher="y"), Member("student", "y", teacher="z"), Member("student", "z", teacher="x")],
     "through x -> y -> z -> x"),
    ([Member("baseline", "a"), Member("student", "a")], "member 'a' appears twice"),
])
def test_bad_member_graphs_are_refused_before_anything_runs(members, named):
    sim = Sim({})
    with pytest.raises(ValueError, match=re.escape(named)):
        sim.run(members, max_parallel=2)
    assert not sim.built and not sim.started


def test_member_order_puts_teachers_first_whatever_the_plan_order():
    members = [Member("student", "c", teacher="b"), Member("student", "b", teacher="a"), Member("student", "a"),
               Member("baseline", "baseline")]
    order = member_order(members)
    assert order.index("a") < order.index("b") < order.index("c") and set(order) == {"a", "b", "c", "baseline"}
    # a dependant listed before its teacher still runs after it
    sim = Sim({"a": 2, "b": 2, "c": 2, "baseline": 1})
    out = sim.run(members, max_parallel=4)
    assert sim.started["b"] >= sim.finished["a"] and sim.started["c"] >= sim.finished["b"]
    assert list(out) == ["c", "b", "a", "baseline"]


def test_max_parallel_below_one_is_refused():
    with pytest.raises(ValueError, match="max_parallel"):
        Sim({}).run([Member("baseline", "baseline")], max_parallel=0)


def test_real_threads_with_concurrent_futures():
    """``submit`` may return any object with done() / result(), e.g. a concurrent.futures.Future."""
    lock = threading.Lock()
    live, peak, order = [0], [0], []

    def work(job):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            order.append(job["name"])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return {"name": job["name"], "weights_sha256": f"w-{job['name']}"}

    def build(m, so_far):
        t = so_far[m.teacher]["weights_sha256"] if m.teacher else "T"
        return {"name": m.name, "teacher": t}

    with ThreadPoolExecutor(8) as ex:
        out = schedule_members(progressive_plan(), build, lambda job: ex.submit(work, job), 2, poll_s=0.005)
    assert peak[0] == 2
    for parent, child in zip(CHAIN, CHAIN[1:]):
        assert order.index(parent) < order.index(child)
    assert list(out) == [m.name for m in progressive_plan()]


def test_run_members_keys_a_dependant_on_its_teacher_members_result(monkeypatch):
    """flows.pipeline._run_members builds each job through _Run.job with the teacher member's result, checks the
    store for a completed stage with that key, and reports which were reused."""
    jobs: dict[str, dict] = {}

    def job(role, name, data, *, kd=None, teacher=None, init=None, eval_teacher=None, seed=None):
        jobs[name] = {"teacher": teacher, "init": init, "eval_teacher": eval_teacher}
        return SimpleNamespace(name=name, out_prefix=f"stages/{name}-{teacher['weights_sha256']}")

    stored = {"stages/progressive-32-w-teacher": {"weights_sha256": "w-p32", "model_prefix": "stages/p32/model"}}
    monkeypatch.setattr(pipeline, "stage_result", lambda store, prefix: stored.get(prefix))
    sim_results = {}

    class Done:
        def __init__(self, job):
            self.job = job

        def done(self):
            return True

        def result(self):
            sim_results[self.job.name] = {"weights_sha256": f"w-{self.job.name}", "prefix": self.job.out_prefix}
            return sim_results[self.job.name]

    monkeypatch.setattr(pipeline, "stage_submitter", lambda pool: Done)
    r = SimpleNamespace(job=job, store=None, params=SimpleNamespace(train_pool=None, max_parallel=2),
                        kind=SimpleNamespace(train_group=None))
    teacher = {"weights_sha256": "w-teacher", "model_prefix": "stages/t/model"}
    members = progressive_plan()
    done, reused = pipeline._run_members(r, members, {"manifest_sha256": "d"}, teacher, {"weights_sha256": "i"})
    assert reused == {"progressive-32"}
    assert jobs["progressive-32"]["teacher"] is teacher and jobs["consistency"]["teacher"] is teacher
    assert jobs["progressive-16"]["teacher"] == stored["stages/progressive-32-w-teacher"]
    assert done["progressive-16"]["prefix"] == "stages/progressive-16-w-p32"
    assert done["progressive-8"]["prefix"] == "stages/progressive-8-w-progressive-16"
    assert all(j["init"] == {"weights_sha256": "i"} for j in jobs.values())
    # every model is evaluated against the run's teacher, also those that learn from a member
    assert jobs["progressive-16"]["eval_teacher"] is teacher and jobs["consistency"]["eval_teacher"] is None
    assert list(done) == [m.name for m in members]


# --------------------------------------------------------------------------------------------------------------
# files written by a kind's evaluate
# --------------------------------------------------------------------------------------------------------------


class _FakeCfg(BaseModel):
    profile: str = "smoke"


@pytest.fixture
def fake_kind(monkeypatch):
    """A test kind, registered for the test only."""

    def make(name: str, evaluate, **extras) -> Kind:
        kind = _kind(name, evaluate, **extras)
        monkeypatch.setitem(kinds._KINDS, name, kind)
        return kind

    return make


def _kind(name: str, evaluate, **extras) -> Kind:
    return Kind(
        name=name, flow=f"distill-{name}", description="test kind", config_model=_FakeCfg, profiles=("smoke",),
        load_profile=lambda profile, overrides=None: _FakeCfg(), prepare=lambda cfg, progress=False: {},
        plan=lambda cfg: [], fingerprint=lambda *a, **k: {}, train=lambda *a, **k: {}, evaluate=evaluate,
        speed=lambda *a, **k: {}, weights_sha256=lambda d: "w", load_model=lambda d: None,
        selection=Metric("val_fid", "min"), test_metric=Metric("fid", "min", "FID"),
        columns=(Column("model", "model", "str"), Column("FID", "fid", "f2")), extras=extras,
    )


def _evaluate_writing_grids(model_dir, data_dir, cfg, *, split, teacher_dir, speed, out_path):
    out_path = Path(out_path)
    for s in (1, 4):
        (out_path.parent / f"grid_s{s}.png").write_bytes(f"png {s}".encode())
    m = {"fid": 12.5, "fid_s1": 30.0, "note": "text", "files": {"grid_s1": "grid_s1.png", "grid_s4": "grid_s4.png",
                                                                "grid_s8": "grid_s8.png"}}
    out_path.write_text(json.dumps(m))
    return m


@pytest.fixture
def stage_env(tmp_path, monkeypatch):
    from tasks import lab

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DISTILL_WORK_DIR", raising=False)
    store = FileStore(tmp_path / "store")
    for prefix in ("data/d1", "stages/m/model"):
        src = tmp_path / "src" / prefix
        src.mkdir(parents=True)
        (src / "x.txt").write_text(prefix)
        store.put_dir(src, prefix)
    calls: dict[str, list] = {"metrics": [], "artifacts": []}

    class FakeTracker:
        def __init__(self, uri, experiment):
            pass

        def log_metrics(self, run_id, metrics, step=None):
            calls["metrics"].append((run_id, dict(metrics)))

        def log_artifact(self, *args, **kwargs):
            a = inspect.signature(Tracker.log_artifact).bind(None, *args, **kwargs).arguments
            calls["artifacts"].append((a["run_id"], Path(a["local_path"]).name, a.get("artifact_path")))

    monkeypatch.setattr(lab, "Tracker", FakeTracker)
    return SimpleNamespace(store=store, calls=calls, lab=lab, tmp=tmp_path)


def _job(env, kind_name: str):
    return env.lab.TrainJob(kind=kind_name, role="student", name="s1", lab={}, data_key="data/d1",
                            out_prefix="stages/abc", store_url=env.store.url, tracking_uri="http://unused",
                            experiment="e")


def test_evaluate_uploads_the_files_and_names_them_by_store_key(stage_env, fake_kind):
    env = stage_env
    fake_kind("fakegrid", _evaluate_writing_grids)
    m = env.lab.evaluate_stage.fn(_job(env, "fakegrid"), {"model_prefix": "stages/m/model", "mlflow_run_id": "run-1",
                                                          "train_seconds": 1.0})
    # grid_s8 was named but not written: left out, the rest is kept
    assert m["files"] == {"grid_s1": "stages/abc/eval/grid_s1.png", "grid_s4": "stages/abc/eval/grid_s4.png"}
    assert env.store.get_bytes("stages/abc/eval/grid_s1.png") == b"png 1"
    assert env.store.get_bytes("stages/abc/eval/grid_s4.png") == b"png 4"
    assert json.loads(env.store.get_bytes("stages/abc/eval_test.json"))["fid"] == 12.5
    assert sorted(env.calls["artifacts"]) == [("run-1", "grid_s1.png", "eval"), ("run-1", "grid_s4.png", "eval")]
    ((run, logged),) = env.calls["metrics"]
    assert run == "run-1" and logged["fid"] == 12.5 and logged["fid_s1"] == 30.0
    assert "files" not in logged and "note" not in logged  # only numbers become MLflow metrics
    # the evaluation's files stay out of the stage folder's top level (which upload_model publishes as the model)
    stage = env.lab.stage_dir("stages/abc")
    assert not list(stage.glob("*.png")) and (stage / "eval" / "grid_s1.png").is_file()


def test_evaluate_without_files_is_unchanged(stage_env, fake_kind):
    env = stage_env

    def plain(model_dir, data_dir, cfg, *, split, teacher_dir, speed, out_path):
        Path(out_path).write_text("{}")
        return {"fid": 3.0, "samples": ["a"]}

    fake_kind("fakeplain", plain)
    m = env.lab.evaluate_stage.fn(_job(env, "fakeplain"), {"model_prefix": "stages/m/model", "mlflow_run_id": "r"})
    assert m == {"fid": 3.0, "samples": ["a"]}
    assert not env.calls["artifacts"] and not env.store.list("stages/abc/eval/")


def test_evaluate_compares_with_the_runs_teacher(stage_env, fake_kind):
    """A member that learns from another member (teacher_prefix) is evaluated against eval_teacher_prefix."""
    env = stage_env
    seen = []

    def record(model_dir, data_dir, cfg, *, split, teacher_dir, speed, out_path):
        seen.append((Path(teacher_dir) / "who.txt").read_text() if teacher_dir else None)
        Path(out_path).write_text("{}")
        return {"fid": 1.0}

    for prefix in ("stages/round/model", "stages/t/model"):
        src = env.tmp / "models" / prefix
        src.mkdir(parents=True)
        (src / "who.txt").write_text(prefix)
        env.store.put_dir(src, prefix)
    fake_kind("fakeagainst", record)
    job = _job(env, "fakeagainst").model_copy(update={"teacher_prefix": "stages/round/model"})
    env.lab.evaluate_stage.fn(job, {"model_prefix": "stages/m/model"})
    env.lab.evaluate_stage.fn(job.model_copy(update={"eval_teacher_prefix": "stages/t/model"}),
                              {"model_prefix": "stages/m/model"})
    assert seen == ["stages/round/model", "stages/t/model"]


def test_evaluate_refuses_a_file_outside_its_folder(stage_env, fake_kind):
    env = stage_env

    def escaping(model_dir, data_dir, cfg, *, split, teacher_dir, speed, out_path):
        Path(out_path).write_text("{}")
        return {"fid": 3.0, "files": {"x": "../../secret.png"}}

    fake_kind("fakeescape", escaping)
    with pytest.raises(ValueError, match="outside"):
        env.lab.evaluate_stage.fn(_job(env, "fakeescape"), {"model_prefix": "stages/m/model", "mlflow_run_id": "r"})


# --------------------------------------------------------------------------------------------------------------
# registration of diffusers folders
# --------------------------------------------------------------------------------------------------------------


def test_diffusers_folders_are_registered_as_files(tmp_path, monkeypatch):
    from tasks import registry

    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    logged = []

    class FakeTracker:
        def __init__(self, uri, experiment):
            pass

        def log_model_folder(self, *args, **kwargs):
            a = inspect.signature(Tracker.log_model_folder).bind(None, *args, **kwargs)  # the real signature
            a.apply_defaults()
            a = a.arguments
            logged.append((a["registered_name"], a["flavor"], a["task"], Path(a["folder"])))
            return {"name": a["registered_name"], "version": "1", "reused": False}

        def log_model(self, *args, **kwargs):
            raise AssertionError("a diffusers folder is not logged with the pytorch flavour")

        def promote(self, *args, **kwargs):
            return {"promoted": False, "reason": "fake"}

    kind = SimpleNamespace(name="diffusion", description="fake", selection=Metric("val_fid", "min"), test_metric=Metric("fid", "min"),
                           extras={"model_format": "diffusers"})
    monkeypatch.setattr(registry, "Tracker", FakeTracker)
    monkeypatch.setattr(registry, "get_kind", lambda name: kind)
    monkeypatch.setattr(registry, "fetch_dir", lambda store, prefix, what: folder)
    results = {role: {"val_fid": v, "test": {"fid": v}, "model_prefix": f"stages/{role}/model",
                      "mlflow_run_id": f"run-{role}"} for role, v in (("teacher", 5.0), ("baseline", 40.0),
                                                                       ("student", 20.0))}
    out = registry.register_models.fn("diffusion", results, store_url=str(tmp_path / "store"), tracking_uri="x",
                                      experiment="exp", data_key="data/x", lineage={}, margin=0.0)
    assert logged == [(f"exp-{role}", "files", "unconditional-image-generation", folder)
                      for role in ("teacher", "baseline", "student")]
    assert out["versions"]["student"]["version"] == "1"


# --------------------------------------------------------------------------------------------------------------
# report: quality against sampling steps, image grids
# --------------------------------------------------------------------------------------------------------------

CURVE = {"steps": [1, 2, 4, 8], "key": "fid_s{}", "label": "FID (lower is better)", "x_label": "sampling steps",
         "log_x": True}


def _diffusion_results() -> dict[str, dict]:
    return {
        "teacher": {"role": "teacher", "val_fid": 5.0, "test": {"fid": 5.5, "steps": 50}},
        "baseline": {"role": "baseline", "val_fid": 40.0,
                     "test": {"fid": 41.0, "fid_s1": 90.0, "fid_s2": 70.0, "fid_s4": 45.0, "fid_s8": 41.0}},
        "progressive-4": {"role": "student", "main": True, "val_fid": 12.0,
                          "test": {"fid": 12.0, "fid_s1": 30.0, "fid_s2": float("nan"), "fid_s4": 12.0}},
        "consistency": {"role": "student", "val_fid": 15.0, "test": {"fid": 15.0, "fid_s1": 18.0, "fid_s2": 16.0}},
    }


def test_curve_points_skip_missing_and_nan():
    from tasks.report import curve_points

    pts = curve_points(CURVE, _diffusion_results())
    assert pts == {"baseline": [(1, 90.0), (2, 70.0), (4, 45.0), (8, 41.0)],
                   "progressive-4": [(1, 30.0), (4, 12.0)], "consistency": [(1, 18.0), (2, 16.0)]}


def test_report_draws_quality_vs_steps_and_shows_grids(tmp_path, monkeypatch, fake_kind):
    from tasks import report

    kind = fake_kind("fakereport", _evaluate_writing_grids, curve=CURVE)
    drawn = []
    real_plt = report._plt()

    class Spy:  # records the lines drawn on the axes, then draws them for real
        def __getattr__(self, name):
            return getattr(real_plt, name)

        def subplots(self, *a, **k):
            fig, ax = real_plt.subplots(*a, **k)
            orig_plot, orig_h = ax.plot, ax.axhline
            ax.plot = lambda xs, ys, style, label=None: (drawn.append(("line", label, list(xs), list(ys))),
                                                         orig_plot(xs, ys, style, label=label))[1]
            ax.axhline = lambda y, **kw: (drawn.append(("hline", kw.get("label"), y, kw.get("ls"))), orig_h(y, **kw))[1]
            return fig, ax

    monkeypatch.setattr(report, "_plt", lambda: Spy())
    store = FileStore(tmp_path / "store")
    results = _diffusion_results()
    for name in ("teacher", "baseline", "progressive-4"):
        store.put_bytes(b"\x89PNG fake " + name.encode(), f"stages/{name}/eval/grid_s1.png")
        results[name]["test"]["files"] = {"grid_s1": f"stages/{name}/eval/grid_s1.png"}
    results["progressive-4"]["test"]["files"]["grid_s4"] = "stages/progressive-4/eval/grid_s4.png"  # not stored
    out_dir = tmp_path / "report"
    samples = report.fetch_sample_files(store.get_file, results, out_dir)
    rep = report.build_report(kind, results, None, [], out_dir, samples=samples)

    png = out_dir / "quality_vs_steps.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in rep["files"]
    curve_lines = [d for d in drawn if d[0] == "line" and d[2] and d[2][0] == 1]
    assert [(d[1], d[2], d[3]) for d in curve_lines] == [
        ("baseline", [1, 2, 4, 8], [90.0, 70.0, 45.0, 41.0]), ("progressive-4", [1, 4], [30.0, 12.0]),
        ("consistency", [1, 2], [18.0, 16.0])]
    assert ("hline", "teacher (50 steps)", 5.5, "--") in drawn
    md = rep["markdown"]
    assert "![quality vs steps](quality_vs_steps.png)" in md and "quality_vs_steps.png" in md.splitlines()[-1]

    assert list(samples) == ["teacher", "baseline", "progressive-4"]  # teacher, baseline, students
    assert samples["progressive-4"]["grid_s4"] is None
    section = md[md.index("## Samples (same noise for every model)"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "![" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "baseline", "progressive-4"]
    assert "![teacher grid_s1](samples/teacher/grid_s1.png)" in rows[0]
    assert (out_dir / "samples" / "baseline" / "grid_s1.png").read_bytes() == b"\x89PNG fake baseline"
    assert rows[2].rstrip().endswith("| - |")  # the missing grid is a dash plus a note, not a failure
    assert "progressive-4/grid_s4" in section


def test_report_without_curve_or_files_has_no_new_sections(tmp_path, fake_kind):
    from tasks import report

    kind = fake_kind("fakeplainreport", _evaluate_writing_grids)
    rep = report.build_report(kind, _diffusion_results(), None, ["a note"], tmp_path / "r",
                              samples=report.fetch_sample_files(lambda k, p: None, _diffusion_results(), tmp_path))
    assert not (tmp_path / "r" / "quality_vs_steps.png").exists()
    assert "Samples (same noise" not in rep["markdown"] and "quality" not in rep["markdown"]
    assert rep["files"] == [str(tmp_path / "r" / "report.md")]


def test_teacher_line_without_step_count(tmp_path, fake_kind):
    from tasks import report

    kind = fake_kind("fakereport2", _evaluate_writing_grids, curve={**CURVE, "log_x": False})
    results = _diffusion_results()
    del results["teacher"]["test"]["steps"]
    results["teacher"]["test"]["fid"] = math.nan
    assert report.plot_quality_vs_steps(kind, results, tmp_path / "q.png") == tmp_path / "q.png"


def test_run_members_trains_a_group_in_one_stage_and_reuses_its_completed_members(monkeypatch):
    """Members of one group: those completed earlier (under the key they would have alone) are reused, the rest
    train together in one group job; the group's results come back under each member's name, in the plan's order."""
    stored = {"stages/baseline-0": {"weights_sha256": "w-b", "model_prefix": "stages/baseline-0/model"}}
    monkeypatch.setattr(pipeline, "stage_result", lambda store, prefix: stored.get(prefix))
    submitted = []

    class Done:
        def __init__(self, job):
            submitted.append(job)
            self.job = job

        def done(self):
            return True

        def result(self):
            if self.job.members:
                return {"members": {m["name"]: {"prefix": f"g/{m['name']}"} for m in self.job.members}}
            return {"prefix": self.job.name}

    def job(role, name, data, *, kd=None, teacher=None, init=None, eval_teacher=None, seed=None):
        return SimpleNamespace(name=name, out_prefix=f"stages/{name}-{seed}", members=None)

    def group_job(name, members, data, teacher):
        return SimpleNamespace(name=name, members=[{"name": m.name, "seed": m.seed} for m in members])

    monkeypatch.setattr(pipeline, "stage_submitter", lambda pool: Done)
    r = SimpleNamespace(job=job, group_job=group_job, store=None, kind=SimpleNamespace(train_group=lambda: None),
                        params=SimpleNamespace(train_pool=None, max_parallel=2))
    members = [Member("baseline", "baseline", seed=0, replica_of="baseline", group="lockstep"),
               Member("student", "student", kd={"temperature": 4.0}, seed=0, replica_of="student", group="lockstep"),
               Member("student", "alone", kd={"temperature": 2.0}),
               Member("baseline", "baseline-s1", seed=1, replica_of="baseline", group="lockstep")]
    done, reused = pipeline._run_members(r, members, {"manifest_sha256": "d"}, {"weights_sha256": "t"}, None)
    assert reused == {"baseline"}
    groups = [j for j in submitted if j.members]
    assert len(groups) == 1 and [m["name"] for m in groups[0].members] == ["student", "baseline-s1"]
    assert [j.name for j in submitted if not j.members] == ["alone"]
    assert list(done) == ["baseline", "student", "alone", "baseline-s1"]
    assert done["baseline"]["reused"] is True and done["student"] == {"prefix": "g/student", "reused": False}
    with pytest.raises(ValueError, match="cannot train in group"):
        pipeline._run_members(r, [Member("student", "x", group="g", teacher="y"), Member("student", "y")],
                              {"manifest_sha256": "d"}, {"weights_sha256": "t"}, None)
