"""Token-level distillation losses for causal language models.

Notation: ``p = softmax(teacher_logits / T)`` is the teacher distribution and ``q = softmax(student_logits / T)``
the student's, one distribution over the vocabulary per token. Every divergence is computed per token in
float32 (logits may be bf16/fp16; autocast is switched off inside), and the teacher is always detached: gradients
reach the student logits only.

Divergences (``kind`` in :data:`TOKEN_LOSSES`), per token:

* ``"fkl"``      forward KL      ``KL(p || q) = sum_v p (log p - log q)``  (mass covering)
* ``"rkl"``      reverse KL      ``KL(q || p)``                          (mode seeking)
* ``"skew_fkl"`` skew forward KL ``KL(p || a p + (1 - a) q)``, ``a = skew`` in [0, 1); ``a = 0`` is ``fkl``
* ``"skew_rkl"`` skew reverse KL ``KL(q || a q + (1 - a) p)``, ``a = skew`` in [0, 1); ``a = 0`` is ``rkl``
* ``"jsd"``      generalised JSD, TRL's ``GKDTrainer.generalized_jsd_loss`` convention, ``beta`` in [0, 1]:

  - ``beta == 0``: ``KL(p || q)`` (forward KL);
  - ``beta == 1``: ``KL(q || p)`` (reverse KL);
  - otherwise ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``.

  The two end points are *defined* cases, as in TRL: the mixture formula itself tends to 0 at both ends (near
  ``beta = 0`` it behaves like ``beta * KL(p || q)``, near ``beta = 1`` like ``(1 - beta) * KL(q || p)``), so the
  loss is discontinuous in ``beta`` at 0 and 1 and its scale shrinks as ``beta`` approaches either end.
  Equivalently, for 0 < beta < 1: ``jsd = beta * skew_fkl(a=beta) + (1 - beta) * skew_rkl(a=1 - beta)``.
* ``"tv"``       total variation ``0.5 * sum_v |p - q|``, in [0, 1].

:func:`distill_loss` (the entry point) combines them::

    loss = alpha * T**2 * mean_tokens(divergence_T) + (1 - alpha) * mean_tokens(CE(student_logits, labels))

* Temperature ``T`` divides both logits for the soft term, which is multiplied by ``T**2`` so that its gradient
  keeps the same scale across temperatures (Hinton et al.). The hard cross-entropy uses the raw student logits
  (``T = 1``). Unlike TRL's ``generalized_jsd_loss`` (which has no ``T**2`` factor), ``T != 1`` therefore scales
  the soft term by ``T**2``. The per-token functions return the plain divergence at temperature ``T`` (no ``T**2``).
* Alignment: the caller passes *aligned* tensors: ``logits[..., t, :]`` is the prediction for ``labels[..., t]``.
  For a causal LM that means the caller shifts (``logits[:, :-1]``, ``labels[:, 1:]``, ``mask[:, 1:]``); nothing is
  shifted here.
* Reduction: mean over the real target tokens, selected by ``mask`` (bool or 0/1, shape ``logits.shape[:-1]``).
  Padding and prompt positions are masked out by the caller; the mask is never derived from a pad id, and a real
  EOS target counts like any other token even when its id equals the pad id. Both terms are averaged over the
  same tokens, so ``alpha`` keeps its meaning. With no target token at all the loss is a float32 zero that is
  still attached to the student logits (its gradient is zero).
* Memory: only the masked-in tokens are gathered, then processed ``chunk_tokens`` at a time. With gradients
  enabled, each chunk runs under non-reentrant activation checkpointing, so float32 log-probabilities and other
  ``tokens x vocab`` intermediates exist for one chunk at a time (forward and, by recomputation, backward) instead
  of for the whole batch; what stays alive between forward and backward is the gathered logits in their own
  dtype. Chunked and unchunked values agree to floating-point tolerance.
* Logits are expected finite; ``-inf`` entries (e.g. a masked vocabulary slot) can give ``nan``/``inf``.
  Student and teacher must share the vocabulary (same last dimension): slice before calling if they differ.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TOKEN_LOSSES",
    "DistillLossParts",
    "distill_loss",
    "distill_loss_parts",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_divergence",
    "total_variation",
]

TOKEN_LOSSES: frozenset[str] = frozenset({"fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv"})


# --------------------------------------------------------------------------------------------- validation


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _check_temperature(temperature: object) -> float:
    t = _real("temperature", temperature)
    if t <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return t


def _check_closed_unit(name: str, value: object) -> float:
    v = _real(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_skew(skew: object) -> float:
    v = _real("skew", skew)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"skew must be in [0, 1) (skew=1 makes the divergence identically 0), got {skew!r}")
    return v


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or kind not in TOKEN_LOSSES:
        raise ValueError(f"kind must be one of {sorted(TOKEN_LOSSES)}, got {kind!r}")
    return kind


def _check_logit_pair(student_logits: object, teacher_logits: object) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{name} must have a non-empty vocabulary (last) dimension, got shape {tuple(x.shape)}")
    assert isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)} (slice to the shared vocabulary first)"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student_logits.device} and "
            f"{teacher_logits.device}"
        )


# ------------------------------------------------------------------------------------------ core formulas


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return F.log_softmax(x, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a (log a - log b), over the last dimension."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) for 0 < w < 1, computed in log space."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _divergence(kind: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    """Per-token divergence from student log-probs ``log_q`` and teacher log-probs ``log_p`` (both float32)."""
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "skew_fkl":
        return _kl(log_p, log_q if skew == 0.0 else _log_mix(log_p, log_q, skew))
    if kind == "skew_rkl":
        return _kl(log_q, log_p if skew == 0.0 else _log_mix(log_q, log_p, skew))
    if kind == "jsd":
        if beta == 0.0:
            return _kl(log_p, log_q)
        if beta == 1.0:
            return _kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    raise ValueError(f"kind must be one of {sorted(TOKEN_LOSSES)}, got {kind!r}")  # pragma: no cover


# ------------------------------------------------------------------------------------ per-token functions


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence ``kind`` between teacher and student at temperature ``T`` (no ``T**2`` factor).

    Inputs ``(..., vocab)``; returns float32 ``(...)``. Not chunked: it materialises float32 ``(..., vocab)``
    intermediates for the whole input (use :func:`distill_loss` for a memory-bounded reduced loss).
    ``beta`` is used by ``"jsd"`` only, ``skew`` by ``"skew_fkl"``/``"skew_rkl"`` only.
    """
    kind = _check_kind(kind)
    t = _check_temperature(temperature)
    b = _check_closed_unit("beta", beta)
    a = _check_skew(skew)
    _check_logit_pair(student_logits, teacher_logits)
    with _no_autocast(student_logits.device):
        log_q = _log_probs(student_logits, t)
        log_p = _log_probs(teacher_logits.detach(), t)
        return _divergence(kind, log_q, log_p, b, a)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token ``KL(p || q)`` (float32, shape ``logits.shape[:-1]``)."""
    return token_divergence(student_logits, teacher_logits, kind="fkl", temperature=temperature)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token ``KL(q || p)`` (float32, shape ``logits.shape[:-1]``)."""
    return token_divergence(student_logits, teacher_logits, kind="rkl", temperature=temperature)


