"""SPG: the evidence bounds and the update against brute force on an enumerable 2-token model
(tests/algos/table_lm.py): ELBO ≤ log π ≤ EUBO, the block-wise Monte-Carlo masks unbiased, the
update's gradient that of −Σ A·bound / N, and its direction (the positive answer's probability
rises, the negative one's falls)."""
import math

import pytest
import torch

from rlgen.algos.base import get_algorithm
from rlgen.algos.spg import (SPG, BoundPlan, SPGConfig, answer_block_length, block_plan, evidence_bounds,
                             view_logprobs)
from rlgen.batches import TextBucket, TextRollout
from rlgen.config import FieldError
from tests.algos import table_lm as T
from tests.algos.engines import RecordingEngine, adamw, context

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(*answers, q=0):
    return torch.tensor([[q, a, b] for a, b in answers])


def exact_plan(B: int) -> BoundPlan:
    """Every mask set of a 2-token block with its ρ weight (k−1)!(n−k)!/n! = ½: {0}, {1}, {0, 1}."""
    sets = torch.tensor([[True, False], [False, True], [True, True]])
    scored = sets[:, None].expand(3, B, 2)
    return BoundPlan(scored, scored.clone(), torch.full((3, B), 0.5))


def code_bounds(model, toks, beta, plan=None):
    plan = plan or exact_plan(len(toks))
    return evidence_bounds(view_logprobs(model, toks, T.P, plan, T.MASK, (T.MASK,)), plan, beta)


@torch.no_grad()
def test_exact_bounds_match_brute_force_and_sandwich_log_pi():
    """On every answer of three random models: the code's bounds on the enumerated plan equal the
    hand formulas, and ELBO ≤ log π ≤ EUBO_β for β = 2 (= the block's tokens: Hölder)."""
    for seed in range(3):
        model = T.TableLM(seed)
        answers = T.all_answers()
        lo, hi = code_bounds(model, tokens(*answers, q=1), beta=2.0)
        for r, (a, b) in enumerate(answers):
            lp = float(T.log_pi(model, 1, a, b))
            assert math.isclose(float(lo[r]), float(T.elbo(model, 1, a, b)), abs_tol=1e-5)
            assert math.isclose(float(hi[r]), float(T.eubo(model, 1, a, b, 2.0)), abs_tol=1e-5)
            assert float(lo[r]) <= lp + 1e-6 <= float(hi[r]) + 2e-6
        assert math.isclose(T.total_probability(model, 1), 1.0, rel_tol=1e-5)  # log π is a distribution


@torch.no_grad()
def test_eubo_with_beta_below_the_block_size_need_not_bound_log_pi():
    """The paper's bound at β = 1 on a 2-token block: left-first decoding makes (0, 0) likely, the
    other order makes it unlikely; the per-token bound then sits below log π (β = 2 does not)."""
    table = torch.zeros(T.G, T.V, T.V + 1, T.V)
    table[0, 0, T.MASK, 0], table[1, 0, 0, 0] = 8.0, 8.0  # p0(0 | other masked), p1(0 | other = 0) ≈ 1
    table[1, 0, T.MASK, 0], table[0, 0, 0, 0] = -8.0, -8.0  # p1(0 | other masked), p0(0 | other = 0) ≈ 0
    model = T.TableLM(table=table)
    lp = float(T.log_pi(model, 0, 0, 0))
    (_, eubo1), (_, eubo2) = code_bounds(model, tokens((0, 0)), 1.0), code_bounds(model, tokens((0, 0)), 2.0)
    assert float(eubo1[0]) < lp - 0.5 and float(eubo2[0]) >= lp - 1e-5  # β = 2: tight here


@torch.no_grad()
def test_block_masks_are_unbiased_for_the_exact_bounds():
    """block_plan over one block: Σ_j w_j·1[i scored]·p^β and the ELBO average to their ρ-expectations;
    with blocks of 1 the ELBO is log π of left-to-right decoding exactly."""
    model, n = T.TableLM(4), 4000
    toks = tokens((2, 1)).repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    plan = block_plan(torch.zeros(n, 2, dtype=torch.long), 0, 1, g)
    logp = view_logprobs(model, toks, T.P, plan, T.MASK, (T.MASK,))
    lo, _ = evidence_bounds(logp, plan, 2.0)
    assert math.isclose(float(lo.mean()), float(T.elbo(model, 0, 2, 1)), abs_tol=0.06)
    per_token = (plan.weights[..., None] * plan.scored * logp.exp() ** 2).sum(0).mean(0)  # (2,)
    states = T.revealed_states(2, 1)
    exact = [sum(w * T.cond(model, k, 0, o)[t] ** 2 for w, o in states[k]) for k, t in ((0, 2), (1, 1))]
    torch.testing.assert_close(per_token, torch.stack(exact).float(), atol=0.02, rtol=0.04)
    plan1 = block_plan(torch.zeros(n, 2, dtype=torch.long), 1, 1, g)
    lo1, _ = evidence_bounds(view_logprobs(model, toks, T.P, plan1, T.MASK, (T.MASK,)), plan1, 2.0)
    assert math.isclose(float(lo1.mean()), float(T.log_pi(model, 0, 2, 1, block_length=1)), abs_tol=0.06)


