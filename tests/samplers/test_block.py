"""Block-diffusion decoding (rlgen/samplers/block.py) against diffusers' LLaDA2Pipeline.

The reference is diffusers' own ``LLaDA2Pipeline`` + ``BlockRefinementScheduler`` run on the raw
network of a tiny LLaDA2-layout model (remote code, block-causal); rlgen decodes the same model
through ``MaskedDiffusionLM`` (which builds the 4-D block mask itself) with and without the block
cache. Greedy decoding must give the same sequences token for token.
"""
import pytest
import torch

import rlgen  # noqa: F401  (first: makes torchvision importable before transformers' model classes)
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline  # noqa: E402

from rlgen.algos import mdm_grpo
from rlgen.models import load_model
from rlgen.samplers.masked import generate
from rlgen.testing.tiny_lms import build_tiny_llada2

pytestmark = pytest.mark.usefixtures("one_thread")
BL = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_llada2(tmp_path_factory.mktemp("llada2") / "m", seed=0, block_size=BL, init_std=0.3)
    m = load_model(path, trust_remote_code=True)
    with torch.no_grad():  # the pipeline may predict [MASK] (rlgen never does): give it logit 0, below the max
        m.net.lm_head.weight[m.mask_id] = 0.0
    return m


@pytest.fixture(scope="module")
def pipe(model):
    p = LLaDA2Pipeline(model=model.net, scheduler=BlockRefinementScheduler(), tokenizer=model.tokenizer)
    p.set_progress_bar_config(disable=True)
    return p


def _prompts(n=3, length=6, seed=0):
    return torch.randint(5, 380, (n, length), generator=torch.Generator().manual_seed(seed))


def _reference(pipe, model, prompts, gen_length, steps_per_block, threshold, editing=None, attention_mask=None,
               eos=None):
    return pipe(input_ids=prompts, attention_mask=attention_mask, gen_length=gen_length, block_length=BL,
                num_inference_steps=steps_per_block, temperature=0.0, threshold=threshold,
                editing_threshold=editing, eos_early_stop=eos is not None, eos_token_id=eos,
                mask_token_id=model.mask_id, output_type="seq").sequences


# threshold 1.0 in diffusers = never above it = LLaDA's pure schedule (rlgen: threshold=None)
@pytest.mark.parametrize("gen_length,steps_per_block,threshold,editing", [
    (8, 4, 1.0, None), (10, 4, 1.0, None), (8, 2, 0.3, None), (10, 4, 0.5, None),
    (8, 2, 0.3, 0.3), (10, 4, 0.2, 0.2)])
def test_greedy_matches_diffusers_llada2_pipeline(model, pipe, gen_length, steps_per_block, threshold, editing):
    prompts = _prompts()  # P = 6: the first block holds 2 prompt tokens; 6 + 8 leaves a 2-token tail
    ref = _reference(pipe, model, prompts, gen_length, steps_per_block, threshold, editing)
    outs = {cache: generate(model, prompts, gen_length, None, BL, steps_per_block=steps_per_block,
                            threshold=None if threshold >= 1 else threshold, editing_threshold=editing, cache=cache)
            for cache in ("none", "prefix")}
    for out in outs.values():
        assert torch.equal(out.answer, ref)
    assert outs["prefix"].forward_tokens < outs["none"].forward_tokens  # finished blocks are not re-fed
    assert outs["prefix"].nfe == outs["none"].nfe
    if editing is not None and editing <= 0.2:
        assert int(outs["none"].edits.sum()) > 0  # the case really edits
    if editing is None:
        assert int(outs["none"].edits.sum()) == 0


def test_left_padded_prompts_match_pipeline(model, pipe):
    prompts = _prompts(seed=1)
    am = torch.ones_like(prompts)
    am[0, :3], am[2, :1] = 0, 0
    ref = _reference(pipe, model, prompts, 8, 4, 0.4, attention_mask=am)
    for cache in ("none", "prefix"):
        out = generate(model, prompts, 8, None, BL, steps_per_block=4, threshold=0.4, attention_mask=am, cache=cache)
        assert torch.equal(out.answer, ref)


def test_eos_settles_rows_like_pipeline_up_to_the_eos(model, pipe):
    prompts = _prompts(n=4, seed=2)
    plain = _reference(pipe, model, prompts, 12, 4, 1.0)
    eos = int(torch.mode(plain.flatten()).values)  # a token the model writes often
    ref = _reference(pipe, model, prompts, 12, 4, 1.0, eos=eos)
    out = generate(model, prompts, 12, None, BL, steps_per_block=4, eos_id=eos, pad_id=0)
    hit = 0
    for b in range(4):
        row = out.answer[b].tolist()
        if eos in row:
            cut = row.index(eos) + 1
            hit += 1
            assert row[:cut] == ref[b, :cut].tolist()
            assert all(t == 0 for t in row[cut:]) and (out.order[b, cut:] == -1).all()
        else:
            assert row == ref[b].tolist()
    assert hit >= 1


