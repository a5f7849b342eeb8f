#!/usr/bin/env python
"""Side-by-side LM distillation throughput and memory: our loop (distill.lm.train.fit_lm) vs the seed's loop
(bench/seed_lm_loop.py) vs TRL's GKDTrainer, on one teacher/student pair, sequence length, batch and loss.

Every configuration runs in a FRESH SUBPROCESS (so that its peak memory is its own): the parent builds the pair
once (teacher; student = the teacher pruned to about half width with distill.lm.prune), writes it and the token
blocks to a work folder, then runs one worker per configuration and repeat, in alternating order, and prints one
table with ours / seed and ours / TRL, all measured in this one run.

- ours: ``fit_lm(student, blocks, val, LMTrainConfig(steps=W + S, chunk_tokens=C, schedule="constant"),
  teacher=..., kd=LMKDConfig(kind="fkl", temperature=T, alpha=1))``; one row per ``--chunks`` value (``full`` =
  one chunk of batch * seq tokens). bf16 autocast on CUDA, fp32 on CPU (fit_lm's ``amp="auto"``). Timed like TRL:
  a global optimiser-step hook stamps the end of every step after a CUDA synchronisation, a teacher pre-forward
  hook counts the tokens; tokens/s over the last S steps (the single validation runs after the last stamp).
  ``ours-onpolicy``: the same with ``LMKDConfig(lmbda=0.5, gen_prompt_tokens=seq/2, gen_max_new_tokens=seq/2)``
  (fit_lm's own on-policy GKD), next to TRL's lmbda=0.5 row.
- seed: the seed's loop (fp32, its ``lm_distillation_loss`` with the same T and alpha; see seed_lm_loop.py for the
  bugs kept), W untimed + S timed steps.
- trl: ``trl.experimental.gkd.GKDTrainer`` (``beta=0`` = forward KL; ``lmbda=0`` off-policy, ``lmbda=0.5``
  on-policy with prompts of seq/2 tokens and ``max_new_tokens = seq/2``), ``bf16`` on CUDA, W + S steps through
  ``trainer.train()``, each step timed by a callback (synchronised on CUDA). ``--trl-gc`` chooses TRL's
  gradient checkpointing (its SFTConfig default is on; ``off`` matches ours, which does not checkpoint the model).
  TRL's loss always runs at temperature 1 (GKDTrainer.compute_loss does not pass its ``temperature``, which is
  the sampling temperature): with ``--temperature`` other than 1 the loss is not the same.

Memory: CUDA: ``torch.cuda.max_memory_allocated`` over the whole training call (warm-up included), after
resetting the peak once models and data are on the device; ``static`` = what was allocated at that point (the
weights). CPU: the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` right before training;
``resource.getrusage`` max RSS where that is not possible), and its increase over the RSS before training.

Data: synthetic random token blocks (uniform over the vocabulary, seeded), like the image bench's synthetic
images: speed and memory do not depend on the token values (on-policy generation may stop early at EOS).

    python bench/bench_lm.py --tiny --device cpu                    # a tiny random Llama pair, seconds per row
    python bench/bench_lm.py --device cuda --seq-len 512 --batch 16 --json out.json   # SmolLM2-135M teacher
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import distill  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use ./src
    sys.path.insert(0, str(ROOT / "src"))

import torch
from _common import fmt, write_json

RESULT_TAG = "BENCH_LM_RESULT "
SMOLLM2_VOCAB = 49152
TINY = {  # the --tiny teacher: a small random Llama with the SmolLM2 vocabulary (tied embeddings, as SmolLM2)
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096, "tie_word_embeddings": True,
}


# ------------------------------------------------------------------------------------------------ arguments


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--teacher", default=None,
                   help="HF folder of the teacher (default: the converted SmolLM2-135M-Instruct folder, "
                        "`python -m distill.lm.teacher`)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama teacher with the SmolLM2 vocabulary")
    p.add_argument("--random-weights", action="store_true",
                   help="build the teacher from the folder's config.json only, with random weights (same shapes, "
                        "same speed; automatic when the folder holds no weights file)")
    p.add_argument("--student-width", type=float, default=0.5,
                   help="student = teacher pruned to this fraction of the hidden size and MLP width (default 0.5)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 512 CUDA, 128 CPU)")
    p.add_argument("--batch", type=int, default=None, help="blocks per step (default 16 CUDA, 4 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 CUDA, 6 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps first (default 5 CUDA, 2 CPU)")
    p.add_argument("--chunks", default=None,
                   help="our loop's chunk_tokens values, one row each; 'full' = batch * seq (one chunk); default "
                        "full,1024 on CUDA, full,<batch*seq/4> on CPU")
    p.add_argument("--loops", default="ours,ours-onpolicy,seed,trl,trl-onpolicy",
                   help="comma list of ours, ours-onpolicy (fit_lm with lmbda=0.5), seed, trl (lmbda=0), "
                        "trl-onpolicy (lmbda=0.5)")
    p.add_argument("--trl-gc", default="off", help="TRL gradient checkpointing: off, on or off,on (one row each)")
    p.add_argument("--onpolicy-steps", type=int, default=None,
                   help="timed steps of the on-policy TRL row (generation is slow; default min(steps, 10))")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="KD temperature T of ours and the seed (TRL's loss is always at T=1); default 1")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (the seed's 5e-5)")
    p.add_argument("--repeats", type=int, default=1, help="repeats per configuration (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (CPU default: 2)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker before it is killed")
    p.add_argument("--workdir", default=None, help="where the pair and data are written (default: a temp folder)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file (rewritten after each row)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.device = "cuda" if cuda else "cpu"
    a.seq_len = a.seq_len or (512 if cuda else 128)
    a.batch = a.batch or (16 if cuda else 4)
    a.steps = a.steps or (30 if cuda else 6)
    a.warmup = (5 if cuda else 2) if a.warmup is None else a.warmup
    a.onpolicy_steps = a.onpolicy_steps or min(a.steps, 10)
    a.threads = a.threads or (None if cuda else 2)
    a.loops = _csv(a.loops)
    bad = [x for x in a.loops if x not in ("ours", "ours-onpolicy", "seed", "trl", "trl-onpolicy")]
    if bad or not a.loops:
        p.error(f"--loops: unknown {bad}")
    a.trl_gc = _csv(a.trl_gc)
    if not a.trl_gc or any(x not in ("off", "on") for x in a.trl_gc):
        p.error("--trl-gc: off, on or off,on")
    if a.chunks is None:
        a.chunks = "full,1024" if cuda else f"full,{max(1, a.batch * a.seq_len // 4)}"
    chunks = []
    for c in _csv(a.chunks):
        if c == "full":
            chunks.append(a.batch * a.seq_len)
        elif c.isdigit() and int(c) > 0:
            chunks.append(int(c))
        else:
            p.error(f"--chunks: {c!r} is neither 'full' nor a positive int")
    a.chunk_values = list(dict.fromkeys(chunks))
    for name in ("seq_len", "batch", "steps", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.seq_len < 8:
        p.error("--seq-len must be >= 8")
    if a.warmup < 0 or not 0.05 <= a.student_width <= 1:
        p.error("--warmup must be >= 0 and --student-width in [0.05, 1]")
    return a


# ------------------------------------------------------------------------------------------------ memory


def _proc_status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of the training call: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        rss = _proc_status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
            hwm = _proc_status_kb("VmHWM")
            ok = rss is not None and hwm is not None and hwm <= rss * 1.05 + 1024
        except OSError:
            ok = False
        self.method = "VmHWM (reset before training)" if ok else "getrusage ru_maxrss (not reset: includes loading)"
        self.base = (rss or 0) * 1024

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": int(peak), "static_bytes": int(self.base), "delta_bytes": int(peak - self.base),
                "method": self.method}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------------ pair + data


def default_teacher_folder() -> Path:
    from distill.lm.teacher import convert_gguf

    return Path(convert_gguf())


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def build_pair(a: argparse.Namespace, work: Path) -> dict:
    """Teacher + pruned student (+ tokenizer) into ``work``; returns paths and a description."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.lm import prune as P

    tok_folder = None
    teacher_folder = Path(a.teacher) if a.teacher else None
    if a.tiny:
        try:
            tok_folder = teacher_folder or default_teacher_folder()
        except Exception as e:  # noqa: BLE001 - no teacher installed: keep the vocabulary size only
            print(f"(no SmolLM2 folder for the tokenizer: {e}; using vocab {SMOLLM2_VOCAB} and pad id 2)", flush=True)
        vocab = len(AutoTokenizer.from_pretrained(str(tok_folder))) if tok_folder else SMOLLM2_VOCAB
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY))
        source = f"tiny random Llama {TINY} (vocab {vocab})"
    else:
        teacher_folder = teacher_folder or default_teacher_folder()
        tok_folder = teacher_folder
        if a.random_weights or not _has_weights(teacher_folder):
            torch.manual_seed(0)
            teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(teacher_folder)), dtype=torch.float32)
            source = f"{teacher_folder} config with RANDOM weights (seed 0)"
        else:
            teacher = AutoModelForCausalLM.from_pretrained(str(teacher_folder), dtype=torch.float32)
            source = str(teacher_folder)
    teacher.eval()
    sizes = P.current_sizes(teacher.config)
    hidden = max(8, int(round(sizes["hidden"] * a.student_width / 8)) * 8)
    mlp = max(8, int(round(sizes["mlp"] * a.student_width / 8)) * 8)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, teacher.config.vocab_size, (2, min(a.seq_len, 128)), generator=g) for _ in range(2)]
    student, report = P.prune(teacher, calib, hidden=min(hidden, sizes["hidden"]), mlp=min(mlp, sizes["mlp"]))
    out = {"teacher_source": source, "tokenizer": str(tok_folder) if tok_folder else None,
           "teacher_params": P.count_params(teacher), "student_params": P.count_params(student),
           "teacher_sizes": report["sizes_before"], "student_sizes": report["sizes_after"]}
    if a.tiny or source != str(teacher_folder):
        teacher.save_pretrained(work / "teacher")
        out["teacher"] = str(work / "teacher")
    else:
        out["teacher"] = str(teacher_folder)
    student.save_pretrained(work / "student")
    out["student"] = str(work / "student")
    out["vocab"] = int(teacher.config.vocab_size)
    out["pad_token_id"] = int(teacher.config.pad_token_id if teacher.config.pad_token_id is not None else 2)
    return out


