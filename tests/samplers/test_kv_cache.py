"""Fast-dLLM prefix and dual key/value caches (rlgen/samplers/kv_cache.py).

References are the models' own full forward passes (no cache) and uncached decoding: the dual cache
must give exactly those for a one-layer model, on three layouts (rlgen's BERT masked LM, a
bidirectional transformers Llama called directly, LLaDA's layout through its remote code), and
differ for deeper models only where stale cached states say it should.
"""
import pytest
import torch

import rlgen  # noqa: F401  (first: makes torchvision importable before transformers' model classes)

from rlgen.data.tokenizer import build_tokenizer
from rlgen.models import load_model
from tests_helpers import bidirectional_llama, tiny_bert_mdm, visible_weights
from rlgen.samplers.kv_cache import cut_span
from rlgen.samplers.masked import generate
from rlgen.testing.tiny_lms import build_tiny_llada, build_tiny_llada2

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = (None, "prefix", "dual")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _bert(tok, layers):
    return tiny_bert_mdm(tok, layers)


def _llama(layers):
    return visible_weights(bidirectional_llama(layers, vocab_size=40))


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv_llada")
    return {n: load_model(build_tiny_llada(root / f"l{n}", num_layers=n, hidden_size=32, init_std=0.3),
                          trust_remote_code=True) for n in (1, 2)}


def _decode_all(model, prompts, mask_id, **kw):
    return {c: generate(model, prompts, 12, mask_id=mask_id, cache=c, **kw) for c in MODES}


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bert", "llama", "llada"])
def test_one_layer_dual_cache_equals_no_cache(kind, tok, llada):
    """Layer-1 keys/values depend on a position's own token only: prefix tokens are final and the
    suffix stays [MASK] during a block, so the dual cache is exact, with far fewer positions fed."""
    model = {"bert": lambda: _bert(tok, 1), "llama": lambda: _llama(1), "llada": lambda: llada[1]}[kind]()
    mask_id = getattr(model, "mask_id", 39)
    prompts = torch.randint(5, 30, (3, 6), generator=torch.Generator().manual_seed(1))
    for kw in [dict(steps=12, block_length=4), dict(steps=None, block_length=4, threshold=0.5)]:
        res = _decode_all(model, prompts, mask_id, **kw)
        full, dual = res[None], res["dual"]
        assert torch.equal(full.tokens, dual.tokens) and torch.equal(full.order, dual.order)
        assert torch.allclose(full.token_logprobs, dual.token_logprobs, atol=1e-5)
        assert dual.forward_tokens < res["prefix"].forward_tokens < full.forward_tokens
    # fixed schedule, 3 blocks of 4 steps: each block = one refresh over 3 × 18 positions + 3 steps × 3 × 4
    assert generate(model, prompts, 12, 12, 4, mask_id=mask_id, cache="dual").forward_tokens == 3 * (54 + 36)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bert", "llama", "llada"])
def test_dual_forward_positions_and_staleness(kind, tok, llada):
    """A refreshed dual cache (block cut out, suffix after it) gives the full forward's block logits
    at any depth, so the fed block's positions are right; once a block token changes, a deeper model's
    cached suffix is stale (≠ full forward, and ≠ the prefix cache, which recomputes the suffix)."""
    def call(m, x, **kw):
        out = m(x, **kw)
        return out.logits if hasattr(out, "logits") else out

    for layers, exact in [(1, True), (2, False)]:
        model = {"bert": lambda: _bert(tok, layers), "llama": lambda: _llama(layers),
                 "llada": lambda: llada[layers]}[kind]()
        x = torch.randint(5, 30, (2, 14), generator=torch.Generator().manual_seed(2))
        s, e = 6, 10  # the block; 10..13 is the suffix
        pos = torch.arange(s, e)[None].expand(2, -1)
        cache = model(x, use_cache=True).past_key_values
        cut_span(cache, s, e)
        assert cache.get_seq_length() == 10
        fresh = call(model, x[:, s:e], past_key_values=cache, use_cache=True, position_ids=pos)
        assert torch.allclose(fresh, call(model, x)[:, s:e], atol=1e-4)
        shifted = model(x, use_cache=True).past_key_values  # wrong positions must show
        cut_span(shifted, s, e)
        wrong = call(model, x[:, s:e], past_key_values=shifted, use_cache=True)  # positions 10..13
        assert not torch.allclose(wrong, fresh, atol=1e-4)

        y = x.clone()
        y[:, 7] = 3  # a block token changes after the refresh
        cache = model(x, use_cache=True).past_key_values
        cut_span(cache, s, e)
        dual = call(model, y[:, s:e], past_key_values=cache, use_cache=True, position_ids=pos)
        prefix_cache = model(x, use_cache=True).past_key_values
        prefix_cache.crop(-(14 - s))
        prefix = call(model, y[:, s:], past_key_values=prefix_cache, use_cache=True)[:, : e - s]
        assert torch.allclose(dual, call(model, y)[:, s:e], atol=1e-4) == exact
        assert torch.allclose(dual, prefix, atol=1e-4) == exact


@torch.no_grad()
def test_deeper_model_differs_only_where_expected(tok):
    """Two layers: the first step of a decode is a full forward in every mode (same commits and
    log-probs); with one block there is no suffix, so dual = prefix exactly; with several blocks the
    dual cache is an approximation (log-probs move)."""
    model = _bert(tok, 2)
    prompts = torch.randint(5, 30, (3, 6), generator=torch.Generator().manual_seed(3))
    res = _decode_all(model, prompts, model.mask_id, steps=12, block_length=4)
    first = res[None].order == 0
    for c in ("prefix", "dual"):
        assert torch.equal(res[c].order == 0, first)
        assert torch.equal(res[c].tokens[:, 6:][first], res[None].tokens[:, 6:][first])
        assert torch.allclose(res[c].token_logprobs[first], res[None].token_logprobs[first], atol=1e-6)
    assert not torch.allclose(res["dual"].token_logprobs, res[None].token_logprobs, atol=1e-4)
    assert not torch.allclose(res["dual"].token_logprobs, res["prefix"].token_logprobs, atol=1e-4)
    one = {c: generate(model, prompts, 12, 12, 12, mask_id=model.mask_id, cache=c) for c in ("prefix", "dual")}
    assert torch.equal(one["prefix"].tokens, one["dual"].tokens)
    assert torch.allclose(one["prefix"].token_logprobs, one["dual"].token_logprobs, atol=1e-5)
    assert one["prefix"].forward_tokens == one["dual"].forward_tokens


def test_unsupported_combinations_are_refused(tok, tmp_path):
    bert, prompts = _bert(tok, 1), torch.randint(5, 30, (2, 6))

    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 40)

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return torch.zeros(*input_ids.shape, 40)

    cases = [(NoCache(), {}, "past_key_values"), (NoPositions(), {}, "position_ids"),
             (bert, {"cfg_scale": 1.0}, "cfg_scale"),
             (bert, {"attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])}, "padded")]
    for model, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            generate(model, prompts, 8, 8, 4, mask_id=39, cache="dual", **kw)
    assert generate(NoPositions(), prompts, 8, 8, 4, mask_id=39, cache="none").answer.shape == (2, 8)
    block_causal = load_model(build_tiny_llada2(tmp_path / "l2", block_size=4), trust_remote_code=True)
    with pytest.raises(ValueError, match="block-causal"):
        generate(block_causal, prompts, 8, 8, 4, cache="dual")
    with pytest.raises(ValueError, match="position_ids"):
        block_causal(prompts, position_ids=torch.arange(6)[None])
