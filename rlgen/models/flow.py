"""Text-conditioned flow-matching policies: a diffusers backbone + a tiny learned prompt encoder.

``FlowPolicy`` predicts the flow velocity ``v = ε − x_data`` at ``x_σ = (1−σ)·x_data + σ·ε`` (SD3's
convention, see DESIGN.md). Two backbones share one interface ``forward(x, sigma, emb) -> v``:

- ``unet``: diffusers ``UNet2DConditionModel`` with a tiny config, run on a pixel-unshuffled image
  (32×32×3 → 16×16×12, then 8×8 and 4×4) so every convolution is cheap; residual blocks are
  conditioned on time + the pooled prompt (``class_embed_type="projection"``), and cross-attend
  to the prompt tokens at the coarse levels. This is what draws recognisable shapes in minutes
  on a CPU (docs/feasibility.md, second round).
- ``sd3``: diffusers ``SD3Transformer2DModel`` (MMDiT), built tiny from config or loaded from an
  existing diffusers folder (``pretrained_backbone``), so a pretrained SD3 transformer can stand in
  on a GPU machine. Real SD3 also needs its VAE (latent space) and its CLIP/T5 text encoders:
  both are out of scope for now; here the transformer sees whatever ``x`` it is given (pixels, or
  latents a caller encoded) and our own prompt encoder, projected to its ``joint_attention_dim``.

Model folder (``save_pretrained``): ``rlgen_model.json`` ({"model_type": "flow_policy", "config":
FlowModelConfig}), ``unet/`` or ``transformer/`` (diffusers, safetensors), ``text_encoder/``
(transformers, safetensors), ``tokenizer/`` (HF tokenizer).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rlgen.models import MODEL_META, ModelLoadError, quiet_hf_progress, read_model_meta
from rlgen.models.prompt_encoder import PromptEmbeds, PromptEncoder, build_tokenizer, load_tokenizer
from rlgen.registry import register_model


@dataclass
class SD3BackboneConfig:
    """A tiny MMDiT (used when backbone = sd3 and no pretrained_backbone is given)."""

    num_layers: int = 2
    patch_size: int = 2
    attention_head_dim: int = 32
    num_attention_heads: int = 4


@dataclass
class FlowModelConfig:
    backbone: str = "unet"              # unet | sd3
    pretrained_backbone: str = ""       # a diffusers model folder to start the backbone from
    in_channels: int = 3
    image_size: int = 32
    # unet backbone
    unshuffle: int = 2                  # pixel-unshuffle factor before the UNet (1 = none)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 96])  # per level
    cross_attention: list[bool] = field(default_factory=lambda: [False, True, True])  # per level
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 16
    mid_block: bool = False             # a cross-attention mid block at the coarsest level
    # sd3 backbone
    sd3: SD3BackboneConfig = field(default_factory=SD3BackboneConfig)
    # prompt encoder (BertModel) and tokenizer
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_ff: int = 256
    max_prompt_tokens: int = 16         # [CLS] included; longer prompts are truncated
    vocab: list[str] = field(default_factory=list)  # prompt words; the trainer fills it from the data

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone '{self.backbone}' is unknown; one of {sorted(BACKBONES)}")
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(f"model.cross_attention has {len(self.cross_attention)} entries but "
                             f"model.block_out_channels has {len(self.block_out_channels)} levels")
        if self.backbone == "unet" and self.image_size % self.unshuffle:
            raise ValueError(f"model.image_size {self.image_size} is not divisible by model.unshuffle {self.unshuffle}")


def _as_sigma(sigma, batch: int, device) -> torch.Tensor:
    """float, 0-d or (B,) → (B,) float32 on device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return s.expand(batch) if s.ndim == 0 else s


