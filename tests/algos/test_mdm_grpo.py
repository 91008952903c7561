"""Masked-diffusion GRPO: log-prob estimators against exact values on a tiny enumerable model, loss."""
import itertools
import math

import pytest
import torch
from torch import nn

from rlgen.algos.mdm_grpo import (MDMGRPOConfig, k3_kl, make_plan, mixed_groups, plan_logprobs, policy_loss)
from rlgen.samplers.masked import generate

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK, P, G = 6, 5, 3, 3  # vocabulary 0..4 plus [MASK]=5; prompt 3 tokens, completion 3 tokens


class Toy(nn.Module):
    """Context-dependent bidirectional toy: logits_i = E[x_i] + pos_i + mean_j C[x_j] (all j ≠ i)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = nn.Parameter(torch.randn(V, V, generator=g))
        self.C = nn.Parameter(torch.randn(V, V, generator=g))
        self.pos = nn.Parameter(torch.randn(P + G, V, generator=g))

    def forward(self, x):  # (B, L) -> (B, L, V)
        ctx = self.C[x]  # (B, L, V)
        others = (ctx.sum(1, keepdim=True) - ctx) / (x.shape[1] - 1)
        return self.E[x] + self.pos[: x.shape[1]] + others


def _rollout(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 5, (n, P), generator=g)
    out = generate(model, prompts, G, G, G, temperature=1.0, remasking="random", mask_id=MASK, generator=g)
    return out.tokens, out.order, out


def _lp(model, x, pos, target):
    """log p(target at position pos | x), [MASK] excluded, by hand."""
    logits = model(x[None])[0, pos].clone()
    logits[MASK] = -math.inf
    return torch.log_softmax(logits, -1)[target]


@torch.no_grad()
def test_d1_without_prompt_masking_is_the_fully_masked_conditional():
    model = Toy()
    tokens, order, _ = _rollout(model)
    plan = make_plan(MDMGRPOConfig(estimator="d1", prompt_mask_p=0.0), tokens, order, P, MASK)
    lp = plan_logprobs(model, plan, tokens, banned_ids=(MASK,))
    for b in range(tokens.shape[0]):
        x = tokens[b].clone()
        x[P:] = MASK
        for k in range(G):
            assert torch.isclose(lp[b, k], _lp(model, x, P + k, tokens[b, P + k]), atol=1e-5)


@torch.no_grad()
def test_d1_is_unbiased_for_its_enumerated_expectation_over_prompt_masks():
    model, p = Toy(1), 0.3
    tokens, order, _ = _rollout(model, n=2)
    exact = torch.zeros(2, G, dtype=torch.float64)
    for bits in itertools.product([0, 1], repeat=P):  # all 2^P prompt masks, weight p^|m| (1-p)^(P-|m|)
        drop = torch.tensor(bits, dtype=torch.bool)
        w = math.prod(p if d else 1 - p for d in bits)
        for b in range(2):
            x = tokens[b].clone()
            x[:P] = x[:P].masked_fill(drop, MASK)
            x[P:] = MASK
            for k in range(G):
                exact[b, k] += w * _lp(model, x, P + k, tokens[b, P + k]).double()
    cfg = MDMGRPOConfig(estimator="d1", prompt_mask_p=p)
    g = torch.Generator().manual_seed(0)
    rep = tokens.repeat(4000, 1)
    mc = plan_logprobs(model, make_plan(cfg, rep, order.repeat(4000, 1), P, MASK, g), rep, (MASK,))
    mc = mc.view(4000, 2, G).double().mean(0)
    assert torch.allclose(mc, exact, atol=0.02)


@torch.no_grad()
def test_coupled_scores_each_token_once_and_matches_enumerated_expectation():
    model = Toy(2)
    tokens, order, _ = _rollout(model, n=2)
    cfg = MDMGRPOConfig(estimator="coupled", coupled_t_min=0.2, coupled_t_max=0.8)
    plan = make_plan(cfg, tokens, order, P, MASK, torch.Generator().manual_seed(0))
    assert plan.inputs.shape == (2, 2, P + G)
    masked = plan.inputs[:, :, P:] == MASK  # (2 views, B, G): complementary, each token in exactly one
    assert torch.equal(masked[0], ~masked[1]) and masked[0].any(1).all()
    assert torch.equal(masked[0], plan.view == 0)
    # exact expectation: k = ceil(t·G) with t ~ U[0.2, 0.8], then a uniform k-subset S masked in view 0
    pk = {k: max(0.0, min(0.8, k / G) - max(0.2, (k - 1) / G)) / 0.6 for k in range(1, G + 1)}
    exact = torch.zeros(2, G, dtype=torch.float64)
    for k, wk in pk.items():
        subsets = list(itertools.combinations(range(G), k))
        for S in subsets:
            for b in range(2):
                for view_masked in (set(S), set(range(G)) - set(S)):
                    x = tokens[b].clone()
                    for j in view_masked:
                        x[P + j] = MASK
                    for j in view_masked:
                        exact[b, j] += wk / len(subsets) * _lp(model, x, P + j, tokens[b, P + j]).double()
    n = 6000
    rep = tokens.repeat(n, 1)
    mc = plan_logprobs(model, make_plan(cfg, rep, order.repeat(n, 1), P, MASK, torch.Generator().manual_seed(1)),
                       rep, (MASK,)).view(n, 2, G).double().mean(0)
    assert torch.allclose(mc, exact, atol=0.02)


@torch.no_grad()
def test_trajectory_replay_equals_the_samplers_own_token_logprobs():
    model = Toy(3)
    for threshold in (None, 0.2):
        g = torch.Generator().manual_seed(5)
        prompts = torch.randint(0, 5, (5, P), generator=g)
        out = generate(model, prompts, G, G, G, temperature=1.0, threshold=threshold, mask_id=MASK, generator=g,
                       forbidden_ids=(MASK,))
        plan = make_plan(MDMGRPOConfig(estimator="trajectory"), out.tokens, out.order, P, MASK)
        assert plan.inputs.shape[0] == int(out.order.max()) + 1
        lp = plan_logprobs(model, plan, out.tokens, (MASK,))
        assert torch.allclose(lp, out.token_logprobs, atol=1e-5)
    # by hand for one row: step s sees exactly the tokens unmasked before it
    b, row = 0, out.tokens[0]
    for k in range(G):
        x = row.clone()
        x[P:][out.order[b] >= out.order[b, k]] = MASK
        assert torch.isclose(lp[b, k], _lp(model, x, P + k, row[P + k]), atol=1e-5)


@torch.no_grad()
def test_eos_fill_tokens_get_no_credit():
    model = Toy()
    tokens, order, _ = _rollout(model, n=2)
    order = order.clone()
    order[0, 2] = -1
    for est in ("d1", "coupled", "trajectory"):
        plan = make_plan(MDMGRPOConfig(estimator=est), tokens, order, P, MASK, torch.Generator().manual_seed(0))
        assert not plan.token_mask[0, 2] and plan.token_mask[1].all()
        assert plan_logprobs(model, plan, tokens, (MASK,))[0, 2] == 0


def test_policy_loss_hand_values_clip_and_k3():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.5], [-0.5, -0.1]])
    ref = torch.tensor([[-1.2, -2.0], [-0.5, -0.3]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = policy_loss(logp, old, adv, mask, clip_range=0.2, ref_logp=ref, kl_beta=0.1)
    r = math.exp(0.5)  # row 0 token 1: ratio e^0.5 > 1.2 with A > 0 → clipped to 1.2
    k3 = lambda lp, rf: math.exp(rf - lp) - (rf - lp) - 1  # noqa: E731
    row0 = (-1.0 + 0.1 * k3(-1.0, -1.2) + -1.2 + 0.1 * k3(-2.0, -2.0)) / 2
    row1 = 2.0 + 0.1 * k3(-0.5, -0.5)  # only token 0 counts
    assert math.isclose(loss.item(), (row0 + row1) / 2, rel_tol=1e-6)
    assert math.isclose(m["clip_frac"], 1 / 3, rel_tol=1e-6) and r > 1.2
    loss.backward()
    assert logp.grad[0, 1].abs() < 1e-7  # clipped ratio: no PPO gradient, and k3's is 0 at logp = ref
    assert torch.isclose(logp.grad[1, 0], torch.tensor(2.0 / 2))  # −A·ratio/ n_tok / B = 2·1/1/2
    assert logp.grad[1, 1] == 0
    assert torch.all(k3_kl(torch.randn(100), torch.randn(100)) >= 0)


def test_mixed_groups_keeps_only_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert mixed_groups(rewards, ids).tolist() == [False, False, True, True, False, False]


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match="estimator.*'nope'"):
        MDMGRPOConfig(estimator="nope")
    cfg = MDMGRPOConfig()
    cfg.estimator = "nope"  # set after construction: make_plan still names it
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        make_plan(cfg, torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), P, MASK)
