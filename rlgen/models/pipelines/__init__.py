"""Pipeline adapters: what differs between flow-matching diffusers pipelines, one small file each.

``DiffusersFlowPolicy`` (rlgen/models/diffusers_flow.py) holds a loaded diffusers pipeline and asks its
adapter for the few things that differ between pipeline classes:

- ``encode(prompts) -> PromptEmbeds``: the pipeline's own ``encode_prompt`` (frozen text encoders);
- ``latent_shape`` (C, H/8, W/8) and ``to_pipeline_latents`` (e.g. FLUX packs 2×2 patches);
- ``sigmas(num_steps, shift)``: the σ grid the pipeline's scheduler would use (static or dynamic shift);
- ``velocity(transformer, x, sigma, embeds, guidance)``: one transformer call in the unpacked latent
  space, returning ``v = ε − x_data`` (the scheduler's ``model_output``);
- ``uses_cfg``: True when guidance is classifier-free (two branches), False when the transformer embeds
  the guidance scale (FLUX.1-dev) — then ``guidance`` is passed to ``velocity`` instead;
- ``lora_targets``: the default peft target modules (the Flow-GRPO recipes'), ``token_limits`` for the
  truncation warning, and ``check`` for channel / resolution mismatches.

Adding a pipeline (Sana, Qwen-Image, Lumina 2, …) is one more file here: subclass ``PipelineAdapter``,
decorate it with ``@register_pipeline_adapter("<diffusers pipeline class name>")`` and import the file
below. See docs/real_models.md.
"""
from __future__ import annotations

import copy

import torch

from rlgen.models import ModelLoadError
from rlgen.models.prompt_encoder import PromptEmbeds

PIPELINE_ADAPTERS: dict[str, type] = {}


def register_pipeline_adapter(pipeline_class: str):
    def deco(cls):
        PIPELINE_ADAPTERS[pipeline_class] = cls
        cls.pipeline_class = pipeline_class
        return cls

    return deco


def adapter_for(pipeline_class: str, where: str) -> type:
    """The adapter class for a pipeline class name, or a one-line error naming the supported ones."""
    _load_builtin_adapters()
    if pipeline_class not in PIPELINE_ADAPTERS:
        raise ModelLoadError(f"{where}: pipeline class {pipeline_class!r} is not supported; supported: "
                             f"{', '.join(sorted(PIPELINE_ADAPTERS))} (a new one is one adapter file in "
                             f"rlgen/models/pipelines/, see docs/real_models.md)")
    return PIPELINE_ADAPTERS[pipeline_class]


def _load_builtin_adapters() -> None:
    from rlgen.models.pipelines import flux, sd3  # noqa: F401  (register on import)


class PipelineAdapter:
    """Base class: shared helpers; subclasses implement the pipeline-specific methods."""

    pipeline_class = ""
    uses_cfg = True                    # classifier-free guidance (two branches) vs an embedded scale
    lora_targets: tuple[str, ...] = ()
    default_steps = 28
    default_guidance = 7.0

    def __init__(self, pipe, resolution: int | None = None, max_sequence_length: int | None = None,
                 where: str = "pipeline"):
        self.pipe, self.where = pipe, where
        self.resolution = int(resolution or self.default_resolution())
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)
        self.check()

    # --- to implement ---------------------------------------------------------------------------
    default_max_sequence_length = 256

    def default_resolution(self) -> int:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ModelLoadError (one line, both numbers) on a channel or resolution mismatch."""

    def encode(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def velocity(self, transformer, x: torch.Tensor, sigma: torch.Tensor, emb: PromptEmbeds,
                 guidance: float | None) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def token_limits(self) -> list[tuple[str, object, int]]:
        """(name, tokenizer, max tokens) for every text encoder, for the truncation warning."""
        return []

    # --- shared ---------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H/8, W/8): the unpacked latent the sampler runs in."""
        side = self.resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def to_pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → what ``pipe(..., output_type="latent").images`` holds (identity by default)."""
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents → (B, 3, H, W) RGB in [-1, 1] through the frozen VAE."""
        vae = self.pipe.vae
        z = x.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → latents (B, C, h, w), the inverse of ``decode`` (VAE posterior mean
        unless a generator asks for a sample); for preference pairs given as images."""
        vae = self.pipe.vae
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def scheduler_copy(self, **overrides):
        """A fresh scheduler with the pipeline's config (so set_timesteps never touches the pipe's own)."""
        sched = copy.deepcopy(self.pipe.scheduler)
        return type(sched).from_config(sched.config, **overrides) if overrides else sched

    def check_resolution(self, multiple: int) -> None:
        if self.resolution <= 0 or self.resolution % multiple:
            raise ModelLoadError(f"{self.where}: resolution {self.resolution} is not a multiple of {multiple} "
                                 f"(VAE factor {self.vae_scale_factor} × patch size)")
