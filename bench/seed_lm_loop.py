"""The seed document's language-model distillation loop (its section 6.4), re-implemented (our own code) for benchmarking.

What the seed's LM lab does (GPT-2 Medium teacher -> GPT-2 Small student, WikiText-2 lines padded to 128 tokens),
and what this module reproduces, line for line where it matters for speed and memory:

- data: ``TensorDataset(input_ids, attention_mask)`` in ``DataLoader(batch_size=8, shuffle=True)`` (no workers,
  no pin_memory); labels are ``input_ids`` themselves;
- fp32 everywhere: no autocast, no torch.compile, weights in float32; AdamW(lr=5e-5, weight_decay=0.01) with
  the default (foreach, unfused) implementation; ``clip_grad_norm_(student.parameters(), 1.0)``;
- per batch: ``.to(device)``, the teacher under ``torch.no_grad()`` (put in eval mode once, before the loop),
  the student forward, ``lm_distillation_loss``, ``zero_grad()``, ``backward()``, clip, ``step()``, and
  ``total_loss += loss.item()`` (a host synchronisation every step), a print every 50 batches;
- ``lm_distillation_loss(student_logits, teacher_logits, labels, T=3.0, alpha=0.5)``: shifts both logits with
  ``[:, :-1, :].contiguous()`` (full-vocabulary copies), ``F.kl_div(log_softmax(s/T), softmax(t/T),
  reduction='batchmean') * T*T`` over the whole ``[B, L-1, V]`` tensors, plus ``F.cross_entropy`` over the shifted
  logits with ``ignore_index=tokenizer.pad_token_id``; every intermediate is a full ``[B, L-1, V]`` fp32 tensor.

Seed bugs KEPT (they do not crash; they change what is optimised or cost time/memory, and that is the point of
the comparison):

1. ``reduction='batchmean'`` on 3-D logits divides the summed KL by the batch size only, not by the number of
   tokens: the soft term is ``(L - 1)`` times the per-token mean (127x at the seed's length 128), so ``alpha``
   does not weigh what it claims and the effective learning rate of the soft term scales with the length.
2. No mask in the soft term: padded positions (the seed pads every line to 128 tokens) are distilled too.
3. ``ignore_index=pad_token_id`` with ``pad_token = eos_token`` drops every real EOS target from the hard term;
   there is no other masking (labels are the raw ``input_ids``).
4. ``loss.item()`` every step (a device-host synchronisation), unfused AdamW, fp32 logits, and the
   ``.contiguous()`` copies of both logits.
5. The teacher's ``.eval()`` is called once, never re-asserted (harmless here).

Seed bug FIXED, only because it would crash here:

- The loss reads the global ``tokenizer`` (``ignore_index=tokenizer.pad_token_id``), a NameError outside the
  notebook: here ``pad_token_id`` is a parameter (the seed's value: the EOS id, since the seed sets
  ``tokenizer.pad_token = tokenizer.eos_token``; the benchmark passes the pair's pad id, 2 = EOS for SmolLM2).
  ``None`` (a tokenizer without pad token, where ``cross_entropy(ignore_index=None)`` raises) falls back to -100.

Nothing else needed changing: ``shift_student.view(-1, V)`` works on the ``.contiguous()`` copy, and the models
share one vocabulary. The benchmark calls the loss with ``alpha=1`` and ``T`` from the command line (the seed's
defaults are T=3, alpha=0.5) so that all three loops optimise forward KL at the same T; with ``alpha=1`` the
seed's function still computes its (zero-weighted) hard cross-entropy, as written.

Only the timing harness is added: ``warmup_steps`` untimed steps, then ``steps`` timed steps (synchronised on
CUDA at both ends); the DataLoader is re-created when it runs out (an epoch boundary, as in the seed).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def lm_distillation_loss(student_logits, teacher_logits, labels, T: float = 3.0, alpha: float = 0.5, pad_token_id=None):
    """The seed's loss, as written (bugs 1-3 above kept). ``pad_token_id`` replaces the seed's global tokenizer."""
    # Shift: predict the next token
    shift_student = student_logits[:, :-1, :].contiguous()
    shift_teacher = teacher_logits[:, :-1, :].contiguous()
    shift_labels = labels[:, 1:].contiguous()

    # soft-target distillation loss ('batchmean' on [B, L-1, V]: divides by B only -- seed bug kept)
    soft_loss = F.kl_div(
        F.log_softmax(shift_student / T, dim=-1),
        F.softmax(shift_teacher / T, dim=-1),
        reduction="batchmean",
    ) * (T * T)

    # hard-label loss (ignore_index = pad id = EOS id in the seed -- seed bug kept)
    hard_loss = F.cross_entropy(
        shift_student.view(-1, shift_student.size(-1)),
        shift_labels.view(-1),
        ignore_index=-100 if pad_token_id is None else int(pad_token_id),  # crash fix: no global tokenizer
    )
    return alpha * soft_loss + (1 - alpha) * hard_loss


def make_loader(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8) -> DataLoader:
    """The seed's ``DataLoader(TensorDataset(input_ids, attention_mask), batch_size, shuffle=True)``."""
    return DataLoader(TensorDataset(input_ids, attention_mask), batch_size=batch_size, shuffle=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_seed_lm_loop(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 8,
    warmup_steps: int = 2,
    steps: int = 10,
    T: float = 3.0,
    alpha: float = 0.5,
    lr: float = 5e-5,
    pad_token_id=None,
    on_timing_start=None,
) -> dict:
    """Run the seed's loop for ``warmup_steps + steps`` batches; time the last ``steps``.

    ``input_ids`` / ``attention_mask``: ``[N, L]`` CPU tensors (the seed's tokenised, padded lines); batches of
    ``batch_size`` rows, the last partial batch of an epoch included, as in the seed. ``on_timing_start()`` is
    called right before the timed steps (after the synchronisation; the benchmark resets its memory peak there
    only on request). Returns ``{"tokens_per_second", "seconds", "tokens", "steps", "last_loss"}`` where tokens are
    input tokens (``batch * L``) of the timed steps.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    student.to(device)
    teacher.to(device)
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    loader = make_loader(input_ids, attention_mask, batch_size)
    student.train()
    total_loss = 0.0
    tokens, t0, loss = 0, None, None
    it = iter(loader)
    batch_idx = 0
    for i in range(warmup_steps + steps):
        if i == warmup_steps:
            _sync(device)
            if on_timing_start is not None:
                on_timing_start()
            t0 = time.perf_counter()
        try:
            ids, am = next(it)
        except StopIteration:  # an epoch boundary
            it, batch_idx = iter(loader), 0
            ids, am = next(it)
        ids = ids.to(device)
        am = am.to(device)

        # teacher inference
        with torch.no_grad():
            teacher_outputs = teacher(input_ids=ids, attention_mask=am)
        # student inference
        student_outputs = student(input_ids=ids, attention_mask=am)
        # distillation loss (labels = input_ids, as in the seed)
        loss = lm_distillation_loss(student_outputs.logits, teacher_outputs.logits, ids, T=T, alpha=alpha,
                                    pad_token_id=pad_token_id)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        total_loss += loss.item()
        batch_idx += 1
        if batch_idx % 50 == 0:
            print(f"  Epoch 1, Batch {batch_idx}/{len(loader)}, Loss: {loss.item():.4f}", flush=True)
        if i >= warmup_steps:
            tokens += ids.numel()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"tokens_per_second": tokens / dt, "seconds": dt, "tokens": tokens, "steps": steps,
            "last_loss": float(loss.item()) if loss is not None else None}
