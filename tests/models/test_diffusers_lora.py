"""LoRA on DiffusersFlowPolicy: plain diffusers loads rlgen's adapter; checkpoints reload on their own."""
import json
import shutil
import warnings

import pytest
import torch

from rlgen.models import ModelLoadError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a cat", "two dogs on a sofa"]


def _randomize_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B = 0 (adapter = identity); make it act
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _velocity(transformer_owner_fn, x, s):
    with torch.no_grad():
        return transformer_owner_fn(x, s)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_plain_diffusers_loads_the_adapter(tiny_pipelines, tmp_path, name):
    from diffusers import DiffusionPipeline

    opts = {"resolution": 64} if name == "flux" else {}
    policy = load_model(tiny_pipelines[name], **opts)
    policy.add_lora()  # Flow-GRPO defaults: r 32, α 64, the attention projections
    targets = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.transformer.named_parameters() if ".lora_A" in n}
    assert targets and all(t.split(".", 2)[-1].startswith("attn.") for t in targets)
    _randomize_lora(policy)
    ckpt = policy.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((ckpt / "rlgen_model.json").read_text())
    assert meta["weights"] == "lora" and meta["lora"]["rank"] == 32 and meta["lora"]["alpha"] == 64
    assert not (ckpt / "transformer").exists()  # the frozen base is pointed at, never copied

    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipelines[name]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    size = {"height": 64, "width": 64} if name == "flux" else {}
    base = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="latent", **size).images
    pipe.load_lora_weights(str(ckpt))
    tuned = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 output_type="latent", **size).images
    ours = policy.generate(PROMPTS, num_steps=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
                           output_type="latent")
    assert (tuned - base).abs().max() > 1e-3                 # the adapter changes the pipeline …
    assert (ours - tuned).abs().max().item() <= 1e-4         # … into exactly the post-trained policy
    with policy.reference():                                  # reference = adapters disabled = the base
        ref = policy.generate(PROMPTS, num_steps=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
                              output_type="latent")
    assert (ref - base).abs().max().item() <= 1e-4


def test_lora_checkpoint_reloads_trainable(tiny_pipelines, tmp_path):
    policy = load_model(tiny_pipelines["sd3"])
    policy.add_lora(rank=4, alpha=8, target_modules=["attn.to_q", "attn.to_v"])
    _randomize_lora(policy, 1)
    ckpt = policy.save_pretrained(tmp_path / "c")
    again = load_model(ckpt)  # on its own: base pointer + adapter
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = policy.velocity_fn(PROMPTS, 2.0)(x, 0.7), again.velocity_fn(PROMPTS, 2.0)(x, 0.7)
    assert torch.allclose(a, b, atol=1e-5)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = again.transformer.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8 and set(cfg.target_modules) == {"attn.to_q", "attn.to_v"}
    assert again.base == str(tiny_pipelines["sd3"].resolve())


def test_full_finetune_checkpoint(tiny_pipelines, tmp_path):
    policy = load_model(tiny_pipelines["flux"], resolution=64)
    with torch.no_grad():
        policy.transformer.proj_out.weight.add_(0.1)
    ckpt = policy.save_pretrained(tmp_path / "full")
    assert json.loads((ckpt / "rlgen_model.json").read_text())["weights"] == "full"
    again = load_model(ckpt)
    assert again.sample_shape == (16, 8, 8)  # resolution remembered in the checkpoint's options
    assert torch.equal(again.transformer.proj_out.weight, policy.transformer.proj_out.weight)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the path and what was expected
# ---------------------------------------------------------------------------------------------
def test_folder_that_is_no_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "model_index.json" in msg and "rlgen_model.json" in msg


def test_unsupported_pipeline_class(tiny_pipelines, tmp_path):
    d = tmp_path / "sdxl"
    shutil.copytree(tiny_pipelines["sd3"], d)
    index = json.loads((d / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"'StableDiffusionXLPipeline' is not supported; supported: "
                                             r"FluxPipeline, StableDiffusion3Pipeline"):
        load_model(d)


def test_channel_and_resolution_mismatch(tiny_pipelines):
    from diffusers import AutoencoderKL

    from rlgen.models.pipelines.sd3 import SD3Adapter

    policy = load_model(tiny_pipelines["sd3"])
    pipe = policy.pipeline
    vae = pipe.vae
    pipe.vae = AutoencoderKL(latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    try:
        with pytest.raises(ModelLoadError, match="transformer takes 16 latent channels but the VAE gives 4"):
            SD3Adapter(pipe, where="x")
    finally:
        pipe.vae = vae
    with pytest.raises(ModelLoadError, match="resolution 72 is not a multiple of 16"):
        load_model(tiny_pipelines["sd3"], resolution=72)
    with pytest.raises(ModelLoadError, match="resolution 512 needs 32 patch positions per side but the "
                                             "transformer's pos_embed_max_size is 16"):
        load_model(tiny_pipelines["sd3"], resolution=512)


def test_hub_id_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as e:
        load_model("stabilityai/stable-diffusion-3.5-medium")
    msg = str(e.value)
    assert "\n" not in msg and "stabilityai/stable-diffusion-3.5-medium" in msg and "not in the local cache" in msg


def test_long_prompts_warn_once(tiny_pipelines, monkeypatch):
    import rlgen.models.diffusers_flow as df

    monkeypatch.setattr(df, "_TRUNCATION_WARNED", False)
    policy = load_model(tiny_pipelines["sd3"])
    long = " ".join(["a very large red square"] * 30)  # > 77 CLIP tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.encode_prompts([long, long + " again"])
        policy.encode_prompts([long + " and more"])
    hits = [w for w in caught if "truncated" in str(w.message)]
    assert len(hits) == 1 and "77 tokens" in str(hits[0].message)
