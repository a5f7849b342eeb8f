"""Maths of distill.diffusion: schedules, samplers and losses, checked against diffusers and limiting cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from distill.diffusion.losses import (
    consistency_loss,
    progressive_loss,
    progressive_target,
    pseudo_huber,
    teacher_loss,
)
from distill.diffusion.sampling import consistency_coefficients, consistency_fn, sample_consistency, sample_ddim
from distill.diffusion.schedule import Schedule

T = 1024
SHAPE = (3, 3, 8, 8)


@pytest.fixture(scope="module")
def schedules():
    return {(k, p): Schedule.make(k, T, p) for k in ("cosine", "linear") for p in ("v", "epsilon")}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def data(seed=0, shape=SHAPE):
    return torch.rand(shape, generator=gen(seed)) * 2 - 1


class ConvModel(torch.nn.Module):
    """A small fixed random model with a t-dependent term (stands in for a UNet)."""

    def __init__(self, seed=0, channels=3):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.w = torch.nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, z, t):
        tt = (t.float() / T).view(-1, 1, 1, 1)
        return 0.5 * torch.tanh(self.conv(z)) + torch.sin(3 * tt) * self.w.view(1, -1, 1, 1) + 0.1 * tt * z


def exact_model(schedule, xstar):
    """The ideal model when the data is the single point x*: it outputs target(x*, eps_implied, t)."""

    def fn(z, t):
        alpha, sigma = schedule.alpha_sigma(t, z.device)
        eps = (z - alpha * xstar) / sigma
        return schedule.target(xstar.expand_as(z), eps, t)

    return fn


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind,beta", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
def test_alphas_equal_diffusers(schedules, kind, beta):
    s = schedules[(kind, "v")]
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta).alphas_cumprod.double()
    assert s.alphas_cumprod.dtype == torch.float64 and s.alphas_cumprod.device.type == "cpu"
    assert torch.equal(s.alphas_cumprod, ref)
    t = torch.arange(-1, T)
    alpha, sigma = s.alpha_sigma(t)
    assert alpha.shape == (T + 1, 1, 1, 1) and alpha.dtype == torch.float32
    assert torch.allclose(alpha[1:].flatten().double() ** 2, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(()), atol=1e-6)
    assert alpha[0].item() == 1.0 and sigma[0].item() == 0.0
    assert (alpha[1:].flatten().diff() < 0).all()  # monotone: more noise with larger t
    ddim = DDIMScheduler(**s.scheduler_config())
    assert torch.allclose(ddim.alphas_cumprod.double(), ref)
    snr = s.snr(t)
    assert snr.shape == (T + 1,) and math.isinf(snr[0].item())
    assert torch.allclose(snr[1:].double(), ref / (1 - ref), rtol=1e-5)


def test_bad_fields_raise(schedules):
    with pytest.raises(ValueError, match="kind"):
        Schedule.make("quadratic")
    with pytest.raises(ValueError, match="prediction"):
        Schedule.make(prediction="sample")
    for bad_T in (0, 1, -4, 8.0, True, "1024"):
        with pytest.raises(ValueError, match="T"):
            Schedule.make(T=bad_T)
    s = schedules[("cosine", "v")]
    for k in (3, 0, -2, 2 * T, 6, 2.0, True):
        with pytest.raises(ValueError, match=f"k={k!r}"):
            s.timesteps(k)
    with pytest.raises(ValueError, match="t must"):
        s.alpha_sigma(torch.tensor([-2]))
    with pytest.raises(ValueError, match="t must"):
        s.alpha_sigma(torch.tensor([T]))
    with pytest.raises(ValueError, match=f"student_steps={T}"):  # s = 1: the teacher has no half step
        progressive_target(ConvModel(0), data(0), torch.full((3,), T - 1), s, T)
    with pytest.raises(ValueError, match="unknown"):
        Schedule.from_dict({"kind": "cosine", "T": 8, "prediction": "v", "extra": 1})


def test_dict_round_trip(schedules):
    for s in schedules.values():
        d = json.loads(json.dumps(s.to_dict()))
        assert d == {"kind": s.kind, "T": s.T, "prediction": s.prediction}
        assert Schedule.from_dict(d) == s
    assert schedules[("cosine", "v")] != schedules[("cosine", "epsilon")]
    small = Schedule.make("linear", 16, "epsilon")
    assert Schedule.from_dict(small.to_dict()).alphas_cumprod.shape == (16,)


def test_non_power_of_two_T():
    """T = 1000 (an existing DDPM's schedule) is accepted; step counts must still be powers of two dividing it."""
    s = Schedule.make("linear", 1000, "epsilon")
    ddim = DDIMScheduler(**s.scheduler_config())
    ddim.set_timesteps(8)
    assert s.timesteps(8) == ddim.timesteps.tolist() == list(range(999, -1, -125))
    with pytest.raises(ValueError, match="k=16"):
        s.timesteps(16)
    x0 = data(50)
    model = ConvModel(51)
    assert torch.isfinite(progressive_loss(model, model, x0, s, 4, generator=gen(52)))  # s = 250
    with pytest.raises(ValueError, match="student_steps=8"):  # s = 125 has no whole half step
        progressive_loss(model, model, x0, s, 8, generator=gen(52))
    assert torch.isfinite(consistency_loss(model, model, model, x0, s, skip=40, generator=gen(53)))
    with pytest.raises(ValueError, match="skip=64"):
        consistency_loss(model, model, model, x0, s, skip=64, generator=gen(53))


@pytest.mark.parametrize("k", [1, 2, 4, 8, 64, T])
def test_timesteps_trailing_equal_diffusers(schedules, k):
    s = schedules[("linear", "v")]
    ddim = DDIMScheduler(**s.scheduler_config())
    ddim.set_timesteps(k)
    grid = s.timesteps(k)
    assert grid == ddim.timesteps.tolist()
    assert len(grid) == k and grid[0] == T - 1 and grid[-1] == T // k - 1 and s.step_size(k) == T // k
    assert all(a - b == T // k for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_target_round_trip(schedules, prediction):
    x0, eps = data(1), torch.randn(SHAPE, generator=gen(2))
    for kind in ("cosine", "linear"):
        s = schedules[(kind, prediction)]
        t = torch.tensor([0, 300, 900])
        z = s.add_noise(x0, eps, t)
        alpha, sigma = s.alpha_sigma(t)
        assert torch.allclose(z, alpha * x0 + sigma * eps)
        x0_hat, eps_hat = s.to_x0_eps(z, t, s.target(x0, eps, t))
        assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)
        # t = -1 is clean data
        assert torch.equal(s.add_noise(x0, eps, -1), x0)
        if prediction == "v":  # well conditioned everywhere, also at the very end of the cosine schedule
            tt = torch.full((3,), T - 1)
            x0_hat, eps_hat = s.to_x0_eps(s.add_noise(x0, eps, tt), tt, s.target(x0, eps, tt))
            assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)
        else:
            assert torch.equal(s.target(x0, eps, t), eps)


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("prediction", ["v", "epsilon"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_sample_ddim_equals_diffusers(schedules, kind, prediction, k):
    s = schedules[(kind, prediction)]
    model = ConvModel(seed=3)
    noise = torch.randn(SHAPE, generator=gen(4))
    ddim = DDIMScheduler(**s.scheduler_config())
    ddim.set_timesteps(k)
    z = noise.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            out = model(z, torch.full((z.shape[0],), int(t)))
            z = ddim.step(out, t, z).prev_sample
    ours = sample_ddim(model, noise, s, k, clip=False)
    # epsilon + cosine divides by alpha_{T-1} ~ 5e-5 at the first step (|x0_hat| ~ 6e4): compare relative to the
    # magnitude, i.e. to float32 round-off of the same computation
    tol = 1e-5 * max(1.0, z.abs().max().item())
    assert torch.allclose(ours, z, atol=tol, rtol=1e-5), (ours - z).abs().max()
    clipped = sample_ddim(model, noise, s, k)
    assert torch.allclose(clipped, z.clamp(-1, 1), atol=tol) and clipped.abs().max() <= 1


@pytest.mark.parametrize("kind,prediction", [("cosine", "v"), ("linear", "v"), ("linear", "epsilon")])
def test_ddim_single_point_data_is_recovered(schedules, kind, prediction):
    s = schedules[(kind, prediction)]
    xstar = data(5, (1, 3, 8, 8)) * 0.9
    noise = torch.randn(SHAPE, generator=gen(6))
    for k in (1, 2, 8, 32):
        out = sample_ddim(exact_model(s, xstar), noise, s, k)
        assert torch.allclose(out, xstar.expand(SHAPE), atol=1e-4), (k, (out - xstar).abs().max())


# ---------------------------------------------------------------- consistency


def test_consistency_coefficients(schedules):
    s = schedules[("cosine", "v")]
    c_skip, c_out = consistency_coefficients(s, torch.tensor([-1]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    t = torch.arange(0, T)
    c_skip, c_out = consistency_coefficients(s, t)
    assert c_skip.shape == (T, 1, 1, 1)
    assert (c_skip.flatten().diff() < 0).all() and (c_out.flatten().diff() >= 0).all()  # saturates at 1 in fp32
    lcm = LCMScheduler(**{k: v for k, v in s.scheduler_config().items() if k != "steps_offset"})
    for tv in (0, 1, 5, 100, 1023):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(tv)
        got_skip, got_out = consistency_coefficients(s, tv)
        assert got_skip.item() == pytest.approx(ref_skip, rel=1e-6, abs=1e-9)
        assert got_out.item() == pytest.approx(ref_out, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError):
        consistency_coefficients(s, torch.tensor([T]))


def test_consistency_fn_boundary(schedules):
    s = schedules[("cosine", "v")]
    z = data(7)
    junk = torch.full(SHAPE, float("nan"))
    assert torch.equal(consistency_fn(s, z, torch.full((3,), -1), junk), z)
    t = torch.tensor([10, 500, 1023])
    out = ConvModel(1)(z, t).detach()
    c_skip, c_out = consistency_coefficients(s, t)
    x0, _ = s.to_x0_eps(z, t, out)
    assert torch.allclose(consistency_fn(s, z, t, out), c_skip * z + c_out * x0)


def test_sample_consistency(schedules):
    s = schedules[("cosine", "v")]
    model = ConvModel(seed=8)
    noise = torch.randn(SHAPE, generator=gen(9))
    one = sample_consistency(model, noise, s, 1)
    tt = torch.full((3,), T - 1)
    with torch.no_grad():
        ref = consistency_fn(s, noise, tt, model(noise, tt)).clamp(-1, 1)
    assert torch.equal(one, ref)
    a = sample_consistency(model, noise, s, 4, generator=gen(10))
    b = sample_consistency(model, noise, s, 4, generator=gen(10))
    c = sample_consistency(model, noise, s, 4, generator=gen(11))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0
    with pytest.raises(ValueError, match="generator"):
        sample_consistency(model, noise, s, 4)


def test_sample_consistency_equals_lcm_scheduler_step(schedules):
    """Each of our multistep iterations equals one diffusers LCMScheduler.step on the same trailing timesteps."""
    s = schedules[("linear", "v")]
    model = ConvModel(seed=12)
    noise = torch.randn(SHAPE, generator=gen(13))
    k = 4
    grid = s.timesteps(k)
    lcm = LCMScheduler(**{key: v for key, v in s.scheduler_config().items() if key != "steps_offset"})
    lcm.set_timesteps(timesteps=grid)
    assert lcm.timesteps.tolist() == grid
    z = noise.clone()
    g = gen(14)
    with torch.no_grad():
        for t in lcm.timesteps:
            out = model(z, torch.full((3,), int(t)))
            z, denoised = lcm.step(out, t, z, generator=g, return_dict=False)
    ours = sample_consistency(model, noise, s, k, generator=gen(14), clip=False)
    assert torch.allclose(ours, denoised, atol=1e-5), (ours - denoised).abs().max()


# ---------------------------------------------------------------- losses


def test_pseudo_huber():
    a = data(15)
    assert pseudo_huber(a, a).item() == 0.0
    d = a.flatten(1).shape[1]
    c_default = 0.00054 * math.sqrt(d)
    b = a + 1e-6 * torch.randn(a.shape, generator=gen(151))
    sq = (a - b).double().pow(2).sum(dim=(1, 2, 3))
    assert (sq.sqrt() < 1e-2 * c_default).all()
    small = pseudo_huber(a, b)
    assert small.item() == pytest.approx((sq / (2 * c_default)).mean().item(), rel=1e-4)  # quadratic near 0
    per_sample = [pseudo_huber(a[i : i + 1], b[i : i + 1]) for i in range(a.shape[0])]
    assert small.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)  # mean over the batch
    big = torch.ones(1, 3, 8, 8)
    for scale in (10.0, 100.0):
        val = pseudo_huber(big * scale, torch.zeros_like(big), c=0.1).item()
        assert val == pytest.approx(scale * math.sqrt(d) - 0.1, rel=1e-5)
    ratio = pseudo_huber(big * 100, big * 0, c=0.1) / pseudo_huber(big * 10, big * 0, c=0.1)
    assert ratio.item() == pytest.approx(10, rel=1e-3)  # linear growth far away
    # gradient at a == b is finite (zero)
    x = a.clone().requires_grad_(True)
    pseudo_huber(x, a).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0
    with pytest.raises(ValueError):
        pseudo_huber(a, b, c=0.0)


def test_teacher_loss(schedules):
    s = schedules[("cosine", "v")]
    xstar = data(16, (1, 3, 8, 8))
    x0 = xstar.expand(SHAPE).contiguous()
    assert teacher_loss(exact_model(s, xstar), x0, s, generator=gen(17)).item() < 1e-8
    model = ConvModel(seed=18)
    l1 = teacher_loss(model, x0, s, generator=gen(19))
    l2 = teacher_loss(model, x0, s, generator=gen(19))
    assert torch.equal(l1, l2) and l1.item() > 1e-3
    l1.backward()
    assert model.conv.weight.grad is not None


@pytest.mark.parametrize("kind,prediction", [("cosine", "v"), ("linear", "epsilon")])
def test_progressive_target_limiting_and_consistency(schedules, kind, prediction):
    s = schedules[(kind, prediction)]
    xstar = data(20, (1, 3, 8, 8)) * 0.9
    teacher = exact_model(s, xstar)
    z = torch.randn(SHAPE, generator=gen(21))
    student_steps = 4
    step = s.step_size(student_steps)
    t = torch.tensor([T - 1, T - 1 - step, step - 1])
    x_tilde = progressive_target(teacher, z, t, s, student_steps)
    assert torch.allclose(x_tilde, xstar.expand(SHAPE), atol=1e-3)
    # a generic teacher: one student DDIM step from t with x_hat = x_tilde lands on the teacher's two-step z''
    model = ConvModel(seed=22)
    with torch.no_grad():
        x_tilde = progressive_target(model, z, t, s, student_steps)
        z_mid = s.ddim_step(z, t, t - step // 2, model(z, t))
        z_end = s.ddim_step(z_mid, t - step // 2, t - step, model(z_mid, t - step // 2))
        alpha, sigma = s.alpha_sigma(t)
        alpha_e, sigma_e = s.alpha_sigma(t - step)
        student_end = alpha_e * x_tilde + sigma_e * (z - alpha * x_tilde) / sigma
    assert torch.allclose(student_end, z_end, atol=1e-4)
    assert torch.equal(x_tilde[2], z_end[2])  # t'' = -1: the target is z'' itself
    with pytest.raises(ValueError, match="t must"):
        progressive_target(model, z, torch.tensor([0, 0, 0]), s, student_steps)


def test_progressive_target_equals_two_diffusers_steps(schedules):
    s = schedules[("linear", "v")]
    model = ConvModel(seed=23)
    z = torch.randn(SHAPE, generator=gen(24))
    ddim = DDIMScheduler(**s.scheduler_config())
    ddim.set_timesteps(8)  # teacher has 8 steps, student 4: the first two teacher steps = first student step
    zz = z.clone()
    with torch.no_grad():
        for t in ddim.timesteps[:2]:
            zz = ddim.step(model(zz, torch.full((3,), int(t))), t, zz).prev_sample
        x_tilde = progressive_target(model, z, torch.full((3,), T - 1), s, 4)
    alpha, sigma = s.alpha_sigma(T - 1)
    alpha_e, sigma_e = s.alpha_sigma(T - 1 - T // 4)
    assert torch.allclose(alpha_e * x_tilde + sigma_e * (z - alpha * x_tilde) / sigma, zz, atol=1e-5)


def _grads(m):
    return [p.grad for p in m.parameters()]


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_progressive_loss(schedules, prediction):
    s = schedules[("linear", prediction)]
    xstar = data(25, (1, 3, 8, 8)) * 0.9
    x0 = xstar.expand(SHAPE).contiguous()
    exact = exact_model(s, xstar)
    assert progressive_loss(exact, exact, x0, s, 4, generator=gen(26)).item() < 1e-6
    student, teacher = ConvModel(seed=27), ConvModel(seed=28)
    loss = progressive_loss(student, teacher, x0, s, 2, generator=gen(29))
    again = progressive_loss(student, teacher, x0, s, 2, generator=gen(29))
    assert torch.equal(loss.detach(), again.detach()) and loss.item() > 1e-4
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(student))
    assert all(g is None for g in _grads(teacher))


def test_progressive_loss_weight_is_truncated_snr(schedules):
    """With the student = the teacher and a 1-step student, t = T-1 and t'' = -1: the loss is
    max(SNR, 1) * per-pixel MSE between the student's x_hat and the teacher's two-step result."""
    s = schedules[("cosine", "v")]
    student, teacher = ConvModel(seed=30), ConvModel(seed=31)
    x0 = data(32)
    g = gen(33)
    loss = progressive_loss(student, teacher, x0, s, 1, generator=g)
    g = gen(33)
    torch.randint(0, 1, (3,), generator=g)  # the draw of t on the 1-step grid [T-1]
    t = torch.full((3,), T - 1)
    eps = torch.randn(SHAPE, generator=g)
    z = s.add_noise(x0, eps, t)
    with torch.no_grad():
        target = progressive_target(teacher, z, t, s, 1)
        x_hat, _ = s.to_x0_eps(z, t, student(z, t))
    w = max(s.snr(T - 1).item(), 1.0)
    assert w == 1.0
    assert loss.item() == pytest.approx(w * (x_hat - target).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind,prediction", [("cosine", "v"), ("linear", "epsilon")])
def test_consistency_loss_limiting_case(schedules, kind, prediction):
    s = schedules[(kind, prediction)]
    xstar = data(34, (1, 3, 8, 8)) * 0.9
    x0 = xstar.expand(SHAPE).contiguous()
    exact = exact_model(s, xstar)
    # with c_skip -> 0 away from t = -1, f(z, t) = x0_hat = x* for every t: the exact model is self-consistent
    for skip in (2, 64, T // 2, T):
        loss = consistency_loss(exact, exact, exact, x0, s, skip=skip, generator=gen(35), timestep_scaling=1e5)
        assert loss.item() < 1e-4, (skip, loss.item())
    # with LCM's default scaling the exact model is still almost consistent, far more than a random student
    near = consistency_loss(exact, exact, exact, x0, s, skip=64, generator=gen(36))
    far = consistency_loss(ConvModel(37), exact, exact, x0, s, skip=64, generator=gen(36))
    assert near.item() < 0.05 * far.item()


def test_consistency_loss_gradients_and_determinism(schedules):
    s = schedules[("cosine", "v")]
    student, target, teacher = ConvModel(38), ConvModel(39), ConvModel(40)
    x0 = data(41)
    loss = consistency_loss(student, target, teacher, x0, s, skip=256, generator=gen(42))
    again = consistency_loss(student, target, teacher, x0, s, skip=256, generator=gen(42))
    assert torch.equal(loss.detach(), again.detach()) and loss.item() > 0
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(student))
    assert all(g is None for g in _grads(target)) and all(g is None for g in _grads(teacher))
    for bad in (3, 0, 2 * T, 48, True):
        with pytest.raises(ValueError, match="skip"):
            consistency_loss(student, target, teacher, x0, s, skip=bad, generator=gen(42))


def test_consistency_loss_matches_manual(schedules):
    """The loss equals the formula written out by hand (same draws: t_hi, then eps)."""
    s = schedules[("linear", "v")]
    student, target, teacher = ConvModel(43), ConvModel(44), ConvModel(45)
    x0 = data(46)
    skip = 512  # grid [1023, 511]: t_lo in {511, -1}
    loss = consistency_loss(student, target, teacher, x0, s, skip=skip, generator=gen(47), huber_c=0.03)
    g = gen(47)
    t_hi = torch.tensor([T - 1, skip - 1])[torch.randint(0, 2, (3,), generator=g)]
    eps = torch.randn(SHAPE, generator=g)
    t_lo = t_hi - skip
    with torch.no_grad():
        z_hi = s.add_noise(x0, eps, t_hi)
        z_lo = s.ddim_step(z_hi, t_hi, t_lo, teacher(z_hi, t_hi))
        y = torch.where((t_lo < 0).view(-1, 1, 1, 1), z_lo,
                        consistency_fn(s, z_lo, t_lo, target(z_lo, t_lo.clamp_min(0))))
        x = consistency_fn(s, z_hi, t_hi, student(z_hi, t_hi))
    d = (x - y).flatten(1).pow(2).sum(1)
    assert loss.item() == pytest.approx(((d + 0.03**2).sqrt() - 0.03).mean().item(), rel=1e-5)
