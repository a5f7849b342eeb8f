import pytest
import torch

from distill.image.config import EvalConfig
from distill.image.evaluate import evaluate, expected_calibration_error
from distill.image.models import build_model


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
                 classes=["a", "b", "c"], teacher=Fixed(), device="cpu")
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 0.0}
    assert m["acc_a"] == pytest.approx(2 / 3)
    assert m["agreement"] == 1.0
    assert m["params"] == 1 and m["size_mb"] > 0
    assert m["latency_ms_b1_cpu"] > 0 and m["throughput_b4_cpu"] > 0


def test_evaluate_real_model_size():
    model = build_model("resnet_small", 10, width=4)
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    m = evaluate(model, x, torch.zeros(8, dtype=torch.long), EvalConfig(speed=False), device="cpu")
    assert "latency_ms_b1_cpu" not in m
    n = sum(p.numel() for p in model.parameters())
    assert m["params"] == n and m["size_mb"] * 1e6 > 4 * n  # fp32 weights plus BatchNorm buffers
