"""SPG: sandwiched policy gradient for masked-diffusion LMs (pure torch).

Wang et al. 2025, "SPG: Sandwiched Policy Gradient for Masked Diffusion Language Models",
arXiv:2510.09541. The policy gradient Σ_i A_i ∇log π(o_i) needs log π, which a masked-diffusion LM
does not have in closed form. Replacing it by a lower bound (the ELBO) is right for A > 0 —
maximising a lower bound raises log π — but for A < 0 minimising a lower bound need not lower
log π. SPG maximises the ELBO of positive-advantage completions and minimises an evidence UPPER
bound (EUBO) of negative-advantage ones, so each sample's surrogate sits on the safe side:

    loss = −Σ_i A_i · [ELBO(o_i) if A_i > 0 else EUBO_β(o_i)]   (mean over rows; no ratio, no clip)

With ρ_i the distribution of the masked state at which token i is revealed (mask sets M ∋ i with
probability (k−1)!(n−k)!/n!, k = |M|, n = the tokens of i's block):

    ELBO(o)   = Σ_i E_{M∼ρ_i}[log p_θ(o_i | o_M masked)]
    EUBO_β(o) = Σ_i (1/β) · log E_{M∼ρ_i}[p_θ(o_i | o_M masked)^β]        (the paper's Rényi-type bound)

ELBO ≤ EUBO_β always (Jensen), and ELBO ≤ log π (π = the any-order decoding process, the model
class the ELBO describes). EUBO_β ≥ log π is guaranteed for β ≥ n by Hölder's inequality
(E[Π_i X_i] ≤ Π_i ‖X_i‖_n over the random decoding order); for smaller β — the paper's 1–2 on
long answers — it is a surrogate that can fall below log π (tests/algos/test_spg.py builds a
2-token case where β = 1 does). ``negative_bound="mix"`` (the paper's default) uses
ω·EUBO + (1 − ω)·ELBO for negatives, which trades the bound for lower variance.

**Block-wise masking** (the paper's ``block_random``): the sampler decodes the answer in blocks,
left to right; each Monte-Carlo sample picks one of the row's K blocks uniformly, keeps earlier
blocks clean, masks every later block (as the sampler saw them while decoding this one), and masks
l ∼ U{1..n_b} of the block's tokens, weight K·n_b/l: unbiased for the sum over blocks of each
block's bound given clean earlier blocks. Eos fill (``order < 0``) is always masked, never scored.
The same draws serve both bounds; a token no sample masked gets no EUBO term (the paper drops
those too). Draws are a pure function of (step seed, row id, inner iteration).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.algos.mdm_grpo import ScorePlan, banned_ids, plan_logprobs, text_group_advantages
from rlgen.batches import TextBucket, TextRollout, row_generator
from rlgen.config import check_choice, check_range
from rlgen.utils import derive_seed

NEGATIVE_BOUNDS = ("eubo", "mix", "elbo")


@dataclass
class SPGConfig(AlgoConfig):
    name: str = "spg"
    negative_bound: str = "mix"    # surrogate of log π for A < 0: eubo | mix (ω·EUBO + (1−ω)·ELBO) | elbo
    mix_weight: float = 0.5        # ω of "mix" (the paper's 0.5)
    eubo_beta: float = 1.5         # β of the EUBO (the paper: 1.5 for math/countdown, 1.0 for sudoku)
    n_samples: int = 2             # Monte-Carlo masks per completion per inner iteration (the paper's num_t)
    block_length: int = -1         # blocks to mask within: −1 = rollout.block_length (set at the job check),
    #                                0 = the whole answer
    adv_std: bool = True           # advantage (r − group mean) / group std; False: r − group mean
    inner_iterations: int = 4      # gradient steps per rollout batch, fresh masks each (the paper's 4)
    skip_uniform_groups: bool = True  # groups with equal rewards have A = 0: no gradient, skip them

    def __post_init__(self):
        check_choice(self, "negative_bound", NEGATIVE_BOUNDS)
        check_range(self, "mix_weight", lo=0, hi=1)
        check_range(self, "eubo_beta", lo=0, lo_open=True)
        check_range(self, "n_samples", lo=1)
        check_range(self, "block_length", lo=-1)
        check_range(self, "inner_iterations", lo=1)


@dataclass
class BoundPlan:
    """n Monte-Carlo masked views of B answers of width G."""

    scored: torch.Tensor   # (n, B, G) bool: masked AND scored in sample j (tokens of the chosen block)
    hidden: torch.Tensor   # (n, B, G) bool: every masked answer position (scored ∪ later blocks ∪ eos fill)
    weights: torch.Tensor  # (n, B) float: importance weight / n, so Σ_j weights_j·f_j estimates E_ρ[f]


def answer_block_length(width: int, block_length: int) -> int:
    """The block length the sampler used for an answer of ``width`` (rlgen.families.masked_lm's rule)."""
    bl = min(block_length, width) if block_length > 0 else width
    return width if width % bl else bl


def block_plan(order: torch.Tensor, block_length: int, n: int, generator: torch.Generator | None = None) -> BoundPlan:
    """SPG's block-wise masks for answers decoded with ``order`` (B, G) (−1 = eos fill, never scored)."""
    B, G = order.shape
    dev = order.device
    draw = generator.device if generator is not None else dev
    real = (order >= 0).to(draw)  # (B, G)
    blk = torch.arange(G, device=draw) // answer_block_length(G, block_length)  # (G,) block of each position
    n_blk = int(blk[-1]) + 1 if G else 0
    has = torch.stack([(real & (blk == k)).any(1) for k in range(n_blk)], dim=1)  # (B, n_blk) blocks with tokens
    K = has.sum(1)  # (B,)
    # the chosen block: the ⌊u·K⌋-th of the row's non-empty blocks
    u = torch.rand(n, B, generator=generator, device=draw)
    pick = (u * K.clamp_min(1)).floor().long()  # (n, B)
    ranks = has.long().cumsum(1) - 1  # (B, n_blk): rank of each non-empty block
    chosen = ((ranks[None] == pick[..., None]) & has[None]).float().argmax(-1)  # (n, B)
    in_blk = (blk[None, None] == chosen[..., None]) & real[None]  # (n, B, G)
    later = blk[None, None] > chosen[..., None]
    n_b = in_blk.sum(-1).float()  # (n, B)
    l = torch.ceil((1.0 - torch.rand(n, B, generator=generator, device=draw)) * n_b).clamp_min(1.0)
    score = torch.rand(n, B, G, generator=generator, device=draw).masked_fill(~in_blk, 2.0)
    scored = (score.argsort(-1).argsort(-1) < l[..., None]) & in_blk  # a uniform l-subset of the block
    hidden = scored | later | ~real[None]
    weights = torch.where(n_b > 0, K[None].float() * n_b / l, torch.zeros_like(l)) / n
    return BoundPlan(scored.to(dev), hidden.to(dev), weights.float().to(dev))


def bucket_bound_plan(cfg: SPGConfig, b: TextBucket, seed: int) -> BoundPlan:
    """Each row's draws from (seed, row id): the same on whichever rank or micro-batch it lands."""
    parts = [block_plan(b.order[r:r + 1], max(cfg.block_length, 0), cfg.n_samples, row_generator(seed, int(b.rows[r])))
             for r in range(len(b))]
    return BoundPlan(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("scored", "hidden", "weights")))


