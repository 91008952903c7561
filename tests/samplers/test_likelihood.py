"""ELBO estimators checked against the exact expectation, enumerated over every mask."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

from rlgen.samplers.likelihood import elbo_from_plan, elbo_l, elbo_t, make_mask_plan, token_logprobs

MASK = 3  # answer tokens are 0..2; the models output logits over those 3 ids only


class TinyNet(nn.Module):
    """Fixed random bidirectional model: p(x_i | x_t) depends on every visible token."""

    def __init__(self, seed=0, dim=8, vocab_out=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(4, dim, generator=g))
        self.pos = nn.Parameter(torch.randn(16, dim, generator=g))
        self.mix = nn.Parameter(torch.randn(dim, dim, generator=g) / math.sqrt(dim))
        self.out = nn.Parameter(torch.randn(dim, vocab_out, generator=g) * 1.5)

    def forward(self, input_ids):
        h = self.emb[input_ids] + self.pos[: input_ids.shape[1]]  # (B, S, d)
        return torch.tanh(h + h.mean(1, keepdim=True) @ self.mix) @ self.out  # (B, S, 3)


class Factorized(nn.Module):
    """Context-free model: position i has fixed log-probs, whatever is visible."""

    def __init__(self, logp):  # logp (S, 3)
        super().__init__()
        self.logp = logp

    def forward(self, input_ids):
        return self.logp[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1)


def exact_elbos(model, prompt, answer):
    """Expectation of the t-form and of the l-form estimators by enumerating every mask M.

    S(M) = Σ_{i∈M} log p(x_i | x with M masked). t-form: ∫ (1/t)·t^k (1−t)^(L−k) dt = B(k, L−k+1);
    l-form: P(l = k) = 1/L, P(M | k) = 1/C(L, k), weight L/k.
    """
    L = answer.shape[0]
    t_form = l_form = 0.0
    for k in range(1, L + 1):
        for M in itertools.combinations(range(L), k):
            x = torch.cat([prompt, answer]).clone()
            x[[prompt.shape[0] + i for i in M]] = MASK
            logp = torch.log_softmax(model(x[None])[0].double(), -1)
            s = sum(logp[prompt.shape[0] + i, answer[i]].item() for i in M)
            t_form += math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1) * s
            l_form += (1 / L) * (L / k) / math.comb(L, k) * s
    return t_form, l_form


PROMPT = torch.tensor([[0, 2], [1, 1]])
ANSWER = torch.tensor([[2, 0, 1], [1, 1, 0]])


def test_both_forms_are_unbiased_for_the_enumerated_elbo():
    model = TinyNet()
    g = torch.Generator().manual_seed(0)
    n = 20000
    with torch.no_grad():
        for b in range(2):
            t_exact, l_exact = exact_elbos(model, PROMPT[b], ANSWER[b])
            assert t_exact == pytest.approx(l_exact, abs=1e-9)  # same expectation, two forms
        for fn in (elbo_t, elbo_l):
            mean, samples = fn(model, PROMPT, ANSWER, MASK, n, generator=g, return_samples=True)
            se = samples.std(0) / math.sqrt(n)
            for b in range(2):
                exact = exact_elbos(model, PROMPT[b], ANSWER[b])[0]
                assert abs(mean[b].item() - exact) < 4 * se[b].item(), (fn.__name__, b, mean[b], exact, se[b])


def test_one_timestep_allocation_shares_the_level_and_stays_unbiased():
    """LLaDA 1.5's n_t = 1 split of the budget: one level per row, n different masks at it."""
    plan = make_mask_plan(400, 5, 6, torch.Generator().manual_seed(7), form="l", allocation="one_timestep")
    assert torch.equal(plan.t, plan.t[:1].expand_as(plan.t))  # (n, B): the same level in every sample
    assert torch.equal(plan.masks.sum(-1), (plan.t * 5).round().long())  # l of 5 tokens masked
    assert (plan.masks != plan.masks[:1]).any()  # ... by different masks
    assert len(set(plan.t[0].tolist())) == 5  # every level 1..5 occurs across rows
    model = TinyNet(seed=1)
    reps = 800
    with torch.no_grad():
        plan = make_mask_plan(2 * reps, 3, 4, torch.Generator().manual_seed(8), allocation="one_timestep")
        est = elbo_from_plan(model, PROMPT.repeat(reps, 1), ANSWER.repeat(reps, 1), plan, MASK).view(reps, 2)
    for b in range(2):
        exact = exact_elbos(model, PROMPT[b], ANSWER[b])[0]
        assert abs(est[:, b].mean().item() - exact) < 4 * est[:, b].std().item() / math.sqrt(reps)