def make_blocks(vocab: int, n: int, n_val: int, seq: int, seed: int = 0) -> dict:
    """Random token blocks in fit_lm's layout: a stream cut into overlapping ``seq + 1`` windows."""
    g = torch.Generator().manual_seed(seed)
    def blocks(k):
        stream = torch.randint(0, vocab, (k * seq + 1,), generator=g)
        ids = stream[:-1].view(k, seq).clone()
        labels = stream[1:].view(k, seq).clone()
        return ids, labels, torch.ones(k, seq, dtype=torch.bool)
    return {"train": blocks(n), "val": blocks(n_val)}


def check_losses(T: float) -> dict:
    """Ours vs TRL's generalized_jsd_loss(beta=0) vs the seed's loss, on random logits: the same objective?"""
    import seed_lm_loop

    from distill.lm.losses import distill_loss

    g = torch.Generator().manual_seed(2)
    B, L, V = 2, 16, 500
    s, t = torch.randn(B, L, V, generator=g) * 2, torch.randn(B, L, V, generator=g) * 2
    y = torch.randint(0, V, (B, L), generator=g)
    # aligned (already shifted) for ours; the seed and TRL shift internally: compare on the same L-1 positions
    ours = distill_loss(s[:, :-1], t[:, :-1], y[:, 1:], torch.ones(B, L - 1, dtype=torch.bool), kind="fkl",
                        temperature=T, alpha=1.0)
    out = {"ours_fkl": float(ours)}
    seed = seed_lm_loop.lm_distillation_loss(s, t, y, T=T, alpha=1.0, pad_token_id=2)
    out["seed_over_ours"] = float(seed / ours)
    out["seed_over_ours_expected"] = L - 1  # 'batchmean' on [B, L-1, V] sums over tokens (seed bug kept)
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        trl = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=y[:, 1:], beta=0.0, temperature=T)
        out["trl_minus_ours_at_T"] = float((trl * T * T - ours).abs())  # TRL has no T**2 factor
    except Exception as e:  # noqa: BLE001
        out["trl_error"] = f"{type(e).__name__}: {e}"
    return out


