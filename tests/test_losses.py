"""Limiting cases of the distillation loss (TRL-style): these fail if the math is wrong."""

import pytest
import torch
import torch.nn.functional as F

from distill.image.losses import LOSSES, get_loss, kd_loss, soft_kl


def _logits(b=16, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale


def test_identical_logits_give_zero_soft_term():
    s = _logits()
    for t in (1.0, 4.0, 16.0):
        assert soft_kl(s, s.clone(), t).abs().item() < 1e-6
    y = torch.randint(0, 10, (16,))
    assert kd_loss(s, s.clone(), y, temperature=4.0, alpha=1.0).abs().item() < 1e-6


def test_alpha_zero_is_plain_cross_entropy():
    s, t = _logits(seed=1), _logits(seed=2)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(kd_loss(s, t, y, temperature=4.0, alpha=0.0), F.cross_entropy(s, y))


def test_soft_term_is_positive_for_different_logits():
    assert soft_kl(_logits(seed=1), _logits(seed=2), 4.0).item() > 0.01


def test_t_squared_keeps_soft_gradient_scale_across_temperatures():
    # For large T, d(T^2 KL)/ds -> (s - t)/C (zero-mean logits): independent of T. Without T^2 it falls as 1/T^2.
    s0, t = _logits(seed=4, scale=1.0), _logits(seed=5, scale=1.0)
    s0, t = s0 - s0.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    norms = {}
    for temp in (4.0, 8.0, 16.0, 32.0):
        s = s0.clone().requires_grad_(True)
        soft_kl(s, t, temp).backward()
        norms[temp] = s.grad.norm().item()
    ref = norms[32.0]
    for temp in (8.0, 16.0):
        assert abs(norms[temp] / ref - 1) < 0.05, norms
    # and the limit is the expected (s - t) / (C * B) (batch-mean)
    expected = ((s0 - t) / (10 * s0.shape[0])).norm().item()
    assert abs(ref / expected - 1) < 0.01


def _reference_kd64(s, t, y, temperature, alpha):
    s, t = s.double(), t.double()
    soft = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
    return alpha * soft * temperature**2 + (1 - alpha) * F.cross_entropy(s, y)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.7), (16.0, 0.9), (2.0, 1.0)])
def test_gradients_match_float64_reference(temperature, alpha):
    s0, t = _logits(seed=6), _logits(seed=7)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(8))
    s32 = s0.clone().requires_grad_(True)
    loss32 = kd_loss(s32, t, y, temperature=temperature, alpha=alpha)
    loss32.backward()
    s64 = s0.double().requires_grad_(True)
    loss64 = _reference_kd64(s64, t, y, temperature, alpha)
    loss64.backward()
    assert abs(loss32.item() - loss64.item()) < 1e-5
    assert torch.allclose(s32.grad.double(), s64.grad, atol=1e-6, rtol=1e-4)


def test_teacher_gets_no_gradient_and_loss_is_fp32_under_autocast():
    s = _logits(seed=9).bfloat16().requires_grad_(True)
    t = _logits(seed=10).bfloat16().requires_grad_(True)
    y = torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(s, t, y, temperature=4.0, alpha=0.7)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_invalid_parameters_rejected():
    s = _logits()
    y = torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, y, temperature=0.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s, y, temperature=1.0, alpha=1.5)


def test_registry():
    assert {"kd", "ce"} <= set(LOSSES)
    assert get_loss("kd") is kd_loss
    with pytest.raises(KeyError, match="unknown loss"):
        get_loss("nope")
