"""Concurrent promotion: real processes promote candidates of one registered model at the same time against a
real ``mlflow server`` (sqlite backend, local artifacts), under the object store's cross-process lock."""

from __future__ import annotations

import inspect
import json
import os
import queue
import random
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from tasks.storage import FileStore  # noqa: E402
from tasks.tracking import CHAMPION, PROMOTION_DECISION_TAG, PROMOTION_PENDING_TAG, Tracker  # noqa: E402
from tests.servers import _no_proxy_env, mlflow_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKERS = 3
ROUNDS = 10
BASELINE, MARGIN = 0.60, 0.02

# Per round the candidates are image-kind (val_acc, higher wins) or LM-kind (val_ppl, lower wins).
KINDS = {"max": ("val_acc", BASELINE, MARGIN, [0.70, 0.74, 0.78, 0.82, 0.86]),
         "min": ("val_ppl", 40.0, 0.5, [21.5, 24.0, 27.25, 30.0, 33.5])}

# One long-lived process per candidate: per command it registers a version of the model (tag: the gate's
# metric), then promotes it under the store's promotion lock; it answers with one JSON line marked "@@" (MLflow prints to
# stdout too).  The tracking URI carries credentials (the server ignores them): they must reach MLflow
# through its variables, never be shown or stored.
_WORKER = textwrap.dedent("""
    import functools, json, sys, time, traceback
    from tasks.storage import FileStore
    from tasks.tracking import Tracker

    tracker = Tracker(sys.argv[1], sys.argv[2])
    store = FileStore(sys.argv[3])
    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            name = cmd["name"]
            tracker._ensure_registered_model(name)
            run = tracker.start_parent("candidate", {}, {cmd["metric"]: cmd["value"]})
            mv = tracker.client.create_model_version(name, f"runs:/{run}/model", run_id=run,
                                                     tags={cmd["metric"]: repr(cmd["value"])})
            result = tracker.promote(name, mv.version, cmd["value"], cmd["baseline"], cmd["margin"],
                                     metric=cmd["metric"], direction=cmd["direction"],
                                     lock=functools.partial(store.lock, f"locks/promote/{name}"))
            tracker.end_run(run)
            out = {"ok": True, "version": str(mv.version), "done": time.time(), **result}
        except BaseException as e:
            out = {"ok": False, "error": traceback.format_exc()}
        print("@@" + json.dumps(out), flush=True)
""")


