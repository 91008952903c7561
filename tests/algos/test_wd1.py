"""wd1: the group weights by hand on hand-made rewards, and the update on an enumerable 2-token
model (tests/algos/table_lm.py): its gradient is that of −(1/N)·Σ_i n_g (w+_i − w−_i)·log π̂(o_i),
log π̂ written out by hand from the table, and its direction raises the exact probability of the
rewarded answer and lowers the other's."""
import copy
import math

import pytest
import torch

from rlgen.algos.base import get_algorithm
from rlgen.algos.wd1 import WD1, WD1Config, wd1_weights
from rlgen.batches import TextBucket, TextRollout
from rlgen.config import FieldError
from tests.algos import table_lm as T
from tests.algos.engines import RecordingEngine, adamw, context

pytestmark = pytest.mark.usefixtures("one_thread")


def rollout(answers, rewards, group_ids, seed=0) -> TextRollout:
    n = len(answers)
    toks = torch.tensor([[0, a, b] for a, b in answers])
    # decoded left to right (order 0, 1): the trajectory estimator replays that
    bucket = TextBucket(toks, torch.tensor([[0, 1]] * n), torch.zeros(n, 2), torch.arange(n), T.P)
    return TextRollout(["q"] * n, [""] * n, torch.tensor(group_ids), [bucket], rewards=torch.tensor(rewards), seed=seed)


def test_weights_by_hand():
    """Group 0 rewards [1, 0, 0, 1]: A = ±0.5/(std + 1e-4), std = √(1/3); w+ = e^{ψA}/(2e^{ψa} + 2e^{−ψa}).
    Group 1 [1, 0, NaN]: the NaN row is out of the softmax and gets 0. Group 2 is uniform."""
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, float("nan"), 1.0, 1.0]
    batch = rollout([(0, 0)] * 9, rewards, [0, 0, 0, 0, 1, 1, 1, 2, 2])
    psi = 2.0
    a0 = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    hi, lo = math.exp(psi * a0), math.exp(-psi * a0)
    wp0, wn0 = [hi / (2 * hi + 2 * lo), lo / (2 * hi + 2 * lo)], [lo / (2 * hi + 2 * lo), hi / (2 * hi + 2 * lo)]
    a1 = 0.5 / (math.sqrt(0.5) + 1e-4)  # [1, 0]: std √½
    hi1, lo1 = math.exp(psi * a1), math.exp(-psi * a1)
    expected_pos = [wp0[0], wp0[1], wp0[1], wp0[0], hi1 / (hi1 + lo1), lo1 / (hi1 + lo1), 0.0, 0.5, 0.5]
    expected_neg = [wn0[0], wn0[1], wn0[1], wn0[0], lo1 / (hi1 + lo1), hi1 / (hi1 + lo1), 0.0, 0.5, 0.5]
    from rlgen.algos.advantages import group_advantages

    adv = group_advantages(batch.rewards, batch.group_ids)
    w_pos, w_neg = wd1_weights(adv, batch.group_ids, psi, ~torch.isnan(batch.rewards))
    torch.testing.assert_close(w_pos, torch.tensor(expected_pos, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w_neg, torch.tensor(expected_neg, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    kept = WD1(WD1Config(psi=psi, skip_uniform_groups=False)).advantages(copy.deepcopy(batch))
    n_g = [4, 4, 4, 4, 2, 2, 2, 2, 2]
    coef = [n * (p - q) for n, p, q in zip(n_g, expected_pos, expected_neg)]
    torch.testing.assert_close(kept.advantages, torch.tensor(coef), rtol=1e-5, atol=1e-6)
    assert kept.advantages[7] == 0 and kept.advantages[6] == 0  # uniform group and NaN row: no signal
    only_pos = WD1(WD1Config(psi=psi, negative=False, skip_uniform_groups=False)).advantages(copy.deepcopy(batch))
    torch.testing.assert_close(only_pos.advantages[:4], torch.tensor([4 * wp0[0], 4 * wp0[1], 4 * wp0[1], 4 * wp0[0]]))
    skipped = WD1(WD1Config(psi=psi)).advantages(copy.deepcopy(batch))
    # mdm_grpo's mixed_groups keeps group 0 only (a group holding a NaN reward counts as not mixed)
    assert skipped.num_rows_in_buckets == 4 and skipped.global_size == 4


def hand_seq_logp(model, a, b, estimator):
    """log π̂ by table look-ups: d1 (prompt kept) scores both tokens with the other masked; the
    trajectory replay of left-to-right decoding scores token 0 with 1 masked, then token 1 after 0."""
    first = torch.log(T.cond(model, 0, 0, T.MASK)[a])
    second = torch.log(T.cond(model, 1, 0, T.MASK if estimator == "d1" else a)[b])
    return first + second


@pytest.mark.parametrize("estimator", ["d1", "trajectory"])
def test_update_gradient_is_that_of_the_weighted_likelihood(estimator):
    cfg = WD1Config(estimator=estimator, prompt_mask_p=0.0, inner_iterations=1, psi=1.5)
    answers, rewards = [(0, 1), (2, 2), (1, 0), (1, 1)], [1.0, 0.0, 0.0, 1.0]
    algo = WD1(cfg)
    batch = algo.advantages(rollout(answers, rewards, [0, 0, 1, 1]))
    batch.global_size = len(batch)
    model = T.TableLM(3)
    engine = RecordingEngine(model)
    algo.update(context(model, engine), batch)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # each group [1, 0]: A = ±a
    wp = math.exp(1.5 * a) / (math.exp(1.5 * a) + math.exp(-1.5 * a))
    c = 2 * (wp - (1 - wp))  # n_g (w+ − w−) of the rewarded row; the other row −c
    loss = sum(-(c if r else -c) * hand_seq_logp(model, *ans, estimator) for ans, r in zip(answers, rewards)) / 4
    model.zero_grad()
    loss.backward()
    torch.testing.assert_close(engine.grads[0][0], model.T.grad, rtol=1e-5, atol=1e-7)


def test_updates_raise_the_positive_and_lower_the_negative_answer():
    model = T.TableLM(7)
    with torch.no_grad():
        before = [float(T.log_pi(model, 0, *ans)) for ans in ((0, 1), (2, 2))]
    algo = WD1(WD1Config(estimator="coupled"))
    engine = adamw(model, lr=0.05)
    for step in range(2):
        batch = algo.advantages(rollout([(0, 1), (2, 2)], [1.0, 0.0], [0, 0], seed=step))
        batch.global_size = len(batch)
        algo.update(context(model, engine), batch)
    with torch.no_grad():
        after = [float(T.log_pi(model, 0, *ans)) for ans in ((0, 1), (2, 2))]
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1


def test_reference_kl_option_needs_the_reference():
    assert not WD1(WD1Config()).uses_reference(lora=False)
    assert WD1(WD1Config(kl_beta=0.01)).uses_reference(lora=False)


def test_config_checks_and_registration():
    assert get_algorithm("wd1") is WD1 and WD1.family == "masked_lm" and WD1.data == "rollouts"
    for bad in ({"psi": 0.0}, {"estimator": "elbo"}, {"inner_iterations": 0}, {"kl_beta": -1.0}):
        with pytest.raises(FieldError):
            WD1Config(**bad)
