"""GRPO for masked-diffusion LMs: per-token log-prob estimators, PPO-clip, k3 KL (pure torch).

A masked-diffusion LM has no cheap exact log π(completion | prompt), so the policy ratio needs an
estimate. Each estimator builds a :class:`ScorePlan` — the masked sequences to feed and, for every
completion token, which of them scores it — and :func:`plan_logprobs` runs any model on a plan.
Policy, old policy and reference are scored on the SAME plan within an inner iteration (d1's
shared mask seed), so their differences carry no masking noise. Estimators (``estimator:`` in
config, :data:`ESTIMATORS`):

- ``d1`` (Zhao et al. 2025, arXiv:2504.12216): ONE forward; the completion fully masked, each
  prompt token masked independently with probability ``prompt_mask_p`` (a regulariser: a fresh
  mask per inner iteration); log π(o_k) ≈ log p_θ(o_k | q', all-mask). Cheap, but it scores every
  token as if nothing else were decoded, far from the state the sampler was in.
- ``coupled`` (DiffuCoder's Coupled-GRPO, Gong et al. 2025, arXiv:2506.20639): two complementary
  views; t ~ U[t_min, t_max], a random ⌈t·G⌉-subset of the completion masked in view 1 and the
  rest in view 2, every token scored exactly once with part of the completion visible. Lower
  variance than two independent masks (each token counted once, no 1/t weights).
- ``trajectory``: replay the decoding order the sampler recorded (``GenerateOutput.order``):
  view s shows the tokens unmasked before step s, and scores those unmasked at step s. It is the
  exact log-probability of each token at the state it was chosen in (the sampler's own
  token_logprobs at temperature 1) — deterministic, no Monte-Carlo variance — for one forward per
  decoding step (3 for a 3-token arith answer).

Tokens with ``order < 0`` (eos fill, not a model decision) get no credit in any estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlgen.algos.advantages import group_advantages
from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.batches import TextBucket, TextRollout, row_generator
from rlgen.config import FieldError, check_choice, check_range
from rlgen.samplers.masked import model_logits
from rlgen.utils import derive_seed


@dataclass
class MDMGRPOConfig(AlgoConfig):
    name: str = "mdm_grpo"
    estimator: str = "d1"          # d1 | coupled | trajectory (see module docstring)
    prompt_mask_p: float = 0.15    # d1: probability of masking each prompt token
    coupled_t_min: float = 0.2     # coupled: masking ratio of view 1 drawn from U[t_min, t_max]
    coupled_t_max: float = 0.8
    clip_range: float = 0.2        # PPO clip ε on the per-token ratio
    kl_beta: float = 0.04          # weight of the k3 KL to the reference (0 = no reference model)
    adv_clip_max: float = 5.0      # advantages clipped to ±this
    inner_iterations: int = 2      # μ: gradient steps per rollout batch, each with a fresh plan
    # d1-exact options (docs/mdm_grpo.md, "rlgen vs d1"); the defaults are rlgen's measured behaviour:
    skip_uniform_groups: bool = True  # drop groups whose rewards are all equal; False (d1) keeps them: zero
    #                                   advantage, but their β·KL term still pulls toward the reference
    adv_std: bool = True           # advantage (r − group mean) / group std; False (d1): r − group mean
    loss_agg: str = "sequence"     # sequence: mean over each row's tokens, then over rows | token (d1): sum over
    #                                every scored token of the step / the step's scored tokens (all ranks)
    ref_refresh_every: int = 0     # 0: the reference stays the base | N (d1's sync): it becomes the policy after
    #                                every N-th update (full fine-tuning, ZeRO <= 2; kept in checkpoints)

    def __post_init__(self):  # fail at config load, not after the first rollout
        check_choice(self, "estimator", sorted(ESTIMATORS))
        check_choice(self, "loss_agg", LOSS_AGG)
        if not 0.0 <= self.coupled_t_min <= self.coupled_t_max <= 1.0:
            raise FieldError("coupled_t_min", f"need 0 <= coupled_t_min ({self.coupled_t_min}) <= coupled_t_max "
                                              f"({self.coupled_t_max}) <= 1")
        check_range(self, "prompt_mask_p", lo=0, hi=1)
        check_range(self, "clip_range", lo=0, lo_open=True)
        check_range(self, "kl_beta", lo=0)
        check_range(self, "adv_clip_max", lo=0, lo_open=True)
        check_range(self, "inner_iterations", lo=1)
        check_range(self, "ref_refresh_every", lo=0)


@dataclass
class ScorePlan:
    """What to feed and which view scores each completion token; n views, B rows, L = P + G."""

    inputs: torch.Tensor  # (n, B, L) long: masked sequences
    view: torch.Tensor    # (B, G) long: the view scoring each completion token, −1 = not scored
    prompt_length: int

    @property
    def token_mask(self) -> torch.Tensor:  # (B, G) bool
        return self.view >= 0


ESTIMATORS: dict[str, Callable] = {}
LOSS_AGG = ("sequence", "token")


def register_estimator(name: str):
    def deco(fn):
        ESTIMATORS[name] = fn
        return fn
    return deco


def make_plan(cfg: MDMGRPOConfig, tokens: torch.Tensor, order: torch.Tensor, prompt_length: int,
              mask_id: int, generator: torch.Generator | None = None) -> ScorePlan:
    """tokens (B, P + G), order (B, G) from ``generate`` → the configured estimator's plan."""
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg.estimator!r} (known: {', '.join(sorted(ESTIMATORS))})")
    return ESTIMATORS[cfg.estimator](cfg, tokens, order, prompt_length, mask_id, generator)


