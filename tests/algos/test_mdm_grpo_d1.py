"""MDM-GRPO's d1-exact options (adv_std, loss_agg, skip_uniform_groups) against d1's formulas,
written out by hand here: advantage r − group mean, loss Σ over all completion tokens / token count,
uniform groups kept with only their KL term."""
import copy
import math

import pytest
import torch

from rlgen.algos.mdm_grpo import MDMGRPO, MDMGRPOConfig, policy_loss
from rlgen.batches import TextBucket, TextRollout
from rlgen.config import FieldError
from tests.algos.engines import RecordingEngine, context
from tests.algos.test_mdm_grpo import MASK, P, Toy

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyLM(Toy):
    """The enumerable toy with the attributes a masked-LM policy carries."""

    mask_id, pad_id = MASK, MASK
    device = torch.device("cpu")


def rollout(rewards, group_ids, lengths, seed=0) -> TextRollout:
    """One bucket of hand-made rows (prompt 3, answer 3); row i decodes ``lengths[i]`` tokens, the
    rest is eos fill (order −1, never scored)."""
    g = torch.Generator().manual_seed(seed)
    n = len(rewards)
    tokens = torch.randint(0, MASK, (n, P + 3), generator=g)
    order = torch.tensor([[k if k < n_k else -1 for k in range(3)] for n_k in lengths])
    bucket = TextBucket(tokens, order, torch.zeros(n, 3), torch.arange(n), P)
    return TextRollout(["q"] * n, [""] * n, torch.tensor(group_ids), [bucket], rewards=torch.tensor(rewards), seed=seed)


def hand_logprobs(model, tokens):
    """d1's one-step estimate, prompt unmasked: log p(o_k | q, all-mask), [MASK] excluded. (n, 3)"""
    x = tokens.clone()
    x[:, P:] = MASK
    logits = model(x)[:, P:].clone()
    logits[..., MASK] = -math.inf
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, P:, None])[..., 0]


def hand_loss(model, ref, batch, adv, agg, beta):
    """d1 (agg="token"): Σ_{i,k} [−A_i·ρ_ik + β·k3_ik] / Σ_i |o_i|; rlgen (agg="sequence"): per-row
    token mean, then the mean over rows. ρ = 1 in value (old = the policy itself), gradient ∇log p."""
    b = batch.buckets[0]
    lp = hand_logprobs(model, b.tokens)
    with torch.no_grad():
        ref_lp = hand_logprobs(ref, b.tokens)
    mask = (b.order >= 0).float()
    d = ref_lp - lp
    per_tok = -adv[b.rows, None] * torch.exp(lp - lp.detach()) + beta * (torch.exp(d) - d - 1)
    if agg == "token":
        return (per_tok * mask).sum() / mask.sum()
    return ((per_tok * mask).sum(1) / mask.sum(1)).mean()


def update_grads(cfg, batch):
    algo = MDMGRPO(cfg)
    batch = algo.advantages(batch)
    batch.global_size = batch.global_size or len(batch)  # as the trainer sets it
    model, ref = ToyLM(0), ToyLM(1).requires_grad_(False)
    engine = RecordingEngine(model)
    algo.update(context(model, engine, ref), batch)
    return batch, model, ref, engine.grads


def assert_grads_equal(grads, model, loss):
    model.zero_grad()
    loss.backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_adv_std_false_is_reward_minus_group_mean():
    batch = rollout([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, float("nan")], [0, 0, 0, 0, 1, 1, 1, 1], [3] * 8)
    d1 = MDMGRPO(MDMGRPOConfig(adv_std=False, skip_uniform_groups=False)).advantages(copy.deepcopy(batch))
    # group 0 mean 1/4; group 1 mean 2/3 over its three scored rows; the NaN row gets 0
    expected = [0.75, -0.25, -0.25, -0.25, 1 / 3, 1 / 3, -2 / 3, 0.0]
    torch.testing.assert_close(d1.advantages, torch.tensor(expected))
    std0 = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # default: divided by the unbiased group std
    default = MDMGRPO(MDMGRPOConfig(skip_uniform_groups=False)).advantages(copy.deepcopy(batch))
    assert math.isclose(float(default.advantages[0]), 0.75 / (std0 + 1e-4), rel_tol=1e-6)