@pytest.mark.parametrize("form", ["t", "l"])
def test_optimal_allocation_is_unbiased_too(form):
    model = TinyNet(seed=1)
    g = torch.Generator().manual_seed(1)
    reps = 600
    with torch.no_grad():
        plan = make_mask_plan(2 * reps, 3, 8, g, form=form, allocation="optimal")
        est = elbo_from_plan(model, PROMPT.repeat(reps, 1), ANSWER.repeat(reps, 1), plan, MASK).view(reps, 2)
    for b in range(2):
        exact = exact_elbos(model, PROMPT[b], ANSWER[b])[0]
        assert abs(est[:, b].mean().item() - exact) < 4 * est[:, b].std().item() / math.sqrt(reps)


def test_factorized_model_elbo_is_the_exact_log_likelihood():
    logp = torch.log_softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), -1)
    model = Factorized(logp)
    exact = logp[2 + torch.arange(3), ANSWER[0]].sum().item()  # Σ_i log p(x_i)
    g = torch.Generator().manual_seed(3)
    for fn in (elbo_t, elbo_l):
        mean, samples = fn(model, PROMPT[:1], ANSWER[:1], MASK, 20000, generator=g, return_samples=True)
        assert abs(mean.item() - exact) < 4 * samples.std().item() / math.sqrt(20000)
    # with equal per-token log-probs, every l-form sample is exact: (L/l)·l·c = L·c
    flat = Factorized(torch.log(torch.full((5, 3), 1 / 3)))
    _, samples = elbo_l(flat, PROMPT, ANSWER, MASK, 50, generator=g, return_samples=True)
    assert torch.allclose(samples, torch.full_like(samples, 3 * math.log(1 / 3)), atol=1e-5)


def test_plan_shapes_and_answer_padding():
    g = torch.Generator().manual_seed(4)
    answer_mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, False, False, False]])
    for allocation in ("optimal", "naive"):
        plan = make_mask_plan(3, 4, 500, g, form="l", allocation=allocation, answer_mask=answer_mask)
        counts = plan.masks.sum(-1)  # (n, B) masked tokens per sample = l
        assert not (plan.masks & ~answer_mask).any()  # pads never masked
        assert ((counts >= 1) & (counts <= answer_mask.sum(-1))).all()
        assert torch.allclose(plan.weights, answer_mask.sum(-1).float() / counts.float())
        assert set(counts[:, 1].tolist()) == {1, 2}
        plan = make_mask_plan(3, 4, 500, g, form="t", allocation=allocation, answer_mask=answer_mask)
        assert not (plan.masks & ~answer_mask).any()
        assert torch.allclose(plan.weights, 1 / plan.t) and ((plan.t > 0) & (plan.t <= 1)).all()
    strat = make_mask_plan(1, 4, 10, g, form="t", allocation="optimal").t[:, 0]
    assert ((strat > 1 - torch.arange(1, 11) / 10 - 1e-6) & (strat <= 1 - torch.arange(10) / 10)).all()


def test_padded_answer_scores_only_real_tokens():
    logp = torch.log_softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(5)), -1)
    model = Factorized(logp)
    answer = torch.tensor([[2, 0, 1, 0], [1, 2, 0, 0]])
    answer_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    exact = [logp[2 + torch.arange(4), answer[0]].sum().item(), logp[2 + torch.arange(2), answer[1, :2]].sum().item()]
    g = torch.Generator().manual_seed(6)
    mean, samples = elbo_l(model, PROMPT, answer, MASK, 20000, generator=g, answer_mask=answer_mask,
                           return_samples=True)
    se = samples.std(0) / math.sqrt(20000)
    assert (mean - torch.tensor(exact)).abs().lt(4 * se).all()


