"""Flow-GRPO's update on one rank (no Ray, no DeepSpeed), checked against gradients computed here by
hand from ``sde_step`` and the PPO ratio, and against facts of the objective: zero advantages give
zero gradient, timestep subsampling trains the stated number of steps, the KL is 0 until the
policy moves away from its reference; LoRA through the flow family; on-policy distillation."""
import copy

import pytest
import torch

from rlgen.algos.flow_grpo import FlowGRPO, FlowGRPOConfig, choose_train_steps
from rlgen.families import LoraSpec, get_family
from rlgen.families.flow import ImageRolloutConfig, PolicyVelocity, rollout_images
from rlgen.models.flow import FlowModelConfig, FlowPolicy
from rlgen.samplers.flow import sde_step
from tests.algos.engines import RecordingEngine, adamw, context

VOCAB = ["red", "blue", "circle", "square"]
NO_CLIP = dict(clip_range=1e6, adv_clip_max=1e6)
FLOW = get_family("flow")


def tiny_flow_config() -> FlowModelConfig:
    return FlowModelConfig(image_size=8, block_out_channels=[8, 16], cross_attention=[False, True],
                           attention_heads=2, norm_num_groups=4, text_dim=16, text_layers=1, text_heads=2,
                           text_ff=32, max_prompt_tokens=8, vocab=VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return FlowPolicy.build(tiny_flow_config())


def make_rollout(policy, num_steps=3, sde_window=0, seed=0, advantages=None):
    prompts = ["red circle", "red circle", "blue square", "blue square"]
    cfg = ImageRolloutConfig(num_steps=num_steps, noise_level=0.7, sde_window=sde_window)
    batch = rollout_images(policy, prompts, torch.tensor([0, 0, 1, 1]), cfg, torch.Generator().manual_seed(seed))
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]) if advantages is None else advantages
    batch.global_size = len(batch)
    return batch


def update(policy, batch, algo_cfg, engine=None, micro=0, ref=None, teacher=None, lora=False, algo_cls=FlowGRPO):
    """Run the algorithm's update; returns (engine, metrics)."""
    engine = engine or RecordingEngine(PolicyVelocity(policy))
    metrics = algo_cls(algo_cfg).update(context(policy, engine, ref, teacher, micro, lora), batch)
    return engine, metrics


def recorded_grads(policy, batch, algo, micro, seed=0, all_updates=False):
    pol = copy.deepcopy(policy)
    batch.seed = seed
    engine, metrics = update(pol, batch, algo, micro=micro)
    assert len(engine.grads) == algo.num_inner_epochs * algo.num_minibatches  # one update per mini-batch
    return (engine.grads if all_updates else engine.grads[0]), metrics


def hand_grads(policy, batch, steps):
    """∇θ of −mean_{i,j}(A_i·ρ_ij) with ρ = exp((log p_θ − log p_old)/D): the unclipped objective."""
    pol = copy.deepcopy(policy)
    terms = []
    for j in steps:
        x, x_next = batch.latents[:, j], batch.latents[:, j + 1]
        v = pol.velocity_fn(batch.prompts)(x, batch.sigmas[j].expand(len(batch)))
        lp = sde_step(x, v, float(batch.sigmas[j]), float(batch.sigmas[j + 1]), batch.noise_level,
                      prev_sample=x_next).log_prob
        d = x[0].numel()
        terms.append(-(batch.advantages * torch.exp((lp - batch.log_probs[:, j]) / d)))
    loss = torch.stack(terms).mean()
    return torch.autograd.grad(loss, list(pol.parameters()), allow_unused=True)


def assert_grads_close(got, want):
    scale = max(w.abs().max().item() for w in want if w is not None)
    assert scale > 0
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_gradient_equals_hand_computed_objective(policy):
    batch = make_rollout(policy)
    algo = FlowGRPOConfig(kl_beta=0.0, **NO_CLIP)
    grads, metrics = recorded_grads(policy, batch, algo, micro=2)
    assert_grads_close(grads, hand_grads(policy, batch, steps=[0, 1, 2]))
    assert metrics["num_train_steps"] == 3 and metrics["samples"] == 4
    # the policy that sampled the batch re-scores it: ratios are 1 up to float noise
    assert abs(metrics["ratio_mean"] - 1) < 1e-4 and metrics["clip_frac"] == 0


