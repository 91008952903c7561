"""FlowPolicy (UNet and SD3 backbones) and its prompt encoder, checked against independent facts:
separate forward passes, a reloaded copy, padding invariance, a diffusers model saved by hand."""
import json

import pytest
import torch

from rlgen.models import ModelLoadError, load_model
from rlgen.models.flow import FlowModelConfig, FlowPolicy, SD3BackboneConfig
from rlgen.models.prompt_encoder import CLS, PAD, UNK, PromptEmbeds, words_of

PROMPTS = ["a red circle", "two blue squares", "a green triangle to the left of a red square"]
VOCAB = words_of(PROMPTS)


def tiny_config(**kw) -> FlowModelConfig:
    base = dict(image_size=16, unshuffle=2, block_out_channels=[16, 32], cross_attention=[False, True],
                norm_num_groups=8, attention_heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32,
                max_prompt_tokens=12, vocab=VOCAB)
    base.update(kw)
    return FlowModelConfig(**base)


def tiny_sd3_config(**kw) -> FlowModelConfig:
    return tiny_config(backbone="sd3", sd3=SD3BackboneConfig(num_layers=1, patch_size=2, attention_head_dim=8,
                                                             num_attention_heads=2), **kw)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return FlowPolicy.build(tiny_config()).eval()


def _inputs(n=3, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.rand(n, generator=g)


# ------------------------------------------------------------------------------- prompt encoder
def test_tokenizer_word_level_with_cls_unk_and_empty_prompt(policy):
    tok = policy.tokenizer
    ids = tok(["A Red circle", "a purple circle", ""], padding="longest", return_tensors="pt")
    cls_id, unk_id, pad_id = tok.convert_tokens_to_ids([CLS, UNK, PAD])
    red, circle = tok.convert_tokens_to_ids(["red", "circle"])
    assert ids["input_ids"][0].tolist() == [cls_id, tok.convert_tokens_to_ids("a"), red, circle]
    assert ids["input_ids"][1, 2].item() == unk_id  # "purple" is not in the vocabulary
    # the unconditional prompt is the lone [CLS], padded
    assert ids["input_ids"][2].tolist() == [cls_id, pad_id, pad_id, pad_id]
    assert ids["attention_mask"][2].tolist() == [1, 0, 0, 0]


def test_prompt_embeddings_do_not_depend_on_padding(policy):
    with torch.no_grad():
        alone = policy.encode_prompts(["a red circle"])
        padded = policy.encode_prompts(["a red circle", PROMPTS[2]])
    n = alone.tokens.shape[1]
    assert padded.tokens.shape[1] > n and padded.mask[0, n:].sum() == 0
    torch.testing.assert_close(padded.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)


def test_prompt_embeds_cat_pads_shorter_batches(policy):
    a, b = policy.encode_prompts(["a red circle"]), policy.encode_prompts([PROMPTS[2]])
    both = PromptEmbeds.cat([a, b])
    assert both.tokens.shape == (2, b.tokens.shape[1], 16)
    assert both.mask[0].sum() == a.mask.sum() and both[1].pooled.equal(b.pooled)


# ------------------------------------------------------------------------------- velocity, CFG
def test_forward_shape_and_prompt_dependence(policy):
    x, sigma = _inputs()
    with torch.no_grad():
        v1 = policy(x, sigma, policy.encode_prompts(PROMPTS))
        v2 = policy(x, sigma, policy.encode_prompts([""] * 3))
    assert v1.shape == x.shape
    assert not torch.allclose(v1, v2, atol=1e-4)  # the prompt reaches the output


def test_cfg_scale_one_is_the_conditional_velocity(policy):
    x, sigma = _inputs()
    with torch.no_grad():
        v = policy.velocity_fn(PROMPTS, cfg_scale=1.0)(x, sigma)
        v_c = policy(x, sigma, policy.encode_prompts(PROMPTS))
    torch.testing.assert_close(v, v_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("w", [0.0, 4.0])
def test_cfg_combination_matches_two_separate_forward_passes(policy, w):
    x, sigma = _inputs()
    with torch.no_grad():
        v = policy.velocity_fn(PROMPTS, cfg_scale=w)(x, sigma)  # one batched forward of 2B rows
        v_c = policy(x, sigma, policy.encode_prompts(PROMPTS))
        v_u = policy(x, sigma, policy.encode_prompts([""] * 3))
    torch.testing.assert_close(v, v_u + w * (v_c - v_u), atol=1e-5, rtol=1e-5)


def test_generate_shapes_range_and_seeding(policy):
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = policy.generate(PROMPTS, num_steps=3, cfg_scale=2.0, generator=gen(0), batch_size=2)
    b = policy.generate(PROMPTS, num_steps=3, cfg_scale=2.0, generator=gen(0))
    sde = policy.generate(PROMPTS, num_steps=3, noise_level=0.7, generator=gen(0))
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # batching does not change the images
    assert not torch.allclose(a, sde)


# ------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_gives_identical_outputs(policy, tmp_path):
    policy.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "rlgen_model.json").read_text())
    assert meta["model_type"] == "flow_policy" and meta["config"]["vocab"] == VOCAB
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "m" / "text_encoder" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, FlowPolicy) and loaded is not policy
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.velocity_fn(PROMPTS, 3.0)(x, sigma), policy.velocity_fn(PROMPTS, 3.0)(x, sigma))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(loaded.generate(PROMPTS, num_steps=2, generator=g()), policy.generate(PROMPTS, num_steps=2, generator=g()))


