"""Evaluation of a causal language model on a held-out split (pure compute; no files written here).

:func:`evaluate_lm` returns a flat dict of floats (plus ``samples``):

* ``test_loss`` / ``test_ppl``: mean per-token cross-entropy (and its exp) over the masked target tokens of the
  blocks given (the caller passes the *test* split, never training text); ``tokens``: how many were scored.
* with a ``teacher``: ``agreement_top1`` (share of target tokens whose argmax agrees with the teacher's) and
  ``kl_to_teacher`` (mean per-token KL(teacher || student), temperature 1, in nats).
* ``params`` (parameter count) and ``size_mb`` (bytes of the safetensors serialisation / 1e6).
* with ``speed``: ``tokens_per_second`` (batched forward over the evaluated blocks) and ``latency_ms_per_token``
  (greedy generation at batch 1 of a fixed small count of tokens).
* ``samples``: ``[{"prompt", "completion"}]`` greedy (``do_sample=False``, seeded) completions of the fixed
  prompts, when a tokenizer is given.

:func:`gap_closed` summarises a distillation: the share of the perplexity gap between the student before training
and the teacher that the trained student closed.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .train import Blocks, _check_blocks, _logits, _model_device, _ppl

__all__ = ["DEFAULT_PROMPTS", "LATENCY_TOKENS", "evaluate_lm", "gap_closed", "model_size"]

DEFAULT_PROMPTS = ("First Citizen:", "ROMEO:", "The king")
LATENCY_TOKENS = 16  # greedy tokens generated at batch 1 for latency_ms_per_token
_EPS = 1e-9


def gap_closed(teacher_ppl: float, student_ppl: float, start_ppl: float) -> float:
    """``(start_ppl - student_ppl) / (start_ppl - teacher_ppl)``: 0 = the student is no better than before
    training, 1 = it matches the teacher, > 1 = it beats the teacher, < 0 = it got worse. Computed on log
    perplexities would rank the same; plain perplexities are used as they are what is reported. When the gap is
    ~0 (``|start - teacher| < 1e-9 * max(1, start)``: the start already matches the teacher) the result is 1.0 if
    the student is at least as good as the teacher, else 0.0. Non-finite inputs give ``nan``."""
    vals = (teacher_ppl, student_ppl, start_ppl)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        return math.nan
    gap = start_ppl - teacher_ppl
    if abs(gap) < _EPS * max(1.0, abs(start_ppl)):
        return 1.0 if student_ppl <= teacher_ppl + _EPS * max(1.0, abs(teacher_ppl)) else 0.0
    return float((start_ppl - student_ppl) / gap)


def state_bytes(model: nn.Module) -> bytes:
    """The model's state dict serialised as safetensors, shared (tied) tensors once, keys sorted."""
    seen, tensors = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[k] = v.detach().cpu().contiguous()
    return save_safetensors_bytes(dict(sorted(tensors.items())))


def model_size(model: nn.Module) -> tuple[int, float]:
    """(parameter count, size in MB of its safetensors serialisation: shared tensors counted once)."""
    params = sum(p.numel() for p in model.parameters())
    return int(params), len(state_bytes(model)) / 1e6


@torch.inference_mode()
def _scores(model, teacher, blocks: Blocks, batch_size: int, max_batches: int | None) -> dict:
    ids, labels, mask = blocks
    dev = _model_device(model)
    tdev = _model_device(teacher) if teacher is not None else None
    ce = torch.zeros((), dtype=torch.float64)
    kl = torch.zeros((), dtype=torch.float64)
    agree = 0
    n = 0
    fwd_tokens, fwd_seconds = 0, 0.0
    for i, start in enumerate(range(0, len(ids), batch_size)):
        if max_batches and i >= max_batches:
            break
        sl = slice(start, start + batch_size)
        m = mask[sl]
        if not bool(m.any()):
            continue
        x = ids[sl].to(dev)
        t0 = time.perf_counter()
        logits = _logits(model, x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        fwd_seconds += time.perf_counter() - t0
        fwd_tokens += x.numel()
        s = logits[m.to(logits.device)].float()  # [K, V]
        y = labels[sl][m].to(s.device)
        ce += F.cross_entropy(s, y, reduction="sum").double().cpu()
        n += int(y.numel())
        if teacher is not None:
            t = _logits(teacher, ids[sl].to(tdev))[m.to(tdev)].float().to(s.device)
            if t.shape[-1] != s.shape[-1]:
                raise ValueError(f"teacher vocabulary {t.shape[-1]} != student vocabulary {s.shape[-1]}")
            lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
            kl += (lt.exp() * (lt - ls)).sum().double().cpu()
            agree += int((t.argmax(-1) == s.argmax(-1)).sum())
    if n == 0:
        raise ValueError("no target token (mask is all False) in the evaluated blocks")
    out = {"test_loss": float(ce) / n, "tokens": float(n), "_fwd": (fwd_tokens, fwd_seconds)}
    out["test_ppl"] = _ppl(out["test_loss"])
    if teacher is not None:
        out["agreement_top1"] = agree / n
        out["kl_to_teacher"] = max(0.0, float(kl) / n)  # KL >= 0; clamp float round-off
    return out


def _eos_id(model, tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return eos if eos is not None else getattr(getattr(model, "config", None), "eos_token_id", None)


@torch.inference_mode()
def _greedy(model, input_ids: torch.Tensor, n: int, eos: int | None) -> torch.Tensor:
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
              attention_mask=torch.ones_like(input_ids), pad_token_id=eos if eos is not None else 0)
    out = model.generate(input_ids, **kw)
    return out[0, input_ids.shape[1]:]


def evaluate_lm(
    model: nn.Module,
    test_blocks: Blocks,
    *,
    teacher: nn.Module | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    sample_prompts: Sequence[str] | None = None,
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    speed: bool = True,
    seed: int = 0,
) -> dict:
    """Evaluate ``model`` (and compare with ``teacher``) on ``test_blocks`` = (ids, labels, mask); see the
    module docstring for the keys. Models are put in eval mode and their modes restored."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    blocks = _check_blocks("test_blocks", test_blocks)
    modes = [(m, m.training) for m in (model, teacher) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        res = _scores(model, teacher, blocks, batch_size, max_batches)
        fwd_tokens, fwd_seconds = res.pop("_fwd")
        params, size_mb = model_size(model)
        res["params"], res["size_mb"] = float(params), size_mb
        dev = _model_device(model)
        eos = _eos_id(model, tokenizer)
        if speed:
            res["tokens_per_second"] = fwd_tokens / fwd_seconds if fwd_seconds > 0 else 0.0
            if hasattr(model, "generate"):
                prompt = blocks[0][:1, :8].to(dev)
                _greedy(model, prompt, 2, eos)  # warm-up
                t0 = time.perf_counter()
                _greedy(model, prompt, LATENCY_TOKENS, eos)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                res["latency_ms_per_token"] = (time.perf_counter() - t0) * 1000.0 / LATENCY_TOKENS
        if tokenizer is not None and hasattr(model, "generate"):
            torch.manual_seed(seed)
            samples = []
            for p in (DEFAULT_PROMPTS if sample_prompts is None else sample_prompts):
                enc = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)
                if enc.shape[1] == 0:
                    enc = torch.tensor([[eos]], device=dev)
                new = _greedy(model, enc, max_new_tokens, None if eos is None else eos)
                samples.append({"prompt": p, "completion": tokenizer.decode(new.tolist())})
            res["samples"] = samples
    finally:
        for m, was in modes:
            m.train(was)
    return res
