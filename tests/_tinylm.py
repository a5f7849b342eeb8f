"""A tiny causal-LM lab for flow tests: a random 2-layer Llama teacher with GPT-2's tokenizer (from
../shared/data) and two slices of Tiny Shakespeare (train, held-out test), plus overrides of the LM smoke
profile that train in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOK_DIR = SHARED / "gpt2-tokenizer"
TEXT = SHARED / "text" / "tinyshakespeare.txt"


def available() -> bool:
    return (TOK_DIR / "vocab.json").is_file() and TEXT.is_file()


def make_tiny_lm(root: Path) -> dict:
    """Writes ``root/teacher`` (an HF folder) and ``root/text/{train,test}.txt``; returns their paths."""
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    text = TEXT.read_text(encoding="utf-8")
    texts = root / "text"
    texts.mkdir(exist_ok=True)
    (texts / "train.txt").write_text(text[:6000], encoding="utf-8")
    (texts / "test.txt").write_text(text[200_000:203_000], encoding="utf-8")
    tok = GPT2TokenizerFast.from_pretrained(str(TOK_DIR))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    ))
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    return {"teacher": teacher, "train": texts / "train.txt", "test": texts / "test.txt"}


def tiny_lm_overrides(lab: dict, cache_dir: Path, kd_kind: str = "fkl", sweep=("fkl", "rkl")) -> dict:
    return {
        "data": {"train": [str(lab["train"])], "test": [str(lab["test"])], "val_fraction": 0.2, "block_size": 32,
                 "max_train_tokens": None, "max_val_tokens": None, "max_test_tokens": 600,
                 "cache_dir": str(cache_dir)},
        "teacher": {"source": str(lab["teacher"])},
        "student": {"init": "prune", "mlp": 32, "layers": 1, "calibration_batches": 2},
        "train": {"steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 3, "checkpoint_every": 3,
                  "device": "cpu", "progress": "off", "schedule": "constant", "weight_decay": 0.0},
        "kd": {"kind": kd_kind, "temperature": 2.0, "alpha": 0.5},
        "sweep": {"enabled": bool(sweep), "kinds": list(sweep) or [kd_kind], "lmbdas": []},
        "eval": {"batch_size": 4, "prompts": ["ROMEO:"], "max_new_tokens": 4, "speed_batches": 1},
    }
