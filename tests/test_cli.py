"""Whole entry points with tiny configs (litgpt-style smoke tests): the stage commands end to end on CPU."""

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

from _imagefolder import make_imagefolder
from distill.cli import main

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(cache: Path, epochs: int = 2) -> list[str]:
    return [
        "--set", f"data.cache_dir={cache}", "--set", "data.val_size=30", "--set", "data.train_subset=90",
        "--set", "data.test_subset=30",
        "--set", 'teacher={"name": "resnet_small", "kwargs": {"width": 8, "depth": 1}}',
        "--set", 'student={"name": "resnet_small", "kwargs": {"width": 4, "depth": 1}}',
        "--set", f"teacher_train.epochs={epochs}", "--set", "teacher_train.batch_size=30",
        "--set", f"student_train.epochs={epochs}", "--set", "student_train.batch_size=30",
        "--set", "eval.latency_runs=2", "--set", "eval.throughput_runs=1", "--set", "eval.throughput_batch=8",
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    src = make_imagefolder(tmp / "src", n_train=40, n_test=10, as_tarballs=True)
    return tmp, src


def test_stage_commands_end_to_end(prepared, capsys):
    tmp, src = prepared
    args = tiny_args(tmp / "cache")
    assert main(["stage", "prepare", "--source", str(src), *args]) == 0
    data = json.loads(capsys.readouterr().out)["dir"]
    assert main(["stage", "train", "--role", "teacher", "--data", data, "--out", str(tmp / "t"), *args]) == 0
    assert main(["stage", "train", "--role", "baseline", "--data", data, "--out", str(tmp / "b"), *args]) == 0
    assert main(["stage", "train", "--role", "student", "--data", data, "--out", str(tmp / "s"), "--teacher", str(tmp / "t"),
                 "-T", "2", "--alpha", "0.5", *args]) == 0
    capsys.readouterr()
    assert main(["stage", "evaluate", "--model", str(tmp / "s"), "--data", data, "--teacher", str(tmp / "t"), *args]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("test_accuracy", "test_loss", "test_ece", "agreement", "params", "size_mb", "latency_ms_b1", "throughput"):
        assert key in metrics, key
    assert metrics["throughput_batch"] == 8 and metrics["speed_device"] == "cpu"
    for d in ("t", "b", "s"):
        for f in ("model.safetensors", "config.json", "metrics.json", "history.json"):
            assert (tmp / d / f).exists()
    cfg = json.loads((tmp / "s" / "config.json").read_text())
    assert cfg["kd"] == {"loss": "kd", "temperature": 2.0, "alpha": 0.5}
    assert cfg["teacher_weights_sha256"] == json.loads((tmp / "t" / "config.json").read_text())["weights_sha256"]
    per_class = json.loads((tmp / "s" / "eval_test.json").read_text())["per_class_accuracy"]
    assert set(per_class) == {"cat", "dog", "frog"}


def test_invalid_config_fails_before_compute_naming_the_field(tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["stage", "train", "--role", "teacher", "--data", str(tmp_path), "--out", str(out), "--set", "kd.temperature=0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "kd.temperature" in err and "greater than 0" in err
    assert not out.exists()
    assert main(["config", "--profile", "nope"]) == 2


def _one_line_errors(err: str, n: int = 1) -> list[str]:
    lines = err.strip().splitlines()
    assert len(lines) == n and all(line.startswith("distill: ") for line in lines), err
    assert "Traceback" not in err
    return lines


def test_student_without_teacher_is_rejected(tmp_path, capsys, monkeypatch):
    """Refused in argument handling: exit 2, one line, before the config is built or any stage runs."""
    from distill.image import stages

    monkeypatch.setattr(stages, "train", lambda *a, **k: pytest.fail("a stage ran"))
    rc = main(["stage", "train", "--role", "student", "--data", str(tmp_path), "--out", str(tmp_path / "x"),
               *tiny_args(tmp_path / "cache")])
    assert rc == 2
    assert "--teacher" in _one_line_errors(capsys.readouterr().err)[0]
    assert not (tmp_path / "x").exists()
    assert main(["stage", "train", "--role", "teacher", "-T", "2", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--role student" in _one_line_errors(capsys.readouterr().err)[0]


def test_version(capsys):
    from distill import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"distill {__version__}"


@pytest.mark.parametrize(
    "argv,needle,n",
    [
        (["config", "--set", "kd.temperature=Infinity"], "kd.temperature", 1),
        (["config", "--set", "kd.temperature=1e-300", "--set", "student_train.lr=1e999"], "student_train.lr", 2),
        (["config", "--set", "sweep.temperatures=[4, 8, 8]"], "sweep.temperatures", 1),
        (["config", "--set", "a.b=3", "--set", "a.b.c=1"], "a.b", 1),
        (["config", "--set", "a=1", "--set", "a.b=2"], "'a'", 1),
        (["config", "--set", "kd..alpha=1"], "kd..alpha", 1),
        (["config", "--bogus"], "--bogus", 1),
        (["stage", "train", "--data", "x"], "--role", 1),
        (["stage", "train", "--role", "student", "--teacher", "t", "--data", "x", "--out", "y", "-T", "inf"], "kd.temperature", 1),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, needle, n, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_line_errors(err, n)
    assert needle in err, err


def test_stage_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from distill.image import stages
    from distill.checkpoint import CheckpointError, CheckpointMismatch
    from distill.image.stages import ModelLoadError

    # a folder that is no prepared data set (DataError)
    assert main(["stage", "train", "--role", "teacher", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line_errors(capsys.readouterr().err)
    for exc in (CheckpointMismatch("out holds another run\nstart fresh with --no-resume"), CheckpointError("bad checkpoint"),
                ValueError("teacher_train.batch_size (512) is larger than the training split (90 images)")):
        def boom(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(stages, "train", boom)
        assert main(["stage", "train", "--role", "teacher", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
        line = _one_line_errors(capsys.readouterr().err)[0]
        assert str(exc).split()[0] in line
    monkeypatch.setattr(stages, "evaluate", lambda *a, **k: (_ for _ in ()).throw(ModelLoadError("model folder m: config.json missing")))
    assert main(["stage", "evaluate", "--model", "m", "--data", str(tmp_path)]) == 2
    assert "config.json missing" in _one_line_errors(capsys.readouterr().err)[0]


@pytest.fixture
def fake_flow(monkeypatch, tmp_path):
    """flows.cifar replaced by a recorder: ``distill run`` without Prefect."""
    import types

    calls = []
    fake = types.ModuleType("flows.cifar")
    fake.run_local = lambda **kw: calls.append(kw) or {}
    monkeypatch.setitem(sys.modules, "flows.cifar", fake)
    for var in ("PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_LOGGING_EXTRA_LOGGERS",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.setenv(var, os.environ.get(var, "x"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return calls


def test_run_passes_fresh_and_no_register(fake_flow):
    assert main(["run", "cifar", "--set", "kd.alpha=0.5"]) == 0
    assert "fresh" not in fake_flow[-1] and "register_models" not in fake_flow[-1]
    assert fake_flow[-1]["overrides"] == {"kd": {"alpha": 0.5}}
    assert main(["run", "cifar", "--fresh"]) == 0
    assert fake_flow[-1]["fresh"] is True and "register_models" not in fake_flow[-1]
    assert main(["run", "cifar", "--no-register"]) == 0
    assert fake_flow[-1]["register_models"] is False and "fresh" not in fake_flow[-1]


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--train-pool", "gpu pool"], "--train-pool"),
        (["--train-pool", "a/b"], "--train-pool"),
        (["--store", "http://example.com/store"], "--store"),
        (["--tracking-uri", "garbage:xyz"], "--tracking-uri"),
    ],
)
def test_run_refuses_bad_parameters_before_the_flow(argv, flag, fake_flow, capsys):
    assert main(["run", "cifar", *argv]) == 2
    assert flag in _one_line_errors(capsys.readouterr().err)[0]
    assert fake_flow == []


def test_killed_stage_command_resumes(prepared, capsys):
    """SIGKILL `distill stage train` after its first checkpoint; the re-run resumes and matches an uninterrupted run."""
    tmp, src = prepared
    args = tiny_args(tmp / "cache", epochs=5)
    assert main(["stage", "prepare", "--source", str(src), *args]) == 0
    data = json.loads(capsys.readouterr().out)["dir"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def run(out):
        return subprocess.Popen([sys.executable, "-m", "distill.cli", "-q", "stage", "train", "--role", "teacher", "--data", data,
                                 "--out", str(out), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref = run(tmp / "ref")
    assert ref.wait(600) == 0, ref.stdout.read()
    victim = run(tmp / "run")
    deadline = time.time() + 300
    while not (tmp / "run" / "checkpoints" / "LATEST").exists():
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp / "run" / "model.safetensors").exists(), "finished before the kill"
    again = run(tmp / "run")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    res = json.loads(out[out.index("{"):])
    assert res["resumed_from_epoch"] >= 1
    a, b = load_file(str(tmp / "ref" / "model.safetensors")), load_file(str(tmp / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
