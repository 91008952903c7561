"""TeaCache's model-side probes (rlgen/models/teacache.py) on real diffusers architectures built tiny: the
hooked tensor is the first block's modulated input recomputed by hand, skipped steps really stop the
forward, threshold 0 changes nothing, and the calibration file round-trips through the CLIs."""
import json

import pytest
import torch
import torch.nn.functional as F

from rlgen.models.flow import FlowModelConfig, FlowPolicy
from rlgen.models.teacache import TeaCacheConfig, probe_for, record_steps
from rlgen.samplers.flow import sample, sigma_schedule
from rlgen.samplers.teacache import TeaCache

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _policy(**kw) -> FlowPolicy:
    torch.manual_seed(0)
    words = sorted({w for p in PROMPTS for w in p.split()})
    cfg = FlowModelConfig(image_size=16, block_out_channels=[16, 32], cross_attention=[False, True],
                          norm_num_groups=8, attention_heads=2, text_dim=16, text_layers=1, text_heads=2,
                          text_ff=32, max_prompt_tokens=8, vocab=words, **kw)
    return FlowPolicy.build(cfg).eval()


def _captured(policy, fn, x, sigma):
    seen = []
    probe_for(policy)(fn, x, sigma, lambda ind: seen.append(ind.clone()) or True)
    return seen[0]


def _modulated(norm1, h, temb):
    """AdaLayerNormZero by hand: LayerNorm(h)·(1 + scale_msa) + shift_msa, (shift, scale) = linear(silu(temb))[:2]."""
    shift, scale = norm1.linear(F.silu(temb)).chunk(6, dim=1)[:2]  # (B, D) each
    return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)


@torch.no_grad()
def test_sd3_probe_reads_the_first_blocks_modulated_input():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=8).eval()
    x, ctx, pooled, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 12), torch.tensor([700., 300.])
    holder = torch.nn.Module()
    holder.transformer = net  # a DiffusersFlowPolicy keeps its transformer here
    fn = lambda x, s: net(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=s).sample  # noqa: E731
    want = _modulated(net.transformer_blocks[0].norm1, net.pos_embed(x), net.time_text_embed(t, pooled))
    torch.testing.assert_close(_captured(holder, fn, x, t), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flux_probe_reads_the_first_blocks_modulated_input():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                 pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    x, ctx, pooled = torch.randn(2, 9, 16), torch.randn(2, 5, 24), torch.randn(2, 12)
    t, guide = torch.tensor([0.7, 0.3]), torch.tensor([3.5, 3.5])
    holder = torch.nn.Module()
    holder.transformer = net
    ids = torch.zeros(9, 3), torch.zeros(5, 3)
    fn = lambda x, s: net(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=s,  # noqa: E731
                          img_ids=ids[0], txt_ids=ids[1], guidance=guide).sample
    temb = net.time_text_embed(t * 1000, guide * 1000, pooled)  # FLUX scales both by 1000 inside forward
    want = _modulated(net.transformer_blocks[0].norm1, net.x_embedder(x), temb)
    torch.testing.assert_close(_captured(holder, fn, x, t), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unet_probe_reads_the_time_embedded_hidden_state():
    policy = _policy()
    unet, emb = policy.backbone.unet, policy.encode_prompts(PROMPTS)
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.9, 0.5, 0.2])
    got = _captured(policy, lambda x, s: policy(x, s, emb), x, sigma)
    # the first ResNet by hand: conv1(silu(norm1(conv_in(h)))) + time_emb_proj(silu(t_emb + class_emb))
    h = unet.conv_in(F.pixel_unshuffle(x, 2))
    temb = unet.time_embedding(unet.time_proj(sigma * 1000)) + unet.class_embedding(emb.pooled)
    res = unet.down_blocks[0].resnets[0]
    want = res.conv1(F.silu(res.norm1(h))) + res.time_emb_proj(F.silu(temb))[:, :, None, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["unet", "sd3"])
@torch.no_grad()
def test_threshold_zero_is_bit_identical_and_skips_stop_the_forward(backbone):
    from rlgen.models.flow import SD3BackboneConfig

    sd3 = SD3BackboneConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2)
    kw = {"sd3": sd3} if backbone == "sd3" else {}
    policy = _policy(backbone=backbone, **kw)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = sigma_schedule(8, 3.0)
    plain = sample(policy.velocity_fn(PROMPTS, 2.0), noise, sigmas, noise_level=0.0)
    zero = TeaCache(probe_for(policy), 0.0)
    cached = sample(policy.velocity_fn(PROMPTS, 2.0), noise, sigmas, noise_level=0.0, teacache=zero)
    assert torch.equal(plain.latents, cached.latents) and zero.skipped == 0
    # a large threshold: the output layer runs only on computed steps (the hook aborted the others)
    head = policy.backbone.unet.conv_out if backbone == "unet" else policy.backbone.transformer.proj_out
    runs = []
    handle = head.register_forward_hook(lambda *a: runs.append(1))
    big = TeaCache(probe_for(policy), 10.0)
    try:
        traj = sample(policy.velocity_fn(PROMPTS, 2.0), noise, sigmas, noise_level=0.0, teacache=big)
    finally:
        handle.remove()
    assert big.skipped == 6 and len(runs) == big.computed == 2 and traj.skipped.sum() == 6
    assert not head._forward_hooks  # the probe leaves no hook behind


