"""TeaCache's pure parts (rlgen/samplers/teacache.py): the polynomial, the skip rule worked by hand, and
its use inside ``sample`` with a synthetic probe (the model-side hooks are tested in tests/models)."""
import numpy as np
import pytest
import torch

from rlgen.samplers.flow import sample, score_steps, sigma_schedule
from rlgen.samplers.teacache import TeaCache, TeaCacheState, fit_polynomial, polyval

NL = 0.7


def test_polyval_matches_numpy_and_fit_recovers_known_coefficients():
    coeffs = [4.9e2, -2.8e2, 5.6e1, -3.8, 0.26]  # TeaCache-like magnitudes, highest degree first
    x = torch.linspace(0.01, 0.4, 200, dtype=torch.float64)
    assert np.allclose(polyval(coeffs, x).numpy(), np.polyval(coeffs, x.numpy()), rtol=1e-12)
    assert polyval(coeffs, 0.1) == pytest.approx(float(np.polyval(coeffs, 0.1)))
    y = torch.as_tensor(np.polyval(coeffs, x.numpy()))
    assert np.allclose(fit_polynomial(x, y, 4), coeffs, rtol=1e-6)
    # noisy data: the same answer as numpy.polyfit (an independent least-squares solver)
    g = np.random.default_rng(0)
    yn = y.numpy() + g.normal(0, 0.01, y.shape)
    assert np.allclose(fit_polynomial(x, torch.as_tensor(yn), 3), np.polyfit(x.numpy(), yn, 3), rtol=1e-6)
    with pytest.raises(ValueError, match="degree 4 needs more than 4 points"):
        fit_polynomial(x[:4], y[:4], 4)


def _run_state(state, changes, may_skip=True):
    """Feed indicators whose successive relative L1 changes are ``changes``; returns 'C'/'S' per step."""
    ind = torch.ones(3, 4)
    out = ["C" if state.decide(ind, must_compute=False) else "S"]
    for c in changes:
        ind = ind * (1 + c)
        out.append("C" if state.decide(ind, must_compute=not may_skip) else "S")
    return "".join(out)


def test_skip_rule_worked_by_hand():
    changes = [0.1, 0.1, 0.3, 0.05, 0.05, 0.05, 0.2]
    # identity polynomial, threshold .25: sums .1 .2 | .5 → compute; .05 .10 .15 | .35 → compute
    assert _run_state(TeaCacheState(0.25), changes) == "CSSCSSSC"
    # poly(x) = 2x: .2 | .4 C | .6 C | .1 .2 | .3 C | .4 C
    assert _run_state(TeaCacheState(0.25, [2.0, 0.0]), changes) == "CSCCSSCC"
    # threshold 0 never skips, even with a polynomial that is negative everywhere
    assert _run_state(TeaCacheState(0.0, [1.0, -1.0]), changes) == "C" * 8
    # steps that must compute do, and restart the sum
    assert _run_state(TeaCacheState(0.25), changes, may_skip=False) == "C" * 8


def _probe_on_sigma(calls):
    """A synthetic probe: the 'modulated input' is a smooth function of sigma alone."""

    def probe(velocity_fn, x, sigma, decide):
        if not decide(torch.full((x.shape[0], 8), 1.0) + sigma[:, None] ** 2):
            return None
        calls.append(float(sigma[0]))
        return velocity_fn(x, sigma)

    return probe


def _vel():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    return lambda x, sigma: conv(x) * (1 + sigma.reshape(-1, 1, 1, 1))


def test_skipped_steps_reuse_the_last_computed_velocity():
    vel, calls = _vel(), []
    sigmas = sigma_schedule(8)
    noise = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    cache = TeaCache(_probe_on_sigma(calls), threshold=0.3)
    traj = sample(vel, noise, sigmas, noise_level=0.0, teacache=cache)
    skipped = traj.skipped.tolist()
    assert any(skipped) and not skipped[0] and not skipped[-1]
    assert cache.skipped == sum(skipped) and cache.computed == len(calls) == 8 - sum(skipped)
    with torch.no_grad():
        last_v = None
        for i in range(8):  # each step is Euler with the velocity of the last computed step
            x, s, sn = traj.latents[:, i], traj.sigmas[i], traj.sigmas[i + 1]
            if not skipped[i]:
                last_v = vel(x, s.expand(3))
            torch.testing.assert_close(traj.latents[:, i + 1], x + last_v * (sn - s), rtol=0, atol=1e-6)


def test_skip_count_grows_with_threshold_and_never_touches_sde_steps():
    vel = _vel()
    sigmas = sigma_schedule(12, 3.0)
    noise = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    counts = []
    for thr in (0.0, 0.02, 0.05, 0.1, 0.3, 10.0):
        cache = TeaCache(_probe_on_sigma([]), threshold=thr)
        traj = sample(vel, noise, sigmas, NL, generator=torch.Generator().manual_seed(3), sde_steps=[4, 5],
                      teacache=cache)
        assert not traj.skipped[traj.sde_mask].any() and not traj.skipped[-1]
        counts.append(cache.skipped)
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 12 - 2 - 2  # all but SDE, first, last
    assert len(set(counts)) >= 3


def test_sde_log_probs_are_exact_while_ode_steps_are_skipped():
    vel = _vel()
    sigmas = sigma_schedule(10, 3.0)
    noise = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    kw = dict(noise_level=NL, sde_steps=[0, 1])
    plain = sample(vel, noise, sigmas, generator=torch.Generator().manual_seed(5), **kw)
    cache = TeaCache(_probe_on_sigma([]), threshold=1.0)
    cached = sample(vel, noise, sigmas, generator=torch.Generator().manual_seed(5), teacache=cache, **kw)
    assert cache.skipped > 0
    # the window comes first: its log-probs are bit-identical; later ODE steps differ (skipped)
    assert torch.equal(plain.log_probs, cached.log_probs) and torch.equal(plain.latents[:, :3], cached.latents[:, :3])
    assert not torch.equal(plain.samples, cached.samples)
    # a window after skipped steps: re-scoring the stored trajectory (the learner's call) gives the same log-probs
    mid = sample(vel, noise, sigmas, NL, generator=torch.Generator().manual_seed(6), sde_steps=[6, 7],
                 teacache=TeaCache(_probe_on_sigma([]), threshold=1.0))
    assert mid.skipped[:6].any()
    lp, _, _ = score_steps(vel, mid.latents, mid.sigmas, [6, 7], NL)
    assert torch.equal(lp, mid.log_probs[:, 6:8])


def test_a_probe_that_never_reports_is_an_error():
    cache = TeaCache(lambda fn, x, s, decide: fn(x, s), threshold=0.5)
    with pytest.raises(RuntimeError, match="never reached its probed module"):
        sample(_vel(), torch.zeros(1, 2, 3, 3), sigma_schedule(3), noise_level=0.0, teacache=cache)
