"""Masked-diffusion decoding checked against hand-computed confidences and LLaDA's published loop."""
import math

import pytest
import torch
from torch import nn

from rlgen.samplers.masked import generate, num_transfer_tokens
from tests_helpers import bidirectional_llama

MASK, PAD, EOS = 5, 4, 3  # vocab 0..5; 5 is [MASK]
V = 6
# answer-position confidences of the table model below, hand-picked and all distinct
CONF = [0.30, 0.90, 0.55, 0.70, 0.40, 0.95, 0.60, 0.80]
TOKENS = [0, 1, 2, 0, 1, 2, 0, 1]


def prob_row(token, conf, vocab=V, banned=(MASK,)):
    """Probabilities: ``conf`` on ``token``, the rest spread evenly over the other allowed ids."""
    others = [t for t in range(vocab) if t != token and t not in banned]
    row = torch.zeros(vocab)
    row[others] = (1.0 - conf) / len(others)
    row[token] = conf
    return row


class TableModel(nn.Module):
    """Ignores the tokens: answer position i always has logits log(rows[k][i]), k = first prompt id."""

    def __init__(self, tables, prompt_len):
        super().__init__()
        self.prompt_len = prompt_len
        self.tables = [torch.log(torch.stack(rows)) for rows in tables]  # each (G, V)

    def forward(self, input_ids):
        B, S = input_ids.shape
        out = torch.zeros(B, S, self.tables[0].shape[-1])
        for b in range(B):
            out[b, self.prompt_len:] = self.tables[int(input_ids[b, 0])]
        return out


def table_model(conf=CONF, tokens=TOKENS, prompt_len=2):
    return TableModel([[prob_row(t, c) for t, c in zip(tokens, conf)]], prompt_len)


class MixModel(nn.Module):
    """A fixed random bidirectional mixer: every position's logits depend on every token."""

    def __init__(self, vocab=V, dim=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, dim, generator=g)
        self.pos = torch.randn(64, dim, generator=g)
        self.mix = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
        self.out = torch.randn(dim, vocab, generator=g) * 2.0

    def forward(self, input_ids):
        h = self.emb[input_ids] + self.pos[: input_ids.shape[1]]  # (B, S, d)
        ctx = h.mean(dim=1, keepdim=True) @ self.mix  # (B, 1, d)
        return torch.tanh(h + ctx) @ self.out  # (B, S, V)