def test_trajectory_replay_reproduces_sampled_logprobs(model):
    """Block-causal decoding is replayable: rlgen's GRPO ``trajectory`` estimator, fed the sampler's
    order, recomputes every token's log-prob exactly (later blocks never influence earlier ones)."""
    prompts = _prompts(seed=3)
    out = generate(model, prompts, 10, None, BL, steps_per_block=2, threshold=0.3, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    cfg = mdm_grpo.MDMGRPOConfig(estimator="trajectory")
    plan = mdm_grpo.make_plan(cfg, out.tokens, out.order, out.prompt_length, model.mask_id)
    with torch.no_grad():
        lp = mdm_grpo.plan_logprobs(model, plan, out.tokens, banned_ids=[model.mask_id])
    assert (out.order >= 0).all()
    assert torch.allclose(lp, out.token_logprobs, atol=1e-4)


def test_default_steps_and_validation(model):
    prompts = _prompts(n=1)
    a = generate(model, prompts, 8, 8, BL)  # LLaDA's steps (total over 8 tokens) → 4 per block of 4
    b = generate(model, prompts, 8, None, BL, steps_per_block=4)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="differs from the block size the policy attends with"):
        generate(model, prompts, 8, 8, 8)
    with pytest.raises(ValueError, match="steps per block"):
        generate(model, prompts, 8, None, BL, steps_per_block=5)
    with pytest.raises(ValueError, match="cfg_scale > 0 is not supported"):
        generate(model, prompts, 8, 8, BL, cfg_scale=1.0)
    with pytest.raises(ValueError, match="editing_threshold"):
        generate(model, prompts, 8, 8, BL, editing_threshold=1.5)


def test_editing_options_refused_for_bidirectional_decoding(model):
    with pytest.raises(ValueError, match="block-causal decoding only"):
        generate(model, _prompts(n=1), 8, 8, BL, block_causal=False, editing_threshold=0.5)


class _ContextFree(torch.nn.Module):
    """Fixed logits per position, whatever the input: its ELBO is exactly Σ_i log p(x_i)."""

    def __init__(self, length, vocab=7, seed=0):
        super().__init__()
        self.table = torch.randn(length, vocab, generator=torch.Generator().manual_seed(seed)) * 2

    def forward(self, ids):
        return self.table[: ids.shape[1]].expand(ids.shape[0], -1, -1)


def test_block_mask_plan_masks_one_block_and_is_unbiased():
    from rlgen.samplers.likelihood import elbo_from_plan, make_block_mask_plan

    P, G, bl, mask_id = 6, 9, 4, 6  # answer positions 6..14 fall in blocks 1 (6-7), 2 (8-11), 3 (12-14)
    g = torch.Generator().manual_seed(0)
    answer_mask = torch.ones(2, G, dtype=torch.bool)
    answer_mask[1, 7:] = False  # row 1: a shorter answer (padding never masked)
    plan = make_block_mask_plan(2, P, G, bl, 4000, generator=g, answer_mask=answer_mask)
    blocks = (P + torch.arange(G)) // bl
    for j in range(50):
        for b in range(2):
            hit = blocks[plan.masks[j, b]]
            assert hit.numel() == 0 or (hit == hit[0]).all()  # one block per sample
    assert not (plan.masks[:, 1, 7:]).any()
    model = _ContextFree(P + G)
    prompt = torch.randint(0, 6, (2, P), generator=g)
    answer = torch.randint(0, 6, (2, G), generator=g)
    est = elbo_from_plan(model, prompt, answer, plan, mask_id)
    logp = torch.log_softmax(model.table[P:].masked_fill(torch.arange(7) == mask_id, float("-inf")), -1)
    exact = logp.gather(-1, answer.T.reshape(G, 2)).T  # (2, G)
    exact = torch.where(answer_mask, exact, torch.zeros_like(exact)).sum(-1)
    assert torch.allclose(est, exact, rtol=0.05)


def test_block_elbo_two_copy_pattern_equals_per_block_forwards(model):
    """Each block's log-probs from the one two-copy forward equal a plain block-causal forward of
    (clean earlier blocks, that block noised): the pattern shows the model what decoding shows it."""
    from rlgen.samplers.likelihood import block_elbo

    g = torch.Generator().manual_seed(5)
    prompts, answers = _prompts(n=2, length=6, seed=5), _prompts(n=2, length=9, seed=6)
    elbo, masks, logp, weights = block_elbo(model, prompts, answers, model.mask_id, BL, generator=g,
                                            return_details=True)
    P = prompts.shape[1]
    blocks = (P + torch.arange(9)) // BL
    for b in blocks.unique().tolist():
        cols = blocks == b
        x = torch.cat([prompts, answers], 1)
        x[:, P:][:, cols] = torch.where(masks[:, cols], model.mask_id, answers[:, cols])
        x[:, P:][:, blocks > b] = model.mask_id  # later blocks: invisible anyway
        with torch.no_grad():
            lg = model(x)[:, P:].float()
        lg[..., model.mask_id] = float("-inf")
        ref = torch.log_softmax(lg, -1).gather(-1, answers[..., None])[..., 0]
        assert torch.allclose(logp[:, cols], ref[:, cols], atol=1e-4)
        assert masks[:, cols].any(1).all()  # every block masks at least one token per row
    assert torch.allclose(elbo, (weights * logp * masks).sum(-1))
