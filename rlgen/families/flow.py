"""The ``flow`` family: text-conditioned flow-matching generators sampled with Flow-GRPO's SDE.

Policies: rlgen's pixel ``FlowPolicy`` (rlgen/models/flow.py) and diffusers pipelines in latent
space. Everything here goes through the flow-policy surface (docs/architecture.md): ``sigmas``,
``sample_shape``, ``velocity_fn``, ``decode``, ``generate``, ``lora_module``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rlgen.batches import ImageRollout
from rlgen.config import FieldError, check_choice, check_range
from rlgen.families import Family, register_family
from rlgen.models.teacache import TeaCacheConfig, teacache_for
from rlgen.samplers.flow import cfg_combine, sample
from rlgen.samplers.flow_sde import SDE_KINDS
from rlgen.samplers.sde_window import compress_tail, window_start


@dataclass
class WindowSlideConfig:
    """``rollout.sde_window_slide``: MixGRPO's sliding window (rlgen/samplers/sde_window.py)."""

    every: int = 0                 # τ: training steps per window position; 0 = the window stays put
    stride: int = 1                # s: steps the window moves each time
    schedule: str = "constant"     # "constant" τ | "progressive": τ·exp(−decay·max(0, position − decay_after))
    decay: float = 0.1             # k of the progressive schedule
    decay_after: int = 0           # position from which τ decays
    at_end: str = "stay"           # past the last position: "stay" there | "restart" from sde_window_start

    def __post_init__(self):
        check_range(self, "every", lo=0)
        check_range(self, "stride", lo=1)
        check_choice(self, "schedule", ("constant", "progressive"))
        check_range(self, "decay", lo=0)
        check_range(self, "decay_after", lo=0)
        check_choice(self, "at_end", ("stay", "restart"))


@dataclass
class ImageRolloutConfig:
    """``rollout:`` of a flow job: how training rollouts are sampled."""

    num_steps: int = 10            # denoising steps in training rollouts
    noise_level: float = 0.7       # SDE noise a: std_σ = a·sqrt(σ/(1−σ))
    cfg_scale: float = 1.0         # CFG during rollouts (1 = off: one forward per step)
    # σ-schedule shift; 0 = the model's own: 1.0 (uniform) for rlgen's pixel models, the scheduler's for a
    # pipeline (SD3.5: 3.0; FLUX: its resolution-dependent shift). A value > 0 replaces it (SD3's static shift).
    shift: float = 0.0
    sde_window: int = 0            # 0: every step stochastic; k > 0: only k consecutive steps are SDE,
                                   # the rest ODE (Flow-GRPO-Fast / MixGRPO)
    sde_window_start: int = -1     # -1: the window starts at a random step per rollout; s >= 0: always at
                                   # step s (0 = the high-noise steps, where layout and count are decided)
    sde_window_slide: WindowSlideConfig = field(default_factory=WindowSlideConfig)  # MixGRPO: every > 0 slides it
    sde_kind: str = "flow_grpo"    # the stochastic step: flow_grpo | dance (DanceGRPO) | cps (coefficients-preserving)
    ode_solver: str = "euler"      # ODE steps after the window: euler | dpm2 (DPM-Solver++(2M), MixGRPO-Flash)
    post_window_steps: int = 0     # 0: the grid as is; k: only k steps after the window (MixGRPO-Flash)
    shared_group_noise: bool = False  # DanceGRPO: a group's samples start from the same noise
    batch_size: int = 64           # rows per sampler call inside a worker
    # TeaCache on the ODE steps (SDE steps always run the model): {threshold: 0 = off, calibration: FILE}
    teacache: TeaCacheConfig = field(default_factory=TeaCacheConfig)

    def __post_init__(self):
        check_range(self, "num_steps", lo=1)
        check_range(self, "noise_level", lo=0, lo_open=True)  # 0 would be an ODE: no log-probs to train on
        check_range(self, "cfg_scale", lo=0)
        check_range(self, "shift", lo=0)
        check_range(self, "sde_window", lo=0)
        check_range(self, "batch_size", lo=1)
        check_choice(self, "sde_kind", tuple(sorted(SDE_KINDS)))
        check_choice(self, "ode_solver", ("euler", "dpm2"))
        check_range(self, "post_window_steps", lo=0)
        if self.sde_kind == "cps" and self.noise_level > 1:
            raise FieldError("noise_level", f"{self.noise_level} with sde_kind=cps: it is the noise angle's "
                                            "fraction of π/2, in (0, 1]")
        if self.sde_window_slide.every and (self.sde_window <= 0 or self.sde_window_start < 0):
            raise FieldError("sde_window_slide.every", "slides a fixed window: set sde_window > 0 and "
                                                      "sde_window_start >= 0 (where it starts)")
        if self.sde_window_start >= 0 and self.sde_window and self.sde_window_start > self.num_steps - self.sde_window:
            raise FieldError("sde_window_start", f"{self.sde_window_start} leaves fewer than sde_window="
                                                 f"{self.sde_window} of num_steps={self.num_steps} steps")


