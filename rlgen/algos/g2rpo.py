"""G²RPO: Granular GRPO for flow models (Zhou et al. 2025, arXiv:2510.01982).

Two changes to Flow-GRPO, both about *which* reward an SDE step is credited with:

- Singular stochastic sampling: a trajectory takes exactly one SDE step, at a step k chosen per
  group; the group shares its start noise and every other step is the ODE. The rewards inside a
  group then differ only through that step's noise, so the group advantage is credit for step k
  alone, and only step k is trained (one forward and backward per sample instead of one per step).
- Multi-granularity advantage integration: from the state after the SDE step the rest of the
  trajectory is also integrated on coarser σ grids (granularity g = every g-th remaining grid
  point). Each granularity's finals are rewarded and normalised within their group; the step's
  advantage is the sum (the reference code's choice) or mean of those per-granularity advantages,
  so a direction is judged by where it leads at several step sizes, not at one.

The loss is Flow-GRPO's per-step PPO clip plus the optional closed-form KL to the reference
(``rlgen.algos.flow_grpo.step_loss``). The rollouts come from rlgen/families/flow_g2rpo.py.
Pure torch: no Ray, DeepSpeed or I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.algos.flow_grpo import check_shard_split, flow_grpo_advantages, step_loss
from rlgen.config import check_choice, check_range
from rlgen.families.flow_g2rpo import G2RPORollout, G2RPORolloutConfig
from rlgen.samplers.flow import sde_step


@dataclass
class G2RPOConfig(AlgoConfig):
    name: str = "g2rpo"
    # how the per-granularity advantages become the step's: "sum" (reference code) | "mean"
    adv_integration: str = "sum"
    clip_range: float = 1e-4          # PPO ε on the ratio of per-dimension-mean log-probs (reference: 1e-4)
    adv_clip_max: float = 5.0         # integrated advantages clamped to ±this (reference: 5)
    kl_beta: float = 0.0              # weight of KL(policy step ‖ reference step) (reference: none)
    log_prob_reduction: str = "mean"  # "mean" over dimensions (reference) | "sum"
    kl_reduction: str = "mean"
    adv_eps: float = 1e-4             # added to each group's std
    adv_std_ddof: int = 1             # group std: 1 unbiased (reference: torch.std) | 0
    num_inner_epochs: int = 1         # passes over each rollout batch (each reshuffles)
    num_minibatches: int = 1          # optimizer updates per pass
    cfg_detach_uncond: bool | None = None  # as flow_grpo's: True = no gradient through CFG's unconditional branch

    def __post_init__(self):
        check_choice(self, "adv_integration", ("sum", "mean"))
        for name in ("log_prob_reduction", "kl_reduction"):
            check_choice(self, name, ("mean", "sum"))
        check_choice(self, "adv_std_ddof", (0, 1))
        check_range(self, "clip_range", lo=0, lo_open=True)
        check_range(self, "adv_clip_max", lo=0, lo_open=True)
        check_range(self, "kl_beta", lo=0)
        check_range(self, "adv_eps", lo=0)
        check_range(self, "num_inner_epochs", lo=1)
        check_range(self, "num_minibatches", lo=1)


def granularity_rewards(batch: G2RPORollout, granularities: list[int]) -> torch.Tensor:
    """(B, M) rewards in the order of ``granularities``: 1 is the row's own final, g > 1 its branch."""
    cols = []
    for g in granularities:
        if g == 1:
            cols.append(batch.rewards)
            continue
        if batch.branch_rewards is None or g not in batch.branch_granularities:
            raise ValueError(f"granularity {g} has no branch rewards in the rollout (its branches: "
                             f"{list(batch.branch_granularities)}; were they scored?)")
        cols.append(batch.branch_rewards[:, batch.branch_granularities.index(g)])
    return torch.stack(cols, 1).float()


def integrate_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, how: str = "sum", eps: float = 1e-4,
                         ddof: int = 1) -> torch.Tensor:
    """(B,) integrated advantage from (B, M) per-granularity rewards.

    Column m is normalised within each group on its own, ``(r − mean_group) / (std_group + eps)``;
    the M columns are then summed (``how="sum"``) or averaged. A NaN reward gives 0 in its column.
    """
    if rewards.dim() != 2 or rewards.shape[0] != group_ids.shape[0]:
        raise ValueError(f"rewards must be (B, M) with B = len(group_ids), got {tuple(rewards.shape)}")
    per = torch.stack([flow_grpo_advantages(rewards[:, m], group_ids, eps, False, ddof)
                       for m in range(rewards.shape[1])], 1)  # (B, M)
    return per.sum(1) if how == "sum" else per.mean(1)


