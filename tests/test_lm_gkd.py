"""On-policy GKD and sequence-level KD (distill.lm.gkd, LMKDConfig.lmbda / seq_kd in distill.lm.train) on tiny random
Llama models with GPT-2's vocabulary and a few KB of Tiny Shakespeare, on CPU."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM  # noqa: E402

from distill.checkpoint import load_latest_checkpoint  # noqa: E402
from distill.lm import gkd  # noqa: E402
from distill.lm import train as lmtrain  # noqa: E402
from distill.lm.data import IGNORE_INDEX, load_blocks, prepare_text  # noqa: E402
from distill.lm.train import LOG_KEYS, LMKDConfig, LMTrainConfig, fit_lm, lm_fit_fingerprint  # noqa: E402

TOK_DIR = Path("/work/shared/data/gpt2-tokenizer")
TEXT = Path("/work/shared/data/text/tinyshakespeare.txt")
EOS = 50256
BLOCK = 24
P, N = 6, 8  # prompt tokens, new tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not TOK_DIR.is_dir() or not TEXT.is_file():
        pytest.skip("offline GPT-2 tokenizer or Tiny Shakespeare not available")
    root = tmp_path_factory.mktemp("gkd")
    tok = GPT2TokenizerFast.from_pretrained(str(TOK_DIR))
    assert tok.eos_token_id == EOS
    src = root / "shakespeare.txt"
    src.write_text(TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    d = prepare_text(src, tok, root / "cache", block_size=BLOCK, val_fraction=0.2).dir
    train, val = load_blocks(d, "train"), load_blocks(d, "val")
    return train, tuple(t[:4] for t in val)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=EOS + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=EOS,
        bos_token_id=EOS,
    ))


class Biased(torch.nn.Module):
    """A causal LM whose logit of ``token`` is raised by ``bias`` (KV cache passed through). ``hide_cache``: its
    output exposes no ``past_key_values`` (the sampler must then re-run the whole sequence). ``calls`` records the
    input lengths."""

    def __init__(self, inner, token, bias, hide_cache=False):
        super().__init__()
        self.inner, self.token, self.bias, self.hide_cache = inner, token, bias, hide_cache
        self.config = inner.config
        self.calls = []

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        self.calls.append(input_ids.shape[1])
        kw = {gkd.cache_kwarg(self.inner): past_key_values} if past_key_values is not None else {}
        out = self.inner(input_ids=input_ids, use_cache=use_cache, **kw)
        logits = out.logits.clone()
        logits[..., self.token] += self.bias
        return SimpleNamespace(logits=logits, past_key_values=None if self.hide_cache else gkd._out_cache(out))


def cfg(**kw):
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=2, checkpoint_every=2, progress="off",
                device="cpu", seed=3, weight_decay=0.0)
    base.update(kw)
    return LMTrainConfig(**base)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ sampling


def test_sampling_is_seeded_and_leaves_global_rng_and_mode_alone(data):
    prompt = data[0][0][:3, :P]
    model = tiny_llama()
    model.train()
    rng = torch.get_rng_state()
    a, la = gkd.sample_continuations(model, prompt, max_new_tokens=N, generator=gen(1))
    b, lb = gkd.sample_continuations(model, prompt, max_new_tokens=N, generator=gen(1))
    c, _ = gkd.sample_continuations(model, prompt, max_new_tokens=N, generator=gen(2))
    assert a.shape == (3, N) and torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng)  # only the explicit generator was used
    assert model.training  # eval for sampling, then back


def test_kv_cache_sampling_matches_full_recompute(data):
    prompt = data[0][0][:2, :P]
    inner = tiny_llama(seed=4)
    cached, plain = Biased(inner, 0, 0.0), Biased(inner, 0, 0.0, hide_cache=True)
    a, _ = gkd.sample_continuations(cached, prompt, max_new_tokens=5, generator=gen(7), temperature=0.7)
    b, _ = gkd.sample_continuations(plain, prompt, max_new_tokens=5, generator=gen(7), temperature=0.7)
    assert torch.equal(a, b)
    assert cached.calls == [P, 1, 1, 1, 1]  # the prompt once, then one token per call with the cache
    assert plain.calls == [P, P + 1, P + 2, P + 3, P + 4]


def test_generated_blocks_mask_only_generated_tokens_up_to_eos(data):
    prompt = data[0][0][:6, :P]
    model = Biased(tiny_llama(seed=2), EOS, 10.0)  # p(EOS) about 0.3 per token: rows stop at different places
    ids, labels, mask = gkd.generated_blocks(model, prompt, max_new_tokens=N, generator=gen(0), eos_token_ids=[EOS])
    n = ids.shape[1] - P + 1  # generated width
    assert 1 <= n <= N and labels.shape == mask.shape == ids.shape and mask.dtype == torch.bool
    assert torch.equal(ids[:, :P], prompt)
    assert torch.equal(labels[:, : P - 1], prompt[:, 1:])  # prompt positions: real next tokens, not targets
    assert not mask[:, : P - 1].any()
    stops = []
    for r in range(len(ids)):
        g = labels[r, P - 1:]  # the generated tokens of row r (then -100)
        eos_at = (g == EOS).nonzero()
        length = int(eos_at[0]) + 1 if len(eos_at) else n
        stops.append(length)
        assert mask[r, P - 1: P - 1 + length].all()  # every generated token up to and including EOS
        assert not mask[r, P - 1 + length:].any()  # nothing after it
        assert (labels[r, P - 1 + length:] == IGNORE_INDEX).all()
        assert (ids[r, P - 1 + length + 1:] == EOS).all() if length < n else True
        assert torch.equal(ids[r, P:], torch.where(g[:-1] == IGNORE_INDEX, EOS, g[:-1]))  # inputs = shifted labels
    assert min(stops) < max(stops)  # some rows stopped early, others went on
    assert any(labels[r, P - 2 + s] == EOS for r, s in enumerate(stops))


# ------------------------------------------------------------------------------------------------ training


def test_lmbda_zero_is_exactly_the_default_run(data, tmp_path):
    train, val = data
    teacher = tiny_llama(seed=7)
    c = cfg(steps=3, eval_every=3, checkpoint_every=3)
    a, ra = fit_lm(tiny_llama(), train, val, c, teacher=teacher, kd=LMKDConfig(), ckpt_dir=tmp_path / "a")
    kd0 = LMKDConfig(lmbda=0.0, seq_kd=False, gen_prompt_tokens=20, gen_max_new_tokens=20, gen_temperature=0.5)
    b, rb = fit_lm(tiny_llama(), train, val, c, teacher=teacher, kd=kd0, ckpt_dir=tmp_path / "b")
    assert state_equal(a.state_dict(), b.state_dict())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]  # noqa: E731
    assert drop(ra.history) == drop(rb.history) and "onpolicy_frac" not in ra.history[0]
    # the fingerprint (so the checkpoints) of a run without generation does not name the generation fields
    fp = lm_fit_fingerprint(a, c, train, val, teacher=teacher, kd=kd0)
    assert fp == lm_fit_fingerprint(a, c, train, val, teacher=teacher, kd=LMKDConfig())
    assert "lmbda" not in fp["kd"] and "gen_temperature" not in fp["kd"]
    _, _, st = load_latest_checkpoint(tmp_path / "b")
    assert set(st["pending"]) == {"loss_sum", "target_tokens", "input_tokens", "seconds"}


def test_lmbda_one_trains_on_student_samples(data, monkeypatch):
    train, val = data
    calls = []
    real = gkd.generated_blocks

    def spy(model, prompt, **kw):
        calls.append((model, prompt.shape, model.training))
        return real(model, prompt, **kw)

    monkeypatch.setattr(gkd, "generated_blocks", spy)
    student, teacher = tiny_llama(), tiny_llama(seed=7)
    init = copy.deepcopy(student.state_dict())
    logs = []
    kd = LMKDConfig(kind="jsd", beta=0.5, lmbda=1.0, gen_prompt_tokens=P, gen_max_new_tokens=N)
    out, res = fit_lm(student, train, val, cfg(steps=2, grad_accum=2, eval_every=2), teacher=teacher, kd=kd,
                      log_fn=lambda m, s: logs.append(m))
    assert len(calls) == 4 and all(m is student and shape == (4, P) for m, shape, _ in calls)
    assert student.training and not teacher.training
    assert not state_equal(out.state_dict(), init)
    assert set(logs[0]) == set(LOG_KEYS) | {"onpolicy_frac"}
    assert logs[0]["onpolicy_frac"] == 1.0 and res.history[0]["onpolicy_frac"] == 1.0
    assert math.isfinite(logs[0]["train_loss"]) and logs[0]["train_loss"] > 0


def test_seq_kd_trains_on_teacher_samples(data, monkeypatch):
    train, val = data
    token = 1234
    teacher = Biased(tiny_llama(seed=7), token, 1e4)  # always emits `token`
    seen = []
    real = lmtrain.distill_loss_parts

    def spy(s_logits, t_logits, labels, mask, **kw):
        seen.append((labels.clone(), mask.clone()))
        return real(s_logits, t_logits, labels, mask, **kw)

    monkeypatch.setattr(lmtrain, "distill_loss_parts", spy)
    kd = LMKDConfig(seq_kd=True, gen_prompt_tokens=P, gen_max_new_tokens=N)
    _, res = fit_lm(tiny_llama(), train, val, cfg(steps=2, eval_every=2), teacher=teacher, kd=kd)
    assert len(seen) == 2
    for labels, mask in seen:
        assert labels.shape == (4, P + N - 1)
        assert int(mask.sum()) == 4 * N and (labels[mask] == token).all()
    assert res.history[0]["onpolicy_frac"] == 0.0


class Killed(Exception):
    pass


def test_resume_with_lmbda_half_is_bit_identical(data, tmp_path):
    train, val = data
    # grad_accum 2: per step two micro-batches, each drawn on- or off-policy; checkpoints mid-epoch
    c = cfg(steps=5, batch_size=2, grad_accum=2, checkpoint_every=2, eval_every=2)
    assert len(train[0]) // 4 > 5  # every checkpoint lies in the first epoch
    teacher = tiny_llama(seed=7)
    kd = LMKDConfig(kind="rkl", lmbda=0.5, gen_prompt_tokens=P, gen_max_new_tokens=N, gen_temperature=1.5)
    ref, ref_res = fit_lm(tiny_llama(), train, val, c, teacher=teacher, kd=kd, ckpt_dir=tmp_path / "a")
    ref_state = copy.deepcopy(ref.state_dict())
    fracs = [r["onpolicy_frac"] for r in ref_res.history]
    assert 0 < sum(fracs) / len(fracs) < 1, fracs  # both kinds of micro-batch occurred

    def kill_at_4(folder, step):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        fit_lm(tiny_llama(), train, val, c, teacher=teacher, kd=kd, ckpt_dir=tmp_path / "b", on_checkpoint=kill_at_4)
    out, res = fit_lm(tiny_llama(seed=9), train, val, c, teacher=teacher, kd=kd, ckpt_dir=tmp_path / "b")
    assert res.resumed_from_step == 4 and res.steps_run == 1
    assert state_equal(out.state_dict(), ref_state)
    _, _, st_a = load_latest_checkpoint(tmp_path / "a")
    _, _, st_b = load_latest_checkpoint(tmp_path / "b")
    assert state_equal(st_a["model"], st_b["model"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]  # noqa: E731
    assert drop(res.history) == drop(ref_res.history)


# ------------------------------------------------------------------------------------------------ refusals


def test_config_refusals(data):
    for bad in (dict(lmbda=-0.1), dict(lmbda=1.5), dict(gen_temperature=0.0), dict(gen_prompt_tokens=0),
                dict(gen_max_new_tokens=0), dict(lmbda=float("nan"))):
        with pytest.raises(ValueError):
            LMKDConfig(**bad)
    with pytest.raises(ValueError, match="lmbda.*seq_kd.*kind='ce'"):
        LMKDConfig(kind="ce", lmbda=0.5)
    with pytest.raises(ValueError, match="seq_kd"):
        LMKDConfig(kind="ce", seq_kd=True)
    kd = LMKDConfig(kind="ce")
    with pytest.raises(ValueError):
        kd.lmbda = 0.5  # checked on assignment too
    assert LMKDConfig(kind="ce", lmbda=0.0).generates is False

    train, val = data
    teacher = tiny_llama(seed=7)
    too_long = LMKDConfig(lmbda=0.5, gen_prompt_tokens=16, gen_max_new_tokens=BLOCK - 15)
    with pytest.raises(ValueError, match="gen_prompt_tokens.*gen_max_new_tokens.*fit"):
        fit_lm(tiny_llama(), train, val, cfg(), teacher=teacher, kd=too_long)
    with pytest.raises(ValueError, match="teacher"):
        fit_lm(tiny_llama(), train, val, cfg(), kd=LMKDConfig(seq_kd=True, gen_prompt_tokens=P, gen_max_new_tokens=N))
