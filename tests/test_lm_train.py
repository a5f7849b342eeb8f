"""LM distillation loop (distill.lm.train) on tiny random Llama models built from configs, on CPU."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from distill.checkpoint import CheckpointMismatch, load_latest_checkpoint, retained_checkpoints  # noqa: E402
from distill.lm.train import (  # noqa: E402
    LOG_KEYS,
    LMKDConfig,
    LMSchedule,
    LMTrainConfig,
    fit_lm,
    mean_token_ce,
    perplexity,
)

VOCAB, T = 64, 16


def tiny_llama(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def blocks(n, seed, stride=3, vary_mask=False):
    """Sequences x_{t+1} = x_t + stride (mod VOCAB) from a random start: learnable in a few dozen steps.
    Aligned: labels[:, t] = x_{t+1}; the last position has no target. With ``vary_mask`` the blocks have
    different numbers of target tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    seq = (start + stride * torch.arange(T + 1)) % VOCAB
    ids, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    mask = torch.ones(n, T, dtype=torch.bool)
    mask[:, -1] = False
    labels[:, -1] = -100
    if vary_mask:
        keep = torch.randint(2, T, (n,), generator=g)
        mask &= torch.arange(T)[None, :] < keep[:, None]
    return ids, labels, mask


def cfg(**kw):
    base = dict(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, checkpoint_every=5, progress="off",
                device="cpu", seed=3, weight_decay=0.0)
    base.update(kw)
    return LMTrainConfig(**base)


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data():
    return blocks(40, 1), blocks(16, 2)


def teacher_model():
    t = tiny_llama(seed=7, tie=False)
    with torch.no_grad():
        t.lm_head.weight.mul_(8.0)  # a sharp, non-uniform teacher distribution
    return t.eval()


class BigramTeacher(torch.nn.Module):
    """A non-HF teacher: sharp random next-token distributions that depend on the current token only
    (learnable by the student in a few dozen steps)."""

    def __init__(self, seed=5, scale=3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g) * scale)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def kl_to_teacher(student, teacher, ids, mask):
    with torch.no_grad():
        p = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(student.eval()(input_ids=ids).logits.float(), -1)
        return float((p.exp() * (p - q)).sum(-1)[mask].mean())


# ------------------------------------------------------------------------------------------------ config


def test_config_validation():
    with pytest.raises(ValueError):
        LMTrainConfig(unknown=1)
    with pytest.raises(ValueError):
        LMTrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError):
        LMTrainConfig(lr=float("nan"))
    with pytest.raises(ValueError):
        LMTrainConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        LMKDConfig(kind="kd")
    with pytest.raises(ValueError):
        LMKDConfig(skew=1.0)
    assert LMKDConfig(kind="ce").kind == "ce"