@register_estimator("d1")
def d1_plan(cfg, tokens, order, P, mask_id, generator=None) -> ScorePlan:
    x = tokens.clone()  # (B, L)
    drop = torch.rand(x[:, :P].shape, generator=generator, device=x.device) < cfg.prompt_mask_p  # (B, P)
    x[:, :P] = x[:, :P].masked_fill(drop, mask_id)
    x[:, P:] = mask_id
    view = torch.where(order >= 0, 0, -1)  # (B, G)
    return ScorePlan(x[None], view, P)


@register_estimator("coupled")
def coupled_plan(cfg, tokens, order, P, mask_id, generator=None) -> ScorePlan:
    B, G = order.shape
    t = cfg.coupled_t_min + (cfg.coupled_t_max - cfg.coupled_t_min) * torch.rand(
        B, generator=generator, device=tokens.device)  # (B,)
    k = torch.ceil(t * G).long().clamp(1, G)  # (B,) tokens masked in view 1 (≥ 1, so view 1 scores some)
    noise = torch.rand(B, G, generator=generator, device=tokens.device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, G) a uniform random permutation's ranks
    in_first = rank < k[:, None]  # (B, G): masked (and scored) in view 0; the rest in view 1
    views = tokens[None].repeat(2, 1, 1)  # (2, B, L)
    views[0, :, P:] = tokens[:, P:].masked_fill(in_first, mask_id)
    views[1, :, P:] = tokens[:, P:].masked_fill(~in_first, mask_id)
    view = torch.where(in_first, 0, 1)
    return ScorePlan(views, torch.where(order >= 0, view, -1), P)


@register_estimator("trajectory")
def trajectory_plan(cfg, tokens, order, P, mask_id, generator=None) -> ScorePlan:
    n = max(int(order.max()) + 1, 1)  # decoding steps of the longest row
    steps = torch.arange(n, device=tokens.device)[:, None, None]  # (n, 1, 1)
    known = (order[None] >= 0) & (order[None] < steps)  # (n, B, G): unmasked before step s
    # eos fills (order −1) were settled after the eos: show them as mask, as the sampler saw them
    views = tokens[None].repeat(n, 1, 1)  # (n, B, L)
    views[:, :, P:] = torch.where(known, views[:, :, P:], torch.full_like(views[:, :, P:], mask_id))
    return ScorePlan(views, order.clone(), P)


