"""LM stages (distill.lm.stages) and evaluation (distill.lm.evaluate) end to end on a tiny random Llama with GPT-2's
vocabulary, on CPU: prepare -> teacher -> pruned init -> baseline / student -> evaluate."""

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM  # noqa: E402

from distill.checkpoint import CheckpointMismatch  # noqa: E402
from distill.lm.data import load_blocks, prepare_text  # noqa: E402
from distill.lm.evaluate import evaluate_lm, gap_closed  # noqa: E402
from distill.lm.stages import (  # noqa: E402
    TokenizerMismatch,
    check_same_tokenizer,
    evaluate_lm_stage,
    init_student,
    train_lm_stage,
)
from distill.lm.train import LMKDConfig, LMTrainConfig  # noqa: E402

TOK_DIR = "/work/shared/data/gpt2-tokenizer"
TEXT = Path("/work/shared/data/text/tinyshakespeare.txt")


def tcfg(**kw):
    base = dict(steps=10, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=5, checkpoint_every=5, progress="off",
                device="cpu", seed=0, weight_decay=0.0, schedule="constant")
    base.update(kw)
    return LMTrainConfig(**base)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmlab")
    torch.set_num_threads(2)
    tok = GPT2TokenizerFast.from_pretrained(TOK_DIR)
    src = root / "shakespeare.txt"
    src.write_text(TEXT.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    data_dir = prepare_text(src, tok, root / "cache", block_size=32, val_fraction=0.15, test_fraction=0.15).dir

    torch.manual_seed(0)
    raw = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    ))
    raw_dir = root / "raw"
    raw.save_pretrained(raw_dir)
    tok.save_pretrained(raw_dir)
    raw_eval = evaluate_lm_stage(raw_dir, data_dir, speed=False, max_new_tokens=4)

    teacher_dir = root / "teacher"
    teacher_metrics = train_lm_stage("teacher", raw_dir, data_dir, teacher_dir, train_cfg=tcfg(steps=24, eval_every=12,
                                                                                               checkpoint_every=12))
    teacher_eval = evaluate_lm_stage(teacher_dir, data_dir, max_new_tokens=4)

    init_dir = root / "init"
    _, init_report = init_student(teacher_dir, how="prune", data_dir=data_dir, out_dir=init_dir, mlp=32, layers=1)
    start_eval = evaluate_lm_stage(init_dir, data_dir, teacher_dir=teacher_dir, speed=False, max_new_tokens=4)

    base_dir, stud_dir = root / "baseline", root / "student"
    cfg = tcfg(steps=12, lr=5e-3, eval_every=6, checkpoint_every=6)
    base_metrics = train_lm_stage("baseline", init_dir, data_dir, base_dir, train_cfg=cfg)
    stud_metrics = train_lm_stage("student", init_dir, data_dir, stud_dir, teacher_dir=teacher_dir, train_cfg=cfg,
                                  kd_cfg=LMKDConfig(kind="fkl", temperature=1.0, alpha=1.0))
    base_eval = evaluate_lm_stage(base_dir, data_dir, teacher_dir=teacher_dir, max_new_tokens=4)
    stud_eval = evaluate_lm_stage(stud_dir, data_dir, teacher_dir=teacher_dir, max_new_tokens=4)
    return dict(root=root, tok=tok, data_dir=data_dir, raw_dir=raw_dir, raw_eval=raw_eval, teacher_dir=teacher_dir,
                teacher_metrics=teacher_metrics, teacher_eval=teacher_eval, init_dir=init_dir, init_report=init_report,
                start_eval=start_eval, base_dir=base_dir, stud_dir=stud_dir, base_metrics=base_metrics,
                stud_metrics=stud_metrics, base_eval=base_eval, stud_eval=stud_eval, cfg=cfg)


def test_teacher_beats_random_and_eval_keys(lab):
    t, r = lab["teacher_eval"], lab["raw_eval"]
    for k in ("test_loss", "test_ppl", "tokens", "params", "size_mb", "tokens_per_second", "latency_ms_per_token"):
        assert isinstance(t[k], float) and math.isfinite(t[k]), k
    assert t["tokens"] > 0 and t["tokens_per_second"] > 0 and t["latency_ms_per_token"] > 0
    assert t["test_ppl"] < r["test_ppl"] * 0.5  # the trained teacher clearly beats its random init
    assert math.isclose(t["test_ppl"], math.exp(t["test_loss"]), rel_tol=1e-6)
    assert t["size_mb"] > 0 and t["params"] > 1e6
    assert [s["prompt"] for s in t["samples"]] and all(isinstance(s["completion"], str) for s in t["samples"])
    on_disk = json.loads((lab["teacher_dir"] / "eval_test.json").read_text())
    assert on_disk["test_ppl"] == t["test_ppl"] and on_disk["split"] == "test"


def test_student_distillation_closes_gap_vs_baseline(lab):
    b, s, st, t = lab["base_eval"], lab["stud_eval"], lab["start_eval"], lab["teacher_eval"]
    for m in (b, s, st):
        assert math.isfinite(m["test_ppl"])
        assert 0.0 <= m["agreement_top1"] <= 1.0
        assert m["kl_to_teacher"] >= 0.0
    assert s["kl_to_teacher"] < b["kl_to_teacher"]
    assert s["params"] < t["params"]
    g = gap_closed(t["test_ppl"], s["test_ppl"], st["test_ppl"])
    assert math.isfinite(g)  # sign not asserted: a pruned init of a barely trained teacher can already beat it
    assert lab["init_report"]["params_after"] < lab["init_report"]["params_before"]


