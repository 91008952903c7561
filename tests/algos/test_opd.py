"""On-policy distillation losses against independently computed math: the image step KL against
torch.distributions' Gaussian KL, the token reverse KL against Categorical KL, the sampled-token
estimator's gradient against the exact KL gradient, and the visited states of a hand-made
decoding trajectory."""
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from rlgen.algos.opd import (FlowOPDConfig, MDMOPDConfig, image_step_loss, masked_mean_per_row,
                             sequence_kl_loss, token_reverse_kl, velocity_kl_weight, visited_states)
from rlgen.samplers.flow import sde_step


def gaussian_step_kl(x, v_s, v_t, sigma, sigma_next, a):
    """KL of the two SDE steps from x, with mean and std written out here from DESIGN.md's formula."""
    dt = sigma_next - sigma
    s_den = sigma_next if sigma == 1.0 else sigma
    std_sigma = a * (sigma / (1 - s_den)) ** 0.5
    mean = lambda v: x * (1 + std_sigma**2 * dt / (2 * sigma)) + v * (1 + std_sigma**2 * (1 - sigma) / (2 * sigma)) * dt  # noqa: E731
    std = std_sigma * (-dt) ** 0.5
    return kl_divergence(Normal(mean(v_s), std), Normal(mean(v_t), std)).flatten(1).sum(1)  # (B,)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.7, 0.6), (0.3, 0.1)])
def test_image_kl_equals_gaussian_kl_and_weighted_velocity_mse(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v_s, v_t = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a = 0.7
    want = gaussian_step_kl(x, v_s, v_t, sigma, sigma_next, a)  # (B,)
    # the closed form: a weighted squared velocity difference
    w = velocity_kl_weight(sigma, sigma_next, a)
    torch.testing.assert_close(w * (v_s - v_t).pow(2).flatten(1).sum(1), want)
    # the loss, built from sde_step's means as the learner builds it
    out_s = sde_step(x, v_s, sigma, sigma_next, a, generator=g)
    out_t = sde_step(x, v_t, sigma, sigma_next, a, prev_sample=out_s.prev_sample)
    D = x[0].numel()
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / D)):
        cfg = FlowOPDConfig(distill_weight=2.0, kl_reduction=reduction)
        loss, m = image_step_loss(out_s.log_prob, out_s.log_prob, torch.zeros(3), out_s.mean, out_t.mean, None,
                                  out_s.std, D, cfg)
        assert loss.item() == pytest.approx(2.0 * scale * want.mean().item(), rel=1e-6)
        assert m["distill_kl"] == pytest.approx(scale * want.mean().item(), rel=1e-6)


def test_image_loss_is_zero_with_zero_gradient_when_student_equals_teacher():
    x = torch.randn(2, 1, 3, 3)
    v = torch.randn(2, 1, 3, 3, requires_grad=True)
    out = sde_step(x, v, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(1))
    t = sde_step(x, v.detach(), 0.5, 0.4, 0.7, prev_sample=out.prev_sample)
    loss, _ = image_step_loss(out.log_prob, out.log_prob.detach(), torch.zeros(2), out.mean, t.mean, None, out.std,
                              9, FlowOPDConfig())
    loss.backward()
    assert loss.item() == 0 and v.grad.abs().max() == 0


def test_image_loss_adds_the_reward_term_when_weighted():
    x = torch.randn(4, 1, 2, 2)
    v = torch.randn(4, 1, 2, 2)
    out = sde_step(x, v, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(2))
    t = sde_step(x, v + 0.1, 0.5, 0.4, 0.7, prev_sample=out.prev_sample)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.5])  # mean 0.25
    pure, _ = image_step_loss(out.log_prob, out.log_prob, adv, out.mean, t.mean, None, out.std, 4,
                              FlowOPDConfig(reward_weight=0.0))
    mixed, m = image_step_loss(out.log_prob, out.log_prob, adv, out.mean, t.mean, None, out.std, 4,
                               FlowOPDConfig(reward_weight=0.5))
    # ratio 1 everywhere (old = new log-prob): the PPO term is −mean(A) = −0.25
    assert mixed.item() == pytest.approx(pure.item() + 0.5 * m["policy_loss"], abs=1e-7)
    assert m["policy_loss"] == pytest.approx(-adv.mean().item(), abs=1e-7)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="both 0"):
        FlowOPDConfig(distill_weight=0.0, reward_weight=0.0)
    with pytest.raises(ValueError, match="teacher"):
        FlowOPDConfig(teacher="")
    with pytest.raises(ValueError, match="teacher_kind"):
        MDMOPDConfig(teacher_kind="gpt")
    with pytest.raises(ValueError, match="states"):
        MDMOPDConfig(states="all")


