"""The language-model stages (student init, train teacher / baseline / student, evaluate) as plain functions over
folders, mirroring :mod:`distill.image.stages` for the image kind.

A trained LM folder is a normal Hugging Face folder (``save_pretrained``: config.json + model.safetensors, plus
the tokenizer files) so ``AutoModelForCausalLM.from_pretrained`` loads it, and beside it:

* ``distill-config.json``: role, the stage fingerprint (+ its sha256), train/KD configs, data manifest sha256,
  init and teacher weights sha256, the tokenizer identity;
* ``metrics.json`` (summary of the fit), ``history.json`` (one row per validation), ``checkpoints/`` (fit_lm's);
* ``eval_<split>.json`` written by :func:`evaluate_lm_stage`.

A stage re-run into a folder holding another fingerprint (another role, config, data, init or teacher) is refused
with :class:`~distill.checkpoint.CheckpointMismatch` before any compute; ``resume=False`` wipes it instead.
Tokenizers are compared (vocab size, EOS id, definition sha256 of
:func:`distill.lm.data.tokenizer_identity`) before any compute: teacher vs student vs the prepared data.

Roles: ``teacher`` and ``baseline`` train with hard labels only (``LMKDConfig(kind="ce")``); ``student`` distils
from ``teacher_dir`` with ``kd_cfg``. Baseline and student given the same init folder and train config start from
the same weights and see the same steps and data.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from .. import __version__
from ..checkpoint import CheckpointMismatch
from ..files import atomic_write_json, sha256_bytes, sha256_file, sha256_json
from ..stage_output import claim_out_dir
from .data import load_blocks, read_text_manifest, tokenizer_identity
from .evaluate import evaluate_lm, model_size, state_bytes
from .prune import count_params, prune
from .train import LMKDConfig, LMTrainConfig, fit_lm, lm_kd_fingerprint, lm_train_fingerprint

log = logging.getLogger("distill.lm.stages")

Role = Literal["teacher", "baseline", "student"]
ROLES = ("teacher", "baseline", "student")
DISTILL_CONFIG = "distill-config.json"
FINGERPRINT_VERSION = 1
_STAGE_OUTPUTS = ("model.safetensors", "config.json", "generation_config.json", DISTILL_CONFIG, "metrics.json",
                  "history.json")

__all__ = [
    "DISTILL_CONFIG",
    "ROLES",
    "CheckpointMismatch",
    "TokenizerMismatch",
    "check_same_tokenizer",
    "evaluate_lm_stage",
    "init_student",
    "load_lm",
    "load_tokenizer",
    "train_lm_stage",
]


class TokenizerMismatch(ValueError):
    """Two tokenizers (teacher / student / data) that differ; the message names both."""


# ------------------------------------------------------------------------------------------------- loading


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# transformers' from_pretrained builds a model under process-wide state (the meta-device init context, weight
# tying): two threads loading at once (pipeline stages running concurrently in one process) left a tied
# lm_head on the meta device in every load (tests/test_lm_stages.py reproduces it). Loads are serialised.
_LOAD_LOCK = threading.Lock()


def load_lm(folder: str | os.PathLike) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"model folder {folder}: {len(empty)} tensor(s) were not loaded (e.g. {empty[0]})")
    return model.eval()


def _identity(tok: Any) -> dict:
    if isinstance(tok, Mapping):
        return dict(tok)
    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    return tokenizer_identity(tok)


def _describe(name: str, tok: Any) -> str:
    return f"{name} ({tok})" if isinstance(tok, (str, os.PathLike)) else name


def check_same_tokenizer(a: Any, b: Any, *, names: tuple[str, str] = ("teacher", "student")) -> dict:
    """Refuse two different tokenizers with :class:`TokenizerMismatch` naming both. ``a`` and ``b`` are tokenizer
    objects, folders holding one, or :func:`~distill.lm.data.tokenizer_identity` dicts (a data manifest's
    ``tokenizer`` entry). Compared: vocabulary size, EOS id, definition sha256. Returns ``a``'s identity."""
    ia, ib = _identity(a), _identity(b)
    diffs = [f"{k}: {ia.get(k)!r} vs {ib.get(k)!r}" for k in ("vocab_size", "eos_id", "sha256") if ia.get(k) != ib.get(k)]
    if diffs:
        raise TokenizerMismatch(
            f"tokenizer mismatch between {_describe(names[0], a)} [{ia.get('class')}] and {_describe(names[1], b)} "
            f"[{ib.get('class')}]: " + "; ".join(diffs) + ". Distillation needs one shared tokenizer."
        )
    return ia