class _Worker:
    """A worker process and a thread collecting its "@@" answer lines."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env)
        self.answers: queue.Queue = queue.Queue()
        self.other_output: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.answers.put(json.loads(line[2:]))
            else:
                self.other_output.append(line)
        self.answers.put(None)

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float) -> dict:
        try:
            out = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker {self.proc.pid} gave no answer within {timeout}s") from None
        assert out is not None, f"worker {self.proc.pid} exited with {self.proc.wait(5)}"
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_pending(tracker: Tracker, name: str, workers: list[_Worker], timeout: float = 120) -> None:
    """Until every worker's candidate announced itself; none may answer while the test holds the lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        early = [w.answers.queue[0] for w in workers if w.answers.qsize()]
        assert not early, f"promoted without waiting for the lock: {early}"
        versions = tracker.client.search_model_versions(f"name = '{name}'")
        if sum(PROMOTION_PENDING_TAG in v.tags for v in versions) >= len(workers):
            return
        time.sleep(0.1)
    raise AssertionError(f"{len(workers)} candidates of {name} did not announce themselves within {timeout}s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("promotion")
    with mlflow_server(base / "mlflow", (base / "artifacts").as_uri(), {}) as srv:
        yield srv


def _start_workers(stack: ExitStack, url: str, experiment: str, store_root: Path) -> list[_Worker]:
    env = _no_proxy_env({**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"})
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    workers = []
    for _ in range(WORKERS):
        worker = _Worker([sys.executable, "-c", _WORKER, url, experiment, str(store_root)], env)
        stack.callback(worker.stop)
        workers.append(worker)
    for worker in workers:
        assert worker.answer(180) == {"ready": True}
    return workers


def _play_round(tracker: Tracker, workers: list[_Worker], store: FileStore, name: str, direction: str,
                values: list[float], held: bool) -> list[dict]:
    """Every worker registers and promotes one candidate of ``name`` at once; with ``held`` the test holds the
    promotion lock until all of them announced themselves."""
    with ExitStack() as hold:
        if held:
            hold.enter_context(store.lock(f"locks/promote/{name}"))
        metric, baseline, margin, _ = KINDS[direction]
        for worker, value in zip(workers, values):
            worker.send({"name": name, "metric": metric, "direction": direction, "value": value,
                         "baseline": baseline, "margin": margin})
        if held:
            _wait_pending(tracker, name, workers)
    results = [worker.answer(180) for worker in workers]
    assert all(r["ok"] for r in results), [r.get("error") for r in results]
    return results


def _check_round(tracker: Tracker, name: str, direction: str, results: list[dict], overlapped: bool) -> None:
    best = (max if direction == "max" else min)(results, key=lambda r: r["candidate"])
    assert all((r["metric"], r["direction"]) == (KINDS[direction][0], direction) for r in results), results
    champion = tracker.get_alias(name, CHAMPION)
    assert champion is not None and str(champion.version) == best["version"], results
    assert best["promoted"], best
    for r in results:
        tags = tracker.client.get_model_version(name, r["version"]).tags
        assert tags[PROMOTION_DECISION_TAG] == ("promoted" if r["promoted"] else "rejected"), r
        assert PROMOTION_PENDING_TAG not in tags
    if overlapped:
        assert [r["promoted"] for r in results].count(True) == 1, results
        for r in results:
            if r is not best:
                assert "stronger" in r["reason"] or "does not beat" in r["reason"], r


def test_concurrent_promotions_pick_the_strongest_exactly_once(server, tmp_path, monkeypatch):
    """Per round WORKERS processes register and promote candidates with different values at once, under the
    store's promotion lock (FileStore.lock): val_acc (higher wins) or, every other pair of rounds, val_ppl
    (direction "min": lower wins).  In even rounds the test holds the lock until every candidate
    has announced itself, so all of them overlap and the lock's (arbitrary) order decides who checks first;
    in odd rounds they race freely.  Every round: no error, the strongest is champion and reports promoted,
    each version's decision tag matches its report (no announcement is left); where all overlapped, exactly
    one reports promoted and the others say why."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    experiment = f"promo-{uuid.uuid4().hex[:8]}"
    url = server.url.replace("http://", "http://ci-user:ci%2Fpass@")
    tracker = Tracker(server.url, experiment)
    store = FileStore(tmp_path / "store")
    rng = random.Random(1234)
    started = time.monotonic()
    with ExitStack() as stack:
        workers = _start_workers(stack, url, experiment, store.root)
        orders, free_promoted = [], []
        for rnd in range(ROUNDS):
            name, held, direction = f"{experiment}-student-{rnd}", rnd % 2 == 0, ("max", "min")[rnd // 2 % 2]
            results = _play_round(tracker, workers, store, name, direction,
                                  rng.sample(KINDS[direction][3], WORKERS), held)
            _check_round(tracker, name, direction, results, overlapped=held)
            if held:  # ranks, strongest first = 0
                ranked = sorted(r["candidate"] for r in results)[:: -1 if direction == "max" else 1]
                orders.append([ranked.index(r["candidate"]) for r in sorted(results, key=lambda r: r["done"])])
            else:
                free_promoted.append([r["promoted"] for r in results].count(True))
        print(f"{ROUNDS} rounds x {WORKERS} processes in {time.monotonic() - started:.1f}s; decision orders "
              f"(rank, 0 = strongest) where all overlapped: {orders}; promoted per free-race round: {free_promoted}")
    assert any(order != sorted(order) for order in orders)  # a weaker one decided first

    # the credentials of the workers' URI were used by MLflow but never printed or stored
    output = [line for w in workers for line in w.other_output]
    assert any("View run" in line for line in output)  # MLflow prints run URLs
    for text in output:
        assert "ci%2Fpass" not in text and "ci/pass" not in text and "ci-user" not in text, text
    for path in Path(server.workdir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"ci%2Fpass" not in data and b"ci/pass" not in data, path


@pytest.mark.parametrize("metric,direction,model_format", [("val_acc", "max", "pytorch"), ("val_ppl", "min", "hf")])
def test_register_models_promotes_under_the_store_lock(metric, direction, model_format, tmp_path, monkeypatch):
    """tasks.registry.register_models calls Tracker's real signatures (log_model / log_model_folder, promote),
    gates on the kind's selection metric in its direction and hands promote the store's lock of the student."""
    from types import SimpleNamespace

    from distill.kinds import Metric
    from tasks import registry
    from tasks.storage import LockTimeout

    store = FileStore(tmp_path / "store")
    seen: dict = {"logged": []}

    def bind(method, *args, **kwargs):
        call = inspect.signature(getattr(Tracker, method)).bind(None, *args, **kwargs)  # the real signature
        call.apply_defaults()
        return call.arguments

    class FakeTracker:
        def __init__(self, uri, experiment):
            pass

        def _version(self, name, run_id):
            return {"name": name, "version": "3", "model_uri": f"models:/{name}/3", "run_id": run_id, "reused": False}

        def log_model(self, *args, **kwargs):
            a = bind("log_model", *args, **kwargs)
            seen["logged"].append(("log_model", a["registered_name"]))
            return self._version(a["registered_name"], a["run_id"])

        def log_model_folder(self, *args, **kwargs):
            a = bind("log_model_folder", *args, **kwargs)
            seen["logged"].append(("log_model_folder", a["registered_name"]))
            return self._version(a["registered_name"], a["run_id"])

        def promote(self, *args, **kwargs):
            a = bind("promote", *args, **kwargs)
            name, lock = a["name"], a["lock"]
            seen.update({k: a[k] for k in ("name", "version", "metric", "direction", "candidate", "baseline")})
            with (lock() if callable(lock) and not hasattr(lock, "__enter__") else lock):
                with pytest.raises(LockTimeout):  # held: nobody else gets the promotion lock of this model
                    with store.lock(f"locks/promote/{name}", timeout=0.3):
                        pass
            with store.lock(f"locks/promote/{name}", timeout=5):  # released afterwards
                pass
            return {"promoted": True, "reason": "fake"}

    kind = SimpleNamespace(
        name="fake", description="a fake kind", selection=Metric(metric, direction), test_metric=Metric("test_" + metric[4:], direction),
        extras={"model_format": model_format, "input_example": lambda model_dir, data_dir: None},
        load_model=lambda path: object(),
    )
    monkeypatch.setattr(registry, "Tracker", FakeTracker)
    monkeypatch.setattr(registry, "get_kind", lambda name: kind)
    monkeypatch.setattr(registry, "fetch_dir", lambda store, prefix, kind: tmp_path)
    results = {role: {metric: value, "test": {"test_" + metric[4:]: value}, "model_prefix": f"runs/{role}/model",
                      "mlflow_run_id": f"run-{role}"}
               for role, value in (("teacher", 0.9), ("baseline", 0.6), ("student", 0.7))}
    out = registry.register_models.fn(
        "fake", results, store_url=store.url, tracking_uri="unused", experiment="exp", data_key="data/x",
        lineage={}, margin=0.0,
    )
    method = "log_model_folder" if model_format == "hf" else "log_model"
    assert seen == {"name": "exp-student", "version": "3", "metric": metric, "direction": direction,
                    "candidate": 0.7, "baseline": 0.6,
                    "logged": [(method, f"exp-{role}") for role in ("teacher", "baseline", "student")]}
    assert out["promotion"]["promoted"]
