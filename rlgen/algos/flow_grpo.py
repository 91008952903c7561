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

from rlgen.algos.advantages import group_advantages
from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.batches import ImageRollout
from rlgen.config import check_choice, check_range
from rlgen.samplers.flow_sde import sde_step_fn


@dataclass
class FlowGRPOConfig(AlgoConfig):
    name: str = "flow_grpo"
    clip_range: float = 1e-4          # PPO ε on the ratio of per-dimension-mean log-probs (paper: 1e-4)
    adv_clip_max: float = 5.0         # advantages clamped to ±this
    kl_beta: float = 0.01             # weight of KL(policy step ‖ reference step); 0 disables the reference
    log_prob_reduction: str = "mean"  # "mean": per-dimension mean (the paper's small clip range); "sum"
    kl_reduction: str = "mean"        # "mean" over dimensions (as flow_grpo's code) or "sum"
    global_std: bool = False          # advantages normalised by the batch std instead of the group's
    adv_eps: float = 1e-4
    num_inner_epochs: int = 1         # passes over each rollout batch (each reshuffles)
    num_minibatches: int = 1          # optimizer updates per pass: the rank's samples split this many ways
    timestep_fraction: float = 1.0    # train on this fraction of the SDE steps (same subset per iteration)
    # Reference-exact options (docs/flow_grpo.md, "Options and the reference code"). Defaults keep rlgen's
    # behaviour; the comment gives the value of Flow-GRPO's code (yifan123/flow_grpo, scripts/train_sd3.py).
    kl_units: str = "exact"           # "exact": the Gaussian step KL | "flow_grpo": that KL × |dt| of the step,
                                      # the quantity its code weights by beta (a kl_beta copied from it means the same)
    adv_std_ddof: int = 1             # group (and global) std: 1 = unbiased (torch) | 0 = numpy's np.std (reference)
    drop_zero_adv_groups: bool = False  # True (reference): rows whose advantage is exactly 0 (all rows of an
                                        # all-equal group) leave the loss: no KL, and the mean is over kept rows
    cfg_detach_uncond: bool | None = None  # None: the policy's own (pipelines: True; pixel models: False) |
                                           # True (reference): the CFG unconditional branch carries no gradient

    def __post_init__(self):
        for name in ("log_prob_reduction", "kl_reduction"):
            check_choice(self, name, ("mean", "sum"))
        check_choice(self, "kl_units", ("exact", "flow_grpo"))
        check_choice(self, "adv_std_ddof", (0, 1))
        check_range(self, "clip_range", lo=0, lo_open=True)
        check_range(self, "adv_clip_max", lo=0, lo_open=True)
        check_range(self, "kl_beta", lo=0)
        check_range(self, "adv_eps", lo=0)
        check_range(self, "num_inner_epochs", lo=1)
        check_range(self, "num_minibatches", lo=1)
        check_range(self, "timestep_fraction", lo=0, hi=1, lo_open=True)


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                clip_range: float, adv_clip_max: float = 5.0, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
    """Per-step PPO-clip: ``mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))`` with ρ = exp(log_prob − old).

    All inputs (B,). ``old_log_prob`` comes from the behaviour policy that sampled the step.
    ``weight`` (B,): each row's term is multiplied by it before the mean (a keep mask, rescaled).
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"shapes differ: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, "
                         f"advantages {tuple(advantages.shape)}")
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)  # (B,)
    loss = (per_row if weight is None else per_row * weight).mean()
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


def kl_unit_scale(sigma: float, sigma_next: float, units: str) -> float:
    """Factor from the exact step KL to the configured ``kl_units``.

    Flow-GRPO's code divides the squared mean difference by 2·std_dev_t², where its std_dev_t is
    ``noise_level·sqrt(σ/(1−σ))`` without the step's ``sqrt(|dt|)``; the Gaussian step's variance is
    std_dev_t²·|dt|, so its number is the exact KL × |dt| (|dt| = σ − σ_next).
    """
    return sigma - sigma_next if units == "flow_grpo" else 1.0


def step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              mean: torch.Tensor | None, ref_mean: torch.Tensor | None, std: torch.Tensor | float,
              num_dims: int, cfg: FlowGRPOConfig, kl_scale: float = 1.0,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one denoising step for a micro-batch: clipped policy term + β·KL to the reference.

    ``log_prob``/``old_log_prob`` are sums over the sample's ``num_dims`` dimensions (B,), as
    ``sde_step`` returns them; the configured reduction divides both the same way. ``kl_scale``
    multiplies the KL (:func:`kl_unit_scale`); ``weight`` (B,) multiplies each row's terms.
    """
    lp = reduce_over_dims(log_prob, num_dims, cfg.log_prob_reduction)
    old = reduce_over_dims(old_log_prob, num_dims, cfg.log_prob_reduction)
    loss, metrics = policy_loss(lp, old, advantages, cfg.clip_range, cfg.adv_clip_max, weight)
    metrics["policy_loss"] = loss.item()
    if cfg.kl_beta > 0:
        if mean is None or ref_mean is None:
            raise ValueError("kl_beta > 0 needs the policy and reference step means")
        kl_rows = reduce_over_dims(kl_to_ref(mean, ref_mean, std), num_dims, cfg.kl_reduction)  # (B,)
        if kl_scale != 1.0:
            kl_rows = kl_rows * kl_scale
        kl = (kl_rows if weight is None else kl_rows * weight).mean()
        loss = loss + cfg.kl_beta * kl
        metrics["kl"] = kl.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def flow_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float, global_std: bool,
                         ddof: int = 1) -> torch.Tensor:
    """(B,) group-relative advantages with the std's ``ddof`` (1: ``group_advantages``; 0: ``np.std``).

    ddof 0 divides the group's (or, with ``global_std``, the batch's) squared deviations by n, not
    n − 1; NaN rewards are left out and get advantage 0, as in ``group_advantages``.
    """
    if ddof == 1:
        return group_advantages(rewards, group_ids, eps, global_std)
    r = rewards.double()
    valid = ~torch.isnan(r)
    _, gid = torch.unique(group_ids, return_inverse=True)  # (B,) group index
    zeros = torch.zeros(int(gid.max()) + 1 if len(gid) else 0, dtype=torch.float64)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = zeros.index_add(0, gid, valid.double()).clamp_min(1)  # (G,)
    centred = torch.where(valid, r - (zeros.index_add(0, gid, r0) / count)[gid], torch.zeros_like(r))  # (B,)
    if global_std:
        std = (r[valid] - r[valid].mean()).pow(2).mean().sqrt() if valid.any() else r.new_tensor(0.0)
    else:
        std = (zeros.index_add(0, gid, centred.pow(2)) / count).sqrt()[gid]  # (B,)
    return torch.where(valid, centred / (std + eps), torch.zeros_like(r)).to(rewards.dtype)


