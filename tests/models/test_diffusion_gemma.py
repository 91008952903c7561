"""DiffusionGemma (transformers' native block-diffusion encoder-decoder) as an evaluation target / teacher."""
import pytest
import torch

import rlgen  # noqa: F401

from rlgen.models import ModelLoadError, load_model
from rlgen.models.diffusion_gemma import RL_NOTE, DiffusionGemmaLM
from rlgen.testing.tiny_lms import build_tiny_diffusion_gemma

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "m", canvas_length=8)


def test_loads_through_load_model_and_samples_with_its_own_generate(folder):
    model = load_model(folder)
    assert isinstance(model, DiffusionGemmaLM) and model.canvas_length == 8 and model.tokenizer is not None
    prompts = torch.randint(5, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    seq = model.generate(prompts, 12, seed=3, max_denoising_steps=4)
    assert seq.shape == (2, 5 + 16)  # whole canvases
    torch.manual_seed(3)  # the reference: transformers' generate itself, same seed
    ref = model.net.generate(prompts, max_new_tokens=12, max_denoising_steps=4).sequences
    assert torch.equal(seq, ref)
    assert torch.equal(model.generate(prompts, 12, seed=3, max_denoising_steps=4), seq)  # seeded locally


def test_token_logprobs_are_the_denoisers_canvas_scores(folder):
    model = load_model(folder)
    prompts = torch.randint(5, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    answer = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp = model.token_logprobs(prompts, answer)
        # canvas 2 (positions 8..11, padded to 8) read after the clean prompt + canvas 1
        canvas = torch.cat([answer[:, 8:], torch.full((2, 4), model.pad_id)], dim=1)
        logits = model.net(input_ids=torch.cat([prompts, answer[:, :8]], 1), decoder_input_ids=canvas).logits
    expect = torch.log_softmax(logits.float(), -1).gather(-1, canvas[..., None])[..., 0][:, :4]
    assert lp.shape == (2, 12) and (lp <= 0).all()
    assert torch.allclose(lp[:, 8:], expect, atol=1e-5)


def test_options_that_do_not_apply_are_refused_and_note_exists(folder, tmp_path):
    with pytest.raises(ModelLoadError, match="do not apply to a DiffusionGemma model"):
        load_model(folder, shift_logits=True)
    model = load_model(folder)
    model.save_pretrained(tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt")
    x = torch.randint(5, 300, (1, 5))
    c = torch.randint(5, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(again.canvas_logits(x, c), model.canvas_logits(x, c))
    assert "log softmax(logits_t / T_t)" in RL_NOTE
