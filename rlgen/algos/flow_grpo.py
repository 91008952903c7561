"""Flow-GRPO: online RL for flow-matching models (Liu et al. 2025, arXiv:2505.05470).

The ODE sampler is turned into an SDE with the same marginals, so each denoising step
x_σ → x_σ' is a Gaussian policy step N(mean_θ, std²·I) with an exact log-probability
(``rlgen.samplers.flow.sde_step``). GRPO then applies a PPO-style clipped objective per step with
group-relative advantages, plus a closed-form KL between the policy's and the reference model's
Gaussian steps (both share the std, so the KL is a scaled squared distance of the means).

Everything here is a pure function of tensors; the learner decides which steps and samples go in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.registry import register_algorithm


@dataclass
class FlowGRPOConfig:
    clip_range: float = 1e-4          # PPO ε on the ratio of per-dimension-mean log-probs (paper: 1e-4)
    adv_clip_max: float = 5.0         # advantages clamped to ±this
    kl_beta: float = 0.01             # weight of KL(policy step ‖ reference step); 0 disables the reference
    log_prob_reduction: str = "mean"  # "mean": per-dimension mean (the paper's small clip range); "sum"
    kl_reduction: str = "mean"        # "mean" over dimensions (as flow_grpo's code) or "sum"
    noise_level: float = 0.7          # SDE noise a in std_σ = a·sqrt(σ/(1−σ))
    global_std: bool = False          # advantages normalised by the batch std instead of the group's
    adv_eps: float = 1e-4

    def __post_init__(self):
        for name in ("log_prob_reduction", "kl_reduction"):
            if getattr(self, name) not in ("mean", "sum"):
                raise ValueError(f"{name} must be 'mean' or 'sum', got {getattr(self, name)!r}")
        if self.clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                clip_range: float, adv_clip_max: float = 5.0) -> tuple[torch.Tensor, dict]:
    """Per-step PPO-clip: ``mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))`` with ρ = exp(log_prob − old).

    All inputs (B,). ``old_log_prob`` comes from the behaviour policy that sampled the step.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"shapes differ: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, "
                         f"advantages {tuple(advantages.shape)}")
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            "approx_kl_old": 0.5 * (log_prob - old_log_prob).pow(2).mean().item(),
            "ratio_mean": ratio.mean().item(),
        }
    return loss, metrics


def kl_to_ref(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """(B,) KL(N(mean, std²) ‖ N(ref_mean, std²)) = ‖mean − ref_mean‖² / (2·std²), summed over dims.

    ``std`` broadcasts against ``mean`` (a float, (B,) expanded by the caller, or (B, 1, 1, 1)).
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ")
    sq = (mean - ref_mean).pow(2) / (2.0 * torch.as_tensor(std, dtype=mean.dtype, device=mean.device).pow(2))
    return sq.flatten(1).sum(dim=1)


def reduce_over_dims(per_sample_sum: torch.Tensor, num_dims: int, reduction: str) -> torch.Tensor:
    """Turn a sum over a sample's dimensions into the requested reduction ('sum' or per-dim 'mean')."""
    return per_sample_sum / num_dims if reduction == "mean" else per_sample_sum


@register_algorithm("flow_grpo")
def step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              mean: torch.Tensor | None, ref_mean: torch.Tensor | None, std: torch.Tensor | float,
              num_dims: int, cfg: FlowGRPOConfig) -> tuple[torch.Tensor, dict]:
    """Loss of one denoising step for a micro-batch: clipped policy term + β·KL to the reference.

    ``log_prob``/``old_log_prob`` are sums over the sample's ``num_dims`` dimensions (B,), as
    ``sde_step`` returns them; the configured reduction divides both the same way.
    """
    lp = reduce_over_dims(log_prob, num_dims, cfg.log_prob_reduction)
    old = reduce_over_dims(old_log_prob, num_dims, cfg.log_prob_reduction)
    loss, metrics = policy_loss(lp, old, advantages, cfg.clip_range, cfg.adv_clip_max)
    metrics["policy_loss"] = loss.item()
    if cfg.kl_beta > 0:
        if mean is None or ref_mean is None:
            raise ValueError("kl_beta > 0 needs the policy and reference step means")
        kl = reduce_over_dims(kl_to_ref(mean, ref_mean, std), num_dims, cfg.kl_reduction).mean()
        loss = loss + cfg.kl_beta * kl
        metrics["kl"] = kl.item()
    metrics["loss"] = loss.item()
    return loss, metrics
