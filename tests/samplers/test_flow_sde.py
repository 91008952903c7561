"""The Flow-GRPO family's step kinds (DanceGRPO, CPS) and MixGRPO's DPM-Solver++ ODE steps, checked
against independent math: Normal densities of the papers' formulas written out by hand, the flow
marginal's coefficients on a case with a known velocity, and diffusers' DPMSolverMultistepScheduler."""
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from torch.distributions import Normal

from rlgen.samplers.dpm_solver import dpmpp_2m_step
from rlgen.samplers.flow import sample, score_steps, sde_step, sigma_schedule
from rlgen.samplers.flow_sde import SDE_KINDS, cps_step, dance_step, sde_step_fn

STEPS = [(1.0, 0.9), (0.6, 0.45), (0.3, 0.2)]


def _normal_lp(prev, mean, std):
    return Normal(mean, torch.full_like(mean, std)).log_prob(prev.double()).flatten(1).sum(1)


@pytest.mark.parametrize("sigma,sigma_next", STEPS)
def test_dance_step_is_dancegrpo_sde_with_exact_normal_log_prob(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    eta = 0.3
    out = dance_step(x, v, sigma, sigma_next, eta, generator=g)
    # DanceGRPO's form: Euler drift plus −½η²·score·dσ, score from the x0 prediction
    xd, vd, dsig = x.double(), v.double(), sigma_next - sigma
    x0 = xd - sigma * vd
    score = -(xd - (1 - sigma) * x0) / sigma ** 2
    mean = xd + dsig * vd - 0.5 * eta ** 2 * score * dsig
    std = eta * math.sqrt(sigma - sigma_next)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_prob.double(), _normal_lp(out.prev_sample, mean, std), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("sigma,sigma_next", STEPS)
def test_cps_step_log_prob_is_the_hand_written_gaussian(sigma, sigma_next):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    a = 0.6
    out = cps_step(x, v, sigma, sigma_next, a, generator=g)
    xd, vd = x.double(), v.double()
    # std² + (noise coefficient of ε̂)² = σ'²: the step keeps the marginal's noise scale
    std = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * (xd - sigma * vd) + math.sqrt(sigma_next ** 2 - std ** 2) * (xd + (1 - sigma) * vd)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_prob.double(), _normal_lp(out.prev_sample, mean, std), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="sigma_next = 0"):
        cps_step(x, v, 0.2, 0.0, a)


def _coefficients(step, sigma, sigma_next, noise_level, n=20000):
    """For x_σ = (1−σ)·x_data + σ·ε and the true v = ε − x_data, the step's x_σ' is
    a·x_data + b·ε + std·ε_fresh: returns (a, sqrt(b² + std²)) — the x_data coefficient and the
    total noise scale — from a least-squares fit of the step's mean, and the empirical std of the
    drawn x_σ' − a·x_data as a check on the drawn noise."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64) * 0.5 + 1.0
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = (1 - sigma) * x0 + sigma * eps
    out = step(x, eps - x0, sigma, sigma_next, noise_level, generator=g)
    a, b = torch.linalg.lstsq(torch.cat([x0, eps], 1), out.mean).solution.flatten().tolist()
    noise_scale = math.sqrt(b ** 2 + float(out.std.reshape(())) ** 2)
    drawn = float((out.prev_sample - a * x0).std())
    return a, noise_scale, drawn


def test_cps_step_preserves_the_flow_marginal_coefficients():
    for sigma, sigma_next in [(0.9, 0.5), (0.5, 0.2), (1.0, 0.7)]:
        c_data, c_noise, drawn = _coefficients(cps_step, sigma, sigma_next, 0.7)
        assert c_data == pytest.approx(1 - sigma_next, abs=1e-9)
        assert c_noise == pytest.approx(sigma_next, abs=1e-9)
        assert drawn == pytest.approx(sigma_next, rel=0.02)
    # Flow-GRPO's Euler–Maruyama step does not: on a coarse step its coefficients drift off (1−σ', σ')
    c_data, c_noise, _ = _coefficients(sde_step, 0.9, 0.5, 0.7)
    assert abs(c_data - 0.5) > 0.02 or abs(c_noise - 0.5) > 0.02


def _velocity(x, s):  # a fixed nonlinear field: deterministic, so re-scoring reproduces the rollout
    return torch.tanh(x) * (1 + s.reshape(-1, *([1] * (x.ndim - 1)))) - 0.3 * x


@pytest.mark.parametrize("kind", sorted(SDE_KINDS))
def test_score_steps_reproduces_each_kinds_rollout_log_probs(kind):
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    grid = sigma_schedule(6, shift=3.0)
    traj = sample(_velocity, noise, grid, noise_level=0.5, generator=torch.Generator().manual_seed(4), sde_kind=kind)
    steps = torch.nonzero(traj.sde_mask).flatten()
    assert traj.sde_mask.tolist() == [True] * 5 + [kind != "cps"]  # cps: the step to 0 is an ODE step
    lp, mean, std = score_steps(_velocity, traj.latents, grid, steps, 0.5, sde_kind=kind)
    torch.testing.assert_close(lp, traj.log_probs[:, steps], rtol=1e-5, atol=1e-4)
    other = "dance" if kind != "dance" else "cps"
    lp_other, _, _ = score_steps(_velocity, traj.latents, grid, steps[:5], 0.5, sde_kind=other)
    assert not torch.allclose(lp_other, traj.log_probs[:, steps[:5]], rtol=1e-3, atol=1e-2)


def test_unknown_kind_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown SDE step kind 'ddpm'"):
        sde_step_fn("ddpm")


@pytest.mark.parametrize("steps,shift", [(8, 3.0), (5, 1.0)])
def test_dpm_solver_matches_diffusers_multistep_scheduler(steps, shift):
    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                      solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sch.set_timesteps(steps)
    grid = sch.sigmas.double()  # diffusers' own flow grid, σ_0 < 1, last 0
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = noise
    for i, t in enumerate(sch.timesteps):
        x = sch.step(_velocity(x, grid[i].expand(2)), t, x).prev_sample
    ours = sample(_velocity, noise, grid.float(), noise_level=0.0, ode_solver="dpm2")
    torch.testing.assert_close(ours.samples, x, rtol=1e-6, atol=1e-7)
    euler = sample(_velocity, noise, grid.float(), noise_level=0.0)
    assert (euler.samples - x).abs().max() > 1e-3  # 2nd order differs from Euler on this grid


def test_dpm_steps_follow_the_window_and_carry_no_log_prob():
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    grid = sigma_schedule(8, shift=2.0)
    traj = sample(_velocity, noise, grid, 0.7, torch.Generator().manual_seed(7), sde_steps=[1, 2], ode_solver="dpm2")
    assert (traj.log_probs[:, [1, 2]] != 0).all() and (traj.log_probs[:, [0, 3, 4, 5, 6, 7]] == 0).all()
    # by hand: Euler before the window (its x0 seeds the history), the window's SDE steps, DPM++ after
    lat = traj.latents.double()
    x0_prev, s_prev = lat[:, 2] - float(grid[2]) * _velocity(lat[:, 2], grid[2].expand(3)).double(), float(grid[2])
    x = lat[:, 3]
    for i in range(3, 8):
        x, x0 = dpmpp_2m_step(x, _velocity(x, grid[i].expand(3)).double(), float(grid[i]), float(grid[i + 1]),
                              x0_prev, s_prev)
        x0_prev, s_prev = x0, float(grid[i])
        torch.testing.assert_close(x.float(), traj.latents[:, i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.latents[:, 1], noise + (grid[1] - grid[0]) * _velocity(noise, grid[0].expand(3)))
