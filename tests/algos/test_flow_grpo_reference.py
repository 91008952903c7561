"""The reference-exact options of Flow-GRPO and Flow-OPD (docs/flow_grpo.md, "Options and the
reference code"), each checked against the reference code's formula written out here by hand on
small hand-made tensors: the KL in Flow-GRPO's units, numpy's ddof-0 std, dropping zero-advantage
rows, the detached unconditional CFG branch, and Flow-OPD's PPO mode."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlgen.algos.flow_grpo import (FlowGRPO, FlowGRPOConfig, flow_grpo_advantages, keep_weights, kl_unit_scale,
                                   step_loss)
from rlgen.algos.opd import FlowOPDConfig, image_step_loss
from rlgen.families.flow import PolicyVelocity
from rlgen.models.flow import FlowPolicy
from tests.algos.engines import RecordingEngine, context
from tests.algos.test_flow_grpo_update import assert_grads_close, make_rollout, tiny_flow_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# 1. KL units
# ----------------------------------------------------------------------------------------------
def reference_step(x, v, sigma, sigma_next, a, sigma_1):
    """Flow-GRPO's SDE step, written from its formula: (mean, std_dev_t). σ = 1 uses σ_1 below."""
    dt = sigma_next - sigma
    std_dev_t = a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))
    mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t


@pytest.mark.parametrize("sigma,sigma_next", [(0.6, 0.45), (1.0, 0.9)])
def test_kl_in_flow_grpo_units_is_the_reference_formula(sigma, sigma_next):
    a, beta = 0.7, 0.04
    x = torch.tensor([[[[0.5, -1.0], [2.0, 0.25]]], [[[1.5, 0.0], [-0.5, 1.0]]]])  # (2, 1, 2, 2)
    v = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]], [[[0.0, -2.0], [1.0, 1.0]]]])
    v_ref = v + torch.tensor([[[[0.5, 0.0], [0.0, -0.5]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    mean, std_dev_t = reference_step(x, v, sigma, sigma_next, a, sigma_1=sigma_next)
    mean_ref, _ = reference_step(x, v_ref, sigma, sigma_next, a, sigma_1=sigma_next)
    # the reference: mean over dims of the squared mean gap / (2·std_dev_t²), then mean over the batch
    want = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2)
    want = want.mean().item()
    std = std_dev_t * math.sqrt(sigma - sigma_next)  # the Gaussian step's std, as rlgen passes it
    zero = torch.zeros(2)
    for units, factor in (("flow_grpo", 1.0), ("exact", 1.0 / (sigma - sigma_next))):
        cfg = FlowGRPOConfig(kl_beta=beta, kl_units=units)
        loss, m = step_loss(zero, zero, zero, mean, mean_ref, std, 4, cfg, kl_unit_scale(sigma, sigma_next, units))
        assert m["kl"] == pytest.approx(want * factor, rel=1e-5)  # exact KL = reference's / |dt|
        assert loss.item() == pytest.approx(beta * want * factor, rel=1e-5)


def test_flow_grpo_step_loss_scales_the_kl_by_the_step_dt():
    """The algorithm passes |dt| of the trained step (σ_j − σ_{j+1}) to the KL."""
    mean, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = SimpleNamespace(log_prob=torch.zeros(2), mean=mean, std=torch.tensor(0.5))
    mb = SimpleNamespace(log_probs=torch.zeros(2, 2), advantages=torch.zeros(2), sigmas=torch.tensor([1.0, 0.75, 0.0]))
    for units, want in (("exact", 2.0), ("flow_grpo", 2.0 * 0.75)):  # 1/(2·0.25) per dim; step 1: |dt| = 0.75
        algo = FlowGRPO(FlowGRPOConfig(kl_beta=1.0, kl_units=units))
        _, m = algo.step_loss(None, mb, 1, out, ref, mean)
        assert m["kl"] == pytest.approx(want)


# ----------------------------------------------------------------------------------------------
# 2. The std's ddof
# ----------------------------------------------------------------------------------------------
def test_ddof0_advantages_are_numpy_std_advantages():
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, float("nan"), 0.0, 1.0], dtype=torch.float64)
    gids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    eps = 1e-4
    got = flow_grpo_advantages(rewards, gids, eps, global_std=False, ddof=0)
    # group 0: mean 7/3, np.std = sqrt(((−4/3)² + (−1/3)² + (5/3)²)/3) = sqrt(14/9)
    s0 = math.sqrt(14 / 9)
    want = [(1 - 7 / 3) / (s0 + eps), (2 - 7 / 3) / (s0 + eps), (4 - 7 / 3) / (s0 + eps),
            0.0, 0.0, 0.0, -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)]  # group 1 equal; NaN → 0; group 2 std 0.5
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert np.std([1.0, 2.0, 4.0]) == pytest.approx(s0)  # the reference's np.std is ddof 0
    # global std: the batch's np.std of the valid rewards, per-group means
    valid = [1.0, 2.0, 4.0, 3.0, 3.0, 0.0, 1.0]
    sg = float(np.std(valid))
    got = flow_grpo_advantages(rewards, gids, eps, global_std=True, ddof=0)
    assert got[0].item() == pytest.approx((1 - 7 / 3) / (sg + eps))
    assert got[6].item() == pytest.approx(-0.5 / (sg + eps))
    # ddof 1 is today's group_advantages: group 2's std is sqrt(0.5)
    got = flow_grpo_advantages(rewards, gids, eps, global_std=False, ddof=1)
    assert got[6].item() == pytest.approx(-0.5 / (math.sqrt(0.5) + eps))


