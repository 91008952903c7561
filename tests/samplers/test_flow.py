"""Flow samplers checked against independent math: torch.distributions.Normal densities computed from
the DESIGN.md formulas by hand, diffusers' FlowMatchEulerDiscreteScheduler, and the exact marginals
of a flow towards a point mass."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from rlgen.samplers.flow import cfg_combine, score_steps, sample, sde_step, sigma_schedule

NL = 0.7


def hand_mean_std(x, v, sigma, sigma_next, noise_level):
    """DESIGN.md's Flow-GRPO step in float64, written out per sample (sigma lists of floats)."""
    means, stds = [], []
    for b, (s, sn) in enumerate(zip(sigma, sigma_next)):
        dt = sn - s
        # Flow-GRPO: sigma / (1 - where(sigma == 1, sigmas[1], sigma)); at σ=1, sigmas[1] is sigma_next
        std_sigma = noise_level * math.sqrt(s / (1 - (sn if s == 1 else s)))
        xb, vb = x[b].double(), v[b].double()
        means.append(xb * (1 + std_sigma**2 * dt / (2 * s)) + vb * (1 + std_sigma**2 * (1 - s) / (2 * s)) * dt)
        stds.append(std_sigma * math.sqrt(-dt))
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def normal_log_prob(prev, mean, std):
    """Independent reference: Normal log-density of each sample, summed over its dims."""
    std = std.reshape(-1, *([1] * (prev.ndim - 1))).expand_as(prev)
    return Normal(mean, std).log_prob(prev.double()).flatten(1).sum(1)


STEPS = [(1.0, 0.9), (0.6, 0.45), (0.1, 0.0)]  # first (σ=1), middle, last (σ_next=0)


@pytest.mark.parametrize("sigma,sigma_next", STEPS)
def test_sde_step_float_sigma_matches_normal(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    out = sde_step(x, v, sigma, sigma_next, NL, generator=g)
    mean, std = hand_mean_std(x, v, [sigma] * 3, [sigma_next] * 3, NL)
    assert out.log_prob.shape == (3,) and out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.std.expand_as(x)[:, 0, 0, 0].double(), std, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.log_prob.double(), normal_log_prob(out.prev_sample, mean, std), rtol=1e-5, atol=1e-3)


def test_sde_step_per_sample_sigma_matches_normal():
    sig, sig_next = [s for s, _ in STEPS], [n for _, n in STEPS]
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    out = sde_step(x, v, torch.tensor(sig), torch.tensor(sig_next), NL, generator=g)
    mean, std = hand_mean_std(x, v, sig, sig_next, NL)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_prob.double(), normal_log_prob(out.prev_sample, mean, std), rtol=1e-5, atol=1e-3)
    # each row agrees with the same step taken with float sigmas
    for b, (s, sn) in enumerate(STEPS):
        ref = sde_step(x[b : b + 1], v[b : b + 1], s, sn, NL, prev_sample=out.prev_sample[b : b + 1])
        torch.testing.assert_close(ref.log_prob, out.log_prob[b : b + 1])


def test_rescoring_reproduces_log_prob_and_draws_no_noise():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    drawn = sde_step(x, v, 0.8, 0.7, NL, generator=g)
    given = drawn.prev_sample.clone()
    state = g.get_state()
    scored = sde_step(x, v, 0.8, 0.7, NL, generator=g, prev_sample=given)
    assert torch.equal(g.get_state(), state), "scoring must not draw noise"
    assert torch.equal(given, drawn.prev_sample) and torch.equal(scored.prev_sample, given)
    torch.testing.assert_close(scored.log_prob, drawn.log_prob, rtol=0, atol=1e-4)


def test_half_inputs_score_the_stored_half_sample_in_float32():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 4, 8, 8, generator=g).half(), torch.randn(2, 4, 8, 8, generator=g).half()
    out = sde_step(x, v, 0.5, 0.4, NL, generator=g)
    assert out.prev_sample.dtype == torch.float16 and out.log_prob.dtype == torch.float32
    mean, std = hand_mean_std(x.float(), v.float(), [0.5] * 2, [0.4] * 2, NL)
    torch.testing.assert_close(out.log_prob.double(), normal_log_prob(out.prev_sample, mean, std), rtol=1e-5, atol=1e-2)
    rescored = sde_step(x, v, 0.5, 0.4, NL, prev_sample=out.prev_sample)
    torch.testing.assert_close(rescored.log_prob, out.log_prob, rtol=0, atol=1e-4)


