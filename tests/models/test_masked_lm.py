"""MaskedDiffusionLM: save/load round trip, bidirectionality, HF adapter, vocabulary checks."""
import json

import pytest
import torch

import rlgen  # noqa: F401  (first: makes torchvision importable before transformers' model classes)
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from rlgen.data.tokenizer import build_tokenizer
from rlgen.models import ModelLoadError, load_model
from rlgen.models.masked_lm import MaskedDiffusionLM

# One thread: on a shared 2-core machine a second OpenMP thread waits ~30 ms per op for a core.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _tiny(tok, seed=0):
    torch.manual_seed(seed)
    return MaskedDiffusionLM.tiny(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                  max_length=16).eval()


def test_save_load_round_trip_identical_logits(tok, tmp_path):
    model = _tiny(tok)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "rlgen_model.json").read_text())
    assert meta["model_type"] == "masked_lm" and meta["mask_id"] == tok.mask_token_id
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    again = load_model(tmp_path)  # through the registry, as evaluate/RL do
    assert isinstance(again, MaskedDiffusionLM)
    assert (again.mask_id, again.pad_id, again.eos_id) == (model.mask_id, model.pad_id, model.eos_id)
    x = torch.randint(3, len(tok), (3, 12))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert model(x).shape == (3, 12, len(tok))


def test_bidirectional_later_token_changes_earlier_logits(tok):
    model = _tiny(tok)
    x = torch.randint(3, len(tok), (1, 10))
    y = x.clone()
    y[0, 8] = tok.mask_token_id if x[0, 8] != tok.mask_token_id else 5
    with torch.no_grad():
        a, b = model(x), model(y)
    assert not torch.allclose(a[0, 0], b[0, 0])  # position 0 sees position 8: no causal mask
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_too_long_input_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 16"):
        _tiny(tok)(torch.zeros(1, 17, dtype=torch.long))


def test_from_hf_local_folder(tok, tmp_path):
    # A plain HF masked LM folder (no rlgen_model.json), as a pretrained LLaDA/Dream folder would be.
    net = BertForMaskedLM(BertConfig(vocab_size=len(tok) + 7, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=16))
    net.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = MaskedDiffusionLM.from_hf(tmp_path)  # a padded vocabulary (model > tokenizer) is fine
    assert model.mask_id == tok.mask_token_id and model.vocab_size == len(tok) + 7
    assert MaskedDiffusionLM.from_hf(tmp_path, mask_id=5).mask_id == 5
    x = torch.randint(3, len(tok), (2, 6))
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(input_ids=x).logits)


def test_vocab_mismatch_is_an_error(tok, tmp_path):
    net = BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16))
    net.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer has 57 tokens but the model's output layer only 10"):
        MaskedDiffusionLM.from_hf(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        MaskedDiffusionLM.from_hf(tmp_path / "missing")