def llada_reference(model, prompt, steps, gen_length, block_length, threshold=None):
    """LLaDA's generate (arXiv:2502.09992, App. B) / Fast-dLLM's threshold rule, greedy, batch 1,
    transcribed from the published loops; the [MASK] logit is banned as our sampler does."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], dim=1)
    P, nb = prompt.shape[1], gen_length // block_length
    for blk in range(nb):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        sched = None
        if threshold is None:
            m = block_length
            spb = steps // nb
            sched = [m // spb + (1 if i < m % spb else 0) for i in range(spb)]
        i = 0
        while (x[0, lo:hi] == MASK).any():
            logits = model(x)[0].clone()
            logits[:, MASK] = float("-inf")
            p = torch.softmax(logits.double(), -1)
            x0 = p.argmax(-1)
            conf = p.gather(-1, x0[:, None])[:, 0]
            conf[hi:] = float("-inf")
            conf = torch.where(x[0] == MASK, conf, torch.tensor(float("-inf"), dtype=conf.dtype))
            if threshold is None:
                sel = torch.topk(conf, sched[i]).indices
            else:
                order = torch.argsort(conf, descending=True)
                sel = [order[0]] + [j for j in order[1:] if conf[j] > threshold]
            for j in sel:
                x[0, j] = x0[j]
            i += 1
    return x[0]


def test_num_transfer_tokens_even_split_remainder_first():
    assert num_transfer_tokens(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    assert num_transfer_tokens(torch.tensor([10, 4, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert num_transfer_tokens(torch.tensor([7]), 7).tolist() == [[1] * 7]


def test_one_token_per_step_takes_most_confident_masked_position():
    out = generate(table_model(), torch.zeros(1, 2, dtype=torch.long), 8, 8, 8, mask_id=MASK)
    # confidences descending: pos5 .95, pos1 .90, pos7 .80, pos3 .70, pos6 .60, pos2 .55, pos4 .40, pos0 .30
    assert out.order[0].tolist() == [7, 1, 5, 3, 6, 0, 4, 2]
    assert out.answer[0].tolist() == TOKENS
    assert out.nfe == 8 and out.steps_taken.tolist() == [8]
    assert torch.allclose(out.token_logprobs[0], torch.log(torch.tensor(CONF)), atol=1e-5)


def test_uneven_schedule_unmasks_three_three_two():
    out = generate(table_model(), torch.zeros(1, 2, dtype=torch.long), 8, 3, 8, mask_id=MASK)
    # 8 masks over 3 steps → [3, 3, 2]: {5, 1, 7}, then {3, 6, 2}, then {4, 0}
    assert out.order[0].tolist() == [2, 0, 1, 1, 2, 0, 1, 0]


def test_blocks_are_decoded_left_to_right():
    prompt = torch.zeros(1, 2, dtype=torch.long)
    out = generate(table_model(), prompt, 8, 8, 4, mask_id=MASK)
    # block 0 (.30 .90 .55 .70) first, although position 5 (.95) is the most confident overall
    assert out.order[0].tolist() == [3, 0, 2, 1, 7, 4, 6, 5]
    out = generate(table_model(), prompt, 8, 4, 4, mask_id=MASK)
    assert out.order[0].tolist() == [1, 0, 1, 0, 3, 2, 3, 2]
    for seed in range(3):  # random remasking keeps the block order too
        out = generate(MixModel(), torch.randint(0, 3, (3, 4)), 12, 6, 4, mask_id=MASK, remasking="random",
                       generator=torch.Generator().manual_seed(seed))
        order = out.order.view(3, 3, 4)
        assert (order[:, :-1].amax(-1) < order[:, 1:].amin(-1)).all()
        assert ((out.order >= 0) & (out.order < 6)).all()


def test_threshold_unmasks_every_position_above_it_and_at_least_one():
    out = generate(table_model(), torch.zeros(1, 2, dtype=torch.long), 8, None, 8, mask_id=MASK, threshold=0.65)
    # step 0: .90 .70 .95 .80 exceed .65; then one per step, most confident first: .60 .55 .40 .30
    assert out.order[0].tolist() == [4, 0, 2, 0, 3, 0, 1, 0]
    assert out.nfe == 5 and out.answer[0].tolist() == TOKENS


@pytest.mark.parametrize("steps,block_length,threshold", [(12, 12, None), (12, 4, None), (6, 6, None),
                                                         (None, 4, 0.5), (None, 12, 0.3)])
def test_matches_llada_reference_on_context_dependent_model(steps, block_length, threshold):
    model = MixModel(seed=1)
    prompts = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompts, 12, steps, block_length, mask_id=MASK, threshold=threshold)
    for b in range(3):
        ref = llada_reference(model, prompts[b:b + 1], steps, 12, block_length, threshold)
        assert out.tokens[b].tolist() == ref.tolist()


def test_batched_threshold_rows_are_independent_and_leave_the_batch():
    model = MixModel(seed=3)
    prompts = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompts, 16, None, 8, mask_id=MASK, threshold=0.6)
    singles = [generate(model, prompts[b:b + 1], 16, None, 8, mask_id=MASK, threshold=0.6) for b in range(6)]
    assert torch.equal(out.tokens, torch.cat([s.tokens for s in singles]))
    assert torch.equal(out.order, torch.cat([s.order for s in singles]))
    steps = torch.tensor([s.nfe for s in singles])
    assert out.steps_taken.tolist() == steps.tolist() and out.nfe == steps.max()
    assert len(set(steps.tolist())) > 1  # rows finish at different times in this case
    # compaction: each row is fed only while it is unfinished
    assert out.forward_tokens == int(steps.sum()) * (4 + 16)


def test_forbidden_tokens_never_sampled_even_with_most_mass():
    rows = [torch.tensor([0.02, 0.02, 0.02, 0.02, 0.40, 0.52])] * 6  # pad .40, [MASK] .52
    model = TableModel([rows], prompt_len=1)
    prompt = torch.zeros(64, 1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    out = generate(model, prompt, 6, 6, 6, temperature=1.0, mask_id=MASK, forbidden_ids=[PAD], generator=gen)
    assert out.answer.max() <= 3
    # the four allowed ids are equally likely: log-prob log(1/4) each, renormalised without pad/[MASK]
    assert torch.allclose(out.token_logprobs, torch.full_like(out.token_logprobs, -math.log(4)), atol=1e-5)
    out = generate(model, prompt, 6, 6, 6, temperature=1.0, mask_id=MASK, generator=gen)
    assert (out.answer == PAD).float().mean() > 0.8 and (out.answer != MASK).all()  # [MASK] banned by default


def test_temperature_sampling_follows_softmax_and_generator():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])
    model = TableModel([[probs]], prompt_len=1)
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    for temp, expect in [(1.0, probs[:3]), (0.5, probs[:3] ** 2 / (probs[:3] ** 2).sum())]:
        out = generate(model, prompt, 1, 1, 1, temperature=temp, mask_id=MASK, generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(out.answer[:, 0], minlength=3)[:3].float() / 4000
        se = (expect * (1 - expect) / 4000).sqrt()
        assert ((freq - expect).abs() < 4 * se).all(), (freq, expect)
    a = generate(model, prompt[:50], 1, 1, 1, temperature=1.0, mask_id=MASK, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt[:50], 1, 1, 1, temperature=1.0, mask_id=MASK, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)


def test_eos_stops_a_row_early_and_pads_after_eos():
    low = [0.45, 0.40, 0.35, 0.30, 0.25, 0.20]
    # prompt id 0: eos at answer position 1 (conf .95) and position 0 next (.90); prompt id 1: no eos
    with_eos = [prob_row(0, 0.90), prob_row(EOS, 0.95)] + [prob_row(1, c) for c in low]
    without = [prob_row(2, c) for c in [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3]]
    model = TableModel([with_eos, without], prompt_len=2)
    prompts = torch.tensor([[0, 0], [1, 1]])
    out = generate(model, prompts, 8, 8, 8, mask_id=MASK, eos_id=EOS, pad_id=PAD)
    assert out.answer[0].tolist() == [0, EOS] + [PAD] * 6
    assert out.order[0].tolist() == [1, 0] + [-1] * 6
    assert (out.token_logprobs[0, 2:] == 0).all()
    assert out.steps_taken.tolist() == [2, 8] and out.nfe == 8
    assert out.forward_tokens == (2 * 2 + 6) * 10  # row 0 leaves the batch after its second step
    single = generate(model, prompts[:1], 8, 8, 8, mask_id=MASK, eos_id=EOS)
    assert single.nfe == 2 and single.answer[0].tolist() == [0, EOS] + [EOS] * 6  # pad defaults to eos
    assert generate(model, prompts[:1], 8, 8, 8, mask_id=MASK).nfe == 8


def test_cfg_combines_conditional_and_unconditional_logits():
    class CondModel(nn.Module):  # logits for the answer depend on whether the prompt is masked
        def forward(self, ids):
            cond = torch.tensor([2.0, 1.5, 0.0, 0.0, 0.0, 0.0])
            unc = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            rows = torch.where((ids[:, :1] == MASK)[..., None], unc, cond)  # (B, 1, V)
            return rows.expand(ids.shape[0], ids.shape[1], V)

    prompt = torch.zeros(1, 2, dtype=torch.long)
    assert generate(CondModel(), prompt, 1, 1, 1, mask_id=MASK).answer.item() == 0
    out = generate(CondModel(), prompt, 1, 1, 1, mask_id=MASK, cfg_scale=1.0)
    guided = torch.tensor([2.0, 3.0, 0.0, 0.0, 0.0])  # u + 2(c − u), [MASK] excluded
    assert out.answer.item() == 1 and out.nfe == 1 and out.forward_tokens == 2 * 3
    assert out.token_logprobs.item() == pytest.approx(torch.log_softmax(guided, 0)[1].item(), abs=1e-5)


def test_attention_mask_covers_prompt_and_answer():
    seen = []

    class Recorder(MixModel):
        def forward(self, input_ids, attention_mask=None):
            seen.append(attention_mask.clone())
            return super().forward(input_ids)

    am = torch.tensor([[0, 1, 1], [1, 1, 1]])
    generate(Recorder(), torch.tensor([[PAD, 1, 2], [0, 1, 2]]), 4, 2, 4, mask_id=MASK, attention_mask=am)
    assert len(seen) == 2
    assert seen[0].tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]


def test_mask_id_from_model_config():
    model = table_model()
    model.mask_id = MASK
    assert generate(model, torch.zeros(1, 2, dtype=torch.long), 8, 8, 8).answer[0].tolist() == TOKENS


def test_validation_errors():
    m, p = table_model(), torch.zeros(1, 2, dtype=torch.long)
    bad = [dict(gen_length=8, steps=8, block_length=3), dict(gen_length=8, steps=3, block_length=4),
           dict(gen_length=8, steps=16, block_length=8), dict(gen_length=8, steps=8, block_length=8, remasking="x"),
           dict(gen_length=8, steps=None, block_length=8, threshold=1.5),
           dict(gen_length=8, steps=8, block_length=8, cache="prefix"),
           dict(gen_length=8, steps=8, block_length=8, temperature=-1.0)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            generate(m, p, mask_id=MASK, **kwargs)
    with pytest.raises(ValueError, match="mask_id"):
        generate(m, p, 8, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        generate(m, p[0], 8, 8, 8, mask_id=MASK)


def _bidirectional_llama(layers):
    return bidirectional_llama(layers, vocab_size=V)


def test_prefix_cache_is_exact_for_one_layer_and_saves_positions():
    prompts = torch.randint(0, 5, (3, 5), generator=torch.Generator().manual_seed(0))
    model = _bidirectional_llama(1)  # layer-1 keys/values of the prefix depend on its tokens only
    for kwargs in [dict(steps=8, block_length=4), dict(steps=None, block_length=4, threshold=0.3)]:
        full = generate(model, prompts, 8, mask_id=MASK, **kwargs)
        cached = generate(model, prompts, 8, mask_id=MASK, cache="prefix", **kwargs)
        assert torch.equal(full.tokens, cached.tokens)
        assert torch.allclose(full.token_logprobs, cached.token_logprobs, atol=1e-5)
        assert cached.forward_tokens < full.forward_tokens
    # two layers: the prefix's second-layer states go stale inside a block, an approximation
    model = _bidirectional_llama(2)
    full = generate(model, prompts, 8, 8, 4, mask_id=MASK)
    cached = generate(model, prompts, 8, 8, 4, mask_id=MASK, cache="prefix")
    assert cached.nfe == full.nfe and not torch.allclose(full.token_logprobs, cached.token_logprobs, atol=1e-5)
    # per block: one full pass (3 rows × 13) then 3 passes over block + suffix (3 × (8, 4) positions)
    assert cached.forward_tokens == 2 * 3 * 13 + 3 * 3 * 8 + 3 * 3 * 4