def test_zero_advantage_sample_contributes_nothing(policy):
    algo = FlowGRPOConfig(kl_beta=0.0, **NO_CLIP)
    batch = make_rollout(policy, advantages=torch.tensor([0.0, -1.0, 0.5, -0.5]))
    batch.rewards = torch.tensor([float("nan"), 0.0, 1.0, 0.2])  # its reward was missing
    with_it, _ = recorded_grads(policy, batch, algo, micro=4)
    sub = batch.select([1, 2, 3])
    sub.global_size = 3
    without, _ = recorded_grads(policy, sub, algo, micro=3)
    # a mean over 4 samples, one of them 0, is 3/4 of the mean over the other 3
    assert_grads_close([None if g is None else g * 4 for g in with_it], [None if g is None else g * 3 for g in without])


def test_all_zero_advantages_leave_the_weights_unchanged(policy):
    pol = copy.deepcopy(policy)
    before = [p.detach().clone() for p in pol.parameters()]
    batch = make_rollout(policy, advantages=torch.zeros(4))
    _, metrics = update(pol, batch, FlowGRPOConfig(kl_beta=0.0), engine=adamw(PolicyVelocity(pol)), micro=2)
    assert metrics["grad_norm"] == 0
    for b, p in zip(before, pol.parameters()):
        assert torch.equal(b, p)