def skew_forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, skew: float = 0.1, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token ``KL(p || skew * p + (1 - skew) * q)``, ``skew`` in [0, 1)."""
    return token_divergence(student_logits, teacher_logits, kind="skew_fkl", temperature=temperature, skew=skew)


def skew_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, skew: float = 0.1, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token ``KL(q || skew * q + (1 - skew) * p)``, ``skew`` in [0, 1)."""
    return token_divergence(student_logits, teacher_logits, kind="skew_rkl", temperature=temperature, skew=skew)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token generalised JSD in TRL's convention (see the module docstring): ``beta=0`` forward KL,
    ``beta=1`` reverse KL, otherwise ``beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q``."""
    return token_divergence(student_logits, teacher_logits, kind="jsd", temperature=temperature, beta=beta)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token ``0.5 * sum_v |p - q|`` (in [0, 1])."""
    return token_divergence(student_logits, teacher_logits, kind="tv", temperature=temperature)


# ---------------------------------------------------------------------------------------- reduced loss


class DistillLossParts(NamedTuple):
    """``loss = alpha * T**2 * soft + (1 - alpha) * hard``; ``soft`` is the mean divergence at temperature T
    (without ``T**2``), ``hard`` the mean cross-entropy; both over the same ``num_tokens`` target tokens. A term
    whose weight is 0 is not computed and reported as 0."""

    loss: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor
    num_tokens: int