def test_schedule_warmup_then_cosine_to_min():
    s = LMSchedule(steps=10, warmup_steps=2, min_ratio=0.1)
    assert s(0) == pytest.approx(1 / 3) and s(1) == pytest.approx(2 / 3)
    assert s(2) == pytest.approx(1.0)
    assert s(10) == pytest.approx(0.1)
    vals = [s(i) for i in range(2, 11)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert LMSchedule(10, 0, 0.1, "constant")(7) == 1.0


# ------------------------------------------------------------------------------------------------ learning


def test_baseline_ce_learns_and_logs_documented_keys(data):
    train, val = data
    model = tiny_llama()
    v0 = mean_token_ce(model, val, 8)[0]
    logs = []
    model, res = fit_lm(model, train, val, cfg(steps=30, eval_every=7), log_fn=lambda m, s: logs.append((s, m)))
    # log_fn at every eval_every steps and after the last one, with exactly the documented keys
    assert [s for s, _ in logs] == [7, 14, 21, 28, 30]
    for s, m in logs:
        assert set(m) == set(LOG_KEYS)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
        assert m["tokens_per_second"] > 0 and m["lr"] > 0
    assert [r["step"] for r in res.history] == [7, 14, 21, 28, 30]
    val_losses = [m["val_loss"] for _, m in logs]
    assert val_losses[-1] < v0 - 1.0, (v0, val_losses)
    assert logs[-1][1]["train_loss"] < logs[0][1]["train_loss"]
    # the returned model holds the best-on-validation weights
    assert res.best_val_loss == pytest.approx(min(val_losses))
    assert mean_token_ce(model, val, 8)[0] == pytest.approx(res.best_val_loss, rel=1e-5)
    assert perplexity(model, val, 5) == pytest.approx(math.exp(res.best_val_loss), rel=1e-5)


def test_perplexity_matches_manual_masked_ce(data):
    _, (ids, labels, mask) = data
    model = tiny_llama(seed=4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[mask], labels[mask])
    assert mean_token_ce(model, (ids, labels, mask), 3)[0] == pytest.approx(float(ce), rel=1e-5)
    assert perplexity(model, (ids, labels, mask), 16) == pytest.approx(math.exp(float(ce)), rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(model, (ids, labels, torch.zeros_like(mask)), 4)


def test_distillation_pulls_student_to_teacher_and_leaves_teacher_alone(data):
    train, val = data
    teacher = BigramTeacher().eval()
    t_before = copy.deepcopy(teacher.state_dict())
    student = tiny_llama(seed=1)
    kl0 = kl_to_teacher(student, teacher, val[0], val[2])
    student, res = fit_lm(
        student, train, val, cfg(steps=60, eval_every=60, lr=1e-2, min_lr_ratio=0.5), teacher=teacher,
        kd=LMKDConfig(kind="fkl", temperature=1.0),
    )
    kl1 = kl_to_teacher(student, teacher, val[0], val[2])
    assert res.runtime["distill"] is True
    assert kl1 < 0.3 * kl0, (kl0, kl1)  # about 2.35 -> 0.23
    # the teacher got no gradient and is unchanged
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert state_equal(teacher.state_dict(), t_before)
    assert not teacher.training


def test_kind_ce_with_teacher_is_the_baseline(data):
    train, val = data
    c = cfg(steps=3, eval_every=3)
    a, _ = fit_lm(tiny_llama(), train, val, c)
    b, res = fit_lm(tiny_llama(), train, val, c, teacher=teacher_model(), kd=LMKDConfig(kind="ce"))
    assert res.runtime["distill"] is False
    assert state_equal(a.state_dict(), b.state_dict())


# ------------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("vary_mask", [False, True])
def test_grad_accum_equals_larger_batch(vary_mask, monkeypatch):
    # token-weighted accumulation: equal to the big batch even when micro-batches hold different token counts
    train, val = blocks(24, 5, vary_mask=vary_mask), blocks(8, 6)
    teacher = teacher_model()
    kd = LMKDConfig(kind="jsd", alpha=0.5, temperature=2.0)
    init = tiny_llama(seed=2)
    clip = torch.nn.utils.clip_grad_norm_
    grads = []

    def spy(params, max_norm, *a, **k):  # the accumulated gradient of each step, before clipping
        params = list(params)
        grads[-1].append([p.grad.clone() for p in params])
        return clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    runs = []
    for bs, acc in ((8, 1), (4, 2)):
        grads.append([])
        runs.append(fit_lm(copy.deepcopy(init), train, val, cfg(steps=3, batch_size=bs, grad_accum=acc, eval_every=3),
                           teacher=teacher, kd=kd))
    (a, ra), (b, rb) = runs
    assert len(grads[0]) == len(grads[1]) == 3
    for ga, gb in zip(*grads):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    sa, sb = a.state_dict(), b.state_dict()
    assert not state_equal(sa, init.state_dict())
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    assert ra.history[-1]["train_loss"] == pytest.approx(rb.history[-1]["train_loss"], rel=1e-5)


def test_bf16_autocast_and_eval_batches(data):
    train, val = data
    logs = []
    model, res = fit_lm(tiny_llama(), train, val, cfg(steps=3, eval_every=3, amp="bf16", eval_batches=1),
                        teacher=teacher_model(), kd=LMKDConfig(kind="tv", alpha=0.5), log_fn=lambda m, s: logs.append(m))
    assert res.runtime["amp_bf16"] is True
    assert math.isfinite(logs[0]["train_loss"])
    one_batch = mean_token_ce(model, val, 4, max_batches=1, amp=True)[0]
    assert logs[0]["val_loss"] == pytest.approx(one_batch, rel=1e-6)


class Killed(Exception):
    pass


def test_resume_mid_epoch_is_bit_identical(data, tmp_path):
    train, val = data
    # 40 blocks / (4 * 2) = 5 steps per epoch; checkpoints every 3 steps: mid-epoch (3, 6, 9, ...)
    c = cfg(steps=13, batch_size=4, grad_accum=2, checkpoint_every=3, eval_every=4)
    teacher, kd = teacher_model(), LMKDConfig(kind="skew_fkl", alpha=0.7, temperature=2.0)

    full_logs = []
    ref, ref_res = fit_lm(tiny_llama(), train, val, c, teacher=teacher, kd=kd, ckpt_dir=tmp_path / "a",
                          log_fn=lambda m, s: full_logs.append((s, m)))
    ref_state = copy.deepcopy(ref.state_dict())

    def kill_at_6(folder, step):  # step 6 is mid-epoch: epoch 1, position 1
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        fit_lm(tiny_llama(), train, val, c, teacher=teacher, kd=kd, ckpt_dir=tmp_path / "b", on_checkpoint=kill_at_6)
    _, step, st = load_latest_checkpoint(tmp_path / "b")
    assert (step, st["epoch"], st["step_in_epoch"], st["steps_per_epoch"]) == (6, 1, 1, 5)
    assert retained_checkpoints(tmp_path / "b") == ["epoch-0003", "epoch-0006"]

    resumed_logs = []
    out, res = fit_lm(tiny_llama(seed=9), train, val, c, teacher=teacher, kd=kd, ckpt_dir=tmp_path / "b",
                      log_fn=lambda m, s: resumed_logs.append((s, m)))
    assert res.resumed_from_step == 6 and res.steps_run == 7
    assert state_equal(out.state_dict(), ref_state)
    # the final (not only the best) weights agree bit for bit, and so does what was logged
    _, _, st_a = load_latest_checkpoint(tmp_path / "a")
    _, _, st_b = load_latest_checkpoint(tmp_path / "b")
    assert state_equal(st_a["model"], st_b["model"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]  # noqa: E731
    assert drop(res.history) == drop(ref_res.history)
    assert [s for s, _ in resumed_logs] == [8, 12, 13]
    assert drop([m for _, m in resumed_logs]) == drop([m for s, m in full_logs if s > 6])
    assert res.best_step == ref_res.best_step and res.best_val_loss == ref_res.best_val_loss


def test_kill_from_log_fn_then_resume(data, tmp_path):
    train, val = data
    c = cfg(steps=9, checkpoint_every=4, eval_every=4)  # 10 steps per epoch: every checkpoint is mid-epoch
    ref, _ = fit_lm(tiny_llama(), train, val, c)

    def kill(m, s):
        if s == 4:
            raise Killed

    with pytest.raises(Killed):
        fit_lm(tiny_llama(), train, val, c, ckpt_dir=tmp_path, log_fn=kill)
    out, res = fit_lm(tiny_llama(), train, val, c, ckpt_dir=tmp_path)
    assert res.resumed_from_step == 4
    assert state_equal(out.state_dict(), ref.state_dict())


def test_checkpoint_of_another_config_is_refused(data, tmp_path):
    train, val = data
    c = cfg(steps=4, checkpoint_every=2, eval_every=2)
    fit_lm(tiny_llama(), train, val, c, ckpt_dir=tmp_path)
    with pytest.raises(CheckpointMismatch, match="lr"):
        fit_lm(tiny_llama(), train, val, cfg(steps=4, checkpoint_every=2, eval_every=2, lr=1e-3), ckpt_dir=tmp_path)
    with pytest.raises(CheckpointMismatch, match="kd"):
        fit_lm(tiny_llama(), train, val, c, teacher=teacher_model(), ckpt_dir=tmp_path)
    with pytest.raises(CheckpointMismatch, match="data"):
        fit_lm(tiny_llama(), blocks(40, 11), val, c, ckpt_dir=tmp_path)
    # a finished run resumes to a no-op; resume=False starts over
    _, res = fit_lm(tiny_llama(), train, val, c, ckpt_dir=tmp_path)
    assert res.resumed_from_step == 4 and res.steps_run == 0
    _, res = fit_lm(tiny_llama(), train, val, cfg(steps=4, checkpoint_every=2, eval_every=2, lr=1e-3),
                    ckpt_dir=tmp_path, resume=False)
    assert res.resumed_from_step == 0 and res.steps_run == 4


def test_bad_blocks_are_refused(data):
    train, val = data
    ids, labels, mask = train
    with pytest.raises(ValueError, match="batch_size"):
        fit_lm(tiny_llama(), train, val, cfg(batch_size=41))
    with pytest.raises(ValueError, match="labels"):
        fit_lm(tiny_llama(), (ids, torch.where(mask, labels + VOCAB, labels), mask), val, cfg())
    with pytest.raises(ValueError, match="bool"):
        fit_lm(tiny_llama(), (ids, labels, mask.long()), val, cfg())
