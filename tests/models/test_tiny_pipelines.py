"""The tiny pipelines are real diffusers/transformers layouts with real tokenizers, built deterministically."""
import hashlib
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clip_tokenizer_matches_open_clip(tiny_pipelines):
    from transformers import CLIPTokenizer

    from rewards.clip_score import open_clip_module

    oc = open_clip_module()
    ref = oc.get_tokenizer("ViT-B-32")  # OpenAI's BPE, as shipped in open_clip
    tok = CLIPTokenizer.from_pretrained(str(tiny_pipelines["sd3"] / "tokenizer"))
    for text in ["a photo of a cat", "A RED square, left of 3 blue circles!", "héllo wörld 2024"]:
        ids = tok(text).input_ids
        want = [int(i) for i in ref([text])[0] if i != 0]
        assert ids == want, text
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_t5_tokenizer_is_a_unigram_with_eos(tiny_pipelines):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(tiny_pipelines["sd3"] / "tokenizer_3"))
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    spec = json.loads((tiny_pipelines["sd3"] / "tokenizer_3" / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "Unigram"


def test_layout_and_classes(tiny_pipelines):
    index = json.loads((tiny_pipelines["sd3"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    flux = json.loads((tiny_pipelines["flux"] / "model_index.json").read_text())
    assert flux["_class_name"] == "FluxPipeline"
    cfg = json.loads((tiny_pipelines["flux"] / "transformer" / "config.json").read_text())
    assert cfg["guidance_embeds"] is True and cfg["in_channels"] == 64
    vae = json.loads((tiny_pipelines["sd3"] / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # factor 8, as SD3's VAE


def test_build_is_deterministic(tiny_pipelines, tmp_path):
    from rlgen.testing.tiny_pipelines import build_tiny_sd3

    again = build_tiny_sd3(tmp_path / "sd3")

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(again) == digest(tiny_pipelines["sd3"])
    other = build_tiny_sd3(tmp_path / "sd3_seed1", seed=1)
    assert digest(other)["transformer/diffusion_pytorch_model.safetensors"] != \
        digest(again)["transformer/diffusion_pytorch_model.safetensors"]