def view_logprobs(model, tokens: torch.Tensor, prompt_length: int, plan: BoundPlan, mask_id: int,
                  banned=()) -> torch.Tensor:
    """(n, B, G) log p_model(answer token | sample j's view) at the scored positions, 0 elsewhere: the
    n views go through the model as one batch of n·B rows (mdm_grpo's ``plan_logprobs``)."""
    n, B, G = plan.scored.shape
    P = prompt_length
    views = tokens[None].repeat(n, 1, 1)  # (n, B, L)
    views[..., P:] = views[..., P:].masked_fill(plan.hidden, mask_id)
    flat = ScorePlan(views.reshape(1, n * B, P + G), torch.where(plan.scored, 0, -1).reshape(n * B, G), P)
    return plan_logprobs(model, flat, tokens.repeat(n, 1), banned).reshape(n, B, G)


def evidence_bounds(logp: torch.Tensor, plan: BoundPlan, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ELBO, EUBO_β), each (B,), from per-view token log-probs ``logp`` (n, B, G) on ``plan``.

    ELBO = Σ_j weight_j Σ_{i scored in j} log p_ij; EUBO = Σ_i (1/β) log Σ_j weight_j·1[i scored in j]·p_ij^β
    over the tokens some view scored (logsumexp: p^β of a long answer underflows).
    """
    s, w = plan.scored, plan.weights[..., None]  # (n, B, G), (n, B, 1)
    elbo = (w * torch.where(s, logp, torch.zeros_like(logp))).sum((0, 2))  # (B,)
    # a large finite stand-in for log 0 keeps logsumexp's gradient finite for tokens no view scored
    terms = torch.where(s & (w > 0), beta * logp + torch.log(w.clamp_min(1e-30)), torch.full_like(logp, -1e4))
    per_token = torch.logsumexp(terms, dim=0) / beta  # (B, G)
    covered = s.any(0)
    eubo = torch.where(covered, per_token, torch.zeros_like(per_token)).sum(1)  # (B,)
    return elbo, eubo


def sandwich_surrogate(elbo, eubo, advantages, cfg: SPGConfig) -> torch.Tensor:
    """(B,) the log π surrogate per row: the ELBO for A > 0, the configured upper side for A ≤ 0."""
    neg = {"eubo": eubo, "elbo": elbo, "mix": cfg.mix_weight * eubo + (1.0 - cfg.mix_weight) * elbo}[cfg.negative_bound]
    return torch.where(advantages > 0, elbo, neg)


@register_algorithm("spg")
class SPG(Algorithm):
    """SPG (Wang et al. 2025, arXiv:2510.09541): −A·ELBO for A > 0, −A·EUBO_β (or the ω-mixture)
    for A < 0, block-wise Monte-Carlo masks; no ratio, no clipping, no reference."""

    family = "masked_lm"
    config = SPGConfig
    rollout_fields = ("buckets", "advantages")

    def check_job(self, job) -> None:
        from rlgen.families.masked_lm import check_masked_lm_job

        conv = check_masked_lm_job(job)
        if conv is not None and conv.attention == "block_causal":
            raise ValueError("algo.name=spg masks later answer blocks as a bidirectional model decodes them; a "
                             "block-causal policy is not supported (use algo.name=mdm_grpo algo.estimator=trajectory)")
        if self.cfg.block_length < 0:  # the blocks the rollouts are decoded in; learners get this config after
            self.cfg.block_length = job.rollout.block_length

    def advantages(self, batch: TextRollout) -> TextRollout:
        return text_group_advantages(batch, self.cfg.adv_std, self.cfg.skip_uniform_groups)

    def update(self, ctx: LearnerContext, batch: TextRollout) -> dict:
        a, policy = self.cfg, ctx.policy
        if getattr(policy, "is_block_causal", False):
            raise ValueError("algo.name=spg does not support a block-causal policy")
        if not batch.buckets:
            return {"kept_frac": 0.0}
        banned = banned_ids(policy)
        chunk = ctx.micro_batch_size or max(len(b) for b in batch.buckets)
        acc, norms = Accumulator(), []
        policy.eval()
        for i in range(a.inner_iterations):
            for b in batch.buckets:
                plan = bucket_bound_plan(a, b, derive_seed(batch.seed, i))
                for lo in range(0, len(b), chunk):
                    hi = min(lo + chunk, len(b))
                    sub = BoundPlan(plan.scored[:, lo:hi], plan.hidden[:, lo:hi], plan.weights[:, lo:hi])
                    acc.add(self._backward(ctx, batch, b, sub, lo, hi, banned), float(b.weight[lo:hi].sum()))
            norms.append(ctx.engine.step())
        return {**acc.mean(), "grad_norm": sum(norms) / len(norms)}

    def _backward(self, ctx, batch, b, plan: BoundPlan, lo, hi, banned) -> dict:
        dev = ctx.device
        tokens = b.tokens[lo:hi].to(dev)
        plan = BoundPlan(plan.scored.to(dev), plan.hidden.to(dev), plan.weights.to(dev))
        logp = view_logprobs(ctx.engine, tokens, b.prompt_length, plan, ctx.policy.mask_id, banned)  # (n, b, G)
        elbo, eubo = evidence_bounds(logp, plan, self.cfg.eubo_beta)  # (b,), (b,)
        adv = batch.advantages[b.rows[lo:hi]].to(dev).float()  # (b,)
        rows = -adv * sandwich_surrogate(elbo, eubo, adv, self.cfg)
        w = b.weight[lo:hi].to(dev)
        ctx.engine.backward((rows * w).sum() / batch.global_size)
        with torch.no_grad():
            n = w.sum().clamp_min(1.0)
            pos, neg = (adv > 0).float() * w, (adv <= 0).float() * w
            return {"loss": float((rows * w).sum() / n), "elbo": float((elbo * w).sum() / n),
                    "eubo": float((eubo * w).sum() / n), "eubo_minus_elbo": float(((eubo - elbo) * w).sum() / n),
                    "pos_frac": float(pos.sum() / n), "neg_frac": float(neg.sum() / n)}