def test_ode_step_matches_diffusers_scheduler_step():
    n, shift = 8, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))  # the SD3 pipeline's call
    sigmas = sigma_schedule(n, shift)
    g = torch.Generator().manual_seed(4)
    ours = theirs = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.tanh(theirs) + torch.randn(theirs.shape, generator=g)  # any velocity, same for both
        theirs_next = sched.step(v, t, theirs).prev_sample
        out = sde_step(theirs, v, float(sigmas[i]), float(sigmas[i + 1]), 0.0)
        assert out.log_prob is None and not out.std.any()
        torch.testing.assert_close(out.prev_sample, theirs_next, rtol=0, atol=1e-6)
        theirs = theirs_next


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_sigma_schedule_matches_diffusers(shift, n):
    ours = sigma_schedule(n, shift)
    # SD3 pipeline convention: uniform sigmas in [1, 1/n], shifted by the scheduler, terminal 0 appended
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=2e-7)
    # The scheduler's own spacing (linspace from sigma_max to its training sigma_min, then shifted again)
    # coincides only when its smallest shifted training sigma is 1/n: num_train_timesteps = shift·(n−1)+1.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(shift * (n - 1) + 1), shift=shift)
    sched.set_timesteps(n)
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=2e-7)
    assert ours[0] == 1 and ours[-1] == 0 and (ours[1:] < ours[:-1]).all()


def test_empirical_moments_match_returned_mean_and_std():
    n = 40_000
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, generator=g).expand(n, 6)
    v = torch.randn(1, 6, generator=g).expand(n, 6)
    out = sde_step(x, v, 0.7, 0.55, NL, generator=g)
    draws, std = out.prev_sample, out.std.reshape(())
    torch.testing.assert_close(draws.mean(0), out.mean[0], rtol=0, atol=float(5 * std / math.sqrt(n)))
    torch.testing.assert_close(draws.std(0), std.expand(6), rtol=0.03, atol=0)
    # E[log p] is minus the entropy of a 6-dim isotropic Gaussian
    neg_entropy = -6 * (0.5 + 0.5 * math.log(2 * math.pi) + math.log(float(std)))
    assert abs(out.log_prob.mean().item() - neg_entropy) < 0.05


def point_mass_velocity(x0):
    """For x_σ = (1−σ)·x0 + σ·ε the exact velocity ε − x0 is (x − x0)/σ."""
    return lambda x, sigma: (x - x0) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def test_ode_sample_reaches_point_mass():
    x0 = torch.tensor([[1.5, -2.0, 0.25]])
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(6))
    traj = sample(point_mass_velocity(x0), noise, sigma_schedule(12, 3.0), noise_level=0.0)
    torch.testing.assert_close(traj.samples, x0.expand(16, 3), rtol=0, atol=1e-5)
    assert not traj.sde_mask.any() and not traj.log_probs.any()
    # the Euler path of this field is exactly the interpolation (1−σ)x0 + σε
    sig = traj.sigmas.reshape(1, -1, 1)
    torch.testing.assert_close(traj.latents, (1 - sig) * x0[:, None] + sig * noise[:, None], rtol=0, atol=1e-5)


def test_sde_sample_keeps_marginals_and_approaches_point_mass():
    x0 = torch.tensor([[1.5, -2.0, 0.25]])
    n, steps = 8000, 40
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(8)
    traj = sample(point_mass_velocity(x0), noise, sigma_schedule(steps), noise_level=NL, generator=gen)
    assert traj.latents.shape == (n, steps + 1, 3) and traj.log_probs.shape == (n, steps)
    assert torch.isfinite(traj.log_probs).all() and traj.sde_mask.all()
    # Flow-GRPO's SDE keeps the forward marginals N((1−σ)x0, σ²) at every grid point
    for i in (10, 20, 30):
        s = float(traj.sigmas[i])
        torch.testing.assert_close(traj.latents[:, i].mean(0), (1 - s) * x0[0], rtol=0, atol=0.06)
        torch.testing.assert_close(traj.latents[:, i].std(0), torch.full((3,), s), rtol=0.08, atol=0)
    torch.testing.assert_close(traj.samples.mean(0), x0[0], rtol=0, atol=0.05)
    assert traj.samples.std(0).max() < 0.1