def test_missing_folder_is_a_clear_error(tmp_path):
    for load in (FlowPolicy.from_pretrained, load_model):
        with pytest.raises(ModelLoadError, match=str(tmp_path / "nope")):
            load(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["weights", "subfolder", "meta"])
def test_corrupt_folder_is_a_model_load_error_naming_the_path(policy, tmp_path, damage):
    d = tmp_path / "m"
    policy.save_pretrained(d)
    if damage == "weights":
        (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
        where = str(d / "unet")
    elif damage == "subfolder":
        import shutil

        shutil.rmtree(d / "text_encoder")
        where = "text_encoder"
    else:
        (d / "rlgen_model.json").write_text("{ truncated")
        where = str(d / "rlgen_model.json")
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert str(d) in str(e.value) and where in str(e.value)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="cross_attention"):
        tiny_config(cross_attention=[True])
    with pytest.raises(ValueError, match="backbone"):
        tiny_config(backbone="dit9000")


# ------------------------------------------------------------------------------- SD3 adapter
def test_sd3_backbone_forward_and_one_training_step():
    from rlgen.pretrain.flow_matching import flow_matching_loss

    torch.manual_seed(0)
    pol = FlowPolicy.build(tiny_sd3_config())
    assert type(pol.backbone.transformer).__name__ == "SD3Transformer2DModel"
    x, sigma = _inputs(n=4)
    emb = pol.encode_prompts(PROMPTS + [""])
    v = pol(x, sigma, emb)
    assert v.shape == x.shape
    noise = torch.randn_like(x)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    before = {k: p.detach().clone() for k, p in pol.named_parameters()}
    loss = flow_matching_loss(pol, x, noise, sigma, emb)
    loss.backward()
    grads = [p.grad for p in pol.backbone.transformer.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    changed = sum(not torch.equal(before[k], p) for k, p in pol.named_parameters())
    assert changed > len(before) // 2


def test_sd3_pretrained_backbone_with_projections_round_trips(tmp_path):
    from diffusers import SD3Transformer2DModel

    # A "pretrained" diffusers folder whose text widths (24, 20) differ from our encoder's (16).
    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=3, out_channels=3, num_layers=1,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                          caption_projection_dim=16, pooled_projection_dim=20,
                          pos_embed_max_size=8).save_pretrained(tmp_path / "transformer")
    pol = FlowPolicy.build(tiny_sd3_config(pretrained_backbone=str(tmp_path / "transformer")))
    assert isinstance(pol.backbone.context_proj, torch.nn.Linear)
    pol.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "transformer" / "adapter.safetensors").is_file()
    loaded = FlowPolicy.from_pretrained(tmp_path / "m")
    x, sigma = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.velocity_fn(PROMPTS, 2.0)(x, sigma), pol.velocity_fn(PROMPTS, 2.0)(x, sigma))


def test_bf16_policy_samples_from_fp32_noise():
    torch.manual_seed(0)
    pol = FlowPolicy.build(tiny_config()).to(torch.bfloat16)
    x, sigma = _inputs(n=2)
    assert pol(x, sigma, pol.encode_prompts(PROMPTS[:2])).dtype == torch.float32  # v in x's dtype
    img = pol.generate(PROMPTS[:2], num_steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