def test_token_logprobs_excludes_mask_and_reads_dot_logits():
    class WithLogits(nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(ids.shape[0], ids.shape[1], 4)})()

    lp = token_logprobs(WithLogits(), torch.zeros(2, 3, dtype=torch.long), mask_id=3)
    assert lp.shape == (2, 3, 4)
    assert torch.allclose(lp[..., :3], torch.full((2, 3, 3), -math.log(3))) and torch.isinf(lp[..., 3]).all()
    picked = token_logprobs(WithLogits(), torch.zeros(2, 3, dtype=torch.long), 3, targets=torch.ones(2, 3, dtype=torch.long))
    assert torch.allclose(picked, torch.full((2, 3), -math.log(3)))


@pytest.mark.parametrize("form", ["t", "l"])
def test_shared_plan_cancels_noise_between_policy_and_reference(form):
    policy = TinyNet(seed=7)
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        plan = make_mask_plan(2, 3, 4, g, form=form)
        assert torch.equal(elbo_from_plan(policy, PROMPT, ANSWER, plan, MASK),
                           elbo_from_plan(ref, PROMPT, ANSWER, plan, MASK))
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        reps, n = 400, 4
        prompt, answer = PROMPT.repeat(reps, 1), ANSWER.repeat(reps, 1)
        plan = make_mask_plan(2 * reps, 3, n, g, form=form)
        other = make_mask_plan(2 * reps, 3, n, g, form=form)
        shared = elbo_from_plan(policy, prompt, answer, plan, MASK) - elbo_from_plan(ref, prompt, answer, plan, MASK)
        indep = elbo_from_plan(policy, prompt, answer, plan, MASK) - elbo_from_plan(ref, prompt, answer, other, MASK)
    assert indep.var() > 10 * shared.var()


def test_optimal_allocation_lowers_variance():
    model = TinyNet(seed=9)
    g = torch.Generator().manual_seed(10)
    reps = 2000
    with torch.no_grad():
        var = {}
        for allocation in ("optimal", "naive"):
            plan = make_mask_plan(reps, 3, 6, g, form="l", allocation=allocation)
            var[allocation] = elbo_from_plan(model, PROMPT[:1].repeat(reps, 1), ANSWER[:1].repeat(reps, 1),
                                             plan, MASK).var()
    assert var["optimal"] < 0.9 * var["naive"]  # measured ≈ 0.75 over seeds (stratified levels)


def test_gradients_flow_and_chunking_matches():
    model = TinyNet(seed=11)
    plan = make_mask_plan(2, 3, 6, torch.Generator().manual_seed(12), form="l")
    whole = elbo_from_plan(model, PROMPT, ANSWER, plan, MASK)
    chunked = elbo_from_plan(model, PROMPT, ANSWER, plan, MASK, samples_per_forward=4)
    assert torch.allclose(whole, chunked, atol=1e-6)
    whole.sum().backward()
    assert model.out.grad is not None and model.out.grad.abs().sum() > 0


def test_validation_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="form"):
        make_mask_plan(2, 3, 4, g, form="x")
    with pytest.raises(ValueError, match="allocation"):
        make_mask_plan(2, 3, 4, g, allocation="x")
    with pytest.raises(ValueError, match="n_samples"):
        make_mask_plan(2, 3, 0, g)
    with pytest.raises(ValueError, match="answer_mask"):
        make_mask_plan(2, 3, 4, g, answer_mask=torch.ones(2, 4, dtype=torch.bool))
    plan = make_mask_plan(2, 3, 4, g)
    with pytest.raises(ValueError, match="plan"):
        elbo_from_plan(TinyNet(), PROMPT, ANSWER[:, :2], plan, MASK)