def test_timestep_fraction_trains_a_seeded_subset(policy):
    batch = make_rollout(policy, num_steps=4)
    algo = FlowGRPOConfig(kl_beta=0.0, timestep_fraction=0.5, **NO_CLIP)
    picks = [choose_train_steps(batch.sde_mask, 0.5, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(len(p) == 2 for p in picks) and len({tuple(p) for p in picks}) > 1
    assert picks[3] == choose_train_steps(batch.sde_mask, 0.5, torch.Generator().manual_seed(3))
    grads, metrics = recorded_grads(policy, batch, algo, micro=2, seed=3)
    assert metrics["num_train_steps"] == 2
    assert_grads_close(grads, hand_grads(policy, batch, steps=picks[3]))
    # with an SDE window only its steps are candidates
    window = make_rollout(policy, num_steps=4, sde_window=2, seed=1)
    sde = set(torch.nonzero(window.sde_mask).flatten().tolist())
    assert len(sde) == 2 and set(choose_train_steps(window.sde_mask, 0.5, torch.Generator())) <= sde


def test_minibatches_split_the_epoch_into_updates(policy):
    # GradRecorder never moves the weights, so each update's gradient is the unclipped objective
    # on its half of the samples: the two halves' means average to the full-batch mean.
    batch = make_rollout(policy)
    algo = FlowGRPOConfig(kl_beta=0.0, num_minibatches=2, **NO_CLIP)
    grads, metrics = recorded_grads(policy, batch, algo, micro=1, all_updates=True)
    full = hand_grads(policy, batch, steps=[0, 1, 2])
    assert len(grads) == 2 and metrics["samples"] == 4
    halves = [None if a is None else (a + b) / 2 for a, b in zip(*grads)]
    assert_grads_close(halves, full)
    assert any(a is not None and (a - f).abs().max() > 1e-6 for a, f in zip(grads[0], full))
    with pytest.raises(ValueError, match="mini-batches"):
        update(copy.deepcopy(policy), batch, FlowGRPOConfig(num_minibatches=3), micro=1)


def test_kl_is_zero_at_the_reference_and_grows_after_an_update(policy):
    pol, ref = copy.deepcopy(policy), copy.deepcopy(policy).requires_grad_(False)
    batch = make_rollout(policy)
    algo = FlowGRPOConfig(kl_beta=0.1)
    engine = adamw(PolicyVelocity(pol), lr=3e-2)
    _, first = update(pol, batch, algo, engine, micro=4, ref=ref)
    _, second = update(pol, batch, algo, engine, micro=4, ref=ref)
    assert first["kl"] == 0 and second["kl"] > 0
    assert second["loss"] == pytest.approx(second["policy_loss"] + 0.1 * second["kl"], rel=1e-5)


def test_lora_trains_only_the_adapter_and_uses_the_base_as_reference(policy):
    pol = copy.deepcopy(policy)
    FLOW.add_lora(pol, LoraSpec(rank=2, targets=["to_q", "to_v"]))
    trainable = {n for n, p in pol.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    batch = make_rollout(policy)
    engine = adamw(PolicyVelocity(pol), lr=3e-2)
    _, first = update(pol, batch, FlowGRPOConfig(kl_beta=0.1), engine, micro=4, lora=True)
    _, second = update(pol, batch, FlowGRPOConfig(kl_beta=0.1), engine, micro=4, lora=True)
    assert first["kl"] == 0 and second["kl"] > 0
    changed = {n for n, p in pol.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert {n for n, p in pol.named_parameters() if p.requires_grad} == trainable  # restored after the reference
    x, sigma = batch.latents[:, 1], batch.sigmas[1].expand(4)
    with torch.no_grad():
        with FLOW.adapters_disabled(pol):
            v_base = pol.velocity_fn(batch.prompts)(x, sigma)
        torch.testing.assert_close(v_base, policy.velocity_fn(batch.prompts)(x, sigma))
        v_lora = pol.velocity_fn(batch.prompts)(x, sigma)
        merged = FLOW.merged_copy(pol)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged.velocity_fn(batch.prompts)(x, sigma), v_lora, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# On-policy distillation: the same update with a teacher (rlgen.algos.opd)
# ----------------------------------------------------------------------------------------------
def opd_grads(policy, teacher, batch, algo, micro):
    from rlgen.algos.opd import FlowOPD

    engine, metrics = update(copy.deepcopy(policy), batch, algo, micro=micro, teacher=teacher, algo_cls=FlowOPD)
    return engine.grads[0], metrics


def test_distillation_gradient_is_the_weighted_velocity_mse_to_the_teacher(policy):
    from rlgen.algos.opd import FlowOPDConfig, velocity_kl_weight

    torch.manual_seed(1)
    teacher = FlowPolicy.build(tiny_flow_config()).requires_grad_(False)
    batch = make_rollout(policy)
    algo = FlowOPDConfig(teacher="unused-here", teacher_cfg_scale=3.0, kl_reduction="mean")
    grads, metrics = opd_grads(policy, teacher, batch, algo, micro=2)
    # by hand: mean over samples and steps of w_j·‖v_θ − v_teacher(CFG 3)‖² / D
    pol = copy.deepcopy(policy)
    terms = []
    for j in range(batch.num_steps):
        x, s, s_next = batch.latents[:, j], float(batch.sigmas[j]), float(batch.sigmas[j + 1])
        sigma = batch.sigmas[j].expand(len(batch))
        v = pol.velocity_fn(batch.prompts)(x, sigma)
        with torch.no_grad():
            v_t = teacher.velocity_fn(batch.prompts, 3.0)(x, sigma)
        w = velocity_kl_weight(s, s_next, batch.noise_level)
        terms.append(w * (v - v_t).pow(2).flatten(1).sum(1) / x[0].numel())
    loss = torch.stack(terms).mean()
    assert_grads_close(grads, torch.autograd.grad(loss, list(pol.parameters()), allow_unused=True))
    assert metrics["distill_kl"] == pytest.approx(loss.item(), rel=1e-4)


def test_distillation_toward_itself_is_zero_and_toward_a_teacher_closes_the_gap(policy):
    from rlgen.algos.opd import FlowOPD, FlowOPDConfig

    batch = make_rollout(policy)
    same = FlowOPDConfig(teacher="x", teacher_cfg_scale=1.0)
    grads, metrics = opd_grads(policy, copy.deepcopy(policy).requires_grad_(False), batch, same, micro=4)
    assert metrics["distill_kl"] == 0 and all(g is None or g.abs().max() == 0 for g in grads)
    torch.manual_seed(2)
    teacher = FlowPolicy.build(tiny_flow_config()).requires_grad_(False)
    pol = copy.deepcopy(policy)
    engine = adamw(PolicyVelocity(pol))
    kls = [update(pol, batch, same, engine, micro=4, teacher=teacher, algo_cls=FlowOPD)[1]["distill_kl"]
           for _ in range(15)]
    assert kls[-1] < 0.5 * kls[0]
