"""Rollouts of Hugging Face diffusion LMs through the masked-LM family: block-causal policies decode
with the block sampler in their own blocks and the trajectory replay reproduces the sampled
log-probs; dataset items under a chat template are rendered with the policy's own template and
their completions reach rewards as conversation turns (trl's convention)."""
import pytest
import torch

import rlgen  # noqa: F401

from rewards.base import RewardMixer
from rlgen.algos.mdm_grpo import MDMGRPOConfig, banned_ids, make_plan, plan_logprobs
from rlgen.families.masked_lm import TextRolloutConfig, decode_settings, rollout_text
from rlgen.models import load_model
from rlgen.testing.tiny_lms import build_tiny_llada, build_tiny_llada2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {"llada2": load_model(build_tiny_llada2(root / "llada2", block_size=4, init_std=0.5),
                                 trust_remote_code=True),
            "llada": load_model(build_tiny_llada(root / "llada", init_std=0.5), trust_remote_code=True)}


def _items(n_prompts=2, group=3, **extra):
    base = [{"prompt": q, "gen_length": 10, "solution": s, **extra}
            for q, s in [("What is 1 + 2?", "3"), ("What is 7 * 6?", "42")][:n_prompts]]
    rep = [it for it in base for _ in range(group)]
    return rep, torch.tensor([i for i in range(n_prompts) for _ in range(group)])


def test_block_causal_rollouts_decode_in_policy_blocks_and_replay_exactly(models):
    policy = models["llada2"]
    assert policy.is_block_causal and policy.block_size == 4
    assert decode_settings(TextRolloutConfig(), 10, policy.block_size) == (4, 10)  # not one 10-token block
    items, gids = _items()
    out = rollout_text(policy, items, gids, TextRolloutConfig(temperature=1.0), torch.Generator().manual_seed(0))
    assert sum(len(b) for b in out.buckets) == 6 and all(isinstance(c, str) for c in out.completions)
    for b in out.buckets:
        plan = make_plan(MDMGRPOConfig(estimator="trajectory"), b.tokens, b.order, b.prompt_length, policy.mask_id)
        with torch.no_grad():
            replay = plan_logprobs(policy, plan, b.tokens, banned_ids(policy))  # (b, G)
        decided = b.order >= 0
        assert decided.any()
        torch.testing.assert_close(replay[decided], b.token_logprobs[decided], atol=2e-5, rtol=0)


def test_pad_that_is_end_of_text_stays_predictable(models):
    policy = models["llada"]  # LLaDA-style: the pad token is the end-of-text token
    assert policy.pad_id == policy.eos_id and banned_ids(policy) == (policy.mask_id,)


def test_chat_items_use_the_policy_template_and_trl_rewards_score_them(models):
    policy = models["llada2"]
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    items, gids = _items(n_prompts=1, group=2, messages=messages)
    out = rollout_text(policy, items, gids, TextRolloutConfig(), torch.Generator().manual_seed(0))
    # ChatML written out by hand (the tiny LLaDA2 folder ships that template)
    assert out.prompts[0] == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    P = len(policy.tokenizer(out.prompts[0], add_special_tokens=False)["input_ids"])
    assert out.buckets[0].prompt_length == P
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in out.completions)
    assert sorted(out.meta) == ["solution"]  # messages and gen_length are not reward columns
    mixer = RewardMixer({"rewards": {"trl.rewards:think_format_reward": 1.0, "math_answer": 1.0}})
    scored = mixer(out.completions, out.prompts, **out.meta)
    assert scored.valid.all() and scored.total.shape == (2,)


def test_rollout_cache_setting_reaches_the_sampler(models):
    with pytest.raises(ValueError, match="must be one of"):
        TextRolloutConfig(cache="suffix")
    items, gids = _items(n_prompts=1, group=2)
    with pytest.raises(ValueError, match="block-causal"):  # the exact block cache needs no suffix cache
        rollout_text(models["llada2"], items, gids, TextRolloutConfig(cache="dual"), torch.Generator().manual_seed(0))
    cfg = TextRolloutConfig(temperature=0.0, block_length=5, cache="dual")
    out = rollout_text(models["llada"], items, gids, cfg, torch.Generator().manual_seed(0))
    assert (out.buckets[0].order >= 0).any() and not (out.buckets[0].tokens == models["llada"].mask_id).any()
