"""DiffusersFlowPolicy against the diffusers pipelines themselves (tiny SD3 and FLUX, real layouts)."""
import math

import pytest
import torch

from rlgen.models import ModelLoadError, load_model
from rlgen.samplers.flow import sde_step

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red square left of a blue circle"]
SIZE = {"sd3": {}, "flux": {"height": 64, "width": 64}}   # FLUX's pipeline default is 1024 px
OPTS = {"sd3": {}, "flux": {"resolution": 64}}


def _pipe(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loaded(tiny_pipelines):
    return {k: (load_model(tiny_pipelines[k], **OPTS[k]), _pipe(tiny_pipelines[k])) for k in ("sd3", "flux")}


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_generate_equals_the_pipeline(loaded, name, cfg):
    policy, pipe = loaded[name]
    ours = policy.generate(PROMPTS, num_steps=3, cfg_scale=cfg, generator=torch.Generator().manual_seed(7),
                           output_type="latent", noise_level=0)
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=cfg, generator=torch.Generator().manual_seed(7),
               output_type="latent", **SIZE[name]).images
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    # the scheduler's grid after the pipeline ran is the policy's σ grid (shift 3.0 / FLUX's dynamic μ)
    assert torch.equal(policy.sigmas(3), pipe.scheduler.sigmas.float())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_decoded_images_equal_the_pipeline(loaded, name):
    policy, pipe = loaded[name]
    ours = policy.generate(PROMPTS[:1], num_steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
               output_type="pt", **SIZE[name]).images  # [0, 1]
    assert ours.shape == (1, 3, 64, 64) and ours.min() >= -1 and ours.max() <= 1
    assert ((ours + 1) / 2 - ref).abs().max().item() <= 1e-4


def test_sde_log_prob_is_flow_grpo_in_latent_space(loaded):
    """One SDE step through rlgen vs Flow-GRPO's step written out here from the paper (Eq. 9) on the
    pipeline's own transformer output (CFG 4.5, pipeline-order batch of [uncond, cond])."""
    policy, pipe = loaded["sd3"]
    sig = policy.sigmas(4)
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    i, eta, w = 1, 0.7, 4.5
    pe, ne, pp, npool = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=(sig[i] * 1000).expand(4),
                               encoder_hidden_states=torch.cat([ne, pe]), pooled_projections=torch.cat([npool, pp]),
                               return_dict=False)[0]
        vu, vc = out.chunk(2)
        v = vu + w * (vc - vu)
        step = sde_step(x, policy.velocity_fn(PROMPTS, w)(x, sig[i].expand(2)), sig[i].item(), sig[i + 1].item(),
                        eta, generator=torch.Generator().manual_seed(3))
    s, sn = sig[i].double(), sig[i + 1].double()
    dt = sn - s
    std_t = eta * torch.sqrt(s / (1 - s))
    mean = x.double() * (1 + std_t ** 2 / (2 * s) * dt) + v.double() * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    lp = (-((step.prev_sample.double() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
          - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    assert torch.allclose(step.log_prob.double(), lp, rtol=1e-5, atol=1e-2)
    assert torch.allclose(step.mean.double(), mean, atol=1e-5)


def test_prompt_cache_and_embeddings(loaded):
    policy, pipe = loaded["sd3"]
    policy._cache.clear()
    m0 = policy.cache_misses
    emb = policy.encode_prompts(PROMPTS + PROMPTS[:1])
    emb2 = policy.encode_prompts(PROMPTS)
    assert policy.cache_misses - m0 == 2  # each distinct prompt encoded once
    pe, _, pp, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert torch.allclose(emb.tokens[:2], pe, atol=1e-5) and torch.allclose(emb.pooled[:2], pp, atol=1e-5)
    assert torch.equal(emb.tokens[2], emb.tokens[0]) and torch.equal(emb2.tokens, emb.tokens[:2])
    # the protocol's embeds surface
    rep = emb2.repeat_interleave(3)
    assert len(rep) == 6 and torch.equal(rep[3:4].tokens, emb2[1].tokens)
    x = torch.randn(2, *policy.sample_shape)
    with torch.no_grad():
        assert torch.equal(policy.velocity_fn(emb2, 3.0)(x, 0.5), policy.velocity_fn(PROMPTS, 3.0)(x, 0.5))


def test_cfg_detached_uncond_gradient(loaded):
    """With the unconditional branch detached, d v / dθ = w · d v_c / dθ (v = v_u + w (v_c − v_u))."""
    policy, _ = loaded["sd3"]
    x, w = torch.randn(1, *policy.sample_shape), 3.0
    p = policy.transformer.proj_out.weight
    v = policy.velocity_fn(PROMPTS[:1], w, cfg_detach_uncond=True)(x, 0.6)
    with torch.no_grad():
        v_full = policy.velocity_fn(PROMPTS[:1], w)(x, 0.6)
    assert torch.allclose(v, v_full, atol=1e-5)
    (g,) = torch.autograd.grad(v.sum(), p)
    (gc,) = torch.autograd.grad(policy.velocity_fn(PROMPTS[:1], 1.0)(x, 0.6).sum(), p)
    assert torch.allclose(g, w * gc, rtol=1e-4, atol=1e-6)
    assert all(not q.requires_grad for m in policy._frozen.values() for q in m.parameters())


def test_frozen_parts_are_not_parameters(loaded):
    policy, pipe = loaded["flux"]
    n = sum(q.numel() for q in policy.parameters())
    assert n == sum(q.numel() for q in pipe.transformer.parameters())
    assert all(k.startswith("transformer.") for k in policy.state_dict())
    assert policy.sample_shape == (16, 8, 8)


def test_bf16_runs_and_tracks_the_bf16_pipeline(tiny_pipelines):
    policy = load_model(tiny_pipelines["sd3"], dtype=torch.bfloat16)
    assert policy.dtype == torch.bfloat16 and policy._frozen["vae"].dtype == torch.bfloat16
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_pipelines["sd3"]), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    a = policy.generate(PROMPTS, num_steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                        output_type="latent")
    b = pipe(PROMPTS, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
             output_type="latent").images
    assert a.dtype == b.dtype == torch.bfloat16
    assert (a.float() - b.float()).abs().max().item() <= 2e-2  # bf16 rounding of one step
    v = policy.velocity_fn(PROMPTS, 1.0)(torch.randn(2, 16, 8, 8), 0.5)
    assert v.dtype == torch.float32  # the sampler's state stays in full precision


def test_gradient_checkpointing_same_gradients(tiny_pipelines):
    policy = load_model(tiny_pipelines["sd3"]).train()
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    fn = policy.velocity_fn(PROMPTS, 1.0)
    (g0,) = torch.autograd.grad(fn(x, 0.5).square().sum(), policy.transformer.proj_out.weight)
    policy.enable_gradient_checkpointing()
    (g1,) = torch.autograd.grad(fn(x, 0.5).square().sum(), policy.transformer.proj_out.weight)
    assert policy.transformer.gradient_checkpointing and torch.allclose(g0, g1, atol=1e-6)
