"""wd1: ratio-free weighted log-likelihood policy optimisation for masked-diffusion LMs (pure torch).

Tang et al. 2025, "wd1: Weighted Policy Optimization for Reasoning in Diffusion Language Models",
arXiv:2507.08838. GRPO-style objectives need the ratio π_θ/π_old of two *estimated* likelihoods of
a masked-diffusion LM, whose estimation errors are exponentiated. wd1 instead fits the policy to
the closed-form optimum of a KL-regularised objective, which turns the update into a weighted
log-likelihood with one estimate of log π_θ and no old-policy ratio, no clipping. Per group of G
completions o_1..o_G of a prompt q with advantages A_i:

    w+_i = softmax_i(ψ·A)        (raises the likelihood of the better completions)
    w−_i = softmax_i(−ψ·A)       (lowers the likelihood of the worse ones: "negative sample unlearning")
    loss(q) = −Σ_i (w+_i − w−_i) · log π_θ(o_i | q)

Both weight vectors sum to 1 over a group, so a group whose advantages are all equal contributes
exactly nothing (they are dropped with ``skip_uniform_groups``). log π_θ(o | q) is the sum over the
completion's tokens of a per-token estimate from rlgen/algos/mdm_grpo.py's estimators (``d1``,
``coupled``, ``trajectory``; the public wd1 code uses d1's one-step estimate), a fresh plan per
inner iteration. ``kl_beta`` > 0 adds mdm_grpo's β·k3 KL to the reference (the paper's target
policy contains the reference; its public loss has no KL term, hence the default 0).

The weights are a function of the group's rewards only, so they are computed on the driver: the
batch's ``advantages`` field carries each row's coefficient n_g·(w+ − w−) (n_g = the group's
scored rows), and ``Σ_rows coefficient·log π / global_size`` is the mean over groups of the loss
above — the same update on any number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.algos.advantages import group_advantages
from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.algos.mdm_grpo import (BLOCK_CAUSAL_ESTIMATOR, ESTIMATORS, ScorePlan, banned_ids, bucket_plan,
                                  centred_advantages, k3_kl, mixed_groups, plan_logprobs, plan_rows)
from rlgen.batches import TextRollout
from rlgen.config import FieldError, check_choice, check_range
from rlgen.utils import derive_seed


@dataclass
class WD1Config(AlgoConfig):
    name: str = "wd1"
    psi: float = 1.0               # ψ: inverse temperature of the group softmax over ±advantages (public code: 1)
    negative: bool = True          # the w− term; False = positive-weighted likelihood only
    estimator: str = "d1"          # per-token log π estimate: d1 | coupled | trajectory (mdm_grpo's)
    prompt_mask_p: float = 0.15    # d1: probability of masking each prompt token
    coupled_t_min: float = 0.2     # coupled: masking ratio of view 1 drawn from U[t_min, t_max]
    coupled_t_max: float = 0.8
    adv_std: bool = True           # advantage (r − group mean) / group std; False: r − group mean
    kl_beta: float = 0.0           # weight of mdm_grpo's k3 KL to the reference (0 = no reference model)
    inner_iterations: int = 2      # gradient steps per rollout batch, each with a fresh plan
    skip_uniform_groups: bool = True  # groups whose rewards are all equal have w+ = w−: no gradient, skip them

    def __post_init__(self):
        check_choice(self, "estimator", sorted(ESTIMATORS))
        if not 0.0 <= self.coupled_t_min <= self.coupled_t_max <= 1.0:
            raise FieldError("coupled_t_min", f"need 0 <= coupled_t_min ({self.coupled_t_min}) <= coupled_t_max "
                                              f"({self.coupled_t_max}) <= 1")
        check_range(self, "psi", lo=0, lo_open=True)
        check_range(self, "prompt_mask_p", lo=0, hi=1)
        check_range(self, "kl_beta", lo=0)
        check_range(self, "inner_iterations", lo=1)


def group_softmax(scores: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N,) softmax of ``scores`` within each group over the ``valid`` rows; 0 for invalid rows."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    for g in torch.unique(group_ids):
        rows = (group_ids == g) & valid
        if rows.any():
            out[rows] = torch.softmax(scores[rows].double(), dim=0)
    return out


def wd1_weights(advantages: torch.Tensor, group_ids: torch.Tensor, psi: float,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w+, w−), each (N,): softmax(ψ·A) and softmax(−ψ·A) over each group's valid rows."""
    valid = torch.ones_like(advantages, dtype=torch.bool) if valid is None else valid
    return group_softmax(psi * advantages, group_ids, valid), group_softmax(-psi * advantages, group_ids, valid)