def test_teacache_config_and_generate(tmp_path):
    from rlgen.config import ConfigError, from_dict
    from rlgen.families.flow import ImageRolloutConfig

    cfg = from_dict(ImageRolloutConfig, {"teacache": {"threshold": 0.2, "coefficients": [2.0, 0.0]}})
    assert cfg.teacache.enabled and cfg.teacache.resolved_coefficients() == [2.0, 0.0]
    with pytest.raises(ConfigError, match="teacache.threshold"):
        from_dict(ImageRolloutConfig, {"teacache": {"threshold": -1}})
    with pytest.raises(ValueError, match="not a 'rlgen_teacache' file"):
        (tmp_path / "bad.json").write_text("{}")
        TeaCacheConfig(0.1, calibration=str(tmp_path / "bad.json")).resolved_coefficients()
    policy = _policy()
    gen = lambda **kw: policy.generate(PROMPTS, num_steps=6, generator=torch.Generator().manual_seed(0), **kw)  # noqa
    assert torch.equal(gen(), gen(teacache=TeaCacheConfig(0.0)))
    assert not torch.equal(gen(), gen(teacache=TeaCacheConfig(5.0)))


@torch.no_grad()
def test_calibration_records_every_step_and_fits(tmp_path):
    from rlgen.teacache import calibrate, read_calibration, step_changes

    policy = _policy()
    fn, records = record_steps(policy, policy.velocity_fn(PROMPTS, 2.0))  # CFG: 2B rows reach the probe
    sample(fn, torch.randn(3, 3, 16, 16), sigma_schedule(5), noise_level=0.0)
    assert len(records) == 5 and records[0][0].shape[0] == 6 and records[0][1].shape[0] == 3
    x, y = step_changes(records)
    assert x.shape == y.shape == (12,) and (x > 0).all() and (y > 0).all()
    v0, v1 = records[0][1][1], records[1][1][1]  # sample 1, steps 0 → 1, by hand
    assert y[1].item() == pytest.approx(((v1 - v0).abs().mean() / v0.abs().mean()).item(), rel=1e-5)
    out = calibrate(policy, PROMPTS, steps=[4, 6], degree=2, progress=False)
    assert out["points"] == 3 * (3 + 5) and len(out["coefficients"]) == 3
    (tmp_path / "tc.json").write_text(json.dumps(out))
    assert read_calibration(tmp_path / "tc.json") == out["coefficients"]


@pytest.mark.slow  # ~10 s: the verifier scores every image
def test_shapes_benchmark_takes_teacache_options(tmp_path):
    from tests_helpers import tiny_flow_policy

    from rlgen.evaluate import EvalRequest, run_benchmark
    from rlgen.models import load_model

    policy = load_model(tiny_flow_policy(tmp_path / "m"))
    results = {}
    for thr in (0.0, 5.0):
        req = EvalRequest(samples_per_prompt=1, progress=False, return_samples=True,
                          options={"prompts_per_task": 1, "steps": 6, "teacache": thr})
        results[thr] = run_benchmark("shapes", req, policy)
    assert results[5.0]["teacache"] == 5.0 and results[0.0]["teacache"] == 0.0
    a, b = results[0.0]["samples"]["images"], results[5.0]["samples"]["images"]
    assert a.shape == b.shape and not (a == b).all()


@pytest.mark.slow  # builds the tiny SD3 and FLUX pipelines (~10 s) if no other test did
@pytest.mark.parametrize("name,opts,cfg", [("sd3", {}, 4.5), ("flux", {"resolution": 64}, 3.5)])
def test_pipelines_threshold_zero_is_exact_and_calibration_runs(tiny_pipelines, name, opts, cfg):
    from rlgen.models import load_model
    from rlgen.teacache import calibrate

    policy = load_model(tiny_pipelines[name], **opts)
    gen = lambda tc=None: policy.generate(["a cat", "a red square"], num_steps=6, cfg_scale=cfg,  # noqa: E731
                                          generator=torch.Generator().manual_seed(0), output_type="latent",
                                          teacache=tc)
    plain = gen()
    assert torch.equal(plain, gen(TeaCacheConfig(0.0)))
    big = TeaCache(probe_for(policy), 10.0)
    assert not torch.equal(plain, gen(big)) and big.skipped == 4 and big.computed == 2  # all but first and last
    out = calibrate(policy, ["a cat", "a dog", "a red square"], steps=[4], degree=1, cfg_scale=cfg, progress=False)
    assert out["points"] == 3 * 3 and len(out["coefficients"]) == 2