class PolicyVelocity(nn.Module):
    """The module a flow learner's engine wraps: its forward is the policy's (CFG-combined) velocity.

    ``forward(prompts (b,), x (b, C, H, W), sigma (b,), cfg_scale) -> v (b, C, H, W)``; prompts are
    encoded inside (for rlgen's models the text encoder trains too). Parameters are ``policy.*``.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, prompts, x: torch.Tensor, sigma: torch.Tensor, cfg_scale: float = 1.0,
                cfg_detach_uncond: bool | None = None) -> torch.Tensor:
        """``cfg_detach_uncond`` (None: the policy's own behaviour) True runs the unconditional CFG
        branch without gradient, as Flow-GRPO's training step does: pipelines take the option
        themselves; for rlgen's pixel models (both branches in one pass otherwise) it is done here."""
        if cfg_detach_uncond is None:
            return self.policy.velocity_fn(prompts, cfg_scale)(x, sigma)
        if hasattr(self.policy, "cfg_detach_uncond"):  # a diffusers pipeline
            return self.policy.velocity_fn(prompts, cfg_scale, cfg_detach_uncond=cfg_detach_uncond)(x, sigma)
        if not cfg_detach_uncond or cfg_scale == 1.0 or not torch.is_grad_enabled():
            return self.policy.velocity_fn(prompts, cfg_scale)(x, sigma)
        v_c = self.policy.velocity_fn(prompts, 1.0)(x, sigma)  # (b, C, H, W) with gradient
        with torch.no_grad():
            v_u = self.policy.velocity_fn([""] * len(prompts), 1.0)(x, sigma)  # the "" prompt, as FlowPolicy's CFG
        return cfg_combine(v_c, v_u, cfg_scale)


def sde_mask_for(num_steps: int, window: int, generator: torch.Generator | None, start: int = -1) -> torch.Tensor:
    """(S,) bool; all True, or a window of ``window`` consecutive steps at ``start`` (random if < 0)."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if window <= 0 or window >= num_steps:
        mask[:] = True
        return mask
    if start > num_steps - window:
        raise ValueError(f"rollout.sde_window_start={start} leaves fewer than sde_window={window} of "
                         f"{num_steps} steps")
    if start < 0:
        start = int(torch.randint(0, num_steps - window + 1, (1,), generator=generator))
    mask[start:start + window] = True
    return mask


def rollout_grid(policy, cfg: ImageRolloutConfig, generator: torch.Generator | None, step: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's σ grid (S+1,) and SDE mask (S,): the window fixed, random or sliding with the
    training step (MixGRPO), the tail after it optionally shortened (``post_window_steps``)."""
    sigmas = policy.sigmas(cfg.num_steps, cfg.shift or None)
    start, slide = cfg.sde_window_start, cfg.sde_window_slide
    if slide.every:
        start = window_start(step, start, cfg.sde_window, cfg.num_steps, slide.every, slide.stride, slide.schedule,
                             slide.decay, slide.decay_after, slide.at_end)
    sde_mask = sde_mask_for(cfg.num_steps, cfg.sde_window, generator, start)
    if cfg.post_window_steps:
        sigmas, sde_mask = compress_tail(sigmas, sde_mask.to(sigmas.device), cfg.post_window_steps)
    return sigmas, sde_mask.cpu()


def start_noise(shape, group_ids: torch.Tensor, shared: bool, generator: torch.Generator) -> torch.Tensor | None:
    """(B, *shape) with one draw per group (DanceGRPO), or None: each chunk then draws its own."""
    if not shared:
        return None
    _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)  # (B,) group index of each row
    per_group = torch.randn((int(inverse.max()) + 1, *shape), generator=generator)
    return per_group[inverse]


