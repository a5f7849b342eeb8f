"""Samplers over a ``model_fn(z, t) -> output`` (``t`` a LongTensor ``[N]`` on z's device): deterministic DDIM
and multistep consistency sampling, plus the consistency-model parametrisation ``f(z, t)``.

- DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eta = 0, on the trailing grid of
  :meth:`Schedule.timesteps`; equal to diffusers' ``DDIMScheduler(**schedule.scheduler_config())``.
- Consistency models (Song et al. 2023, "Consistency Models"; Luo et al. 2023, "Latent Consistency Models"):
  ``f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t)`` with LCM's discrete boundary-condition scalings, and
  multistep sampling ``x <- f(z_t, t)``, ``z_{t'} = alpha_{t'} x + sigma_{t'} eps'`` with fresh noise ``eps'``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import Schedule

__all__ = ["consistency_coefficients", "consistency_fn", "sample_consistency", "sample_ddim"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _tvec(t: int, z: torch.Tensor) -> torch.Tensor:
    return torch.full((z.shape[0],), int(t), dtype=torch.long, device=z.device)


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, noise: torch.Tensor, schedule: Schedule, steps: int, *, clip: bool = True):
    """Deterministic DDIM sampling in ``steps`` steps.

    Starts from ``z = noise`` at ``t = T-1`` (the noise *is* ``z_{T-1}``, not rescaled: ``alpha_{T-1}`` is ~0 for
    cosine and small for linear, exactly as diffusers' pipelines start), then for each ``t`` of the trailing grid
    ``z <- alpha_{t-s} x0_hat + sigma_{t-s} eps_hat`` with ``s = T/steps``; the last step lands on ``t = -1`` where
    ``z = x0_hat``. Only the final output is clamped to ``[-1, 1]`` (when ``clip``): the intermediate ``x0_hat`` is
    not, so every intermediate ``z`` equals ``DDIMScheduler(clip_sample=False)`` exactly."""
    s = schedule.step_size(steps)
    z = noise.float()
    for t in schedule.timesteps(steps):
        tt = _tvec(t, z)
        z = schedule.ddim_step(z, tt, t - s, model_fn(z, tt))
    return z.clamp(-1.0, 1.0) if clip else z


def consistency_coefficients(
    schedule: Schedule,
    t: torch.Tensor | int,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
    device: torch.device | str | None = None,
):
    """LCM's discrete boundary-condition scalings (Luo et al. 2023; diffusers'
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``), from Song et al. 2023's
    ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)``, ``c_out = s / sqrt(s^2 + sigma_data^2)`` with
    ``s = t * timestep_scaling``. ``c_skip`` falls from 1 (``t = 0``) towards 0, ``c_out`` rises from 0 to 1.
    Clean data ``t = -1`` gives ``(1, 0)`` so ``f(x, clean) = x`` (the boundary condition).

    Returns float32 ``(c_skip, c_out)`` of shape ``[N, 1, 1, 1]`` on ``device`` (default: t's device)."""
    tt = torch.as_tensor(t).detach().to("cpu").reshape(-1)
    if tt.is_floating_point() or (tt.numel() and (int(tt.min()) < -1 or int(tt.max()) > schedule.T - 1)):
        raise ValueError(f"t must be integer timesteps in [-1, {schedule.T - 1}], got {tt.tolist()[:8]}")
    scaled = tt.to(torch.float64) * float(timestep_scaling)
    denom = scaled**2 + float(sigma_data) ** 2
    c_skip = float(sigma_data) ** 2 / denom
    c_out = scaled / denom.sqrt()
    clean = tt < 0
    c_skip = torch.where(clean, torch.ones_like(c_skip), c_skip)
    c_out = torch.where(clean, torch.zeros_like(c_out), c_out)
    dev = Schedule._device(t, device)
    return (
        c_skip.reshape(-1, 1, 1, 1).to(device=dev, dtype=torch.float32),
        c_out.reshape(-1, 1, 1, 1).to(device=dev, dtype=torch.float32),
    )


def consistency_fn(
    schedule: Schedule,
    z: torch.Tensor,
    t: torch.Tensor | int,
    out: torch.Tensor,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """The consistency function ``f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t, out)`` (Song et al. 2023), with
    ``x0_hat`` from the model output per the schedule's prediction type and LCM's scalings. At ``t = -1`` it
    returns ``z`` exactly (whatever ``out`` is)."""
    c_skip, c_out = consistency_coefficients(schedule, t, timestep_scaling, sigma_data, device=z.device)
    x0, _ = schedule.to_x0_eps(z, t, out)
    shape = (-1,) + (1,) * (z.dim() - 1)
    f = c_skip.reshape(shape) * z + c_out.reshape(shape) * x0
    clean = (torch.as_tensor(t, device=z.device).reshape(shape) < 0)
    return torch.where(clean, z.float(), f)


@torch.no_grad()
def sample_consistency(
    model_fn: ModelFn,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    clip: bool = True,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM) on the trailing ``steps`` grid.

    ``x = f(noise, T-1)``; then for each next grid point ``t``: ``z = alpha_t x + sigma_t eps`` with fresh
    ``eps ~ N(0, I)`` drawn from ``generator``, and ``x = f(z, t)``. Returns ``x`` (clamped to ``[-1, 1]`` at the
    end if ``clip``; intermediate ``x`` are not clamped). ``steps = 1`` draws nothing and needs no generator;
    ``steps > 1`` without one raises ValueError."""
    grid = schedule.timesteps(steps)
    if len(grid) > 1 and generator is None:
        raise ValueError(f"sample_consistency with steps={steps} > 1 needs an explicit generator")
    z = noise.float()
    x = z
    for i, t in enumerate(grid):
        tt = _tvec(t, z)
        if i > 0:
            eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
            z = schedule.add_noise(x, eps.to(x.device), tt)
        x = consistency_fn(schedule, z, tt, model_fn(z, tt), timestep_scaling, sigma_data)
    return x.clamp(-1.0, 1.0) if clip else x