# ----------------------------------------------------------------------------------------------
# Backbones: forward(x (B,C,H,W), sigma (B,), emb) -> v (B,C,H,W); timestep input = σ·1000
# ----------------------------------------------------------------------------------------------
class UNetBackbone(nn.Module):
    subfolder = "unet"

    def __init__(self, unet, unshuffle: int):
        super().__init__()
        self.unet, self.r = unet, unshuffle

    @classmethod
    def build(cls, cfg: FlowModelConfig) -> "UNetBackbone":
        from diffusers import UNet2DConditionModel

        if cfg.pretrained_backbone:
            unet = UNet2DConditionModel.from_pretrained(cfg.pretrained_backbone, use_safetensors=True)
            want = cfg.in_channels * cfg.unshuffle ** 2
            if unet.config.in_channels != want:
                raise ValueError(f"unet {cfg.pretrained_backbone} takes {unet.config.in_channels} channels, but "
                                 f"model.in_channels·unshuffle² is {want}")
            return cls(unet, cfg.unshuffle)
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention))
        ch = cfg.in_channels * cfg.unshuffle ** 2
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // cfg.unshuffle, in_channels=ch, out_channels=ch,
            down_block_types=down, up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_block else None,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.text_dim,
            attention_head_dim=cfg.attention_heads,  # diffusers' legacy name: the number of heads
            class_embed_type="projection", projection_class_embeddings_input_dim=cfg.text_dim)
        return cls(unet, cfg.unshuffle)

    @classmethod
    def load(cls, path: Path, cfg: FlowModelConfig) -> "UNetBackbone":
        from diffusers import UNet2DConditionModel

        return cls(UNet2DConditionModel.from_pretrained(str(path), use_safetensors=True), cfg.unshuffle)

    def save_pretrained(self, path: Path) -> None:
        self.unet.save_pretrained(str(path), safe_serialization=True)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, emb: PromptEmbeds) -> torch.Tensor:
        h = F.pixel_unshuffle(x, self.r) if self.r > 1 else x  # (B, C·r², H/r, W/r)
        out = self.unet(h, sigma * 1000, encoder_hidden_states=emb.tokens, class_labels=emb.pooled,
                        encoder_attention_mask=emb.mask).sample
        return F.pixel_shuffle(out, self.r) if self.r > 1 else out  # (B, C, H, W)


class SD3Backbone(nn.Module):
    """SD3's MMDiT behind the same interface. Its joint attention has no padding mask: padded
    prompt positions are zeroed instead (they still take part in attention)."""

    subfolder = "transformer"

    def __init__(self, transformer, text_dim: int):
        super().__init__()
        self.transformer = transformer
        joint, pooled = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
        # A pretrained SD3 expects T5/CLIP widths (4096 / 2048): learn projections from ours.
        self.context_proj = nn.Identity() if joint == text_dim else nn.Linear(text_dim, joint)
        self.pooled_proj = nn.Identity() if pooled == text_dim else nn.Linear(text_dim, pooled)

    @classmethod
    def build(cls, cfg: FlowModelConfig) -> "SD3Backbone":
        from diffusers import SD3Transformer2DModel

        if cfg.pretrained_backbone:
            model = SD3Transformer2DModel.from_pretrained(cfg.pretrained_backbone, use_safetensors=True)
        else:
            s = cfg.sd3
            inner = s.num_attention_heads * s.attention_head_dim
            model = SD3Transformer2DModel(
                sample_size=cfg.image_size, patch_size=s.patch_size, in_channels=cfg.in_channels,
                out_channels=cfg.in_channels, num_layers=s.num_layers, attention_head_dim=s.attention_head_dim,
                num_attention_heads=s.num_attention_heads, joint_attention_dim=cfg.text_dim,
                caption_projection_dim=inner, pooled_projection_dim=cfg.text_dim,
                pos_embed_max_size=cfg.image_size // s.patch_size)
        if model.config.in_channels != cfg.in_channels:
            raise ValueError(f"sd3 backbone {cfg.pretrained_backbone or '(built)'} takes "
                             f"{model.config.in_channels} channels but model.in_channels is {cfg.in_channels}")
        return cls(model, cfg.text_dim)

    @classmethod
    def load(cls, path: Path, cfg: FlowModelConfig) -> "SD3Backbone":
        from diffusers import SD3Transformer2DModel
        from safetensors.torch import load_file

        backbone = cls(SD3Transformer2DModel.from_pretrained(str(path), use_safetensors=True), cfg.text_dim)
        wanted = [k for k in backbone.state_dict() if not k.startswith("transformer.")]
        if wanted:  # projections to a pretrained model's text widths
            adapter = path / "adapter.safetensors"
            if not adapter.is_file():
                raise ModelLoadError(f"{path}: missing adapter.safetensors (holds {', '.join(wanted)})")
            backbone.load_state_dict(load_file(str(adapter)), strict=False)
        return backbone

    def save_pretrained(self, path: Path) -> None:
        from safetensors.torch import save_file

        self.transformer.save_pretrained(str(path), safe_serialization=True)
        adapter = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("transformer.")}
        if adapter:
            save_file(adapter, str(path / "adapter.safetensors"))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, emb: PromptEmbeds) -> torch.Tensor:
        tokens = self.context_proj(emb.tokens) * emb.mask.unsqueeze(-1).to(emb.tokens.dtype)  # (B, T, J)
        pooled = self.pooled_proj(emb.pooled)  # (B, P)
        return self.transformer(x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=sigma * 1000).sample  # (B, C, H, W)


