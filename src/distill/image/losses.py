"""Loss registry. Every loss takes (student_logits, teacher_logits, targets, **params) and returns a scalar.

Losses compute in float32 even under autocast: softmax/log-softmax over bf16 logits loses the small
probabilities that carry the "dark knowledge".
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register_loss(name: str):
    def deco(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[name]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch (fp32)."""
    t = float(temperature)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float() / t
        te = teacher_logits.detach().float() / t
        log_p_s = F.log_softmax(s, dim=-1)
        log_p_t = F.log_softmax(te, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
        return kl.mean() * (t * t)


@register_loss("ce")
def ce_loss(student_logits, teacher_logits, targets, **_) -> torch.Tensor:
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        return F.cross_entropy(student_logits.float(), targets)


@register_loss("kd")
def kd_loss(student_logits, teacher_logits, targets, temperature: float = 4.0, alpha: float = 0.7, **_) -> torch.Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets).

    Batch-mean. The T^2 factor keeps the soft term's gradient on the same scale across temperatures.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    hard = ce_loss(student_logits, None, targets)
    if alpha == 0.0:
        return hard
    soft = soft_kl(student_logits, teacher_logits, temperature)
    return alpha * soft + (1.0 - alpha) * hard