def plan_logprobs(model, plan: ScorePlan, tokens: torch.Tensor, banned_ids=()) -> torch.Tensor:
    """(B, G) log p_model(completion token | its view); 0 where not scored. Keeps autograd.

    All n views go through the model as one batch of n·B rows. ``banned_ids`` (the sampler's
    ``forbidden_ids``: [MASK], [PAD]) are excluded from the softmax, as the sampler excludes them,
    so the ``trajectory`` estimate equals the sampler's own token log-probs.
    """
    n, B, L = plan.inputs.shape
    P = plan.prompt_length
    logits = model_logits(model, plan.inputs.reshape(n * B, L))[:, P:].reshape(n, B, L - P, -1)  # (n, B, G, V)
    target = tokens[:, P:]  # (B, G)
    view = plan.view.clamp_min(0)
    # each token's own view first, float32 after: n views of a long trajectory would not fit in float32
    chosen = logits.gather(0, view[None, :, :, None].expand(1, B, L - P, logits.shape[-1]))[0].float()  # (B, G, V)
    if len(banned_ids):
        chosen = chosen.index_fill(-1, torch.tensor(sorted(set(banned_ids)), device=chosen.device), float("-inf"))
    lp = torch.log_softmax(chosen, dim=-1).gather(-1, target[..., None]).squeeze(-1)  # (B, G)
    return torch.where(plan.token_mask, lp, torch.zeros_like(lp))


def banned_ids(policy) -> tuple[int, ...]:
    """The ids the sampler never predicts ([MASK]; [PAD] unless it is end of text): left out of the
    replayed softmax too, so ``trajectory`` log-probs equal the sampler's."""
    return tuple(getattr(policy, "forbidden_ids", (policy.mask_id, policy.pad_id)))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(r − l) − (r − l) − 1 ≥ 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, token_mask: torch.Tensor,
                clip_range: float, ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0,
                adv_clip_max: float = 5.0, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """d1/GRPO loss: per-token PPO-clip + β·k3 KL, averaged over each row's scored tokens, then rows.

    logp, old_logp, ref_logp, token_mask (B, G); advantages (B,). Returns (loss, metrics floats);
    ``reduction="none"`` returns the per-row losses (B,) instead of their mean; ``"sum"`` the per-row
    SUMS over scored tokens (B,), for token-level aggregation (d1: divide by the total token count).
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)[:, None]  # (B, 1)
    m = token_mask.float()
    ratio = torch.exp(logp - old_logp)  # (B, G)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None and kl_beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_beta * kl
    row_sum = (per_token * m).sum(dim=1)  # (B,)
    row_loss = row_sum / m.sum(dim=1).clamp_min(1.0)  # (B,)
    loss = {"none": row_loss, "sum": row_sum}.get(reduction, row_loss.mean())
    with torch.no_grad():
        total = m.sum().clamp_min(1.0)
        metrics = {"clip_frac": float(((clipped > unclipped).float() * m).sum() / total),
                   "kl": float((kl * m).sum() / total),
                   "ratio_mean": float((ratio * m).sum() / total),
                   "approx_kl_old": float(((old_logp - logp) * m).sum() / total)}
    return loss, metrics


def centred_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) r − group mean, not divided by the group std (d1, Dr. GRPO: Liu et al. 2025,
    arXiv:2503.20783, which argue the std division over-weights near-uniform groups). NaN rewards
    are left out of the mean and get 0, as in :func:`group_advantages`."""
    r = rewards.double()
    valid = ~torch.isnan(r)
    _, gid = torch.unique(group_ids, return_inverse=True)  # (B,) group index
    zeros = torch.zeros(int(gid.max()) + 1 if len(gid) else 0, dtype=torch.float64, device=r.device)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    mean = zeros.index_add(0, gid, r0) / zeros.index_add(0, gid, valid.double()).clamp_min(1)  # (groups,)
    return torch.where(valid, r - mean[gid], torch.zeros_like(r)).to(rewards.dtype)


