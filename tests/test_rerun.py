"""Kill `distill run cifar` with SIGKILL mid-training, then run the same command again, as an operator would.

The re-run must resume the killed stage from its last checkpoint in the store (stage work is keyed by what
determines its result, not by flow run id), the embedded Prefect server of the killed run must be gone, and
the killed attempt's MLflow runs must end KILLED instead of RUNNING forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from _imagefolder import make_imagefolder  # noqa: E402
from servers import VENV_BIN  # noqa: E402

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _latest_epoch(store: Path) -> int:
    best = 0
    for pointer in store.glob("stages/*/checkpoints/LATEST"):
        try:
            best = max(best, int(pointer.read_text().split()[0].split("-")[1]))
        except (OSError, IndexError, ValueError):
            pass
    return best


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killed_distill_run_resumes_when_run_again(tmp_path):
    from mlflow import MlflowClient

    src = make_imagefolder(tmp_path / "src", n_train=60, n_test=5, as_tarballs=True)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "DISTILL_", "MLFLOW_TRACKING", "AWS_"))}
    env.update(DISTILL_HOME=str(home), PREFECT_SERVER_UI_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    sets = {
        "data.source": str(src), "data.cache_dir": str(tmp_path / "cache"), "data.val_size": 30,
        "data.train_subset": 150, "data.test_subset": 15,
        "teacher_train.epochs": 40, "teacher_train.batch_size": 30,
        "student_train.epochs": 2, "student_train.batch_size": 30,
        "sweep.temperatures": "[1.0, 4.0]",
        "eval.latency_runs": 2, "eval.throughput_runs": 1, "eval.warmup_runs": 1, "eval.throughput_batch": 16,
    }
    cmd = [str(VENV_BIN / "distill"), "run", "cifar", "--profile", "smoke"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    store = home / "store"

    # --- first attempt, SIGKILLed once the teacher has checkpointed a few epochs to the store ---------------
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 400
        while _latest_epoch(store) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint reached the store"
            time.sleep(0.02)
        server_files = list((home / "prefect").glob(f"embedded-server.{first.pid}.json"))
        assert server_files, "the run did not record its embedded server"
        recorded = json.loads(server_files[0].read_text())
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    killed_at = _latest_epoch(store)
    assert 3 <= killed_at < 40, "the teacher finished before it was killed"

    # the embedded Prefect server of the killed run dies with it
    pids = [recorded["watchdog_pid"], recorded["server_pid"]]
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "the embedded Prefect server outlived its parent"

    # --- second attempt: the same command resumes the teacher from the store ------------------------------
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    summaries = [json.loads(p.read_text()) for p in store.glob("runs/*/summary.json")]
    assert len(summaries) == 1
    summary = summaries[0]
    teacher = summary["results"]["teacher"]
    assert teacher["reused"] is False
    assert teacher["resumed_from_epoch"] >= killed_at - 1  # the store keeps the last checkpoints (+ best)

    # --- MLflow: the killed attempt's runs are KILLED, the new ones FINISHED, none stays RUNNING -----------
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("distill-cifar")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    old_parent = next(r for r in parents if r.info.status == "KILLED")
    old_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == old_parent.info.run_id]
    assert old_children and {r.info.status for r in old_children} == {"KILLED"}
