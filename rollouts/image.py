"""Image rollouts: G samples per prompt from a flow policy with Flow-GRPO's SDE sampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.runtime.batches import ImageRollout
from rlgen.samplers.flow import sample, sigma_schedule


@dataclass
class ImageRolloutConfig:
    num_steps: int = 10            # denoising steps in training rollouts (fewer than in evaluation)
    eval_num_steps: int = 20
    noise_level: float = 0.7       # SDE noise a: std_σ = a·sqrt(σ/(1−σ))
    cfg_scale: float = 1.0         # CFG during rollouts (1 = off: one forward per step)
    shift: float = 1.0             # SD3 σ-schedule shift
    sde_window: int = 0            # 0: every step stochastic; k > 0: only k consecutive steps are SDE,
                                   # the rest ODE (Flow-GRPO-Fast / MixGRPO)
    sde_window_start: int = -1     # -1: the window starts at a random step per rollout; s >= 0: always at
                                   # step s (0 = the high-noise steps, where layout and count are decided)
    batch_size: int = 64           # rows per sampler call inside a worker


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


@torch.no_grad()
def rollout_images(policy, prompts: list[str], group_ids: torch.Tensor, cfg: ImageRolloutConfig,
                   generator: torch.Generator, weights_version: int = 0) -> ImageRollout:
    """Sample one image per entry of ``prompts`` (callers repeat each prompt G times)."""
    dev = policy.device
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift, device=dev)
    sde_mask = sde_mask_for(cfg.num_steps, cfg.sde_window, generator, cfg.sde_window_start)
    # SDE noise is drawn on the model's device; derive its generator from the CPU one so a seed
    # reproduces the same rollout on CPU and GPU alike.
    dev_gen = generator if dev.type == "cpu" else torch.Generator(dev).manual_seed(
        int(torch.randint(2**62, (1,), generator=generator)))
    parts = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        noise = torch.randn((len(chunk), *policy.sample_shape), generator=generator).to(dev)
        traj = sample(policy.velocity_fn(chunk, cfg.cfg_scale), noise, sigmas, noise_level=cfg.noise_level,
                      generator=dev_gen, sde_steps=sde_mask.to(dev))
        parts.append((traj.latents.float().cpu(), traj.log_probs.float().cpu()))
    return ImageRollout(prompts=list(prompts), group_ids=group_ids.cpu(),
                        latents=torch.cat([p[0] for p in parts]), log_probs=torch.cat([p[1] for p in parts]),
                        sigmas=sigmas.float().cpu(), sde_mask=sde_mask, noise_level=cfg.noise_level,
                        cfg_scale=cfg.cfg_scale, weights_version=weights_version)