BACKBONES: dict[str, type] = {"unet": UNetBackbone, "sd3": SD3Backbone}


# ----------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------
@register_model("flow_policy")
class FlowPolicy(nn.Module):
    """Backbone + prompt encoder + tokenizer; the generator every image RL algorithm trains.

    A policy of the ``flow`` family (rlgen/families/flow.py): pixels are its sample space, so
    ``decode`` is the identity and ``sigmas`` SD3's shifted grid.
    """

    family = "flow"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the backbone's attention projections

    def __init__(self, config: FlowModelConfig, backbone: nn.Module, text_encoder: PromptEncoder, tokenizer):
        super().__init__()
        self.config, self.backbone, self.text_encoder, self.tokenizer = config, backbone, text_encoder, tokenizer

    def lora_module(self) -> nn.Module:
        """The diffusers model peft adapters attach to (UNet2DConditionModel, SD3Transformer…)."""
        for child in self.backbone.children():
            if hasattr(child, "add_adapter"):
                return child
        raise TypeError(f"{type(self.backbone).__name__} holds no diffusers model with add_adapter()")

    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """(num_steps + 1,) σ grid from 1 to 0 (SD3's shift; 1.0 = uniform) on this policy's device."""
        from rlgen.samplers.flow import sigma_schedule

        return sigma_schedule(num_steps, 1.0 if shift is None else shift, device=self.device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel model: the sample is the image."""
        return x

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @classmethod
    def build(cls, config: FlowModelConfig) -> "FlowPolicy":
        """A freshly initialised policy (seed torch first for reproducible weights)."""
        tokenizer = build_tokenizer(config.vocab, config.max_prompt_tokens)
        text = PromptEncoder.build(len(tokenizer), config.text_dim, config.text_layers, config.text_heads,
                                   config.text_ff, config.max_prompt_tokens)
        return cls(config, BACKBONES[config.backbone].build(config), text, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, got a single string")
        batch = self.tokenizer(list(prompts), padding="longest", truncation=True,
                               max_length=self.config.max_prompt_tokens, return_tensors="pt")
        dev = self.device
        return self.text_encoder(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))

    def forward(self, x: torch.Tensor, sigma, emb: PromptEmbeds) -> torch.Tensor:
        """Velocity v (B, C, H, W) at x (B, C, H, W), noise level sigma (B,) or float.

        x is cast to the weights' dtype (a bf16 policy can be sampled from fp32 noise) and v comes
        back in x's dtype, so samplers keep their state in full precision.
        """
        dtype = next(self.backbone.parameters()).dtype
        v = self.backbone(x.to(dtype), _as_sigma(sigma, x.shape[0], x.device), emb)
        return v.to(x.dtype)

    def velocity_fn(self, prompts: Sequence[str], cfg_scale: float = 1.0) -> Callable:
        """``(x, sigma) -> v`` for ``rlgen.samplers.flow.sample``; prompts are encoded once.

        With ``cfg_scale != 1`` the conditional and unconditional ("") halves run in one forward
        pass of 2B rows and combine as ``v_u + w·(v_c − v_u)``. Gradients flow (RL learners use it).
        """
        from rlgen.samplers.flow import cfg_combine

        if cfg_scale == 1.0:
            emb = self.encode_prompts(prompts)
            return lambda x, sigma: self(x, sigma, emb)
        emb = self.encode_prompts(list(prompts) + [""] * len(prompts))  # (2B, …) cond rows, then uncond

        def fn(x: torch.Tensor, sigma) -> torch.Tensor:
            s = _as_sigma(sigma, x.shape[0], x.device)
            v_c, v_u = self(torch.cat([x, x]), torch.cat([s, s]), emb).chunk(2)  # (B, C, H, W) each
            return cfg_combine(v_c, v_u, cfg_scale)

        return fn

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], num_steps: int = 20, cfg_scale: float = 1.0,
                 noise_level: float = 0.0, shift: float | None = None, generator: torch.Generator | None = None,
                 batch_size: int = 64, progress: bool = False, teacache=None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1]: Euler ODE (noise_level 0) or Flow-GRPO's SDE (> 0).

        ``teacache`` (``TeaCacheConfig`` or ``TeaCache``, rlgen/samplers/teacache.py) skips forwards on ODE steps."""
        from rlgen.models.teacache import teacache_for
        from rlgen.samplers.flow import sample

        cache = teacache_for(self, teacache)  # sample() never skips an SDE step

        dev = self.device
        sigmas = self.sigmas(num_steps, shift)
        step_gen = generator
        if generator is not None and generator.device != dev:  # SDE noise is drawn on x's device
            step_gen = torch.Generator(dev).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            # Start noise is drawn on the generator's device so a seed gives the same images anywhere.
            noise = torch.randn((len(chunk), *self.sample_shape), generator=generator,
                                device=generator.device if generator is not None else dev).to(dev)
            traj = sample(self.velocity_fn(chunk, cfg_scale), noise, sigmas, noise_level=noise_level,
                          generator=step_gen, keep_latents=False, progress=progress, teacache=cache)
            out.append(traj.samples.clamp(-1, 1))
        return torch.cat(out) if out else torch.empty((0, *self.sample_shape), device=dev)

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with quiet_hf_progress():
            self.backbone.save_pretrained(path / self.backbone.subfolder)
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.tokenizer.save_pretrained(str(path / "tokenizer"))
        meta = {"model_type": "flow_policy", "config": asdict(self.config)}
        (path / MODEL_META).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "FlowPolicy":
        from rlgen.config import ConfigError, from_dict

        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"flow policy folder not found: {path}")
        meta = read_model_meta(path)
        if meta["model_type"] != "flow_policy":
            raise ModelLoadError(f"{path}: model_type is '{meta['model_type']}', not 'flow_policy'")
        try:
            config = from_dict(FlowModelConfig, meta.get("config", {}), src=str(path / MODEL_META))
        except ConfigError as e:
            raise ModelLoadError(str(e)) from e
        backbone_cls = BACKBONES[config.backbone]
        parts = {}
        for name, loader in ((backbone_cls.subfolder, lambda p: backbone_cls.load(p, config)),
                             ("text_encoder", PromptEncoder.from_pretrained), ("tokenizer", load_tokenizer)):
            sub = path / name
            if not sub.is_dir():
                raise ModelLoadError(f"{path}: missing '{name}/' folder of a flow_policy model")
            try:
                with quiet_hf_progress():
                    parts[name] = loader(sub)
            except Exception as e:  # diffusers/transformers/safetensors raise many types
                raise ModelLoadError(f"{sub}: cannot load {name}: {type(e).__name__}: {e}") from e
        policy = cls(config, parts[backbone_cls.subfolder], parts["text_encoder"], parts["tokenizer"])
        return policy.to(device).eval()  # like diffusers/transformers: call .train() to fine-tune