def wd1_coefficients(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: WD1Config) -> torch.Tensor:
    """(N,) each row's weight on log π in the ascent direction: n_g·(w+ − w−) (n_g·w+ without the
    negative term); 0 for rows without a reward (NaN), which are left out of their group's softmax."""
    valid = ~torch.isnan(rewards)
    adv = (group_advantages if cfg.adv_std else centred_advantages)(rewards, group_ids)
    w_pos, w_neg = wd1_weights(adv, group_ids, cfg.psi, valid)
    _, gid = torch.unique(group_ids, return_inverse=True)
    n_g = torch.zeros(int(gid.max()) + 1 if len(gid) else 0, dtype=torch.float64).index_add(0, gid, valid.double())
    coef = n_g[gid] * (w_pos - w_neg if cfg.negative else w_pos)
    return coef.to(rewards.dtype)


@register_algorithm("wd1")
class WD1(Algorithm):
    """wd1 (Tang et al. 2025, arXiv:2507.08838): −Σ_i (w+_i − w−_i)·log π_θ(o_i|q) with group
    softmax weights of ±ψ·A, no ratio, no clipping; log π from mdm_grpo's per-token estimators."""

    family = "masked_lm"
    config = WD1Config
    rollout_fields = ("buckets", "advantages")

    def check_job(self, job) -> None:
        from rlgen.families.masked_lm import check_masked_lm_job

        conv = check_masked_lm_job(job)
        if conv is not None and conv.attention == "block_causal" and self.cfg.estimator != "trajectory":
            raise ValueError(BLOCK_CAUSAL_ESTIMATOR.format(estimator=self.cfg.estimator))

    def advantages(self, batch: TextRollout) -> TextRollout:
        # the field the learner reads holds the wd1 coefficient, not the GRPO advantage (module docstring)
        batch.advantages = wd1_coefficients(batch.rewards, batch.group_ids, self.cfg)  # (N,)
        if self.cfg.skip_uniform_groups:
            return batch.keep_rows(mixed_groups(batch.rewards, batch.group_ids))
        return batch

    def update(self, ctx: LearnerContext, batch: TextRollout) -> dict:
        a, policy = self.cfg, ctx.policy
        if getattr(policy, "is_block_causal", False) and a.estimator != "trajectory":
            raise ValueError(BLOCK_CAUSAL_ESTIMATOR.format(estimator=a.estimator))
        if not batch.buckets:
            return {"kept_frac": 0.0}
        banned = banned_ids(policy)
        chunk = ctx.micro_batch_size or max(len(b) for b in batch.buckets)
        acc, norms = Accumulator(), []
        policy.eval()  # no dropout: the estimate is the model's, not a perturbed one
        for i in range(a.inner_iterations):
            for b in batch.buckets:
                plan = bucket_plan(a, b, policy.mask_id, derive_seed(batch.seed, i))
                for lo in range(0, len(b), chunk):
                    hi = min(lo + chunk, len(b))
                    acc.add(self._backward(ctx, batch, b, plan_rows(plan, lo, hi), lo, hi, banned),
                            float(b.weight[lo:hi].sum()))
            norms.append(ctx.engine.step())
        return {**acc.mean(), "grad_norm": sum(norms) / len(norms)}

    def _backward(self, ctx, batch, b, plan: ScorePlan, lo, hi, banned) -> dict:
        a, dev = self.cfg, ctx.device
        tokens = b.tokens[lo:hi].to(dev)
        plan = ScorePlan(plan.inputs.to(dev), plan.view.to(dev), plan.prompt_length)
        lp = plan_logprobs(ctx.engine, plan, tokens, banned)  # (b, G), 0 where not scored
        seq_lp = lp.sum(1)  # (b,) log π_θ(o | q) estimate
        coef = batch.advantages[b.rows[lo:hi]].to(dev).float()  # (b,) n_g·(w+ − w−)
        rows = -coef * seq_lp  # (b,)
        m = plan.token_mask.float()
        kl = torch.zeros_like(lp)
        if a.kl_beta > 0:
            with torch.no_grad(), ctx.reference() as ref:
                ref_lp = plan_logprobs(ref, plan, tokens, banned)
            kl = k3_kl(lp, ref_lp)
            rows = rows + a.kl_beta * (kl * m).sum(1) / m.sum(1).clamp_min(1.0)
        w = b.weight[lo:hi].to(dev)
        ctx.engine.backward((rows * w).sum() / batch.global_size)
        with torch.no_grad():
            n = w.sum().clamp_min(1.0)
            return {"loss": float((rows * w).sum() / n), "seq_logp": float((seq_lp * w).sum() / n),
                    "kl": float((kl * m).sum(1).div(m.sum(1).clamp_min(1.0)).mul(w).sum() / n),
                    "coef_abs": float((coef.abs() * w).sum() / n)}