@torch.no_grad()
def rollout_images(policy, prompts: list[str], group_ids: torch.Tensor, cfg: ImageRolloutConfig,
                   generator: torch.Generator, weights_version: int = 0, step: int = 0) -> ImageRollout:
    """Sample one trajectory per entry of ``prompts`` (callers repeat each prompt G times).

    ``step`` is the training step the rollout is for (MixGRPO's window position is a function of it).
    """
    dev = policy.device
    sigmas, sde_mask = rollout_grid(policy, cfg, generator, step)
    # SDE noise is drawn on the model's device; derive its generator from the CPU one so a seed
    # reproduces the same rollout on CPU and GPU alike.
    dev_gen = generator if dev.type == "cpu" else torch.Generator(dev).manual_seed(
        int(torch.randint(2**62, (1,), generator=generator)))
    cache = teacache_for(policy, cfg.teacache)
    shared = start_noise(policy.sample_shape, group_ids, cfg.shared_group_noise, generator)
    parts = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        noise = (torch.randn((len(chunk), *policy.sample_shape), generator=generator) if shared is None
                 else shared[i:i + cfg.batch_size]).to(dev)
        traj = sample(policy.velocity_fn(chunk, cfg.cfg_scale), noise, sigmas, noise_level=cfg.noise_level,
                      generator=dev_gen, sde_steps=sde_mask.to(dev), teacache=cache, sde_kind=cfg.sde_kind,
                      ode_solver=cfg.ode_solver)
        images = policy.decode(traj.samples)
        parts.append((traj.latents.float().cpu(), traj.log_probs.float().cpu(), images.float().cpu()))
    return ImageRollout(prompts=list(prompts), group_ids=group_ids.cpu(),
                        latents=torch.cat([p[0] for p in parts]), log_probs=torch.cat([p[1] for p in parts]),
                        sigmas=sigmas.float().cpu(), sde_mask=traj.sde_mask.cpu(), noise_level=cfg.noise_level,
                        cfg_scale=cfg.cfg_scale, weights_version=weights_version,
                        images=torch.cat([p[2] for p in parts]), sde_kind=cfg.sde_kind)


@register_family("flow")
class FlowFamily(Family):
    modality = "image"
    rollout_config = ImageRolloutConfig

    def add_lora(self, policy, lora) -> None:
        if not hasattr(policy, "add_lora"):  # rlgen's pixel models: peft on the backbone
            return super().add_lora(policy, lora)
        # a diffusers pipeline: its adapter in the format `pipe.load_lora_weights` reads
        if getattr(policy, "has_lora", False):  # started from a post-trained LoRA checkpoint: train that adapter on
            have = policy.transformer.peft_config["default"].r
            if have != lora.rank:
                raise ValueError(f"policy.lora.rank={lora.rank}, but the checkpoint holds a rank-{have} LoRA adapter "
                                 f"(on {policy.base}); set policy.lora.rank={have} to continue training it")
        else:
            policy.add_lora(lora.rank, lora.alpha or lora.rank, list(lora.targets) or None)
        policy.requires_grad_(False)
        for name, p in policy.named_parameters():
            p.requires_grad_("lora_" in name)

    def saves_adapter(self, policy) -> bool:
        return hasattr(policy, "add_lora")  # pipelines save the adapter and a pointer to their base

    def train_module(self, policy) -> nn.Module:
        return PolicyVelocity(policy)

    def rollout(self, policy, items: list[dict], group_ids, cfg: ImageRolloutConfig, generator, version: int = 0,
                step: int = 0):
        prompts = [it["prompt"] for it in items]
        if hasattr(cfg, "sample_rollout"):  # an algorithm's own rollout settings bring their sampler (G²RPO)
            return cfg.sample_rollout(policy, prompts, group_ids, generator, version)
        return rollout_images(policy, prompts, group_ids, cfg, generator, version, step)

    @torch.no_grad()
    def prepare_pairs(self, policy, pairs) -> dict:
        """Image pairs in the policy's sample space: the images themselves for a pixel model, their
        latents (encoded once, here) for a latent-space pipeline."""
        w, l = pairs.images()  # (N, C, H, W) in [-1, 1]
        if hasattr(policy, "encode_images"):
            w, l = policy.encode_images(w.to(policy.device)).cpu(), policy.encode_images(l.to(policy.device)).cpu()
        if tuple(w.shape[1:]) != tuple(policy.sample_shape):
            raise ValueError(f"{pairs.path}: pair images are {tuple(w.shape[1:])}, the policy samples "
                             f"{tuple(policy.sample_shape)}")
        return {"modality": "image", "prompts": [r.prompt for r in pairs.rows], "chosen": w.float(),
                "rejected": l.float(), "bucket_ids": [0] * len(pairs.rows)}