def tiny_velocity_net(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    return conv, lambda x, sigma: conv(x) * (1 + sigma.reshape(-1, 1, 1, 1))


def test_sde_steps_window_is_respected():
    conv, vel = tiny_velocity_net()
    sigmas = sigma_schedule(6, 2.0)
    noise = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(9))
    a = sample(vel, noise, sigmas, NL, generator=torch.Generator().manual_seed(10), sde_steps=[2, 3])
    window = torch.tensor([0, 0, 1, 1, 0, 0]).bool()
    b = sample(vel, noise, sigmas, NL, generator=torch.Generator().manual_seed(11), sde_steps=window)
    assert a.sde_mask.tolist() == b.sde_mask.tolist() == [False, False, True, True, False, False]
    c = sample(vel, noise, sigmas, NL, sde_steps=np.array([1, 1, 0, 0, 0, 1], dtype=bool))
    assert c.sde_mask.tolist() == [True, True, False, False, False, True]
    assert (a.log_probs[:, ~a.sde_mask] == 0).all() and (a.log_probs[:, a.sde_mask] != 0).all()
    assert (a.stds[~a.sde_mask] == 0).all() and (a.stds[a.sde_mask] > 0).all()
    # ODE steps before the window do not depend on the generator; the window's draws do
    assert torch.equal(a.latents[:, :3], b.latents[:, :3]) and not torch.allclose(a.latents[:, 3], b.latents[:, 3])
    with torch.no_grad():
        for i in (0, 1, 4, 5):  # each ODE step is exactly Euler on the stored latents
            x, s, sn = a.latents[:, i], a.sigmas[i], a.sigmas[i + 1]
            torch.testing.assert_close(a.latents[:, i + 1], x + vel(x, s.expand(4)) * (sn - s), rtol=0, atol=1e-6)


def test_score_steps_reproduces_trajectory_and_has_grad():
    conv, vel = tiny_velocity_net(1)
    sigmas = sigma_schedule(5, 3.0)
    noise = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(12))
    traj = sample(vel, noise, sigmas, NL, generator=torch.Generator().manual_seed(13), return_means=True)
    idx = [0, 2, 4]
    log_prob, mean, std = score_steps(vel, traj.latents, traj.sigmas, idx, NL)
    assert log_prob.shape == (3, 3) and mean.shape == (3, 3, 2, 6, 6) and std.shape == (3,)
    torch.testing.assert_close(log_prob, traj.log_probs[:, idx], rtol=0, atol=1e-5)
    torch.testing.assert_close(mean, traj.means[:, idx], rtol=0, atol=1e-6)
    torch.testing.assert_close(std, traj.stds[idx], rtol=0, atol=0)
    log_prob.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_keep_latents_false_keeps_start_and_final():
    _, vel = tiny_velocity_net(2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(14))
    full = sample(vel, noise, sigma_schedule(4), NL, generator=torch.Generator().manual_seed(15))
    lean = sample(vel, noise, sigma_schedule(4), NL, generator=torch.Generator().manual_seed(15), keep_latents=False)
    assert lean.latents.shape == (2, 2, 2, 4, 4) and torch.equal(lean.samples, full.samples)
    assert torch.equal(lean.latents[:, 0], noise) and torch.equal(lean.log_probs, full.log_probs)


def test_cfg_combine():
    vc, vu = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(cfg_combine(vc, vu, 4.0), 4.0 * vc - 3.0 * vu)
    per_sample = cfg_combine(vc, vu, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per_sample, torch.stack([vc[0], vu[1]]))


def test_input_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step(x, x, 0.5, 0.5, NL)
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step(x, x, torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.6]), NL)
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step(x, x, 1.2, 0.5, NL)
    with pytest.raises(ValueError, match="shape"):
        sde_step(x, torch.zeros(2, 4), 0.5, 0.4, NL)
    with pytest.raises(ValueError, match="shape"):
        sde_step(x, x, torch.tensor([0.5, 0.5, 0.5]), 0.4, NL)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, x, 0.5, 0.4, -0.1)
    vel = lambda x, s: x  # noqa: E731
    with pytest.raises(ValueError, match="decrease"):
        sample(vel, x, torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="sde_steps"):
        sample(vel, x, sigma_schedule(3), sde_steps=[3])
    with pytest.raises(ValueError, match="noise_level"):
        score_steps(vel, torch.zeros(2, 4, 3), sigma_schedule(3), [0], 0.0)
    with pytest.raises(ValueError, match="latents"):
        score_steps(vel, torch.zeros(2, 3, 3), sigma_schedule(3), [0], NL)
