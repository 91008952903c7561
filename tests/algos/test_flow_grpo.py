import math

import pytest
import torch

from rlgen.algos.advantages import group_advantages
from rlgen.algos.flow_grpo import FlowGRPOConfig, kl_to_ref, policy_loss, step_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    g = torch.tensor([7, 7, 7, 3, 3])
    adv = group_advantages(r, g, eps=0.0 + 1e-12)
    # group 7: mean 2, unbiased std 1 → (-1, 0, 1); group 3: identical rewards → 0
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]), atol=1e-6)


def test_group_advantages_global_std_and_nan():
    r = torch.tensor([0.0, 1.0, float("nan"), 4.0, 6.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    adv = group_advantages(r, g, eps=0.0, global_std=True)
    valid = torch.tensor([0.0, 1.0, 4.0, 6.0])
    std = valid.std()  # batch std over scored samples only
    expect = torch.tensor([-0.5, 0.5, 0.0, -1.0, 1.0]) / std
    assert torch.allclose(adv, expect, atol=1e-6)
    per_group = group_advantages(r, g, eps=0.0)
    assert per_group[2] == 0.0  # unscored sample: no gradient
    assert torch.allclose(per_group[:2], torch.tensor([-0.5, 0.5]) / math.sqrt(0.5), atol=1e-6)


def test_policy_loss_clip_inactive_equals_plain_pg():
    lp = torch.tensor([-1.0, -2.0])
    old = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([2.0, -1.0])
    loss, m = policy_loss(lp, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx(-(2.0 * 1 + (-1.0) * 1) / 2)
    assert m["clip_frac"] == 0.0


def test_policy_loss_clip_active_by_hand():
    # ratio e^0.5 ≈ 1.6487 > 1.2 with A = +1: the clipped branch (-1.2) is the max of (-1.6487, -1.2)
    # ratio e^-0.5 ≈ 0.6065 < 0.8 with A = +3: max(-1.8196, -2.4) → unclipped -1.8196
    lp = torch.tensor([0.5, -0.5], requires_grad=True)
    old = torch.zeros(2)
    adv = torch.tensor([1.0, 3.0])
    loss, m = policy_loss(lp, old, adv, clip_range=0.2)
    expect = (-1.2 + -3.0 * math.exp(-0.5)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert m["clip_frac"] == 1.0
    loss.backward()
    # clipped branch carries no gradient; the unclipped one has d/dlp (-A e^lp)/2
    assert lp.grad[0].item() == 0.0
    assert lp.grad[1].item() == pytest.approx(-3.0 * math.exp(-0.5) / 2, rel=1e-6)


def test_advantage_clipping():
    loss, _ = policy_loss(torch.zeros(1), torch.zeros(1), torch.tensor([100.0]), 0.1, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-5.0)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=g)
    ref = torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.5, 0.9]).view(3, 1, 1, 1)
    kl = kl_to_ref(mean, ref, std)
    p = torch.distributions.Normal(mean, std.expand_as(mean))
    q = torch.distributions.Normal(ref, std.expand_as(ref))
    expect = torch.distributions.kl_divergence(p, q).flatten(1).sum(1)
    assert torch.allclose(kl, expect, rtol=1e-5)


def test_step_loss_mean_reduction_and_kl_weight():
    cfg = FlowGRPOConfig(clip_range=10.0, kl_beta=0.5, log_prob_reduction="mean", kl_reduction="mean")
    d = 8
    lp, old = torch.tensor([-8.0]), torch.tensor([-16.0])  # per-dim means: -1 and -2 → ratio e
    mean, ref = torch.ones(1, d), torch.zeros(1, d)
    loss, m = step_loss(lp, old, torch.tensor([1.0]), mean, ref, 1.0, d, cfg)
    expect_pg = -math.e
    expect_kl = (d * 1.0 / 2.0) / d  # summed KL d/2, mean over dims
    assert loss.item() == pytest.approx(expect_pg + 0.5 * expect_kl, rel=1e-6)
    assert m["kl"] == pytest.approx(expect_kl)


def test_config_validation():
    with pytest.raises(ValueError, match="log_prob_reduction"):
        FlowGRPOConfig(log_prob_reduction="avg")