def test_token_reverse_kl_matches_categorical_kl_without_banned_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    banned = (0, 5)
    keep = [i for i in range(7) if i not in banned]
    want = kl_divergence(Categorical(logits=s[..., keep]), Categorical(logits=t[..., keep]))  # (2, 3)
    s.requires_grad_(True)
    got = token_reverse_kl(s, t, banned)
    torch.testing.assert_close(got, want)
    # the gradient is finite and equals autograd of the Categorical KL (none flows to banned logits)
    (g,) = torch.autograd.grad(got.sum(), s)
    s_keep = s.detach()[..., keep].requires_grad_(True)
    (g_want,) = torch.autograd.grad(kl_divergence(Categorical(logits=s_keep), Categorical(logits=t[..., keep])).sum(),
                                    s_keep)
    torch.testing.assert_close(g[..., keep], g_want)
    assert torch.isfinite(g).all() and g[..., list(banned)].abs().max() == 0
    s = s.detach()
    torch.testing.assert_close(token_reverse_kl(s, t), kl_divergence(Categorical(logits=s), Categorical(logits=t)))
    assert token_reverse_kl(s, s, banned).abs().max() < 1e-6


def test_masked_mean_per_row():
    per = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # (n=2, B=2, G=2)
    mask = torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])
    torch.testing.assert_close(masked_mean_per_row(per, mask), torch.tensor([(1 + 5 + 6) / 3, 0.0]))


def test_visited_states_of_a_hand_made_trajectory():
    M = 9
    # prompt [1, 2]; answer [3, 4, 5] decoded in order: pos 1 at step 0, pos 2 at step 1, pos 0 at step 2
    tokens = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 6, 7, 8]])
    order = torch.tensor([[2, 0, 1], [0, 1, -1]])  # row 1: last position is an eos fill
    states, masked = visited_states(tokens, order, 2, M)
    assert states.shape == (3, 2, 5)
    assert states[:, 0].tolist() == [[1, 2, M, M, M], [1, 2, M, 4, M], [1, 2, M, 4, 5]]
    assert states[:, 1].tolist() == [[1, 2, M, M, M], [1, 2, 6, M, M], [1, 2, 6, 7, M]]
    assert masked[:, 0].tolist() == [[True, True, True], [True, False, True], [True, False, False]]
    assert masked[:, 1].tolist() == [[True, True, False], [False, True, False], [False, False, False]]


def test_sequence_kl_gradient_is_unbiased_for_the_exact_joint_kl_gradient():
    """Student: two positions decoded independently (trajectory log-prob = sum of the two); teacher:
    autoregressive p_t(y1)·p_t(y2 | y1). E[∇ loss] over sampled answers = ∇ KL(p_s ‖ p_t) exactly."""
    torch.manual_seed(0)
    V = 4
    theta = torch.randn(2, V, requires_grad=True)  # (G=2, V) student logits per position
    t1 = torch.log_softmax(torch.randn(V), -1)  # (V,) teacher's first token
    t2 = torch.log_softmax(torch.randn(V, V), -1)  # (V, V) teacher's second token given the first
    ls = torch.log_softmax(theta, -1)
    joint_s = ls[0][:, None] + ls[1][None, :]  # (V, V) log p_s(y1, y2)
    joint_t = t1[:, None] + t2  # (V, V) log p_t(y1, y2)
    exact_kl = (joint_s.exp() * (joint_s - joint_t)).sum()
    exact = torch.autograd.grad(exact_kl, theta)[0]
    n = 200_000
    y = torch.stack([Categorical(logits=theta[k].detach()).sample((n,)) for k in range(2)], dim=1)  # (n, 2)
    ls = torch.log_softmax(theta, -1)  # a fresh graph (the exact gradient consumed the first)
    student_lp = torch.stack([ls[0][y[:, 0]], ls[1][y[:, 1]]], dim=1)  # (n, 2) with grad
    teacher_lp = torch.stack([t1[y[:, 0]], t2[y[:, 0], y[:, 1]]], dim=1)  # (n, 2)
    loss, m = sequence_kl_loss(student_lp, teacher_lp, torch.ones(n, 2, dtype=torch.bool))
    est = torch.autograd.grad(loss, theta)[0]
    torch.testing.assert_close(est, exact, atol=0.03, rtol=0.0)
    assert m["distill_kl"] == pytest.approx(exact_kl.item(), abs=0.03)
    # a masked-out position contributes nothing
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss, _ = sequence_kl_loss(lp, torch.tensor([[-1.5, 5.0], [-0.7, 9.0]]), torch.tensor([[True, False]] * 2))
    (g,) = torch.autograd.grad(loss, lp)
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().max() > 0