@register_algorithm("g2rpo")
class G2RPO(Algorithm):
    """G²RPO on singular-SDE rollouts with ODE branches (``rollout:`` is a G2RPORolloutConfig).

    Each row trains exactly its one SDE step ``sde_step[b]``: a micro-batch may mix steps, so the
    model is called with per-row σ (every rank runs the same number of passes whatever its steps).
    """

    family = "flow"
    config = G2RPOConfig
    rollout_config = G2RPORolloutConfig
    rollout_fields = ("latents", "log_probs", "sigmas", "sde_step", "rewards", "branch_rewards", "advantages")

    def check_job(self, job) -> None:
        check_shard_split(job, self.cfg.num_minibatches)

    def advantages(self, batch: G2RPORollout) -> G2RPORollout:
        c = self.cfg
        rewards = granularity_rewards(batch, list(batch.granularities))
        batch.advantages = integrate_advantages(rewards, batch.group_ids, c.adv_integration, c.adv_eps,
                                                c.adv_std_ddof).to(batch.rewards.dtype)
        return batch

    # -- learner --------------------------------------------------------------------------------
    def _micro_batch(self, ctx: LearnerContext, mb: G2RPORollout, scale: float) -> dict:
        """Loss of each row's own SDE step on one micro-batch, scaled; one backward."""
        policy = ctx.policy
        dev, dtype = policy.device, policy.dtype
        rows, k = torch.arange(len(mb)), mb.sde_step.long()  # (b,)
        x = mb.latents[rows, k].to(dev)  # (b, C, H, W) the shared state before the step
        x_next = mb.latents[rows, k + 1].to(dev)  # (b, C, H, W) the row's SDE sample
        sigma, sigma_next = mb.sigmas[k].to(dev), mb.sigmas[k + 1].to(dev)  # (b,) each row's own step
        ref_mean = None
        if self.cfg.kl_beta > 0:
            with torch.no_grad(), ctx.reference() as ref:
                v_ref = ref.velocity_fn(mb.prompts, mb.cfg_scale)(x.to(dtype).contiguous(), sigma)
                ref_mean = sde_step(x, v_ref, sigma, sigma_next, mb.noise_level, prev_sample=x_next).mean
        detach = {} if self.cfg.cfg_detach_uncond is None else {"cfg_detach_uncond": self.cfg.cfg_detach_uncond}
        v = ctx.engine(mb.prompts, x.to(dtype).contiguous(), sigma, mb.cfg_scale, **detach)
        out = sde_step(x, v, sigma, sigma_next, mb.noise_level, prev_sample=x_next)
        old = mb.log_probs[rows, k].to(dev)  # (b,) behaviour log-prob of the same step
        loss, metrics = step_loss(out.log_prob, old, mb.advantages.to(dev).float(), out.mean, ref_mean, out.std,
                                  x[0].numel(), self.cfg)
        ctx.engine.backward(loss / scale)
        return metrics

    def update(self, ctx: LearnerContext, batch: G2RPORollout) -> dict:
        """``num_inner_epochs × num_minibatches`` optimizer updates on this rank's rows."""
        c = self.cfg
        micro = ctx.micro_batch_size or len(batch)
        _check_batch(batch, micro, c.num_minibatches)
        generator = torch.Generator().manual_seed(int(batch.seed))
        n_micro = len(batch) // micro
        per_update = n_micro // c.num_minibatches
        # each backward is 1/(micro-batches per update) of this rank's mean loss, which is 1/world_size of the step's
        scale = float(per_update * ctx.world_size)
        acc, grad_norms = Accumulator(), []
        ctx.policy.train()
        for _ in range(c.num_inner_epochs):
            order = torch.randperm(len(batch), generator=generator)
            for m in range(n_micro):
                acc.add(self._micro_batch(ctx, batch.select(order[m * micro:(m + 1) * micro]), scale))
                if (m + 1) % per_update == 0:
                    grad_norms.append(ctx.engine.step())
        metrics = acc.mean()
        metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), samples=len(batch),
                       sde_step_mean=batch.sde_step.float().mean().item())
        if batch.branch_rewards is not None:  # what the coarser branches scored (the rows' own: reward_mean)
            for m, g in enumerate(batch.branch_granularities):
                r = batch.branch_rewards[:, m]
                metrics[f"reward_g{g}"] = r[~torch.isnan(r)].mean().item() if (~torch.isnan(r)).any() else float("nan")
        return metrics


def _check_batch(batch: G2RPORollout, micro: int, minibatches: int) -> None:
    if not isinstance(batch, G2RPORollout) or batch.sde_step is None:
        raise ValueError("g2rpo trains on G²RPO rollouts (rollout: G2RPORolloutConfig); this batch has no sde_step")
    if batch.advantages is None or not torch.isfinite(batch.advantages).all():
        raise ValueError("the rollout's advantages are missing or not finite (compute them with G2RPO.advantages)")
    if len(batch) % micro or (len(batch) // micro) % minibatches:
        raise ValueError(f"{len(batch)} samples on this rank do not split into {minibatches} mini-batches of "
                         f"micro-batches of {micro} (learner.micro_batch_size)")
    if batch.noise_level <= 0:
        raise ValueError(f"the rollout was sampled with noise_level={batch.noise_level}: ODE steps have no log-prob")
