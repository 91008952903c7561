"""MaskedDiffusionLM prefix key/value cache: exact mechanics, exact for one layer, approximate beyond."""
import pytest
import torch

import rlgen  # noqa: F401  (first: makes torchvision importable before transformers' model classes)

from rlgen.data.tokenizer import build_tokenizer
from rlgen.models.masked_lm import CachedLMOutput
from tests_helpers import tiny_bert_mdm
from rlgen.samplers.masked import generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _tiny(tok, layers=2, seed=0):
    return tiny_bert_mdm(tok, layers, seed)


@torch.no_grad()
def test_cached_suffix_equals_full_forward_when_prefix_state_is_current(tok):
    model = _tiny(tok)
    x = torch.randint(3, len(tok), (2, 14))
    full = model(x)  # (2, 14, V)
    out = model(x, use_cache=True)
    assert isinstance(out, CachedLMOutput) and torch.allclose(out.logits, full, atol=1e-5)
    cache = out.past_key_values
    assert cache.get_seq_length() == 14
    cache.crop(-5)  # keep the first 9 positions
    again = model(x[:, 9:], past_key_values=cache)  # positions 9..13 continue the position ids
    assert torch.allclose(again.logits, full[:, 9:], atol=1e-5)
    assert cache.get_seq_length() == 14  # extended in place


@torch.no_grad()
def test_stale_prefix_is_approximate_beyond_one_layer(tok):
    x = torch.randint(3, len(tok), (1, 12))
    y = x.clone()
    y[0, 10] = tok.mask_token_id  # a later token changes after the prefix was cached
    for layers, exact in [(1, True), (2, False)]:
        model = _tiny(tok, layers)
        cache = model(x, use_cache=True).past_key_values
        cache.crop(-4)  # prefix = first 8 positions, computed while position 10 held x's token
        stale = model(y[:, 8:], past_key_values=cache).logits
        assert torch.allclose(stale, model(y)[:, 8:], atol=1e-5) == exact


@torch.no_grad()
def test_generate_prefix_cache_one_layer_exact_and_feeds_fewer_positions(tok):
    prompts = torch.randint(3, len(tok), (3, 6), generator=torch.Generator().manual_seed(1))
    model = _tiny(tok, layers=1)
    for kw in [dict(steps=8, block_length=4), dict(steps=None, block_length=4, threshold=0.9)]:
        full = generate(model, prompts, 8, mask_id=model.mask_id, **kw)
        cached = generate(model, prompts, 8, mask_id=model.mask_id, cache="prefix", **kw)
        assert torch.equal(full.tokens, cached.tokens)
        assert torch.allclose(full.token_logprobs, cached.token_logprobs, atol=1e-5)
        assert cached.forward_tokens < full.forward_tokens
    deep = _tiny(tok, layers=2)  # runs; tokens may differ (stale prefix states)
    out = generate(deep, prompts, 8, 8, 4, mask_id=deep.mask_id, cache="prefix")
    assert not (out.answer == deep.mask_id).any()


def test_padded_inputs_and_overlong_cache_are_errors(tok):
    model = _tiny(tok)
    x = torch.randint(3, len(tok), (1, 10))
    am = torch.ones_like(x)
    am[0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        model(x, attention_mask=am, use_cache=True)
    cache = model(x, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randint(3, len(tok), (1, 15)), past_key_values=cache)