# ----------------------------------------------------------------------------------------------
# 3. Dropping zero-advantage rows
# ----------------------------------------------------------------------------------------------
def test_drop_sets_the_kept_count_and_weights_rows_to_a_mean_over_kept_rows():
    algo = FlowGRPO(FlowGRPOConfig(drop_zero_adv_groups=True))
    batch = SimpleNamespace(rewards=torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0, 0.5, 1.0]),
                            group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 2]), global_size=0)
    algo.advantages(batch)
    # group 1 is all-equal; in group 2 the middle row sits exactly at the mean: the reference drops both
    assert (batch.advantages == 0).tolist() == [False, False, True, True, False, True, False]
    assert batch.global_size == 4
    w = keep_weights(batch.advantages, 7, batch.global_size)
    assert w.tolist() == pytest.approx([7 / 4, 7 / 4, 0, 0, 7 / 4, 0, 7 / 4])
    rows = torch.tensor([1.0, 2.0, 100.0, 100.0, 3.0, 100.0, 4.0])
    assert (rows * w).mean().item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # the mean over kept rows


def test_drop_trains_as_the_reference_does_on_the_filtered_batch():
    """Dropping rows (with a KL to a reference that differs) = training on the kept rows only."""
    torch.manual_seed(0)
    policy = FlowPolicy.build(tiny_flow_config())
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_rollout(policy, advantages=torch.tensor([1.0, -1.0, 0.0, 0.0]))
    batch.global_size, batch.seed = 2, 0  # what advantages() leaves with drop on: 2 kept rows
    cfg = dict(kl_beta=0.5, clip_range=1e6, adv_clip_max=1e6)

    def grads(b, drop):
        pol = copy.deepcopy(policy)
        engine = RecordingEngine(PolicyVelocity(pol))
        FlowGRPO(FlowGRPOConfig(drop_zero_adv_groups=drop, **cfg)).update(context(pol, engine, ref), b)
        return engine.grads[0]

    kept = batch.select([0, 1])
    kept.global_size = 2
    assert_grads_close(grads(batch, True), grads(kept, False))


