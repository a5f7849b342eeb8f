"""Losses for the teacher (denoising), progressive distillation and consistency distillation.

Models are called as ``model_fn(z, t) -> output`` (``t`` a LongTensor ``[N]`` on z's device); all randomness comes
from an explicit ``generator`` (drawn on ``generator.device``, then moved to the data's device), so the same
generator state gives the same loss. Losses are float32 scalars.

- Teacher: the "simple" denoising objective of Ho et al. 2020 in the schedule's parametrisation (v or epsilon).
- Progressive distillation (Salimans & Ho 2022): one student DDIM step must match two teacher DDIM steps.
- Consistency distillation (Song et al. 2023, "Consistency Models"; Luo et al. 2023, "Latent Consistency Models"):
  ``f_student(z_{t_hi}, t_hi)`` must match ``f_target(z_hat_{t_lo}, t_lo)``, where ``z_hat_{t_lo}`` is one teacher
  DDIM (ODE) step from ``z_{t_hi}`` ("skipping-step" solver of LCM), with the pseudo-Huber metric of
  Song & Dhariwal 2023 ("Improved Techniques for Training Consistency Models").
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .sampling import consistency_fn
from .schedule import Schedule

__all__ = ["consistency_loss", "progressive_loss", "progressive_target", "pseudo_huber", "teacher_loss"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x.device)


def _randint(high: int, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def _need_generator(generator: torch.Generator | None, name: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"{name} needs an explicit torch.Generator (generator=...)")


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Pseudo-Huber distance (Song & Dhariwal 2023): per sample ``sqrt(||a - b||^2 + c^2) - c``, mean over the batch.

    ``c`` defaults to ``0.00054 sqrt(d)`` with ``d = C*H*W`` (the paper's choice). It behaves like
    ``||a - b||^2 / (2c)`` for ``||a - b|| << c`` and like ``||a - b|| - c`` for ``||a - b|| >> c``; identical inputs
    give exactly 0 with a finite (zero) gradient. ``c > 0`` is required. Computed as the algebraically equal
    ``s / (sqrt(s + c^2) + c)`` with ``s = ||a - b||^2``, which avoids cancellation when ``s << c^2``."""
    d = (a.float() - b.float()).flatten(1)
    if c is None:
        c = 0.00054 * math.sqrt(d.shape[1])
    if not c > 0:
        raise ValueError(f"huber c must be > 0, got {c!r}")
    c_t = torch.tensor(float(c), dtype=torch.float32, device=d.device)
    sq = d.pow(2).sum(dim=1)
    return (sq / ((sq + c_t * c_t).sqrt() + c_t)).mean()


def teacher_loss(model_fn: ModelFn, x0: torch.Tensor, schedule: Schedule, *, generator: torch.Generator):
    """Denoising loss (Ho et al. 2020; v-parametrisation of Salimans & Ho 2022): ``t ~ U{0..T-1}``,
    ``eps ~ N(0, I)`` (drawn in that order), ``z_t = alpha_t x0 + sigma_t eps``, and the per-pixel MSE between
    ``model_fn(z_t, t)`` and ``schedule.target(x0, eps, t)`` (``v`` or ``eps``)."""
    _need_generator(generator, "teacher_loss")
    x0 = x0.float()
    t = _randint(schedule.T, x0.shape[0], generator, x0.device)
    eps = _randn_like(x0, generator)
    z = schedule.add_noise(x0, eps, t)
    out = model_fn(z, t).float()
    return (out - schedule.target(x0, eps, t)).pow(2).mean()


@torch.no_grad()
def progressive_target(teacher_fn: ModelFn, z: torch.Tensor, t: torch.Tensor, schedule: Schedule, student_steps: int):
    """The x0 target of progressive distillation (Salimans & Ho 2022, Algorithm 2), under no_grad.

    With student step ``s = T / student_steps``, the teacher takes two DDIM steps ``t -> t' = t - s/2 -> t'' = t - s``
    giving ``z''``. The target ``x_tilde`` is the x0 for which ONE DDIM step ``t -> t''`` (with
    ``eps = (z - alpha x_tilde) / sigma``) lands on ``z''``:
    ``x_tilde = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha)``; at ``t'' = -1`` this is ``z''``.
    The denominator equals ``sigma'' (sqrt(SNR'') - sqrt(SNR)) alpha / sqrt(SNR) > 0``, so it is well defined.
    Needs ``2 * student_steps`` to divide ``T`` (the teacher's half step ``s/2`` is a whole number) and every
    ``t >= s - 1``."""
    s = schedule.step_size(student_steps)
    if s % 2:
        raise ValueError(f"student_steps={student_steps}: the teacher's 2*student_steps grid must divide "
                         f"T={schedule.T} (half steps of s={s})")
    t = torch.as_tensor(t, device=z.device).long().reshape(-1).expand(z.shape[0])
    if int(t.min()) < s - 1:
        raise ValueError(f"t must be >= s-1={s - 1} so that t - s >= -1, got min t={int(t.min())}")
    z = z.float()
    t_mid, t_end = t - s // 2, t - s
    z_mid = schedule.ddim_step(z, t, t_mid, teacher_fn(z, t))
    z_end = schedule.ddim_step(z_mid, t_mid, t_end, teacher_fn(z_mid, t_mid))
    alpha, sigma = schedule._coef(t, z)
    alpha_e, sigma_e = schedule._coef(t_end, z)
    ratio = sigma_e / sigma
    return (z_end - ratio * z) / (alpha_e - ratio * alpha)


