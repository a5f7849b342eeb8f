"""Token-level LM distillation losses (distill.lm.losses) against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.lm.losses import (
    TOKEN_LOSSES,
    distill_loss,
    distill_loss_parts,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_divergence,
    total_variation,
)

KINDS = sorted(TOKEN_LOSSES)
V = 11


# ------------------------------------------------------------------ independent float64 reference (direct formulas)


def _probs64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.double() / temperature
    z = z - z.max(dim=-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)


def _kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def ref_divergence(kind, s, t, temperature=1.0, beta=0.5, skew=0.1):
    """Per-token divergence in float64 (graph kept for s so gradients can be compared)."""
    p = _probs64(t, temperature)
    q = _probs64(s, temperature)
    if kind == "fkl":
        return _kl64(p, q)
    if kind == "rkl":
        return _kl64(q, p)
    if kind == "skew_fkl":
        return _kl64(p, skew * p + (1 - skew) * q)
    if kind == "skew_rkl":
        return _kl64(q, skew * q + (1 - skew) * p)
    if kind == "jsd":
        if beta == 0:
            return _kl64(p, q)
        if beta == 1:
            return _kl64(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_loss(kind, s, t, y, mask, temperature=1.0, alpha=1.0, beta=0.5, skew=0.1):
    m = mask.bool()
    div = ref_divergence(kind, s, t, temperature, beta, skew)[m]
    q1 = _probs64(s, 1.0)
    ce = -q1.log().gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[m]
    return alpha * temperature**2 * div.mean() + (1 - alpha) * ce.mean()


def make(batch=3, seq=6, vocab=V, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, seq, vocab, generator=g) * scale
    t = torch.randn(batch, seq, vocab, generator=g) * scale
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.rand(batch, seq, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1, -1] = False
    return s, t, y, mask


NAMED = {
    "fkl": lambda s, t, T, beta, skew: forward_kl(s, t, temperature=T),
    "rkl": lambda s, t, T, beta, skew: reverse_kl(s, t, temperature=T),
    "skew_fkl": lambda s, t, T, beta, skew: skew_forward_kl(s, t, skew=skew, temperature=T),
    "skew_rkl": lambda s, t, T, beta, skew: skew_reverse_kl(s, t, skew=skew, temperature=T),
    "jsd": lambda s, t, T, beta, skew: generalized_jsd(s, t, beta=beta, temperature=T),
    "tv": lambda s, t, T, beta, skew: total_variation(s, t, temperature=T),
}


# ------------------------------------------------------------------------------------------- per-token values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,beta,skew", [(1.0, 0.5, 0.1), (2.5, 0.3, 0.4), (0.7, 0.9, 0.25)])
def test_per_token_divergence_matches_float64_reference(kind, temperature, beta, skew):
    s, t, _, _ = make()
    ref = ref_divergence(kind, s, t, temperature, beta, skew)
    got = NAMED[kind](s, t, temperature, beta, skew)
    assert got.dtype == torch.float32 and got.shape == s.shape[:-1]
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    got2 = token_divergence(s, t, kind=kind, temperature=temperature, beta=beta, skew=skew)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    assert (ref > 1e-3).all()  # the comparison is not trivially between zeros


# ------------------------------------------------------------------------------------ reduced loss + gradient


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.3, 2.0)])
def test_distill_loss_value_and_grad_match_reference(kind, alpha, temperature):
    s, t, y, mask = make(seed=1)
    s1 = s.clone().requires_grad_(True)
    loss = distill_loss(s1, t, y, mask, kind=kind, temperature=temperature, alpha=alpha, beta=0.4, skew=0.2)
    loss.backward()
    s2 = s.double().requires_grad_(True)
    ref = ref_loss(kind, s2, t, y, mask, temperature, alpha, beta=0.4, skew=0.2)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def test_parts_combine_into_loss():
    s, t, y, mask = make(seed=2)
    parts = distill_loss_parts(s, t, y, mask, kind="rkl", temperature=3.0, alpha=0.25)
    assert parts.num_tokens == int(mask.sum())
    torch.testing.assert_close(parts.loss, 0.25 * 9.0 * parts.soft + 0.75 * parts.hard)
    torch.testing.assert_close(parts.soft.double(), ref_divergence("rkl", s, t, 3.0)[mask].mean(), rtol=1e-5, atol=0)


# -------------------------------------------------------------------------------------------- limiting cases


@pytest.mark.parametrize("kind", KINDS)
def test_identical_logits_give_zero_loss_and_gradient(kind):
    s, _, y, mask = make(seed=3, scale=4.0)
    s1 = s.clone().requires_grad_(True)
    loss = distill_loss(s1, s.clone(), y, mask, kind=kind, temperature=1.7, beta=0.3, skew=0.3)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert s1.grad.abs().max().item() < 1e-6
    per_tok = token_divergence(s, s.clone(), kind=kind, beta=0.3, skew=0.3)
    assert per_tok.abs().max().item() < 1e-6


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, y, mask = make(seed=4)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t), rtol=0, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t), rtol=0, atol=0)
    fkl = distill_loss(s, t, y, mask, kind="fkl", temperature=2.0)
    rkl = distill_loss(s, t, y, mask, kind="rkl", temperature=2.0)
    assert not torch.allclose(fkl, rkl)
    torch.testing.assert_close(distill_loss(s, t, y, mask, kind="jsd", beta=0.0, temperature=2.0), fkl)
    torch.testing.assert_close(distill_loss(s, t, y, mask, kind="jsd", beta=1.0, temperature=2.0), rkl)


def test_jsd_interior_formula_is_trl_mixture_and_vanishes_at_the_ends():
    """The documented discontinuity: the mixture formula ~ beta*KL(p||q) near 0 and (1-beta)*KL(q||p) near 1."""
    s, t, _, _ = make(seed=5, scale=1.0)
    eps = 1e-3
    torch.testing.assert_close(generalized_jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=2e-2, atol=1e-4)
    # identity with the skew divergences: jsd(beta) = beta*skew_fkl(beta) + (1-beta)*skew_rkl(1-beta)
    b = 0.3
    combo = b * skew_forward_kl(s, t, skew=b) + (1 - b) * skew_reverse_kl(s, t, skew=1 - b)
    torch.testing.assert_close(generalized_jsd(s, t, beta=b), combo, rtol=1e-5, atol=1e-6)


def test_skew_zero_is_plain_kl():
    s, t, y, mask = make(seed=6)
    torch.testing.assert_close(skew_forward_kl(s, t, skew=0.0), forward_kl(s, t), rtol=0, atol=0)
    torch.testing.assert_close(skew_reverse_kl(s, t, skew=0.0), reverse_kl(s, t), rtol=0, atol=0)
    torch.testing.assert_close(
        distill_loss(s, t, y, mask, kind="skew_fkl", skew=0.0), distill_loss(s, t, y, mask, kind="fkl")
    )
    # a positive skew really changes the value (and shrinks it)
    assert (skew_forward_kl(s, t, skew=0.5) < forward_kl(s, t)).all()


def test_total_variation_bounds_and_disjoint_one_hots():
    s, t, _, _ = make(seed=7, scale=5.0)
    tv = total_variation(s, t)
    assert (tv >= 0).all() and (tv <= 1).all() and (tv > 0).all()
    a = torch.full((4, V), -1e4)
    b = torch.full((4, V), -1e4)
    a[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1e4
    b[torch.arange(4), torch.tensor([5, 6, 7, 8])] = 1e4
    torch.testing.assert_close(total_variation(a, b), torch.ones(4))
    torch.testing.assert_close(total_variation(a, a.clone()), torch.zeros(4))


def test_alpha_zero_is_torch_cross_entropy_on_target_tokens():
    s, t, y, mask = make(seed=8)
    y_junk = torch.where(mask, y, torch.full_like(y, -100))  # masked-out labels may be anything, e.g. -100
    got = distill_loss(s, t, y_junk, mask, alpha=0.0, temperature=3.0)
    want = F.cross_entropy(s[mask], y[mask])
    torch.testing.assert_close(got, want)
    want2 = F.cross_entropy(s.reshape(-1, V), y_junk.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want2)


def test_target_with_pad_id_value_still_counts():
    """pad == eos: a real EOS target whose id equals the pad id is a target; only the mask decides."""
    s, t, y, mask = make(seed=9)
    pad_id = 0
    y = y.clone()
    y[mask] = pad_id
    got = distill_loss(s, t, y, mask, alpha=0.0)
    torch.testing.assert_close(got, F.cross_entropy(s[mask], torch.zeros(int(mask.sum()), dtype=torch.long)))


# ------------------------------------------------------------------------------------------------ temperature


def test_soft_term_is_scaled_by_temperature_squared():
    s, t, y, mask = make(seed=10)
    for temperature in (0.5, 1.0, 4.0):
        got = distill_loss(s, t, y, mask, kind="fkl", temperature=temperature)
        want = temperature**2 * ref_divergence("fkl", s, t, temperature)[mask].mean()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_soft_gradient_keeps_its_scale_across_temperatures():
    """With T^2, d loss / d z -> ((z - mean z) - (v - mean v)) / (V * n) as T grows (Hinton et al.)."""
    s, t, y, mask = make(seed=11, scale=1.0)
    n = int(mask.sum())
    zc = s - s.mean(-1, keepdim=True)
    vc = t - t.mean(-1, keepdim=True)
    limit = torch.where(mask.unsqueeze(-1), (zc - vc) / (V * n), torch.zeros(()))
    norms = {}
    for temperature in (10.0, 20.0, 40.0):
        s1 = s.clone().requires_grad_(True)
        distill_loss(s1, t, y, mask, kind="fkl", temperature=temperature).backward()
        norms[temperature] = s1.grad.norm().item()
        rel = (s1.grad - limit).norm().item() / limit.norm().item()
        assert rel < 2.0 / temperature + 1e-3, (temperature, rel)
    assert 0.9 < norms[40.0] / norms[10.0] < 1.1


# ---------------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("kind", KINDS)
def test_masked_out_positions_change_nothing(kind):
    s, t, y, mask = make(seed=12)
    s2, t2, y2 = s.clone(), t.clone(), y.clone()
    off = ~mask
    g = torch.Generator().manual_seed(99)
    s2[off] = torch.randn(int(off.sum()), V, generator=g) * 50
    t2[off] = torch.randn(int(off.sum()), V, generator=g) * 50
    y2[off] = -100
    grads, losses = [], []
    for a, b, c in ((s, t, y), (s2, t2, y2)):
        x = a.clone().requires_grad_(True)
        loss = distill_loss(x, b, c, mask, kind=kind, alpha=0.6, temperature=1.5)
        loss.backward()
        losses.append(loss)
        grads.append(x.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][mask], grads[1][mask], rtol=0, atol=0)
    assert grads[0][off].abs().max().item() == 0.0 and grads[1][off].abs().max().item() == 0.0


def test_mean_is_over_real_tokens_not_padding():
    s, t, y, _ = make(batch=2, seq=4, seed=13)
    full = torch.ones(2, 4, dtype=torch.bool)
    # the same real tokens, right-padded to length 9 with junk, and float 0/1 mask
    sp = torch.randn(2, 9, V) * 30
    tp = torch.randn(2, 9, V) * 30
    yp = torch.full((2, 9), 7)
    sp[:, :4], tp[:, :4], yp[:, :4] = s, t, y
    mp = torch.zeros(2, 9)
    mp[:, :4] = 1.0
    for kind in ("fkl", "jsd"):
        a = distill_loss(s, t, y, full, kind=kind, alpha=0.5)
        b = distill_loss(sp, tp, yp, mp, kind=kind, alpha=0.5)
        torch.testing.assert_close(a, b)
    # left padding in another row: position does not matter either
    sl = torch.cat([sp[:, 5:], sp[:, :4]], dim=1)
    tl = torch.cat([tp[:, 5:], tp[:, :4]], dim=1)
    yl = torch.cat([yp[:, 5:], yp[:, :4]], dim=1)
    ml = torch.cat([mp[:, 5:], mp[:, :4]], dim=1)
    torch.testing.assert_close(distill_loss(sl, tl, yl, ml, alpha=0.5), distill_loss(s, t, y, full, alpha=0.5))


def test_no_target_token_gives_attached_zero():
    s, t, y, _ = make(seed=14)
    x = s.clone().requires_grad_(True)
    parts = distill_loss_parts(x, t, y, torch.zeros(s.shape[:-1], dtype=torch.bool), alpha=0.5)
    assert parts.num_tokens == 0 and parts.loss.item() == 0.0 and parts.loss.dtype == torch.float32
    parts.loss.backward()
    assert x.grad is not None and x.grad.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 1000])
def test_chunked_equals_unchunked(chunk):
    s, t, y, mask = make(batch=3, seq=7, seed=15)
    n = int(mask.sum())
    assert 5 < n < 1000
    for kind in KINDS:
        outs = []
        for c in (chunk, n + 1_000_000):
            x = s.clone().requires_grad_(True)
            loss = distill_loss(x, t, y, mask, kind=kind, alpha=0.7, temperature=2.0, chunk_tokens=c)
            loss.backward()
            outs.append((loss, x.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-8)


def test_chunks_keep_no_float32_vocab_tensor_between_forward_and_backward():
    """bf16 logits: what autograd keeps for backward is the gathered bf16 logits only; float32 tokens x vocab
    intermediates (log-probs, mixtures) live one chunk at a time and are recomputed in backward."""
    s, t, y, _ = make(batch=4, seq=16, vocab=32, seed=16)
    s, t = s.bfloat16(), t.bfloat16()
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[:, :3] = False
    n = int(mask.sum())
    saved: list[torch.Tensor] = []

    def pack(v):
        saved.append(v)
        return v

    x = s.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        loss = distill_loss(x, t, y, mask, kind="jsd", alpha=0.5, chunk_tokens=8)
    fp32_elems = sum(v.numel() for v in saved if v.dtype == torch.float32)
    bf16_elems = sum(v.numel() for v in saved if v.dtype == torch.bfloat16)
    assert fp32_elems < 32, [(tuple(v.shape), v.dtype) for v in saved]
    assert bf16_elems <= 2 * n * 32  # gathered student + teacher logits, nothing more
    loss.backward()
    ref = x.grad.clone()
    x.grad = None
    distill_loss(x, t, y, mask, kind="jsd", alpha=0.5, chunk_tokens=10_000).backward()
    torch.testing.assert_close(x.grad, ref)


def test_no_grad_path_matches():
    s, t, y, mask = make(seed=17)
    x = s.clone().requires_grad_(True)
    with_grad = distill_loss(x, t, y, mask, kind="skew_rkl", alpha=0.4, chunk_tokens=3)
    with torch.no_grad():
        without = distill_loss(x, t, y, mask, kind="skew_rkl", alpha=0.4, chunk_tokens=3)
    assert not without.requires_grad
    torch.testing.assert_close(with_grad.detach(), without)


# ------------------------------------------------------------------------------------------- dtype / autograd


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tv"])
def test_bf16_logits_give_float32_result_close_to_fp32(kind):
    s, t, y, mask = make(seed=18)
    sb, tb = s.bfloat16(), t.bfloat16()
    x = sb.clone().requires_grad_(True)
    got = distill_loss(x, tb, y, mask, kind=kind, alpha=0.5, temperature=2.0, chunk_tokens=4)
    assert got.dtype == torch.float32
    got.backward()
    assert x.grad.dtype == torch.bfloat16
    # the computation itself is float32: exact up to fp32 rounding on the bf16-rounded values
    same = distill_loss(sb.float(), tb.float(), y, mask, kind=kind, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6)
    # and close to the fp32 logits (only the input rounding differs)
    full = distill_loss(s, t, y, mask, kind=kind, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(got, full, rtol=2e-2, atol=2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = distill_loss(s, t, y, mask, kind=kind, alpha=0.5, temperature=2.0)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_student_only(kind):
    s, t, y, mask = make(seed=19)
    x = s.clone().requires_grad_(True)
    te = t.clone().requires_grad_(True)
    distill_loss(x, te, y, mask, kind=kind, alpha=0.8).backward()
    assert te.grad is None
    assert x.grad is not None and x.grad.abs().sum().item() > 0
    per_tok = token_divergence(x, te, kind=kind)
    per_tok.sum().backward()
    assert te.grad is None


# ------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"kind": "kl"}, "kind"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"beta": 1.01}, "beta"),
        ({"beta": -1e-9}, "beta"),
        ({"skew": 1.0}, "skew"),
        ({"skew": -0.2}, "skew"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"chunk_tokens": 2.5}, "chunk_tokens"),
        ({"chunk_tokens": True}, "chunk_tokens"),
        ({"temperature": "2"}, "temperature"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    s, t, y, mask = make(batch=1, seq=3, seed=20)
    with pytest.raises(ValueError, match=name):
        distill_loss(s, t, y, mask, **kwargs)


def test_bad_tensors_raise():
    s, t, y, mask = make(batch=2, seq=3, seed=21)
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(s, t[..., :-1], y, mask)
    with pytest.raises(ValueError, match="mask"):
        distill_loss(s, t, y, mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        distill_loss(s, t, y, mask.float() * 0.5)
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, None, mask, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, y.float(), mask, alpha=0.5)
    bad = y.clone()
    bad[mask] = V  # out of vocabulary at a target position
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, bad, mask, alpha=0.5)
    # labels are optional for the pure soft loss
    assert distill_loss(s, t, None, mask, alpha=1.0).item() > 0
    with pytest.raises(ValueError, match="student_logits"):
        distill_loss(s.long(), t, y, mask)