def keep_weights(advantages: torch.Tensor, world_rows: int, global_size: int) -> torch.Tensor:
    """(B,) row weights that drop zero-advantage rows from a mean over ``world_rows`` rows.

    A kept row weighs ``world_rows / global_size`` (global_size = kept rows of the whole step, set
    by ``FlowGRPO.advantages``), so a mean over all rows of the step becomes the mean over the kept
    ones, whatever shard a kept row landed on; dropped rows weigh 0.
    """
    keep = (advantages != 0).float()
    return keep * (world_rows / max(global_size, 1))


# ----------------------------------------------------------------------------------------------
# The learner update
# ----------------------------------------------------------------------------------------------
def num_train_steps(num_sde_steps: int, timestep_fraction: float) -> int:
    """How many of an iteration's SDE steps are trained on (Flow-GRPO: int(S·fraction), at least 1)."""
    return max(1, min(num_sde_steps, int(num_sde_steps * timestep_fraction + 1e-9)))


def choose_train_steps(sde_mask: torch.Tensor, timestep_fraction: float, generator: torch.Generator) -> list[int]:
    """Sorted step indices to train on: a random subset of the SDE steps (one per iteration)."""
    sde = torch.nonzero(sde_mask.cpu()).flatten()  # (S_sde,)
    if len(sde) == 0:
        raise ValueError("the rollout has no SDE steps (sde_mask is all False): nothing to train on")
    k = num_train_steps(len(sde), timestep_fraction)
    pick = torch.randperm(len(sde), generator=generator)[:k]
    return sorted(sde[pick].tolist())