def _weights_sha256(model: nn.Module) -> str:
    """sha256 of the state dict serialised as safetensors (shared tensors once, sorted keys)."""
    return sha256_bytes(state_bytes(model))


def _folder_weights_sha256(folder: Path) -> str:
    f = folder / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"model folder {folder}: model.safetensors missing (not a saved HF model?)")
    return sha256_file(f)


# ------------------------------------------------------------------------------------------------ init


_CONFIG_KEYS = {"hidden": "hidden_size", "mlp": "intermediate_size", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "layers": "num_hidden_layers"}


def init_student(
    teacher: str | os.PathLike | nn.Module,
    *,
    how: Literal["prune", "config"] = "prune",
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    calibration_batches: int = 4,
    batch_size: int = 8,
    hidden: int | None = None,
    mlp: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    target_params: int | None = None,
) -> tuple[nn.Module, dict]:
    """Make a student from the teacher (a folder or a model): ``how="config"``: a smaller config of the same family
    (the given sizes replace the teacher's; ``head_dim`` kept when heads change), random init seeded by ``seed``;
    ``how="prune"``: :func:`distill.lm.prune.prune` with calibration from the first ``calibration_batches`` batches
    of ``data_dir``'s TRAIN split. With ``out_dir`` the student is saved as an HF folder (+ the teacher folder's
    tokenizer, or ``tokenizer``) with ``init-report.json``. Returns ``(student, report)``."""
    t_dir = Path(teacher) if isinstance(teacher, (str, os.PathLike)) else None
    t_model = load_lm(t_dir) if t_dir is not None else teacher
    if t_dir is not None and tokenizer is None:
        tokenizer = load_tokenizer(t_dir)
    if data_dir is not None and tokenizer is not None:
        check_same_tokenizer(tokenizer, read_text_manifest(data_dir)["tokenizer"], names=("teacher", f"data {data_dir}"))
    sizes = {"hidden": hidden, "mlp": mlp, "heads": heads, "kv_heads": kv_heads, "layers": layers}
    if how == "config":
        if target_params is not None:
            raise ValueError("target_params needs how='prune'")
        cfg = copy.deepcopy(t_model.config)
        old_head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for k, v in sizes.items():
            if v is not None:
                setattr(cfg, _CONFIG_KEYS[k], int(v))
        if heads is not None and kv_heads is None and cfg.num_attention_heads % cfg.num_key_value_heads:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if hasattr(cfg, "head_dim"):
            cfg.head_dim = old_head_dim if hidden is None else cfg.hidden_size // cfg.num_attention_heads
        torch.manual_seed(seed)
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        report = {"how": "config", "seed": seed, "sizes": {k: v for k, v in sizes.items() if v is not None},
                  "params_before": count_params(t_model), "params_after": count_params(student)}
    elif how == "prune":
        if data_dir is None:
            raise ValueError("how='prune' needs data_dir (calibration blocks come from its train split)")
        ids, _, mask = load_blocks(data_dir, "train")
        n = min(len(ids), calibration_batches * batch_size)
        calib = [(ids[i:i + batch_size], torch.ones_like(ids[i:i + batch_size])) for i in range(0, n, batch_size)]
        student, report = prune(t_model, calib, target_params=target_params, **sizes)
        report = {"how": "prune", "calibration_blocks": n, **report}
    else:
        raise ValueError(f"how must be 'prune' or 'config', got {how!r}")
    student = student.float().eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        atomic_write_json(out / "init-report.json", {k: v for k, v in report.items() if k != "importance"})
    return student, report


