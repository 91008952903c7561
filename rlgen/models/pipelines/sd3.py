"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): MMDiT on 16-channel VAE latents.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(arXiv:2403.03206). Text conditioning is CLIP-L + CLIP-G (penultimate hidden states, concatenated and
zero-padded to T5's width) followed by T5-XXL tokens on the sequence axis; the pooled vector is the two
CLIP projections concatenated. Guidance is classifier-free with the empty prompt as the unconditional
branch. The σ grid is the scheduler's own (static shift 3.0 for SD3/SD3.5; dynamic if configured).
"""
from __future__ import annotations

import torch

from rlgen.models import ModelLoadError
from rlgen.models.pipelines import PipelineAdapter, register_pipeline_adapter
from rlgen.models.prompt_encoder import PromptEmbeds

# Flow-GRPO's SD3.5 LoRA targets (scripts/train_sd3.py): the joint attention's image and text projections.
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


@register_pipeline_adapter("StableDiffusion3Pipeline")
class SD3Adapter(PipelineAdapter):
    uses_cfg = True
    lora_targets = SD3_LORA_TARGETS
    default_steps = 28          # StableDiffusion3Pipeline.__call__ defaults
    default_guidance = 7.0
    default_max_sequence_length = 256

    def default_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size) * self.vae_scale_factor

    def check(self) -> None:
        cfg = self.pipe.transformer.config
        if cfg.in_channels != self.latent_channels:
            raise ModelLoadError(f"{self.where}: the transformer takes {cfg.in_channels} latent channels but the "
                                 f"VAE gives {self.latent_channels}")
        self.check_resolution(self.vae_scale_factor * cfg.patch_size)
        side = self.resolution // self.vae_scale_factor // cfg.patch_size
        if cfg.pos_embed_max_size is not None and side > cfg.pos_embed_max_size:
            raise ModelLoadError(f"{self.where}: resolution {self.resolution} needs {side} patch positions per side "
                                 f"but the transformer's pos_embed_max_size is {cfg.pos_embed_max_size}")

    def token_limits(self):
        p = self.pipe
        out = [("CLIP (text_encoder)", p.tokenizer, p.tokenizer_max_length)]
        if p.text_encoder_3 is not None:
            out.append(("T5 (text_encoder_3)", p.tokenizer_3, self.max_sequence_length))
        return out

    def encode(self, prompts: list[str]) -> PromptEmbeds:
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe.transformer.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        # (B, 77 + T5 tokens, D_joint), (B, P): the pipeline attends to every position (no mask)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return PromptEmbeds(tokens, mask, pooled)

    def velocity(self, transformer, x, sigma, emb, guidance):
        # The pipeline feeds scheduler.timesteps = σ·1000 (float32) unchanged.
        return transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=emb.tokens,
                           pooled_projections=emb.pooled, return_dict=False)[0]

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The pipeline's grid: ``set_timesteps(num_steps)`` (+ μ when dynamic shifting is configured)."""
        over = {} if shift is None else {"shift": float(shift), "use_dynamic_shifting": False}
        sched = self.scheduler_copy(**over)
        kw = {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c, h, w = self.latent_shape
            p = self.pipe.transformer.config.patch_size
            kw["mu"] = calculate_shift((h // p) * (w // p), sched.config.get("base_image_seq_len", 256),
                                       sched.config.get("max_image_seq_len", 4096),
                                       sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
        sched.set_timesteps(num_steps, device="cpu", **kw)
        return sched.sigmas.to(torch.float32)
