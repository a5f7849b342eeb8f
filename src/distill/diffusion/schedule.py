"""The variance-preserving noise schedule over discrete timesteps, prediction-type conversions and DDIM steps.

Maths (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Song et al. 2021, "Denoising Diffusion
Implicit Models"; Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"):

- Timesteps are integers ``t`` in ``[0, T-1]``; ``t = -1`` means clean data (``alpha = 1``, ``sigma = 0``).
- ``abar_t = alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)``, taken from diffusers' own beta schedules so that every
  number here equals diffusers' schedulers ("cosine" = diffusers ``squaredcos_cap_v2``, Nichol & Dhariwal 2021;
  "linear" = betas linear in ``[1e-4, 0.02]``, Ho et al. 2020).
- Variance preserving: ``z_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(abar_t)``,
  ``sigma_t = sqrt(1 - abar_t)``, so ``alpha^2 + sigma^2 = 1``; ``SNR(t) = alpha_t^2 / sigma_t^2``.
- Model outputs: ``"v"`` predicts ``v = alpha eps - sigma x0`` (Salimans & Ho 2022), ``"epsilon"`` predicts ``eps``.
  Then ``x0 = alpha z - sigma v``, ``eps = sigma z + alpha v`` (v), or ``x0 = (z - sigma eps) / alpha`` (epsilon).
- Deterministic DDIM (eta = 0) from ``t`` to ``t'``: ``z_{t'} = alpha_{t'} x0_hat + sigma_{t'} eps_hat``.

Conditioning: with the cosine schedule ``abar[T-1]`` is about 2e-9 (``alpha ~ 5e-5``), so recovering ``x0`` from an
epsilon prediction at ``t = T-1`` divides by ``alpha`` and amplifies any error in ``eps`` ~20000-fold. The
v-parametrisation has no division (``x0 = alpha z - sigma v``) and is well conditioned at every ``t``; that is why
``prediction="v"`` is the default.

Step grids are "trailing": ``k`` sampling steps use ``[T-1, T-1-T/k, ..., T/k-1]`` and a step from ``t`` goes to
``t - T/k`` (``-1`` after the last one), equal to diffusers' ``DDIMScheduler(timestep_spacing="trailing",
set_alpha_to_one=True)``. ``k`` must be a power of two dividing ``T``; the default ``T = 1024`` is itself a power
of two so that every such ``k`` up to 1024 is allowed (any ``T >= 2`` is accepted, e.g. 1000 for an existing DDPM).

Arithmetic: the ``alphas_cumprod`` table is float64 on the CPU; coefficients are looked up there and returned as
float32 on the data's device, shaped ``[N, 1, 1, 1]`` to broadcast over ``[N, C, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["KINDS", "PREDICTIONS", "Schedule"]

# our name -> diffusers' beta_schedule
KINDS = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
# our name -> diffusers' prediction_type
PREDICTIONS = {"v": "v_prediction", "epsilon": "epsilon"}
LINEAR_BETA_START = 0.0001  # diffusers' defaults, written out so the DDIM config states them
LINEAR_BETA_END = 0.02


def _is_pow2(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


def _alphas_cumprod(kind: str, T: int) -> torch.Tensor:
    """``alphas_cumprod`` exactly as diffusers builds it (float32 there), returned as float64 on the CPU."""
    from diffusers import DDPMScheduler

    kw: dict[str, Any] = {"num_train_timesteps": T, "beta_schedule": KINDS[kind]}
    if kind == "linear":
        kw.update(beta_start=LINEAR_BETA_START, beta_end=LINEAR_BETA_END)
    return DDPMScheduler(**kw).alphas_cumprod.detach().to("cpu", torch.float64).clone()


@dataclass(frozen=True, eq=False)
class Schedule:
    """A VP noise schedule: ``kind`` ("cosine" | "linear"), ``T`` training timesteps, model ``prediction``
    ("v" | "epsilon") and the float64 CPU table ``alphas_cumprod`` (length ``T``). Build it with :meth:`make`."""

    kind: str
    T: int
    prediction: str
    alphas_cumprod: torch.Tensor = field(repr=False)
    # [abar_{-1} = 1, abar_0, ..., abar_{T-1}]: index with t + 1
    _padded: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod.detach().to("cpu", torch.float64)
        if ac.shape != (self.T,):
            raise ValueError(f"alphas_cumprod must have shape ({self.T},), got {tuple(ac.shape)}")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_padded", torch.cat([torch.ones(1, dtype=torch.float64), ac]))

    # ------------------------------------------------------------------ construction
    @classmethod
    def make(cls, kind: str = "cosine", T: int = 1024, prediction: str = "v") -> "Schedule":
        """Validated constructor (``T`` an int >= 2); a bad field raises ValueError naming it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if not isinstance(T, int) or isinstance(T, bool) or T < 2:
            raise ValueError(f"T must be an int >= 2, got {T!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {sorted(PREDICTIONS)}, got {prediction!r}")
        return cls(kind=kind, T=T, prediction=prediction, alphas_cumprod=_alphas_cumprod(kind, T))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :meth:`from_dict` rebuilds an equal schedule (the table is recomputed)."""
        return {"kind": self.kind, "T": self.T, "prediction": self.prediction}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        extra = sorted(set(d) - {"kind", "T", "prediction"})
        if extra:
            raise ValueError(f"unknown schedule field(s) {extra}")
        return cls.make(**d)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self.to_dict() == other.to_dict() and torch.equal(self.alphas_cumprod, other.alphas_cumprod)

    def __hash__(self) -> int:
        return hash((self.kind, self.T, self.prediction))

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' ``DDIMScheduler`` that make it equal to this schedule and to
        :meth:`ddim_step` on the :meth:`timesteps` grid (trailing spacing, ``abar_{-1} = 1``, no clipping)."""
        return {
            "num_train_timesteps": self.T,
            "beta_schedule": KINDS[self.kind],
            "beta_start": LINEAR_BETA_START,
            "beta_end": LINEAR_BETA_END,
            "prediction_type": PREDICTIONS[self.prediction],
            "timestep_spacing": "trailing",
            "set_alpha_to_one": True,
            "clip_sample": False,
            "steps_offset": 0,
        }

    # ------------------------------------------------------------------ coefficients
    def _lookup(self, t: torch.Tensor | int) -> torch.Tensor:
        """float64 CPU ``abar`` for ``t`` (int or integer tensor of any shape); ``t = -1`` gives 1."""
        tt = torch.as_tensor(t).detach().to("cpu")
        if tt.is_floating_point() or tt.is_complex() or tt.dtype == torch.bool:
            raise ValueError(f"t must be an integer timestep, got dtype {tt.dtype}")
        tt = tt.long()
        if tt.numel() and (int(tt.min()) < -1 or int(tt.max()) > self.T - 1):
            raise ValueError(f"t must lie in [-1, {self.T - 1}], got values in [{int(tt.min())}, {int(tt.max())}]")
        return self._padded[tt + 1]

    @staticmethod
    def _device(t: torch.Tensor | int, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")

    def alpha_sigma(self, t: torch.Tensor | int, device: torch.device | str | None = None):
        """``(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t))`` as float32 ``[N, 1, 1, 1]`` on ``device``
        (default: t's device). ``t`` is a LongTensor ``[N]`` (or an int: ``[1, 1, 1, 1]``); ``t = -1`` -> (1, 0)."""
        ac = self._lookup(t).reshape(-1, 1, 1, 1)
        dev = self._device(t, device)
        alpha = ac.sqrt().to(device=dev, dtype=torch.float32)
        sigma = (1.0 - ac).clamp_min(0.0).sqrt().to(device=dev, dtype=torch.float32)
        return alpha, sigma

    def snr(self, t: torch.Tensor | int, device: torch.device | str | None = None) -> torch.Tensor:
        """Signal-to-noise ratio ``SNR(t) = alpha_t^2 / sigma_t^2 = abar_t / (1 - abar_t)``, float32 of shape
        ``[N]`` (``inf`` at ``t = -1``); computed in float64 before the cast."""
        ac = self._lookup(t).reshape(-1)
        return (ac / (1.0 - ac)).to(device=self._device(t, device), dtype=torch.float32)

    def _coef(self, t: torch.Tensor | int, like: torch.Tensor):
        alpha, sigma = self.alpha_sigma(t, like.device)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha.reshape(shape), sigma.reshape(shape)

    # ------------------------------------------------------------------ forward process and parametrisation
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Forward process ``q(z_t | x0)``: ``z_t = alpha_t x0 + sigma_t eps``."""
        alpha, sigma = self._coef(t, x0)
        return alpha * x0 + sigma * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The regression target of the model: ``v = alpha_t eps - sigma_t x0`` or ``eps``."""
        if self.prediction == "epsilon":
            return eps.float()
        alpha, sigma = self._coef(t, x0)
        return alpha * eps - sigma * x0

    def to_x0_eps(self, z: torch.Tensor, t: torch.Tensor | int, out: torch.Tensor):
        """``(x0_hat, eps_hat)`` from a model output at ``(z, t)``.

        v: ``x0 = alpha z - sigma v``, ``eps = sigma z + alpha v`` (exact inverses since ``alpha^2 + sigma^2 = 1``).
        epsilon: ``x0 = (z - sigma eps) / alpha`` -- ill-conditioned where ``alpha ~ 0`` (cosine at ``T-1``)."""
        alpha, sigma = self._coef(t, z)
        out = out.float()
        if self.prediction == "v":
            return alpha * z - sigma * out, sigma * z + alpha * out
        return (z - sigma * out) / alpha, out

    # ------------------------------------------------------------------ step grids and DDIM
    def step_size(self, k: int) -> int:
        """``T // k``: the distance between neighbouring points of the ``k``-step grid. ValueError naming ``k``
        unless ``k`` is a power of two dividing ``T``."""
        if not _is_pow2(k) or k > self.T or self.T % k:
            raise ValueError(f"k (number of steps) must be a power of two dividing T={self.T}, got k={k!r}")
        return self.T // k

    def timesteps(self, k: int) -> list[int]:
        """The trailing ``k``-step grid ``[T-1, T-1-T/k, ..., T/k-1]`` (descending, ``k`` values)."""
        s = self.step_size(k)
        return list(range(self.T - 1, -1, -s))

    def ddim_step(self, z: torch.Tensor, t: torch.Tensor | int, t_prev: torch.Tensor | int, out: torch.Tensor):
        """Deterministic DDIM (eta = 0, Song et al. 2021) from ``t`` to ``t_prev`` (``t_prev = -1`` returns
        ``x0_hat``): ``z_{t_prev} = alpha_{t_prev} x0_hat + sigma_{t_prev} eps_hat``."""
        x0, eps = self.to_x0_eps(z, t, out)
        alpha_p, sigma_p = self._coef(t_prev, z)
        return alpha_p * x0 + sigma_p * eps