def test_stage_outputs_and_hf_loading(lab):
    for d, role in ((lab["base_dir"], "baseline"), (lab["stud_dir"], "student")):
        for name in ("config.json", "model.safetensors", "distill-config.json", "metrics.json", "history.json",
                     "tokenizer.json"):
            assert (d / name).is_file(), (d, name)
        meta = json.loads((d / "distill-config.json").read_text())
        assert meta["role"] == role and meta["fingerprint"]["role"] == role
        assert len(meta["data_manifest_sha256"]) == 64
        assert (meta["teacher_weights_sha256"] is not None) == (role == "student")
        assert meta["kd"]["kind"] == ("ce" if role == "baseline" else "fkl")
        assert (d / "checkpoints").is_dir()
        assert len(json.loads((d / "history.json").read_text())) == 2
    assert lab["base_metrics"]["steps_run"] == lab["stud_metrics"]["steps_run"] == 12
    # same init weights for baseline and student
    bm = json.loads((lab["base_dir"] / "distill-config.json").read_text())
    sm = json.loads((lab["stud_dir"] / "distill-config.json").read_text())
    assert bm["init_weights_sha256"] == sm["init_weights_sha256"]
    model = AutoModelForCausalLM.from_pretrained(lab["stud_dir"])
    ids, _, _ = load_blocks(lab["data_dir"], "test")
    with torch.no_grad():
        out = model(input_ids=ids[:1]).logits
    assert out.shape == (1, 32, len(lab["tok"]))
    assert model.config.intermediate_size == 32 and model.config.num_hidden_layers == 1


def test_tokenizer_mismatch_refused_naming_both(lab, tmp_path):
    other = GPT2TokenizerFast.from_pretrained(TOK_DIR)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(TokenizerMismatch) as e:
        check_same_tokenizer(lab["tok"], other, names=("teacher", "student"))
    msg = str(e.value)
    assert "teacher" in msg and "student" in msg and "50257" in msg and "50258" in msg
    assert check_same_tokenizer(lab["teacher_dir"], lab["tok"])["vocab_size"] == 50257
    # a student init folder carrying another tokenizer is refused before compute
    bad = tmp_path / "bad_init"
    AutoModelForCausalLM.from_pretrained(lab["init_dir"]).save_pretrained(bad)
    other.save_pretrained(bad)
    out = tmp_path / "out"
    with pytest.raises(TokenizerMismatch) as e:
        train_lm_stage("student", bad, lab["data_dir"], out, teacher_dir=lab["teacher_dir"], train_cfg=lab["cfg"])
    assert "student" in str(e.value) and "data" in str(e.value)
    assert not (out / "checkpoints").exists()


def test_rerun_into_other_role_refused(lab):
    before = (lab["stud_dir"] / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointMismatch, match="another run"):
        train_lm_stage("baseline", lab["init_dir"], lab["data_dir"], lab["stud_dir"], train_cfg=lab["cfg"])
    with pytest.raises(CheckpointMismatch):
        train_lm_stage("student", lab["init_dir"], lab["data_dir"], lab["stud_dir"], teacher_dir=lab["teacher_dir"],
                       train_cfg=lab["cfg"], kd_cfg=LMKDConfig(kind="rkl"))
    assert (lab["stud_dir"] / "model.safetensors").read_bytes() == before


def test_init_student_from_config_and_gap_closed(lab):
    m, rep = init_student(lab["teacher_dir"], how="config", hidden=16, mlp=32, layers=1)
    assert m.config.hidden_size == 16 and rep["params_after"] < rep["params_before"]
    ids, labels, mask = load_blocks(lab["data_dir"], "test")
    r = evaluate_lm(m, (ids[:2], labels[:2], mask[:2]), speed=False)
    assert math.isfinite(r["test_ppl"]) and "samples" not in r
    assert gap_closed(10.0, 10.0, 20.0) == 1.0 and gap_closed(10.0, 20.0, 20.0) == 0.0
    assert gap_closed(10.0, 15.0, 20.0) == pytest.approx(0.5)
    assert gap_closed(10.0, 10.0, 10.0) == 1.0 and gap_closed(10.0, 12.0, 10.0) == 0.0
    assert math.isnan(gap_closed(10.0, float("inf"), 20.0))


def test_concurrent_loads_give_whole_models(lab):
    """Pipeline stages load models from several threads of one process at once; every load must be whole (without
    the loader's lock, every concurrent load of a tied-embedding model left lm_head on the meta device)."""
    import threading

    from distill.lm.stages import load_lm

    folder = lab["teacher_dir"]
    ref = load_lm(folder)
    bad, errors = [], []

    def work():
        try:
            for _ in range(3):
                m = load_lm(folder)
                if any(t.is_meta for t in m.parameters()) or not torch.equal(m.lm_head.weight, ref.lm_head.weight):
                    bad.append(1)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not bad, (errors, len(bad))