def test_block_plan_masks_later_blocks_and_eos_fill():
    order = torch.tensor([[0, 1, 2, 3, -1, -1]])  # blocks of 2: [0 1] [2 3] [eos eos]
    plan = block_plan(order.repeat(500, 1), 2, 1, torch.Generator().manual_seed(1))
    first = plan.scored[0, :, :2].any(1)  # rows whose sample chose block 0
    assert first.any() and (~first).any()
    assert plan.hidden[0, first][:, 2:].all() and not plan.scored[0, :, 4:].any() and plan.hidden[0, :, 4:].all()
    assert not plan.hidden[0, ~first][:, :2].any()  # block 1 chosen: block 0 stays clean
    torch.testing.assert_close(plan.weights[0], 2 * 2 / plan.scored[0].sum(1).float())  # K·n_b/l, K = 2
    assert answer_block_length(6, 4) == 6 and answer_block_length(6, 0) == 6 and answer_block_length(6, 2) == 2


def rollout(answers, rewards, seed=0) -> TextRollout:
    n = len(answers)
    bucket = TextBucket(tokens(*answers), torch.tensor([[0, 1]] * n), torch.zeros(n, 2), torch.arange(n), T.P)
    return TextRollout(["q"] * n, [""] * n, torch.zeros(n, dtype=torch.long), [bucket], rewards=torch.tensor(rewards),
                       seed=seed)


@pytest.mark.parametrize("negative_bound", ["eubo", "mix"])
def test_update_gradient_is_that_of_the_sandwiched_objective(negative_bound, monkeypatch):
    """update() on the enumerated plan has the gradient of −(1/N)·Σ_i A_i·S_i, S = the hand ELBO for
    A > 0 and the hand EUBO (or ω·EUBO + (1−ω)·ELBO) for A < 0."""
    import rlgen.algos.spg as spg

    monkeypatch.setattr(spg, "bucket_bound_plan", lambda cfg, b, seed: exact_plan(len(b)))
    cfg = SPGConfig(negative_bound=negative_bound, eubo_beta=1.5, inner_iterations=1, block_length=0)
    algo = SPG(cfg)
    answers = [(0, 1), (2, 2), (1, 0), (0, 0)]
    batch = algo.advantages(rollout(answers, [1.0, 0.0, 0.0, 1.0]))
    batch.global_size = len(batch)
    model = T.TableLM(5)
    engine = RecordingEngine(model)
    algo.update(context(model, engine), batch)
    adv = batch.advantages
    assert adv[0] > 0 > adv[1]
    loss = 0.0
    for (a, b), A in zip(answers, adv.tolist()):
        lo, up = T.elbo(model, 0, a, b), T.eubo(model, 0, a, b, 1.5)
        s = lo if A > 0 else (up if negative_bound == "eubo" else 0.5 * up + 0.5 * lo)
        loss = loss - A * s / len(answers)
    model.zero_grad()
    loss.backward()
    torch.testing.assert_close(engine.grads[0][0], model.T.grad, rtol=1e-4, atol=1e-6)


def test_updates_raise_the_positive_and_lower_the_negative_answer():
    """Monte-Carlo masks, AdamW: the exact probability of the rewarded answer rises, the other's falls."""
    model = T.TableLM(6)
    with torch.no_grad():
        before = [float(T.log_pi(model, 0, *ans)) for ans in ((0, 1), (2, 2))]
    algo = SPG(SPGConfig(block_length=0, inner_iterations=4, n_samples=2))
    engine = adamw(model, lr=0.05)
    for step in range(2):
        batch = algo.advantages(rollout([(0, 1), (2, 2)], [1.0, 0.0], seed=step))
        batch.global_size = len(batch)
        algo.update(context(model, engine), batch)
    with torch.no_grad():
        after = [float(T.log_pi(model, 0, *ans)) for ans in ((0, 1), (2, 2))]
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1


def test_config_checks_and_registration():
    assert get_algorithm("spg") is SPG and SPG.family == "masked_lm" and SPG.data == "rollouts"
    for bad in ({"negative_bound": "upper"}, {"mix_weight": 1.5}, {"eubo_beta": 0.0}, {"n_samples": 0}):
        with pytest.raises(FieldError):
            SPGConfig(**bad)