# ------------------------------------------------------------------------------------------------ workers


def _load_worker_inputs(spec: dict):
    from transformers import AutoModelForCausalLM

    dev = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    data = torch.load(spec["data"], weights_only=True)
    return dev, teacher, student, data


def worker_ours(spec: dict) -> dict:
    from distill.lm.train import LMKDConfig, LMTrainConfig, fit_lm

    dev, teacher, student, data = _load_worker_inputs(spec)
    W, S, B, L = spec["warmup"], spec["steps"], spec["batch"], spec["seq_len"]
    cfg = LMTrainConfig(
        steps=W + S, batch_size=B, grad_accum=1, lr=spec["lr"], weight_decay=0.01, betas=(0.9, 0.999),
        warmup_steps=0, schedule="constant", grad_clip=1.0, seed=0, device=spec["device"], amp="auto",
        eval_every=W + S, eval_batches=1, chunk_tokens=spec["chunk_tokens"], progress="off",
    )  # one validation, after the last step: outside the timed window
    kd_kw = {"kind": "fkl", "temperature": spec["temperature"], "alpha": 1.0}
    lmbda = float(spec.get("lmbda") or 0.0)
    if lmbda > 0:  # on-policy GKD in fit_lm (LMKDConfig's lmbda / gen_* fields), as TRL's lmbda=0.5 row
        kd_kw.update(lmbda=lmbda, gen_prompt_tokens=L // 2, gen_max_new_tokens=L - L // 2, gen_temperature=1.0)
    kd = LMKDConfig(**kd_kw)
    student.to(dev)
    teacher.to(dev)
    # Per-step timing as for TRL: a global optimiser-step hook stamps the end of every step (after a CUDA
    # synchronisation); a teacher pre-forward hook counts the tokens trained on (generated ones included).
    seen = [0]
    marks: list[tuple[float, int]] = []

    def count(_mod, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        seen[0] += int(x.numel()) if x is not None else 0

    def stamp(_opt, _args, _kwargs):
        _sync(dev)
        marks.append((time.perf_counter(), seen[0]))

    h_count = teacher.register_forward_pre_hook(count, with_kwargs=True)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    h_stamp = register_optimizer_step_post_hook(stamp)
    mem = PeakMemory(dev)
    mem.start()
    t0 = time.perf_counter()
    try:
        _, res = fit_lm(student, data["train"], data["val"], cfg, teacher=teacher, kd=kd, desc="bench-lm")
    finally:
        h_count.remove()
        h_stamp.remove()
    wall = time.perf_counter() - t0
    m = mem.stop()
    if len(marks) != W + S:
        raise RuntimeError(f"counted {len(marks)} optimiser steps, expected {W + S}")
    t_a, n_a = marks[W - 1] if W > 0 else (t0, 0)
    t_b, n_b = marks[-1]
    return {"tokens_per_second": (n_b - n_a) / (t_b - t_a), "seconds": t_b - t_a, "tokens": n_b - n_a, "steps": S,
            "memory": m, "wall_seconds": wall, "runtime": res.runtime, "lmbda": lmbda,
            "fit_tokens_per_second_incl_warmup": res.tokens_per_second,
            "train_loss_last": res.history[-1]["train_loss"]}


def worker_seed(spec: dict) -> dict:
    import seed_lm_loop

    dev, teacher, student, data = _load_worker_inputs(spec)
    ids = data["train"][0]
    student.to(dev)
    teacher.to(dev)
    mem = PeakMemory(dev)
    mem.start()
    t0 = time.perf_counter()
    r = seed_lm_loop.time_seed_lm_loop(
        student, teacher, ids, torch.ones_like(ids), dev, batch_size=spec["batch"], warmup_steps=spec["warmup"],
        steps=spec["steps"], T=spec["temperature"], alpha=1.0, lr=spec["lr"], pad_token_id=spec["pad_token_id"],
    )
    r["wall_seconds"] = time.perf_counter() - t0
    r["memory"] = mem.stop()
    return r


def worker_trl(spec: dict) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("WANDB_DISABLED", "true")
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dev, teacher, student, data = _load_worker_inputs(spec)
    W, S, B, L = spec["warmup"], spec["steps"], spec["batch"], spec["seq_len"]
    lmbda, gc = spec["lmbda"], spec["gc"]
    prompt_len = L // 2 if lmbda > 0 else L
    ids = data["train"][0]
    if spec.get("tokenizer"):
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    else:  # no SmolLM2 folder (tiny without the teacher installed): a minimal stand-in never used to tokenise
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                      pad_token="<pad>")
        tok.pad_token_id = spec["pad_token_id"]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def collate(features):
        x = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        ones = torch.ones_like(x)
        return {"input_ids": x, "attention_mask": ones, "labels": x.clone(),
                "prompts": x[:, :prompt_len].contiguous(), "prompt_attention_mask": ones[:, :prompt_len].contiguous()}

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            _sync(dev)
            self.ends.append(time.perf_counter())

    tokens_per_step = []

    class CountingGKD(GKDTrainer):  # measurement only: counts the tokens of each step, then TRL's own loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens_per_step.append(int(inputs["input_ids"].numel()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    out_dir = tempfile.mkdtemp(prefix="bench_lm_trl_")
    cuda = dev.type == "cuda"
    args = GKDConfig(
        output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=1, max_steps=W + S,
        learning_rate=spec["lr"], weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        bf16=cuda, fp16=False, use_cpu=not cuda, dataloader_num_workers=0, dataloader_pin_memory=cuda, seed=0,
        gradient_checkpointing=gc, lmbda=lmbda, beta=0.0, temperature=1.0, max_new_tokens=max(1, L - prompt_len),
        max_length=L, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
    )
    timer = Timer()
    trainer = CountingGKD(model=student, teacher_model=teacher, args=args, data_collator=collate,
                          train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}), processing_class=tok,
                          callbacks=[timer])
    mem = PeakMemory(dev)
    mem.start()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    m = mem.stop()
    shutil.rmtree(out_dir, ignore_errors=True)
    ends = timer.ends
    if len(ends) != W + S:
        raise RuntimeError(f"TRL ran {len(ends)} steps, expected {W + S}")
    start = ends[W - 1] if W > 0 else t0
    secs = ends[-1] - start
    tokens = sum(tokens_per_step[W:W + S]) if len(tokens_per_step) >= W + S else S * B * L
    return {"tokens_per_second": tokens / secs, "seconds": secs, "tokens": int(tokens), "steps": S,
            "memory": m, "wall_seconds": wall, "trl": trl.__version__, "transformers": transformers.__version__,
            "optim": str(args.optim), "gradient_checkpointing": gc, "lmbda": lmbda,
            "tokens_per_step": tokens_per_step[W:W + S]}


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    fn = {"ours": worker_ours, "seed": worker_seed, "trl": worker_trl}[spec["loop"]]
    r = fn(spec)
    print(RESULT_TAG + json.dumps(r, default=str), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ parent


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def configurations(a) -> list[dict]:
    confs = []
    if "ours" in a.loops:
        for c in a.chunk_values:
            label = "full" if c == a.batch * a.seq_len else str(c)
            confs.append({"name": f"ours chunk={label}", "loop": "ours", "chunk_tokens": c})
    if "ours-onpolicy" in a.loops:
        confs.append({"name": "ours lmbda=0.5", "loop": "ours", "chunk_tokens": a.chunk_values[-1], "lmbda": 0.5,
                      "steps": a.onpolicy_steps, "warmup": min(a.warmup, 2)})
    if "seed" in a.loops:
        confs.append({"name": "seed", "loop": "seed"})
    if "trl" in a.loops:
        for gc in a.trl_gc:
            confs.append({"name": f"trl lmbda=0 gc={gc}", "loop": "trl", "lmbda": 0.0, "gc": gc == "on"})
    if "trl-onpolicy" in a.loops:  # one row, with the first --trl-gc value (generation dominates it)
        gc = a.trl_gc[0]
        confs.append({"name": f"trl lmbda=0.5 gc={gc}", "loop": "trl", "lmbda": 0.5, "gc": gc == "on",
                      "steps": a.onpolicy_steps, "warmup": min(a.warmup, 2)})
    return confs


def run_worker(spec: dict, work: Path, timeout: int) -> tuple[dict | None, str]:
    path = work / f"spec-{spec['name'].replace(' ', '_').replace('=', '')}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    env["TOKENIZERS_PARALLELISM"] = "false"
    try:
        cp = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, f"timed out after {timeout}s: {(e.stderr or '')[-2000:] if isinstance(e.stderr, str) else ''}"
    for line in cp.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), ""
    tail = (cp.stdout[-1500:] + "\n" + cp.stderr[-3000:]).strip()
    return None, f"exit {cp.returncode}: {tail}"


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a.worker)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"none (CPU, {os.cpu_count()} cores)"
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_lm_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        import transformers

        pair = build_pair(a, work)
        n = a.batch * max(a.warmup + a.steps, 2)
        torch.save(make_blocks(pair["vocab"], n, a.batch, a.seq_len), work / "data.pt")
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        for mod in ("accelerate", "trl", "datasets"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001
                versions[mod] = f"unavailable ({type(e).__name__})"
        meta = {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": a.device,
            "card": card, "versions": versions, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": a.threads or torch.get_num_threads(),
            "platform": platform.platform(), "argv": sys.argv[1:] if argv is None else list(argv),
            "args": {k: v for k, v in vars(a).items() if k not in ("json", "worker")}, "pair": pair,
            "loss_check": check_losses(a.temperature),
        }
        print(f"device: {a.device} | card: {card} | " + " | ".join(f"{k} {v}" for k, v in versions.items())
              + f" | torch threads {meta['torch_threads']}", flush=True)
        print(f"teacher: {pair['teacher_source']} ({pair['teacher_params'] / 1e6:.1f}M params, {pair['teacher_sizes']})",
              flush=True)
        print(f"student: pruned to {pair['student_sizes']} ({pair['student_params'] / 1e6:.1f}M params)", flush=True)
        print(f"seq {a.seq_len} | batch {a.batch} | {a.warmup} warm-up + {a.steps} timed steps | loss forward KL, "
              f"T={a.temperature}, alpha=1 | lr {a.lr} | repeats {a.repeats}", flush=True)
        lc = meta["loss_check"]
        print(f"loss check: seed/ours = {lc['seed_over_ours']:.2f} (= L-1 = {lc['seed_over_ours_expected']}: the seed's "
              f"'batchmean' sums over tokens); |TRL*T^2 - ours| = {lc.get('trl_minus_ours_at_T', lc.get('trl_error'))}",
              flush=True)
        if a.temperature != 1.0:
            print("note: TRL's GKD loss runs at T=1 whatever --temperature says: its rows use another loss scale",
                  flush=True)

        base = {"device": a.device, "threads": a.threads, "teacher": pair["teacher"], "student": pair["student"],
                "tokenizer": pair["tokenizer"], "data": str(work / "data.pt"), "batch": a.batch,
                "seq_len": a.seq_len, "warmup": a.warmup, "steps": a.steps, "temperature": a.temperature,
                "lr": a.lr, "pad_token_id": pair["pad_token_id"]}
        confs = configurations(a)
        if "trl_error" in lc and any(c["loop"] == "trl" for c in confs):
            print(f"TRL unavailable ({lc['trl_error']}): its rows are skipped", flush=True)
            confs = [c for c in confs if c["loop"] != "trl"]
        runs, failures = [], []
        for rep in range(a.repeats):
            order = confs if rep % 2 == 0 else list(reversed(confs))
            for c in order:
                spec = {**base, **c}
                t0 = time.perf_counter()
                r, err = run_worker(spec, work, a.timeout)
                if r is None:
                    failures.append({"name": c["name"], "repeat": rep, "error": err})
                    print(f"  repeat {rep + 1}/{a.repeats} {c['name']:22s} FAILED: {err.splitlines()[-1] if err else ''}",
                          flush=True)
                    print("    " + err.replace("\n", "\n    ")[-2500:], file=sys.stderr, flush=True)
                else:
                    r.update(name=c["name"], repeat=rep)
                    runs.append(r)
                    m = r["memory"]
                    print(f"  repeat {rep + 1}/{a.repeats} {c['name']:22s} {fmt(r['tokens_per_second']):>9s} tok/s over "
                          f"{r['steps']} steps ({r['seconds']:.2f}s); peak {gib(m['peak_bytes'])} GiB "
                          f"(+{gib(m['delta_bytes'])} over {gib(m['static_bytes'])})  "
                          f"[worker {time.perf_counter() - t0:.0f}s, total {time.perf_counter() - t_start:.0f}s]", flush=True)
                write_json(a.json, {"meta": meta, "partial": True, "runs": runs, "failures": failures})

        rows = []
        for c in confs:
            rs = [r for r in runs if r["name"] == c["name"]]
            if not rs:
                continue
            rows.append({
                "name": c["name"], "loop": c["loop"], "lmbda": c.get("lmbda", 0.0),
                "tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
                "peak_bytes": statistics.median(r["memory"]["peak_bytes"] for r in rs),
                "delta_bytes": statistics.median(r["memory"]["delta_bytes"] for r in rs),
                "static_bytes": statistics.median(r["memory"]["static_bytes"] for r in rs),
                "all_tokens_per_second": [r["tokens_per_second"] for r in rs], "memory_method": rs[0]["memory"]["method"],
            })
        by = {r["name"]: r for r in rows}
        seed = by.get("seed")
        trl_rows = [r for r in rows if r["loop"] == "trl" and r["lmbda"] == 0.0]  # the off-policy comparison
        mem_label = "peak alloc GiB" if dev.type == "cuda" else "peak RSS GiB"
        print()
        print(f"{card} | torch {torch.__version__} | transformers {versions['transformers']} | trl {versions['trl']} | "
              f"seq {a.seq_len} x batch {a.batch} | {a.steps} timed steps | median of {a.repeats}")
        print(f"| loop | tokens/s | {mem_label} | increase in training GiB | ours / seed tok/s | ours / TRL tok/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            vs_seed = vs_trl = ""
            if r["loop"] == "ours" and r["lmbda"] == 0.5:
                on = [t for t in rows if t["loop"] == "trl" and t["lmbda"] == 0.5]
                vs_trl = ", ".join(f"{r['tokens_per_second'] / t['tokens_per_second']:.2f}x ({t['name'].split(' ', 1)[1]})"
                                   for t in on)
            elif r["loop"] == "ours":
                if seed:
                    vs_seed = f"{r['tokens_per_second'] / seed['tokens_per_second']:.2f}x"
                vs_trl = ", ".join(f"{r['tokens_per_second'] / t['tokens_per_second']:.2f}x ({t['name'].split(' ', 1)[1]})"
                                   for t in trl_rows)
            print(f"| {r['name']} | {fmt(r['tokens_per_second'])} | {gib(r['peak_bytes'])} | {gib(r['delta_bytes'])} | "
                  f"{vs_seed} | {vs_trl} |")
        target = None
        ours_rows = [r for r in rows if r["loop"] == "ours" and not r["lmbda"]]
        if ours_rows and trl_rows:
            best_trl = max(trl_rows, key=lambda r: r["tokens_per_second"])
            fits = [r for r in ours_rows if r["peak_bytes"] <= best_trl["peak_bytes"]]
            best = max(fits or ours_rows, key=lambda r: r["tokens_per_second"])
            ratio = best["tokens_per_second"] / best_trl["tokens_per_second"]
            applies = dev.type == "cuda" and not a.tiny  # random teacher weights: same shapes, same speed
            target = {"required_ratio": 1.5, "ours": best["name"], "trl": best_trl["name"], "ratio": ratio,
                      "ours_memory_le_trl": bool(fits), "met": ratio >= 1.5 and bool(fits), "applies": applies}
            note = "" if applies else " (the target is about a GPU run with the SmolLM2 teacher: not this run)"
            print(f"target: >= 1.5x TRL GKD tokens/s at no more memory: {best['name']} {ratio:.2f}x {best_trl['name']}"
                  f", memory {'<=' if fits else '>'} TRL's -> {'met' if target['met'] else 'NOT met'}{note}")
        for f in failures:
            print(f"FAILED: {f['name']} (repeat {f['repeat'] + 1}): {f['error'].splitlines()[-1] if f['error'] else ''}")
        print(f"total {time.perf_counter() - t_start:.0f}s")
        out = {"meta": meta, "partial": False, "rows": rows, "target": target, "runs": runs, "failures": failures}
        write_json(a.json, out)
        if a.json:
            print(f"wrote {a.json}")
        return out
    finally:
        if not a.keep_workdir and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