# ----------------------------------------------------------------------------------------------
# 4. The unconditional CFG branch detached (rlgen's pixel models)
# ----------------------------------------------------------------------------------------------
def test_detached_uncond_branch_gives_w_times_the_conditional_gradient():
    torch.manual_seed(0)
    policy = FlowPolicy.build(tiny_flow_config())
    module, w = PolicyVelocity(policy), 3.0
    prompts = ["red circle", "blue square"]
    x, sigma = torch.randn(2, *policy.sample_shape), torch.tensor([0.7, 0.4])
    g = torch.randn(2, *policy.sample_shape)
    params = [p for p in policy.parameters() if p.requires_grad]

    v = module(prompts, x, sigma, w, cfg_detach_uncond=True)
    got = torch.autograd.grad((v * g).sum(), params, allow_unused=True)
    # by hand: v = v_u + w·(v_c − v_u) with v_u constant, so ∇(g·v) = w·∇(g·v_c)
    v_c = policy.velocity_fn(prompts, 1.0)(x, sigma)
    want = torch.autograd.grad(w * (v_c * g).sum(), params, allow_unused=True)
    assert_grads_close(list(got), list(want))
    with torch.no_grad():  # the value is the usual CFG velocity
        assert torch.allclose(v, policy.velocity_fn(prompts, w)(x, sigma), atol=1e-5)
    both = module(prompts, x, sigma, w)  # default: both branches carry gradient
    full = torch.autograd.grad((both * g).sum(), params, allow_unused=True)
    assert max(float((a - b).abs().max()) for a, b in zip(full, want) if a is not None and b is not None) > 1e-6


# ----------------------------------------------------------------------------------------------
# 5. Flow-OPD's PPO mode
# ----------------------------------------------------------------------------------------------
def test_flow_opd_ppo_loss_is_ppo_clip_with_minus_kl_advantage():
    d, std, eps = 4, 0.5, 0.1
    mean = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)  # (2, 4)
    teacher = torch.zeros(2, 4)
    old = torch.tensor([-4.0, -4.0])
    lp = torch.tensor([-4.0 + 4 * 0.5, -4.0 - 4 * 0.3], requires_grad=True)  # per-dim log-ratio 0.5, −0.3
    cfg = FlowOPDConfig(mode="ppo", clip_range=eps, adv_clip_max=100.0, distill_weight=2.0)
    loss, m = image_step_loss(lp, old, torch.zeros(2), mean, teacher, None, std, d, cfg)
    # by hand: KL per dim = Σ(μ−μ_t)²/(2s²)/D → row 0: 1/(0.5)/4 = 0.5; row 1: 1/(0.5)/4 = 0.5
    a = [-0.5, -0.5]
    rho = [math.exp(0.5), math.exp(-0.3)]
    terms = [max(-a[i] * rho[i], -a[i] * min(max(rho[i], 1 - eps), 1 + eps)) for i in range(2)]
    assert loss.item() == pytest.approx(2.0 * sum(terms) / 2, rel=1e-6)
    assert m["distill_kl"] == pytest.approx(0.5)
    loss.backward()
    assert mean.grad is None or not mean.grad.any()  # the advantage is detached: no gradient through the KL
    # A < 0. Row 0: ρ > 1+ε, the unclipped −Aρ is the max and carries gradient 2·(−A)·ρ/D / 2 rows;
    # row 1: ρ < 1−ε, the clipped term is the max, so no gradient
    assert lp.grad[0].item() == pytest.approx(2.0 * 0.5 * rho[0] / d / 2, rel=1e-6)
    assert lp.grad[1].item() == 0
    direct, _ = image_step_loss(lp, old, torch.zeros(2), mean, teacher, None, std, d, FlowOPDConfig())
    assert direct.item() == pytest.approx(0.5)  # today's mode: the KL itself


def test_option_validation():
    with pytest.raises(ValueError, match="kl_units"):
        FlowGRPOConfig(kl_units="nats")
    with pytest.raises(ValueError, match="adv_std_ddof"):
        FlowGRPOConfig(adv_std_ddof=2)
    with pytest.raises(ValueError, match="mode"):
        FlowOPDConfig(mode="dpo")
    with pytest.raises(ValueError, match="drop_zero_adv_groups"):
        FlowOPDConfig(drop_zero_adv_groups=True)
