"""REINFORCE with a group baseline for flow policies — the worked example of docs/algorithms.md.

Williams 1992 (REINFORCE), with the mean reward of the prompt's group as baseline (as in GRPO,
Shao et al. 2024, arXiv:2402.03300, without ratio clipping or a KL term). A flow policy sampled
with the SDE is a chain of Gaussian steps, so log π(trajectory) is the sum of the per-step
log-densities ``sde_step`` returns; the loss is ``−mean_i A_i · Σ_j log π(x_{j+1} | x_j) / D``
(D = dimensions per sample, the per-dimension scale Flow-GRPO's clip range is set in).

    python train_rl.py --config configs/rl/reinforce_shapes.yaml
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.batches import ImageRollout
from rlgen.config import check_range
from rlgen.samplers.flow_sde import sde_step_fn


@dataclass
class ReinforceConfig(AlgoConfig):
    name: str = "reinforce"
    adv_clip_max: float = 5.0   # advantages clamped to ±this

    def __post_init__(self):
        check_range(self, "adv_clip_max", lo=0, lo_open=True)


@register_algorithm("reinforce")
class Reinforce(Algorithm):
    family = "flow"                       # it trains flow policies
    config = ReinforceConfig
    rollout_fields = ("latents", "sigmas", "sde_mask", "advantages")

    # advantages(): the default, group-relative (r − mean_group) / std_group

    def update(self, ctx: LearnerContext, batch: ImageRollout) -> dict:
        steps = torch.nonzero(batch.sde_mask).flatten().tolist()  # the stochastic steps: they have a log-prob
        chunk = ctx.micro_batch_size or len(batch)
        dev, dtype = ctx.device, ctx.policy.dtype
        acc = Accumulator()
        ctx.policy.train()
        for lo in range(0, len(batch), chunk):
            mb = batch.select(list(range(lo, min(lo + chunk, len(batch)))))
            adv = mb.advantages.to(dev).float().clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)  # (b,)
            for j in steps:  # one backward per step: each frees its graph before the next forward
                x, x_next = mb.latents[:, j].to(dev), mb.latents[:, j + 1].to(dev)  # (b, C, H, W)
                sigma = mb.sigmas[j].to(dev).expand(len(mb))
                v = ctx.engine(mb.prompts, x.to(dtype), sigma, mb.cfg_scale)
                out = sde_step_fn(mb.sde_kind)(x, v, float(mb.sigmas[j]), float(mb.sigmas[j + 1]), mb.noise_level,
                                               prev_sample=x_next)
                log_prob = out.log_prob / x[0].numel()  # (b,) per-dimension scale
                loss = -(adv * log_prob).sum() / batch.global_size
                ctx.engine.backward(loss)
                acc.add({"loss": float(loss.detach()) * batch.global_size / len(mb), "log_prob": float(log_prob.mean())},
                        len(mb))
        return {**acc.mean(), "grad_norm": ctx.engine.step()}