def mixed_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose group's rewards are not all equal (the only ones with signal)."""
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    for g in torch.unique(group_ids):
        rows = group_ids == g
        r = rewards[rows]
        keep[rows] = bool((r.max() - r.min()).abs() > 1e-12) if r.numel() else False
    return keep


def text_group_advantages(batch: TextRollout, adv_std: bool, skip_uniform_groups: bool) -> TextRollout:
    """GRPO's driver side: (r − group mean) [/ group std] per row; groups with equal rewards dropped if asked."""
    adv = group_advantages if adv_std else centred_advantages
    batch.advantages = adv(batch.rewards, batch.group_ids)  # (N,)
    if skip_uniform_groups:
        return batch.keep_rows(mixed_groups(batch.rewards, batch.group_ids))
    return batch


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------
def bucket_plan(cfg: MDMGRPOConfig, b: TextBucket, mask_id: int, seed: int) -> ScorePlan:
    """The estimator's plan for a bucket; random estimators draw each row from (seed, row id), so a
    row gets the same plan whichever rank (and micro-batch) it lands in."""
    if cfg.estimator == "trajectory":  # deterministic: one call for the bucket
        return make_plan(cfg, b.tokens, b.order, b.prompt_length, mask_id)
    rows = [make_plan(cfg, b.tokens[r:r + 1], b.order[r:r + 1], b.prompt_length, mask_id,
                      row_generator(seed, int(b.rows[r]))) for r in range(len(b))]
    return ScorePlan(torch.cat([p.inputs for p in rows], dim=1), torch.cat([p.view for p in rows]), b.prompt_length)


def plan_rows(plan: ScorePlan, lo: int, hi: int) -> ScorePlan:
    return ScorePlan(plan.inputs[:, lo:hi], plan.view[lo:hi], plan.prompt_length)


# d1 and coupled score tokens with earlier answer blocks (partly) masked: a state a block-causal
# model never conditions on (it decodes block b after blocks < b are final), so their estimates are
# not log-probs of its sampler; the trajectory replay is exact for it (rlgen/samplers/block.py).
BLOCK_CAUSAL_ESTIMATOR = ("algo.estimator={estimator} does not estimate a block-causal policy's log-probs (it "
                          "masks earlier answer blocks, which the block sampler never does); use "
                          "algo.estimator=trajectory")


