"""On-policy and sequence-level distillation batches (GKD, Agarwal et al. 2024; TRL ``GKDTrainer`` conventions).

A generated batch replaces a data micro-batch of :func:`distill.lm.train.fit_lm`: the first ``prompt_tokens``
input tokens of each data block are the prompt, a model (the *student* for on-policy batches, the *teacher* for
sequence-level KD) samples up to ``max_new_tokens`` continuation tokens, and the result is returned in the aligned
``(input_ids, labels, mask)`` layout of :func:`distill.lm.data.load_blocks`:

* the full sequence is ``s = prompt + generated`` (``P + n`` tokens, ``n`` = the longest row's continuation);
  ``input_ids = s[:, :-1]``, ``labels = s[:, 1:]`` (``logits[:, t]`` predicts ``labels[:, t]``);
* ``mask`` is True exactly where ``labels`` is a generated token: never on prompt positions (their labels are the
  real next prompt tokens, not targets), and per row only up to and including its first EOS; positions after it
  hold the EOS id as input, ``-100`` as label and False as mask.

Sampling (:func:`sample_continuations`): the model runs in eval mode under ``no_grad`` (its mode is restored
afterwards), the prompt once with ``use_cache=True`` and then one token per call with the returned KV cache (passed
as ``cache=`` where the model's ``forward`` names that argument, as transformers >= 5.24 does, else as
``past_key_values=``; a model whose output holds no cache is re-run on the whole sequence instead). Each next token is drawn with
``torch.multinomial(softmax(logits / temperature), generator=g)`` from an explicit :class:`torch.Generator`, so the
samples depend on the generator's seed only (and on the weights), never on the global RNG: seeded and resumable.
``model.generate`` is not used for that reason. Sampling can be limited to the first ``vocab_limit`` ids (the
vocabulary shared by student and teacher). A row stops at its first EOS; the loop stops when every row has.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Iterable

import torch
from torch import nn

__all__ = ["IGNORE_INDEX", "cache_kwarg", "eos_ids", "mixed_seed", "sample_continuations", "generated_blocks"]

IGNORE_INDEX = -100


def mixed_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints / strings (sha256: distinct tuples give unrelated streams)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def eos_ids(*models: nn.Module) -> list[int]:
    """EOS ids from the first model whose ``config`` (or ``generation_config``) names one (an int or a list)."""
    for model in models:
        for holder in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            eos = getattr(holder, "eos_token_id", None)
            if eos is None:
                continue
            ids = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, Iterable) else []
            ids = [int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]
            if ids:
                return ids
    return []


def cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``"cache"`` (transformers >= 5.24, where
    ``past_key_values`` is a deprecated alias) when its signature names it, else ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _out_cache(out):
    """The KV cache of a model output (``cache``, or the older ``past_key_values``), None when it has none."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _forward(model: nn.Module, input_ids: torch.Tensor, past, use_cache: bool, cache_name: str = "past_key_values"):
    if past is not None:
        return model(input_ids=input_ids, use_cache=True, **{cache_name: past})
    return model(input_ids=input_ids, use_cache=use_cache)


def _last_logits(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1]


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator, vocab_limit: int | None) -> torch.Tensor:
    if vocab_limit is not None and logits.shape[-1] > vocab_limit:
        logits = logits[..., :vocab_limit]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    eos_token_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of ``prompt`` ([B, P] long, on the model's device) -> (tokens [B, n] long, lengths [B]):
    ``n <= max_new_tokens`` is the longest row's length; row ``b`` holds ``lengths[b]`` real tokens (its first EOS
    included), then EOS fill. ``generator`` must live on ``prompt``'s device. ``amp``: bf16 autocast."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, P] with P >= 1, got {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev = prompt.device
    eos = torch.tensor(sorted(set(int(i) for i in eos_token_ids)), dtype=torch.long, device=dev)
    fill = int(eos[0]) if eos.numel() else 0
    b = prompt.shape[0]
    was_training = model.training
    model.eval()
    tokens: list[torch.Tensor] = []
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b, dtype=torch.long, device=dev)
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = _forward(model, prompt, None, use_cache=True)
            past, cache_name = _out_cache(out), cache_kwarg(model)
            seq = prompt
            for i in range(max_new_tokens):
                nxt = _draw(_last_logits(out), temperature, generator, vocab_limit)
                nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
                lengths += (~finished).long()
                tokens.append(nxt)
                if eos.numel():
                    finished |= torch.isin(nxt, eos)
                if i == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
                    break
                if past is not None:
                    out = _forward(model, nxt[:, None], past, use_cache=True, cache_name=cache_name)
                    past = _out_cache(out)
                else:  # no KV cache exposed: run the whole sequence again
                    seq = torch.cat([seq, nxt[:, None]], 1)
                    out = _forward(model, seq, None, use_cache=False)
    finally:
        model.train(was_training)
    return torch.stack(tokens, 1), lengths


def generated_blocks(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    eos_token_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample continuations of ``prompt`` with ``model`` (see :func:`sample_continuations`) and return the aligned
    ``(input_ids [B, P+n-1], labels, mask)`` block of the module docstring."""
    gen, lengths = sample_continuations(
        model, prompt, max_new_tokens=max_new_tokens, generator=generator, temperature=temperature,
        eos_token_ids=eos_token_ids, vocab_limit=vocab_limit, amp=amp,
    )
    p, n = prompt.shape[1], gen.shape[1]
    seq = torch.cat([prompt.long(), gen], 1)
    input_ids, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    # labels[:, t] = seq[:, t + 1]; generated token k sits at label position p - 1 + k
    k = torch.arange(p + n - 1, device=seq.device) - (p - 1)
    mask = (k >= 0)[None, :] & (k[None, :] < lengths[:, None])
    labels[(k >= 0)[None, :].expand_as(labels) & ~mask] = IGNORE_INDEX
    return input_ids, labels, mask
