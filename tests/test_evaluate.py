import re

import pytest
import torch

from distill.image.config import EvalConfig, LabConfig, load_profile
from distill.image.evaluate import SPEED_KEYS, evaluate, expected_calibration_error, speed_metrics, throughput_batch
from distill.image.models import build_model

STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_ece_limiting_cases():
    labels = torch.tensor([0, 1, 0, 1])
    # confident and right: ECE 0
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    # confident (0.9) and always wrong: ECE 0.9
    wrong = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])
    assert expected_calibration_error(wrong, labels) == pytest.approx(0.9)
    # 60 % confident, right 3 times out of 5: calibrated
    p = torch.tensor([[0.6, 0.4]] * 5)
    assert expected_calibration_error(p, torch.tensor([0, 0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-6)


class Fixed(torch.nn.Module):
    """Predicts the class stored in the red channel's first pixel (test double)."""

    def __init__(self, n=3):
        super().__init__()
        self.n = n
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = (x[:, 0, 0, 0] > 0).long()  # normalised > 0 <=> raw pixel above the mean
        return torch.nn.functional.one_hot(c, self.n).float() * 10 + self.w


def test_evaluate_accuracy_per_class_agreement_and_speed():
    x = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    x[:3, 0, 0, 0] = 255  # predicted class 1
    y = torch.tensor([1, 1, 0, 0, 0, 2])
    m = evaluate(Fixed(), x, y, EvalConfig(latency_runs=2, throughput_runs=1, throughput_batch=4, warmup_runs=0),
                 stats=STATS, classes=["a", "b", "c"], teacher=Fixed(), device="cpu")
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 0.0}
    assert m["acc_a"] == pytest.approx(2 / 3)
    assert m["agreement"] == 1.0
    assert m["params"] == 1 and m["size_mb"] > 0
    assert m["latency_ms_b1"] > 0 and m["throughput"] > 0
    assert m["throughput_batch"] == 4 and m["speed_device"] == "cpu"
    assert not any(re.match(r"throughput_b\d", k) or k.endswith("_cpu") for k in m)  # no batch in a key name
    assert set(k for k in m if k.startswith(("latency", "throughput", "speed"))) <= set(SPEED_KEYS)


def test_evaluate_normalises_with_the_given_stats():
    x = torch.full((4, 3, 32, 32), 100, dtype=torch.uint8)  # 100/255 = 0.39
    y = torch.ones(4, dtype=torch.long)
    no_speed = EvalConfig(speed=False)
    # below a mean of 0.5 -> class 0; above a mean of 0.3 -> class 1
    assert evaluate(Fixed(), x, y, no_speed, stats=STATS, device="cpu")["accuracy"] == 0.0
    assert evaluate(Fixed(), x, y, no_speed, stats=((0.3,) * 3, (0.25,) * 3), device="cpu")["accuracy"] == 1.0
    # the teacher is fed with its own statistics
    m = evaluate(Fixed(), x, y, no_speed, stats=STATS, teacher=Fixed(), teacher_stats=((0.3,) * 3, (0.2,) * 3),
                 device="cpu")
    assert m["agreement"] == 0.0


def test_throughput_batch_follows_the_student_batch_unless_set():
    assert EvalConfig().throughput_batch is None
    assert throughput_batch(EvalConfig(), 64) == 64
    assert throughput_batch(EvalConfig(throughput_batch=8), 64) == 8
    assert throughput_batch(EvalConfig()) == LabConfig().student_train.batch_size  # no LabConfig: the default one
    cfg = load_profile("smoke", {"student_train": {"batch_size": 48}})
    assert cfg.resolved_eval().throughput_batch == 48
    assert load_profile("smoke", {"eval": {"throughput_batch": 7}}).resolved_eval().throughput_batch == 7


def test_speed_metrics_alone():
    model = build_model("resnet_small", 10, width=4, depth=1)
    m = speed_metrics(model, EvalConfig(latency_runs=2, throughput_runs=1, warmup_runs=0), batch=3,
                      image_shape=(3, 16, 16))
    assert set(m) == set(SPEED_KEYS[:4]) | ({"latency_ms_b1_cuda", "throughput_cuda"} if torch.cuda.is_available() else set())
    assert m["throughput_batch"] == 3 and m["speed_device"] == "cpu" and m["latency_ms_b1"] > 0 and m["throughput"] > 0


def test_evaluate_real_model_size():
    model = build_model("resnet_small", 10, width=4)
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    m = evaluate(model, x, torch.zeros(8, dtype=torch.long), EvalConfig(speed=False), stats=STATS, device="cpu")
    assert not any(k.startswith(("latency", "throughput", "speed")) for k in m)
    n = sum(p.numel() for p in model.parameters())
    assert m["params"] == n and m["size_mb"] * 1e6 > 4 * n  # fp32 weights plus BatchNorm buffers