def _chunk_sums(
    s: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
    want_soft: bool,
    want_hard: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed soft divergence and summed hard CE over one chunk of gathered tokens (float32 scalars)."""
    with _no_autocast(s.device):
        zero = torch.zeros((), dtype=torch.float32, device=s.device)
        soft = hard = zero
        if want_soft:
            log_q = _log_probs(s, temperature)
            log_p = _log_probs(t, temperature)
            soft = _divergence(kind, log_q, log_p, beta, skew).sum()
        if want_hard:
            assert y is not None
            hard = F.cross_entropy(s.float(), y, reduction="sum")
        return soft, hard


def distill_loss_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_tokens: int = 4096,
) -> DistillLossParts:
    """:func:`distill_loss` with its parts (for logging). See :func:`distill_loss` for the arguments."""
    kind = _check_kind(kind)
    t = _check_temperature(temperature)
    al = _check_closed_unit("alpha", alpha)
    b = _check_closed_unit("beta", beta)
    a = _check_skew(skew)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    _check_logit_pair(student_logits, teacher_logits)
    lead = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]

    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask must have shape logits.shape[:-1] = {lead}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or contain only 0 and 1")
        mask = mask != 0
    mask = mask.to(student_logits.device)

    want_soft = al > 0.0
    want_hard = al < 1.0
    if want_hard:
        if not isinstance(labels, torch.Tensor):
            raise ValueError("labels must be a torch.Tensor when alpha < 1 (the hard cross-entropy needs them)")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape logits.shape[:-1] = {lead}, got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        labels = labels.to(student_logits.device)
    elif labels is not None and not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")

    flat_mask = mask.reshape(-1)
    n = int(flat_mask.sum())
    s_flat = student_logits.reshape(-1, vocab)
    t_flat = teacher_logits.detach().reshape(-1, vocab)
    if n == flat_mask.numel():  # every position is a target: no gather copy needed
        s_sel, t_sel = s_flat, t_flat
        y_sel = labels.reshape(-1).long() if want_hard else None
    else:
        s_sel, t_sel = s_flat[flat_mask], t_flat[flat_mask]
        y_sel = labels.reshape(-1)[flat_mask].long() if want_hard else None

    if n == 0:
        # No target token: a zero that stays attached to the student (zero gradient, never nan).
        zero = s_sel.float().sum() * 0.0
        return DistillLossParts(zero, zero.detach(), zero.detach(), 0)

    if want_hard:
        assert y_sel is not None
        bad = (y_sel < 0) | (y_sel >= vocab)
        if bool(bad.any()):
            raise ValueError(
                f"labels at target positions must lie in [0, {vocab}); got {int(y_sel[bad][0])} "
                "(masked-out positions may hold anything, e.g. -100)"
            )

    use_ckpt = torch.is_grad_enabled() and s_sel.requires_grad
    s_chunks = s_sel.split(chunk_tokens, dim=0)
    t_chunks = t_sel.split(chunk_tokens, dim=0)
    y_chunks = y_sel.split(chunk_tokens, dim=0) if y_sel is not None else (None,) * len(s_chunks)
    soft_sum = hard_sum = None
    for s_c, t_c, y_c in zip(s_chunks, t_chunks, y_chunks):
        args = (s_c, t_c, y_c, kind, t, b, a, want_soft, want_hard)
        if use_ckpt:
            soft_c, hard_c = checkpoint(_chunk_sums, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            soft_c, hard_c = _chunk_sums(*args)
        soft_sum = soft_c if soft_sum is None else soft_sum + soft_c
        hard_sum = hard_c if hard_sum is None else hard_sum + hard_c
    assert soft_sum is not None and hard_sum is not None

    soft = soft_sum / n
    hard = hard_sum / n
    if not want_hard:
        loss = (t * t) * soft
    elif not want_soft:
        loss = hard
    else:
        loss = (al * t * t) * soft + (1.0 - al) * hard
    return DistillLossParts(loss, soft.detach(), hard.detach(), n)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Token-level distillation loss, a float32 scalar:
    ``alpha * T**2 * mean_tokens(div_T(p, q)) + (1 - alpha) * mean_tokens(CE(student_logits, labels))``.

    Args:
        student_logits: ``(..., vocab)``, usually ``(batch, seq, vocab)``, any float dtype; receives the gradient.
        teacher_logits: same shape as ``student_logits``; detached.
        labels: integer ``(...)``, aligned with the logits (``logits[..., t, :]`` predicts ``labels[..., t]``; the
            caller shifts). Values at masked-out positions are ignored (``-100`` is fine there). May be ``None``
            when ``alpha == 1``.
        mask: bool or 0/1 ``(...)``; True at real target tokens (the mean is over these only).
        kind: one of :data:`TOKEN_LOSSES`.
        temperature: ``T > 0``, applied to both logits for the soft term; the soft term is scaled by ``T**2``.
        alpha: weight of the soft term in [0, 1] (``1``: soft only, ``0``: cross-entropy only).
        beta: ``"jsd"`` interpolation in [0, 1] (TRL convention: 0 forward KL, 1 reverse KL).
        skew: mixing weight in [0, 1) for ``"skew_fkl"`` / ``"skew_rkl"``.
        chunk_tokens: number of target tokens processed at once (bounds float32 ``tokens x vocab`` memory).

    Raises:
        ValueError: naming the offending argument when it is out of range, non-finite or of the wrong shape.
    """
    return distill_loss_parts(
        student_logits,
        teacher_logits,
        labels,
        mask,
        kind=kind,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        skew=skew,
        chunk_tokens=chunk_tokens,
    ).loss