def _check_batch(batch: ImageRollout, micro: int, minibatches: int) -> None:
    if batch.advantages is None:
        raise ValueError("the rollout has no advantages: compute them (group_advantages) before training")
    if not torch.isfinite(batch.advantages).all():
        raise ValueError("the rollout's advantages contain NaN/inf (NaN rewards must map to advantage 0)")
    if len(batch) % micro or (len(batch) // micro) % minibatches:
        raise ValueError(f"{len(batch)} samples on this rank do not split into {minibatches} mini-batches of "
                         f"micro-batches of {micro} (learner.micro_batch_size)")
    if batch.noise_level <= 0:
        raise ValueError(f"the rollout was sampled with noise_level={batch.noise_level}: ODE steps have no log-prob")


def check_shard_split(job, num_minibatches: int) -> None:
    """The step's samples must split into learner shards of whole mini-batches of micro-batches."""
    n = job.prompts.per_step * job.prompts.group_size
    k, micro, mbs = job.learner.num_learners, job.learner.micro_batch_size, num_minibatches
    per_rank = n // k
    if n % k or (micro and per_rank % micro) or (per_rank // (micro or per_rank)) % mbs:
        raise ValueError(f"{n} samples per step (prompts.per_step × group_size) must split into "
                         f"learner.num_learners={k} shards of algo.num_minibatches={mbs} mini-batches of "
                         f"learner.micro_batch_size={micro or per_rank} samples")


@register_algorithm("flow_grpo")
class FlowGRPO(Algorithm):
    """Flow-GRPO (Liu et al. 2025, arXiv:2505.05470) on a flow policy's SDE rollouts.

    An inner epoch shuffles the rank's samples and splits them into ``num_minibatches``
    mini-batches, one optimizer update each (PPO-style). Every (micro-batch × train step) pair of a
    mini-batch is one backward; the update follows the gradient of the mean per-step loss over the
    mini-batch's samples and the iteration's train steps. Later mini-batches are scored by an
    already-moved policy, so the ratio and its clip matter even in the first epoch.
    """

    family = "flow"
    config = FlowGRPOConfig
    rollout_fields = ("latents", "log_probs", "sigmas", "sde_mask", "advantages")

    def check_job(self, job) -> None:
        check_shard_split(job, self.cfg.num_minibatches)

    def advantages(self, batch):
        c = self.cfg
        batch.advantages = flow_grpo_advantages(batch.rewards, batch.group_ids, c.adv_eps, c.global_std,
                                                c.adv_std_ddof)
        if c.drop_zero_adv_groups:  # rows stay (shards keep their shape); global_size counts the kept ones
            batch.global_size = int((batch.advantages != 0).sum())
        return batch

    def row_weights(self, ctx: LearnerContext, mb: ImageRollout) -> torch.Tensor | None:
        """(b,) per-row loss weights, or None (every row weighs 1: today's mean)."""
        if not self.cfg.drop_zero_adv_groups:
            return None
        return keep_weights(mb.advantages.float(), self._world_rows, mb.global_size).to(ctx.device)

    def step_loss(self, ctx: LearnerContext, mb: ImageRollout, j: int, out, ref_mean, x) -> tuple[torch.Tensor, dict]:
        """Loss of step j on one micro-batch (subclasses change this; on-policy distillation does)."""
        old_lp, adv = mb.log_probs[:, j].to(x.device), mb.advantages.to(x.device).float()
        kl_scale = kl_unit_scale(float(mb.sigmas[j]), float(mb.sigmas[j + 1]), self.cfg.kl_units)
        return step_loss(out.log_prob, old_lp, adv, out.mean, ref_mean, out.std, x[0].numel(), self.cfg,
                         kl_scale, self.row_weights(ctx, mb))

    def _micro_batch_step(self, ctx: LearnerContext, mb: ImageRollout, j: int, scale: float) -> dict:
        """Loss of train step j (σ_j → σ_{j+1}) on one micro-batch, scaled; one backward."""
        policy = ctx.policy
        dev, dtype = policy.device, policy.dtype
        x = mb.latents[:, j].to(dev)  # (b, C, H, W) fp32: the stored state before the step
        x_next = mb.latents[:, j + 1].to(dev)  # (b, C, H, W): the sampled state it is scored on
        sigma = mb.sigmas[j].to(dev).expand(len(mb))  # (b,) the sampler fed the model exactly this
        s, s_next = float(mb.sigmas[j]), float(mb.sigmas[j + 1])
        ref_mean, sde_step = None, sde_step_fn(mb.sde_kind)  # the kind that drew the rollout scores it
        if self.cfg.kl_beta > 0:  # before the policy's forward: nothing runs between its forward and backward
            with torch.no_grad(), ctx.reference() as ref:
                v_ref = ref.velocity_fn(mb.prompts, mb.cfg_scale)(x.to(dtype).contiguous(), sigma)
                ref_mean = sde_step(x, v_ref, s, s_next, mb.noise_level, prev_sample=x_next).mean
        self.before_forward(ctx, mb, x, x_next, sigma, s, s_next)
        detach = {} if self.cfg.cfg_detach_uncond is None else {"cfg_detach_uncond": self.cfg.cfg_detach_uncond}
        v = ctx.engine(mb.prompts, x.to(dtype).contiguous(), sigma, mb.cfg_scale, **detach)  # (b, C, H, W)
        out = sde_step(x, v, s, s_next, mb.noise_level, prev_sample=x_next)
        loss, metrics = self.step_loss(ctx, mb, j, out, ref_mean, x)
        ctx.engine.backward(loss / scale)
        return metrics

    def before_forward(self, ctx, mb, x, x_next, sigma, s, s_next) -> None:
        """Hook for no-grad work on the state before the trained forward (e.g. a teacher's step)."""

    def update(self, ctx: LearnerContext, batch: ImageRollout) -> dict:
        """``num_inner_epochs × num_minibatches`` optimizer updates on this rank's share of a rollout.

        The train steps are drawn from the step seed (the same on every rank); each inner epoch
        then shuffles this rank's samples. Metrics are averaged over all (micro-batch, step)
        losses, grad_norm over the updates.
        """
        c = self.cfg
        micro = ctx.micro_batch_size or len(batch)
        _check_batch(batch, micro, c.num_minibatches)
        self._world_rows = len(batch) * ctx.world_size  # rows of the whole step (equal shards)
        generator = torch.Generator().manual_seed(int(batch.seed))
        steps = choose_train_steps(batch.sde_mask, c.timestep_fraction, generator)
        n_micro = len(batch) // micro
        per_update = n_micro // c.num_minibatches
        # each backward is 1/(micro-batches per update × train steps) of this rank's mean loss, and the
        # rank's mean is 1/world_size of the step's (equal shards; the engine undoes DeepSpeed's averaging)
        scale = float(per_update * len(steps) * ctx.world_size)
        acc, grad_norms = Accumulator(), []
        ctx.policy.train()
        for _ in range(c.num_inner_epochs):
            order = torch.randperm(len(batch), generator=generator)  # (B,) this epoch's sample order
            for m in range(n_micro):
                mb = batch.select(order[m * micro:(m + 1) * micro])
                for j in steps:
                    acc.add(self._micro_batch_step(ctx, mb, j, scale))
                if (m + 1) % per_update == 0:
                    grad_norms.append(ctx.engine.step())
        metrics = acc.mean()
        metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), num_train_steps=len(steps), samples=len(batch))
        return metrics