def test_token_and_sequence_aggregation_can_have_opposite_signs():
    """Lengths [2, 8, 5, 8], rewards [1, 0, 0, 0] centred (d1); row 0's ratio 1.1 (inside the clip)."""
    lengths, adv = [2, 8, 5, 8], torch.tensor([0.75, -0.25, -0.25, -0.25])
    mask = torch.arange(8)[None] < torch.tensor(lengths)[:, None]  # (4, 8)
    old = torch.zeros(4, 8)
    logp = torch.where(torch.arange(4)[:, None] == 0, math.log(1.1), 0.0).expand(4, 8)
    seq, _ = policy_loss(logp, old, adv, mask, clip_range=0.2)
    rows, _ = policy_loss(logp, old, adv, mask, clip_range=0.2, reduction="sum")
    token = rows.sum() / mask.sum()
    hand_token = (-0.75 * 1.1 * 2 + 0.25 * (8 + 5 + 8)) / 23  # Σ_tokens (−A·ρ) / 23 = +0.1565
    hand_seq = (-0.75 * 1.1 + 0.25 * 3) / 4  # per-row means −A·ρ, then their mean = −0.01875
    assert math.isclose(float(token), hand_token, rel_tol=1e-6) and math.isclose(float(seq), hand_seq, rel_tol=1e-6)
    assert hand_token > 0 > hand_seq


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_update_gradient_matches_the_hand_loss(agg):
    """d1's full configuration (centred advantages, uniform group kept, k3 KL) through ``update``:
    the gradient is that of the hand-written loss of ``agg``, and not that of the other one."""
    cfg = MDMGRPOConfig(estimator="d1", prompt_mask_p=0.0, inner_iterations=1, kl_beta=0.04, adv_std=False,
                        skip_uniform_groups=False, loss_agg=agg)
    batch, model, ref, grads = update_grads(cfg, rollout([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0, 0, 0, 1, 2, 2],
                                                         [1, 3, 2, 3, 3, 1]))
    assert len(grads) == 1 and batch.num_rows_in_buckets == 6  # the uniform group 2 is kept
    adv = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])  # r − mean; group 1 has one row: 0
    assert_grads_equal(grads[0], model, hand_loss(model, ref, batch, adv, agg, 0.04))
    other = hand_loss(model, ref, batch, adv, "sequence" if agg == "token" else "token", 0.04)
    model.zero_grad()
    other.backward()
    assert max(float((g - p.grad).abs().max()) for g, p in zip(grads[0], model.parameters())) > 1e-4


def test_kept_uniform_groups_contribute_their_kl_term():
    """A batch of one uniform group: kept (skip_uniform_groups=False) it trains on β·k3 alone (d1);
    skipped (the default) nothing is left to train on."""
    cfg = MDMGRPOConfig(estimator="d1", prompt_mask_p=0.0, inner_iterations=1, kl_beta=0.1, skip_uniform_groups=False)
    batch, model, ref, grads = update_grads(cfg, rollout([1.0, 1.0, 1.0], [0, 0, 0], [3, 2, 3]))
    assert batch.global_size == 3 and torch.all(batch.advantages == 0)
    b = batch.buckets[0]
    lp, mask = hand_logprobs(model, b.tokens), (b.order >= 0).float()
    d = hand_logprobs(ref, b.tokens).detach() - lp
    kl_only = ((0.1 * (torch.exp(d) - d - 1) * mask).sum(1) / mask.sum(1)).mean()
    assert_grads_equal(grads[0], model, kl_only)
    assert max(float(g.abs().max()) for g in grads[0]) > 1e-4
    skipped = MDMGRPO(MDMGRPOConfig(kl_beta=0.1)).advantages(rollout([1.0, 1.0, 1.0], [0, 0, 0], [3, 2, 3]))
    assert skipped.buckets == [] and skipped.global_size == 0


def test_two_shards_share_the_global_token_count():
    """Each shard of a token-aggregated step divides by the whole step's scored tokens."""
    batch = rollout([1.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 1, 1, 2], [1, 3, 2, 3, 2])
    shards = batch.shard(2)  # 3 + 2 rows: the second padded with a weight-0 copy
    assert [s.global_tokens for s in shards] == [11, 11] and sum(s.scored_tokens() for s in shards) == 11


def test_bad_loss_agg_is_a_clear_error():
    with pytest.raises(FieldError, match="loss_agg"):
        MDMGRPOConfig(loss_agg="tokens")