# ------------------------------------------------------------------------------------------------ training


def lm_stage_fingerprint(role: str, *, init_weights_sha256: str, init_config: dict, train_cfg: LMTrainConfig,
                         kd_cfg: LMKDConfig | None, data_manifest_sha256: str,
                         teacher_weights_sha256: str | None) -> dict:
    return {
        "lm_stage": FINGERPRINT_VERSION,
        "role": role,
        "init_weights_sha256": init_weights_sha256,
        "init_config_sha256": sha256_json(init_config),
        "train": lm_train_fingerprint(train_cfg),
        "kd": lm_kd_fingerprint(kd_cfg) if kd_cfg is not None else None,
        "data_manifest_sha256": data_manifest_sha256,
        "teacher_weights_sha256": teacher_weights_sha256,
    }


def _claim_out_dir(out_dir: Path, fingerprint: dict, resume: bool) -> None:
    """:func:`distill.stage_output.claim_out_dir` for an LM stage folder (fingerprint in distill-config.json; an
    HF config.json without it and without checkpoints is a foreign model)."""
    claim_out_dir(out_dir, fingerprint, resume, outputs=_STAGE_OUTPUTS, config_name=DISTILL_CONFIG,
                  foreign_markers=("config.json",))


def train_lm_stage(
    role: Role,
    init: str | os.PathLike | nn.Module,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    teacher_dir: str | os.PathLike | None = None,
    train_cfg: LMTrainConfig,
    kd_cfg: LMKDConfig | None = None,
    tokenizer: Any = None,
    log_fn: Callable[[dict, int], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    resume: bool = True,
) -> dict:
    """Train one role into ``out_dir`` starting from ``init`` (an HF model folder, e.g. from :func:`init_student`,
    or a model object; the object is not modified). ``teacher``/``baseline``: hard labels only (kind ``ce``);
    ``student``: distilled from ``teacher_dir`` with ``kd_cfg`` (default :class:`LMKDConfig`). Before any compute:
    tokenizer checks (init / teacher / data) and the out_dir fingerprint claim. Returns the metrics.json dict."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "student" and teacher_dir is None:
        raise ValueError("role 'student' needs teacher_dir (the output folder of the teacher stage)")
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    init_dir = Path(init) if isinstance(init, (str, os.PathLike)) else None
    if tokenizer is None:
        src = init_dir if init_dir is not None and (init_dir / "tokenizer_config.json").exists() else teacher_dir
        if src is None:
            raise ValueError("no tokenizer: pass tokenizer=, or an init folder holding one")
        tokenizer = load_tokenizer(src)
    data_manifest = read_text_manifest(data_dir)
    tok_id = check_same_tokenizer(tokenizer, data_manifest["tokenizer"], names=(role, f"data {data_dir}"))
    teacher_sha = None
    if role == "student":
        teacher_dir = Path(teacher_dir)
        check_same_tokenizer(teacher_dir, tokenizer, names=("teacher", role))
        teacher_sha = _folder_weights_sha256(teacher_dir)
    model = load_lm(init_dir) if init_dir is not None else copy.deepcopy(init).float()
    kd = (kd_cfg or LMKDConfig()) if role == "student" else LMKDConfig(kind="ce")
    fingerprint = lm_stage_fingerprint(
        role, init_weights_sha256=_weights_sha256(model), init_config=model.config.to_dict(), train_cfg=train_cfg,
        kd_cfg=kd if role == "student" else None, data_manifest_sha256=sha256_file(data_dir / "manifest.json"),
        teacher_weights_sha256=teacher_sha,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_out_dir(out_dir, fingerprint, resume)

    train_blocks, val_blocks = load_blocks(data_dir, "train"), load_blocks(data_dir, "val")
    teacher = load_lm(teacher_dir) if role == "student" else None
    desc = role if role != "student" else f"student {kd.kind} T={kd.temperature:g} a={kd.alpha:g}"
    t0 = time.perf_counter()
    model, res = fit_lm(
        model, train_blocks, val_blocks, train_cfg, teacher=teacher, kd=kd, log_fn=log_fn,
        ckpt_dir=out_dir / "checkpoints", on_checkpoint=on_checkpoint, resume=resume, fingerprint=fingerprint,
        desc=desc,
    )
    wall = time.perf_counter() - t0
    model = model.to("cpu").float().eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params, size_mb = model_size(model)
    meta = {
        "role": role,
        "train": train_cfg.model_dump(mode="json"),
        "kd": kd.model_dump(mode="json"),
        "data_dir": str(data_dir),
        "data_manifest_sha256": fingerprint["data_manifest_sha256"],
        "init": str(init_dir) if init_dir is not None else None,
        "init_weights_sha256": fingerprint["init_weights_sha256"],
        "teacher_dir": str(teacher_dir) if teacher_dir is not None else None,
        "teacher_weights_sha256": teacher_sha,
        "weights_sha256": _folder_weights_sha256(out_dir),
        "tokenizer": tok_id,
        "distill_version": __version__,
        "fingerprint": fingerprint,
        "fingerprint_sha256": sha256_json(fingerprint),
    }
    atomic_write_json(out_dir / DISTILL_CONFIG, meta)
    atomic_write_json(out_dir / "history.json", res.history)
    summary = {
        "role": role,
        "model_dir": str(out_dir),
        "val_loss": res.best_val_loss,
        "val_ppl": res.best_val_ppl,
        "best_step": res.best_step,
        "steps_run": res.steps_run,
        "resumed_from_step": res.resumed_from_step,
        "train_seconds": res.train_seconds,
        "wall_seconds": wall,
        "tokens_per_second": res.tokens_per_second,
        "params": params,
        "size_mb": size_mb,
        "runtime": res.runtime,
        "kd": meta["kd"],
    }
    atomic_write_json(out_dir / "metrics.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_lm_stage(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    teacher_dir: str | os.PathLike | None = None,
    split: str = "test",
    batch_size: int = 8,
    max_batches: int | None = None,
    sample_prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    speed: bool = True,
    out_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate the HF folder ``model_dir`` on ``split`` of ``data_dir`` (default the held-out test split) with
    :func:`distill.lm.evaluate.evaluate_lm` (vs ``teacher_dir`` when given) and write ``eval_<split>.json``
    (or ``out_path``). Tokenizers (model / teacher / data) are checked first."""
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    tokenizer = load_tokenizer(model_dir)
    check_same_tokenizer(tokenizer, read_text_manifest(data_dir)["tokenizer"], names=(f"model {model_dir}", f"data {data_dir}"))
    if teacher_dir is not None:
        check_same_tokenizer(Path(teacher_dir), tokenizer, names=("teacher", f"model {model_dir}"))
    blocks = load_blocks(data_dir, split)
    model = load_lm(model_dir)
    teacher = load_lm(teacher_dir) if teacher_dir is not None else None
    metrics = evaluate_lm(model, blocks, teacher=teacher, batch_size=batch_size, max_batches=max_batches,
                          sample_prompts=sample_prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                          speed=speed)
    metrics["split"] = split
    metrics["model_dir"] = str(model_dir)
    metrics["teacher_dir"] = str(teacher_dir) if teacher_dir is not None else None
    atomic_write_json(Path(out_path) if out_path else model_dir / f"eval_{split}.json", metrics)
    return metrics