@register_algorithm("mdm_grpo")
class MDMGRPO(Algorithm):
    """GRPO for masked-diffusion LMs (d1: Zhao et al. 2025, arXiv:2504.12216; coupled: Gong et al.
    2025, arXiv:2506.20639): per-token PPO-clip on an estimated log-prob plus a k3 KL, with
    group-relative advantages; groups whose rewards are all equal carry no signal and are dropped
    (``skip_uniform_groups``). Each inner iteration draws a fresh plan, shared by policy, old
    policy and reference (d1's shared mask seed). ``adv_std``, ``loss_agg`` and
    ``skip_uniform_groups`` switch to d1's exact choices (docs/mdm_grpo.md, "rlgen vs d1")."""

    family = "masked_lm"
    config = MDMGRPOConfig
    rollout_fields = ("buckets", "advantages")

    def check_job(self, job) -> None:
        from rlgen.families.masked_lm import check_masked_lm_job

        conv = check_masked_lm_job(job)
        n = self.cfg.ref_refresh_every
        for bad, why in ((n and job.policy.lora.rank > 0, "policy.lora.rank > 0 (the reference is the base with "
                                                           "the adapter off: nothing to refresh)"),
                         (n and job.learner.zero_stage == 3, "learner.zero_stage=3 (the policy it would copy is "
                                                             "partitioned over the ranks)"),
                         (n and self.cfg.kl_beta == 0, "algo.kl_beta=0 (there is no reference)")):
            if bad:
                raise ValueError(f"algo.ref_refresh_every={n} refreshes a frozen reference copy: not with {why}")
        if conv is not None and conv.attention == "block_causal" and self.cfg.estimator != "trajectory":
            raise ValueError(BLOCK_CAUSAL_ESTIMATOR.format(estimator=self.cfg.estimator))

    def advantages(self, batch: TextRollout) -> TextRollout:
        return text_group_advantages(batch, self.cfg.adv_std, self.cfg.skip_uniform_groups)

    def update(self, ctx: LearnerContext, batch: TextRollout) -> dict:
        a, policy = self.cfg, ctx.policy
        dev, banned = ctx.device, banned_ids(policy)
        if getattr(policy, "is_block_causal", False) and a.estimator != "trajectory":
            raise ValueError(BLOCK_CAUSAL_ESTIMATOR.format(estimator=a.estimator))
        if not batch.buckets:
            return {"kept_frac": 0.0}
        chunk = ctx.micro_batch_size or max(len(b) for b in batch.buckets)
        plans = [[bucket_plan(a, b, policy.mask_id, derive_seed(batch.seed, i)) for b in batch.buckets]
                 for i in range(a.inner_iterations)]
        # old policy = the policy before this iteration's first step (step 0 scores itself, detached)
        with torch.no_grad():
            olds = [[None if i == 0 else plan_logprobs(policy, p, b.tokens.to(dev), banned)
                     for p, b in zip(plans[i], batch.buckets)] for i in range(a.inner_iterations)]
            refs = [[self._ref_logprobs(ctx, p, b, banned) for p, b in zip(plans[i], batch.buckets)]
                    for i in range(a.inner_iterations)]
        acc, norms = Accumulator(), []
        policy.eval()  # no dropout: old and new log-probs of one plan must agree before the update
        for i in range(a.inner_iterations):
            for p, b, old, ref in zip(plans[i], batch.buckets, olds[i], refs[i]):
                for lo in range(0, len(b), chunk):
                    hi = min(lo + chunk, len(b))
                    acc.add(self._backward(ctx, batch, b, plan_rows(p, lo, hi), lo, hi, old, ref, banned),
                            float(b.weight[lo:hi].sum()))
            norms.append(ctx.engine.step())
        return {**acc.mean(), "grad_norm": sum(norms) / len(norms)}

    def _ref_logprobs(self, ctx, plan, b, banned):
        if self.cfg.kl_beta <= 0:
            return None
        with ctx.reference() as ref:
            return plan_logprobs(ref, plan, b.tokens.to(ctx.device), banned)

    def _backward(self, ctx, batch, b, plan, lo, hi, old, ref, banned) -> dict:
        a, dev = self.cfg, ctx.device
        tokens = b.tokens[lo:hi].to(dev)
        lp = plan_logprobs(ctx.engine, ScorePlan(plan.inputs.to(dev), plan.view.to(dev), plan.prompt_length),
                           tokens, banned)  # (b, G) through the trained forward
        old = lp.detach() if old is None else old[lo:hi]
        adv = batch.advantages[b.rows[lo:hi]].to(dev).float()  # (b,)
        token = a.loss_agg == "token"
        rows, m = policy_loss(lp, old, adv, plan.token_mask.to(dev), a.clip_range, None if ref is None else ref[lo:hi],
                              a.kl_beta, a.adv_clip_max, reduction="sum" if token else "none")
        w = b.weight[lo:hi].to(dev)
        if token:  # d1: Σ over the step's scored tokens / their count over ALL ranks (shard() counts it)
            ctx.engine.backward((rows * w).sum() / max(batch.global_tokens or batch.scored_tokens(), 1))
            n_tok = (plan.token_mask.to(dev).float().sum(1) * w).sum().clamp_min(1.0)
            return {"loss": float((rows * w).detach().sum() / n_tok), **m}
        ctx.engine.backward((rows * w).sum() / batch.global_size)
        return {"loss": float((rows * w).detach().sum() / w.sum().clamp_min(1.0)), **m}