def progressive_loss(
    student_fn: ModelFn,
    teacher_fn: ModelFn,
    x0: torch.Tensor,
    schedule: Schedule,
    student_steps: int,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Progressive distillation loss (Salimans & Ho 2022): ``t`` uniform on the student's trailing grid
    ``timesteps(student_steps)``, ``eps ~ N(0, I)`` (drawn in that order), ``z_t = alpha_t x0 + sigma_t eps``;
    the target ``x_tilde`` from :func:`progressive_target` (no gradient) and the student's ``x_hat`` from its output;
    ``loss = mean_n( w(t_n) * mean_pixels (x_hat - x_tilde)^2 )`` with the paper's "truncated SNR" weight
    ``w(t) = max(SNR(t), 1)``, i.e. ``max(||x - x_hat||^2, ||eps - eps_hat||^2)``-style weighting."""
    _need_generator(generator, "progressive_loss")
    x0 = x0.float()
    grid = torch.tensor(schedule.timesteps(student_steps), dtype=torch.long, device=x0.device)
    t = grid[_randint(len(grid), x0.shape[0], generator, x0.device)]
    eps = _randn_like(x0, generator)
    z = schedule.add_noise(x0, eps, t)
    x_tilde = progressive_target(teacher_fn, z, t, schedule, student_steps)
    x_hat, _ = schedule.to_x0_eps(z, t, student_fn(z, t))
    w = schedule.snr(t, device=x0.device).clamp_min(1.0)
    return (w * (x_hat - x_tilde).pow(2).flatten(1).mean(dim=1)).mean()


def consistency_loss(
    student_fn: ModelFn,
    target_fn: ModelFn,
    teacher_fn: ModelFn,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    skip: int,
    generator: torch.Generator,
    huber_c: float | None = None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Consistency distillation (Song et al. 2023, Algorithm 2; LCM, Luo et al. 2023, skipping-step solver).

    ``t_hi`` uniform on the trailing grid ``[T-1, T-1-skip, ..., skip-1]``, ``t_lo = t_hi - skip``
    (may be -1), ``eps ~ N(0, I)`` (drawn in that order), ``z_hi = alpha_hi x0 + sigma_hi eps``. Without gradient:
    the teacher takes ONE DDIM step ``z_hi -> z_lo`` (the ODE solver) and the target network (EMA of the student)
    gives ``y = f_target(z_lo, t_lo)`` (``y = z_lo`` at ``t_lo = -1``, the boundary condition; the target model is
    then evaluated at ``t = 0`` and its output discarded). The student gives ``x = f_student(z_hi, t_hi)`` and the
    loss is ``pseudo_huber(x, y, huber_c)``. ``skip`` must be a positive int dividing ``T``."""
    _need_generator(generator, "consistency_loss")
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 1 or schedule.T % skip:
        raise ValueError(f"skip must be a positive int dividing T={schedule.T}, got skip={skip!r}")
    x0 = x0.float()
    grid = torch.arange(schedule.T - 1, -1, -skip, dtype=torch.long, device=x0.device)
    t_hi = grid[_randint(len(grid), x0.shape[0], generator, x0.device)]
    t_lo = t_hi - skip
    eps = _randn_like(x0, generator)
    z_hi = schedule.add_noise(x0, eps, t_hi)
    with torch.no_grad():
        z_lo = schedule.ddim_step(z_hi, t_hi, t_lo, teacher_fn(z_hi, t_hi))
        out_lo = target_fn(z_lo, t_lo.clamp_min(0))
        y = consistency_fn(schedule, z_lo, t_lo, out_lo, timestep_scaling, sigma_data)
    x = consistency_fn(schedule, z_hi, t_hi, student_fn(z_hi, t_hi), timestep_scaling, sigma_data)
    return pseudo_huber(x, y.detach(), huber_c)
