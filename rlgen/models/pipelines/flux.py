"""FLUX.1 (``FluxPipeline``): a guidance-distilled MMDiT on packed 2×2 patches of 16-channel latents.

Black Forest Labs 2024 (FLUX.1 [dev] / [schnell]). Text conditioning is T5 tokens plus CLIP-L's pooled
output; [dev] embeds the guidance scale in the transformer (no unconditional branch), [schnell] has no
guidance at all. The transformer sees packed latents (B, h/2·w/2, 4C) with 2-D RoPE ids; rlgen's sampler
runs in the unpacked (B, C, h, w) space and this adapter packs around each call (packing is a reshuffle,
so an Euler/SDE step commutes with it). The σ grid is ``linspace(1, 1/N, N)`` with the resolution-dependent
dynamic shift μ(image tokens), as the pipeline computes it.
"""
from __future__ import annotations

import numpy as np
import torch

from rlgen.models import ModelLoadError
from rlgen.models.pipelines import PipelineAdapter, register_pipeline_adapter
from rlgen.models.prompt_encoder import PromptEmbeds

# Flow-GRPO's FLUX LoRA targets (scripts/train_flux.py): the double blocks' joint attention (image and text
# projections); single blocks are left frozen.
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                     "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out")


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C), FluxPipeline._pack_latents' layout."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) → (B, C, h, w), the inverse of :func:`pack`."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


@register_pipeline_adapter("FluxPipeline")
class FluxAdapter(PipelineAdapter):
    uses_cfg = False
    lora_targets = FLUX_LORA_TARGETS
    default_steps = 28          # FluxPipeline.__call__ defaults
    default_guidance = 3.5
    default_max_sequence_length = 512

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _, h, w = self.latent_shape
        self._img_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)  # (h/2·w/2, 3)

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor  # 1024 for FLUX.1

    def check(self) -> None:
        cfg = self.pipe.transformer.config
        if cfg.in_channels != 4 * self.latent_channels:
            raise ModelLoadError(f"{self.where}: the transformer takes {cfg.in_channels} packed channels but the "
                                 f"VAE's {self.latent_channels} latent channels pack to {4 * self.latent_channels}")
        self.check_resolution(self.vae_scale_factor * 2)

    @property
    def has_guidance(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

    def token_limits(self):
        p = self.pipe
        return [("CLIP (text_encoder)", p.tokenizer, p.tokenizer_max_length),
                ("T5 (text_encoder_2)", p.tokenizer_2, self.max_sequence_length)]

    def encode(self, prompts: list[str]) -> PromptEmbeds:
        tokens, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                    device=self.pipe.transformer.device, num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return PromptEmbeds(tokens, mask, pooled)  # (B, T5 tokens, D), (B, T), (B, CLIP width)

    def to_pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        return pack(x)

    def velocity(self, transformer, x, sigma, emb, guidance):
        b, _, h, w = x.shape
        dtype = x.dtype
        # As the pipeline: t = σ·1000 in the latents' dtype, passed as t/1000; guidance as a float32 (B,).
        t = (sigma * 1000).to(dtype)
        g = None
        if self.has_guidance:
            g = torch.full((b,), float(guidance if guidance is not None else self.default_guidance),
                           device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(emb.tokens.shape[1], 3, device=x.device, dtype=emb.tokens.dtype)
        out = transformer(hidden_states=pack(x), timestep=t / 1000, guidance=g, pooled_projections=emb.pooled,
                          encoder_hidden_states=emb.tokens, txt_ids=txt_ids,
                          img_ids=self._img_ids.to(device=x.device, dtype=dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """``linspace(1, 1/N, N)`` through the scheduler with μ from the image token count (the pipeline's
        call); an explicit ``shift`` replaces the dynamic shift by SD3's static one."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        over = {} if shift is None else {"shift": float(shift), "use_dynamic_shifting": False}
        sched = self.scheduler_copy(**over)
        grid = np.linspace(1.0, 1 / num_steps, num_steps)
        _, h, w = self.latent_shape
        c = sched.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=grid, device="cpu", mu=mu)
        return sched.sigmas.to(torch.float32)
