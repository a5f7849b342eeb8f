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
    for key in ("accuracy", "loss", "ece", "agreement", "params", "size_mb", "latency_ms_b1_cpu", "throughput_b8_cpu"):
        assert key in metrics, key
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


def test_student_without_teacher_is_rejected(prepared):
    tmp, src = prepared
    with pytest.raises(ValueError, match="teacher_dir"):
        main(["stage", "train", "--role", "student", "--data", str(tmp), "--out", str(tmp / "x"), *tiny_args(tmp / "cache")])


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
