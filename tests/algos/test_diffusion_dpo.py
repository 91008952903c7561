"""Diffusion-DPO: the contract's loss against hand-computed values and against trl's DPO sigmoid
loss for the same log-ratios; shared noise for winner and loser; gradients reach only the policy."""
import math

import pytest
import torch

from rlgen.algos.diffusion_dpo import DiffusionDPOConfig, draw_noise, loss, noised, pair_errors
from rlgen.registry import ALGORITHMS
from trl_dpo import trl_dpo_sigmoid


def nls(x):  # −log σ(x)
    return math.log1p(math.exp(-x))


def test_hand_computed():
    ew, el = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.25])
    rw, rl = torch.tensor([0.15, 0.30]), torch.tensor([0.15, 0.30])
    out, m = loss(ew, el, rw, rl, beta=10.0)
    # inside = −β/2·((e_θw − e_θl) − (e_rw − e_rl)) = −5·(−0.10 − 0) = 0.5 and −5·(0.05 − 0) = −0.25
    assert out.item() == pytest.approx((nls(0.5) + nls(-0.25)) / 2, rel=1e-6)
    assert m["implicit_acc"] == 0.5
    assert m["reward_margin"] == pytest.approx(0.125, rel=1e-6)


def test_policy_equal_to_reference_gives_log2():
    e = torch.rand(5)
    out, m = loss(e, e.flip(0), e, e.flip(0), beta=5000.0)
    assert out.item() == pytest.approx(math.log(2), rel=1e-6)
    assert m["reward_margin"] == 0.0


def test_matches_trl_sigmoid_loss():
    g = torch.Generator().manual_seed(0)
    ew, el, rw, rl = (torch.rand(6, generator=g, dtype=torch.float64) * 0.1 for _ in range(4))
    beta = 300.0
    ours, m = loss(ew, el, rw, rl, beta)
    # Diffusion-DPO is DPO with log-ratio_w = −(e_θw − e_rw), log-ratio_l = −(e_θl − e_rl) and β_trl = β/2
    theirs, tm = trl_dpo_sigmoid(-ew, -el, -rw, -rl, beta / 2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    assert m["implicit_acc"] == pytest.approx(tm["accuracy"])
    assert m["reward_margin"] == pytest.approx(tm["margin"], rel=1e-9)


def test_gradient_reaches_policy_errors_only():
    ew, el = torch.tensor([0.1, 0.2], requires_grad=True), torch.tensor([0.3, 0.1], requires_grad=True)
    rw, rl = torch.tensor([0.2, 0.2], requires_grad=True), torch.tensor([0.2, 0.2], requires_grad=True)
    out, _ = loss(ew, el, rw, rl, beta=10.0)
    out.backward()
    assert rw.grad is None and rl.grad is None
    # d/d e_w of −log σ(−β/2·(e_w − e_l − c)) = (β/2)·σ(−inside) > 0: lowering the winner's error helps
    assert (ew.grad > 0).all() and (el.grad < 0).all()


def test_winner_and_loser_share_noise_and_sigma():
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    noise, sigma = draw_noise(x, DiffusionDPOConfig(), torch.Generator().manual_seed(1))
    assert noise.shape == x.shape and sigma.shape == (3,) and ((sigma > 0) & (sigma < 1)).all()
    n2, s2 = draw_noise(x, DiffusionDPOConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(noise, n2) and torch.equal(sigma, s2)
    x_s, target = noised(x, noise, sigma)
    s = sigma[:, None, None, None]
    assert torch.allclose(x_s, (1 - s) * x + s * noise) and torch.allclose(target, noise - x)

    calls = []

    def velocity(xs, sig):  # a 'model' predicting 0: error = ‖ε − x‖² mean
        calls.append((xs.shape[0], sig.clone()))
        return torch.zeros_like(xs)

    e_w, e_l = pair_errors(velocity, x, x, noise, sigma)
    assert len(calls) == 1 and calls[0][0] == 6 and torch.equal(calls[0][1], torch.cat([sigma, sigma]))
    assert torch.equal(e_w, e_l)  # the same image, noise and σ give the same error
    assert torch.allclose(e_w, (noise - x).pow(2).flatten(1).mean(1))


def test_registered():
    from rlgen.algos.diffusion_dpo import DiffusionDPO

    assert ALGORITHMS.get("diffusion_dpo") is DiffusionDPO and DiffusionDPO.data == "pairs"


def test_config_checks():
    with pytest.raises(ValueError, match="beta"):
        DiffusionDPOConfig(beta=0)


def test_sigma_range_maps_the_density_onto_lo_hi():
    x = torch.zeros(4000, 1, 1, 1)
    full = DiffusionDPOConfig(sigma_density="uniform")
    high = DiffusionDPOConfig(sigma_density="uniform", sigma_range=[0.6, 1.0])
    _, s_full = draw_noise(x, full, torch.Generator().manual_seed(3))
    _, s_high = draw_noise(x, high, torch.Generator().manual_seed(3))
    # same draws, mapped linearly: σ' = 0.6 + 0.4·σ, so uniform on [0.6, 1] (mean 0.8, var 0.4²/12)
    assert torch.allclose(s_high, 0.6 + 0.4 * s_full)
    assert s_high.min() >= 0.6 and s_high.max() <= 1.0
    assert s_high.mean().item() == pytest.approx(0.8, abs=0.01)
    assert s_high.var().item() == pytest.approx(0.16 / 12, rel=0.1)


@pytest.mark.parametrize("bad", [[0.6], [0.7, 0.6], [-0.1, 0.5], [0.5, 1.2], [0.3, 0.3]])
def test_sigma_range_checks(bad):
    with pytest.raises(ValueError, match="sigma_range"):
        DiffusionDPOConfig(sigma_range=bad)
