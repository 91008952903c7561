"""VRPO: variance-reduced preference optimisation for masked-diffusion LMs (LLaDA 1.5, Zhu et al.
2025, arXiv:2505.19223).

DPO (Rafailov et al. 2023) needs log π(y | x); a masked-diffusion LM only has a Monte-Carlo ELBO
``B(y | x)`` (rlgen/samplers/likelihood.py). VRPO plugs ELBO estimates into the DPO loss

    loss = −log σ(β·((B_θ(y_w) − B_ref(y_w)) − (B_θ(y_l) − B_ref(y_l))))

and makes the estimated preference score inside σ far less noisy, with the same compute:

1. **sampling budget** n: each ELBO is the mean of n (timestep, mask) samples;
2. **optimal allocation**: the n samples use n distinct timesteps with one mask each (the paper
   shows this minimises the variance for a fixed n; we also stratify the timesteps);
3. **antithetic sampling**: policy and reference are scored on the *same* timesteps and masks,
   so the noise they share cancels in B_θ − B_ref (the two models are close).

The naive estimator (``antithetic=False, allocation="naive"``) draws i.i.d. samples separately
for each model: same cost, much higher variance (benchmarks/bench_vrpo_variance.py).

``sft_weight`` > 0 adds an NLL term on the chosen answer, ``sft_weight · (−B_θ(y_w) / L)`` (per
answer token), as RPO does for autoregressive DPO (Pang et al. 2024, arXiv:2404.19733; trl's
``rpo_alpha``): DPO alone can lower the chosen answer's likelihood too, as long as the rejected one
falls faster. With n ≥ 2 every update also logs, from its own n per-sample ELBO terms at the
current policy, estimates of the score variance of both estimators (``score_var_naive``,
``score_var_antithetic``; :func:`score_variance_estimates`).

Pure torch; the ELBO draws come from a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.batches import TextPairs, row_generator
from rlgen.config import check_choice, check_range
from rlgen.samplers.likelihood import (ALLOCATIONS, FORMS, MaskPlan, elbo_from_plan, make_block_mask_plan,
                                      make_mask_plan)


@dataclass
class VRPOConfig(AlgoConfig):
    name: str = "vrpo"
    beta: float = 0.1               # DPO β on ELBO log-ratios (sequence-level, as DPO's log-probs)
    n_samples: int = 8              # sampling budget n per ELBO (LLaDA 1.5 uses 8)
    allocation: str = "optimal"     # optimal: n stratified timesteps, one mask each | naive: i.i.d. | one_timestep
    antithetic: bool = True         # share the timesteps and masks between policy and reference
    form: str = "l"                 # ELBO form: l (exactly l tokens masked; bounded weights) | t
    samples_per_forward: int = 0    # 0 = all n samples in one forward batch
    sft_weight: float = 0.0         # + sft_weight · (−B_θ(y_w) / L): NLL of the chosen answer (RPO)

    def __post_init__(self):
        check_range(self, "beta", lo=0, lo_open=True)
        check_range(self, "sft_weight", lo=0)
        check_range(self, "n_samples", lo=1)
        check_choice(self, "allocation", ALLOCATIONS)
        check_choice(self, "form", FORMS)
        check_range(self, "samples_per_forward", lo=0)


def dpo_loss(elbo_w: torch.Tensor, elbo_l: torch.Tensor, ref_elbo_w: torch.Tensor, ref_elbo_l: torch.Tensor,
             beta: float, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """DPO on ELBO estimates, mean over the batch; every input is (B,).

    ``−log σ(β·((B_θw − B_rw) − (B_θl − B_rl)))``; the reference ELBOs carry no gradient.
    Metrics follow trl's DPO names: ``implicit_acc`` (rewards/accuracies), ``reward_margin``
    (rewards/margins: mean β·(log-ratio_w − log-ratio_l)), ``chosen_reward``, ``rejected_reward``.
    """
    if not (elbo_w.shape == elbo_l.shape == ref_elbo_w.shape == ref_elbo_l.shape):
        raise ValueError(f"ELBO shapes differ: {tuple(elbo_w.shape)}, {tuple(elbo_l.shape)}, "
                         f"{tuple(ref_elbo_w.shape)}, {tuple(ref_elbo_l.shape)}")
    chosen = elbo_w - ref_elbo_w.detach()  # (B,) log-ratio estimate of the winner
    rejected = elbo_l - ref_elbo_l.detach()  # (B,)
    score = beta * (chosen - rejected)  # (B,) the estimated preference score
    rows = -F.logsigmoid(score)  # (B,)
    out = rows if reduction == "none" else rows.mean()
    with torch.no_grad():
        metrics = {
            "loss": rows.mean().item(),
            "implicit_acc": (score > 0).float().mean().item(),
            "reward_margin": score.mean().item(),
            "chosen_reward": (beta * chosen).mean().item(),
            "rejected_reward": (beta * rejected).mean().item(),
            "elbo_w": elbo_w.mean().item(),
            "elbo_l": elbo_l.mean().item(),
        }
    return out, metrics


def vrpo_loss(elbo_w, elbo_l, ref_elbo_w, ref_elbo_l, beta: float, sft_weight: float = 0.0, answer_len: int = 1,
              reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """:func:`dpo_loss` plus ``sft_weight · (−B_θw / answer_len)`` per row (inputs (B,)).

    The NLL term (per answer token, as trl's ``rpo_alpha`` averages the chosen answer's NLL over its
    tokens) pulls the chosen answer's ELBO up, which DPO alone does not: its loss only sees the
    margin, so both likelihoods may fall (the likelihood collapse of docs/preference.md).
    """
    rows, m = dpo_loss(elbo_w, elbo_l, ref_elbo_w, ref_elbo_l, beta, reduction="none")  # (B,)
    if sft_weight > 0:
        nll = -elbo_w / answer_len  # (B,) per-token NLL estimate of the chosen answer
        rows = rows + sft_weight * nll
        m = {**m, "sft_nll": nll.mean().item(), "loss": rows.mean().item()}
    return (rows if reduction == "none" else rows.mean()), m


def score_variance_estimates(pol_w, pol_l, ref_w, ref_l, beta: float) -> dict:
    """Estimated variance of the preference score at the current policy, for both estimators, from
    ONE antithetic draw's per-sample ELBO terms (each (n, B), n ≥ 2, policy and reference on the
    same plan).

    Treating the n samples as i.i.d. (exact for ``allocation=naive``; for stratified timesteps an
    upper bound up to the small between-strata part), the mean of n draws has variance S²/n, S² the
    sample variance over n. Naive (independent draws per model, same budget): the four ELBOs are
    independent, ``β²·Σ S²(term)/n``. Antithetic: the shared draws enter as differences,
    ``β²·(S²(θw − rw) + S²(θl − rl))/n``. Means over the B pairs.
    """
    n = pol_w.shape[0]
    v = lambda x: x.detach().double().var(0) / n  # (B,)  # noqa: E731
    naive = beta ** 2 * (v(pol_w) + v(ref_w) + v(pol_l) + v(ref_l))
    anti = beta ** 2 * (v(pol_w - ref_w) + v(pol_l - ref_l))
    return {"score_var_naive": naive.mean().item(), "score_var_antithetic": anti.mean().item()}


def preference_elbos(policy, ref, prompt_ids: torch.Tensor, chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                     mask_id: int, cfg: VRPOConfig, generator: torch.Generator | None = None,
                     chosen_mask: torch.Tensor | None = None, rejected_mask: torch.Tensor | None = None,
                     plans: tuple[MaskPlan, MaskPlan] | None = None):
    """(B_θw, B_θl, B_rw, B_rl), each (B,): the four ELBO estimates of one batch of pairs.

    ``prompt_ids`` (B, P); ``chosen_ids``/``rejected_ids`` (B, L) (pad both to one L); optional
    ``*_mask`` (B, L) bool mark real answer tokens. Winner and loser rows go through each model in
    ONE forward (2B rows), so a training engine sees one forward per backward. The policy keeps
    autograd; the reference runs under no_grad. With ``cfg.antithetic`` the reference reuses the
    policy's mask plan, otherwise it draws its own. ``plans`` (policy plan, reference plan) over the
    2B rows replaces the draws (e.g. :func:`pair_plans`, drawn per pair).
    """
    B, L = chosen_ids.shape
    if tuple(rejected_ids.shape) != (B, L) or prompt_ids.shape[0] != B:
        raise ValueError(f"prompt {tuple(prompt_ids.shape)}, chosen {tuple(chosen_ids.shape)} and rejected "
                         f"{tuple(rejected_ids.shape)} must share B (and chosen/rejected their length)")
    prompts = torch.cat([prompt_ids, prompt_ids])  # (2B, P)
    answers = torch.cat([chosen_ids, rejected_ids])  # (2B, L)
    answer_mask = None
    if chosen_mask is not None or rejected_mask is not None:
        ones = torch.ones(B, L, dtype=torch.bool, device=answers.device)
        answer_mask = torch.cat([ones if chosen_mask is None else chosen_mask,
                                 ones if rejected_mask is None else rejected_mask])  # (2B, L)

    def plan():
        return make_mask_plan(2 * B, L, cfg.n_samples, generator, form=cfg.form, allocation=cfg.allocation,
                              answer_mask=answer_mask, device=answers.device)

    chunk = cfg.samples_per_forward or None
    policy_plan = plans[0] if plans is not None else plan()
    elbo = elbo_from_plan(policy, prompts, answers, policy_plan, mask_id, samples_per_forward=chunk)  # (2B,)
    with torch.no_grad():
        ref_plan = plans[1] if plans is not None else policy_plan if cfg.antithetic else plan()
        ref_elbo = elbo_from_plan(ref, prompts, answers, ref_plan, mask_id, samples_per_forward=chunk)  # (2B,)
    e_w, e_l = elbo.chunk(2)
    r_w, r_l = ref_elbo.chunk(2)
    return e_w, e_l, r_w, r_l


def pair_elbos(model, prompt_ids, chosen_ids, rejected_ids, plan: MaskPlan, mask_id: int,
               samples_per_forward: int | None = None, return_samples: bool = False):
    """(B_w, B_l), each (B,): one model's ELBOs of chosen and rejected answers on ``plan`` (over the 2B
    rows, chosen first), in one forward batch. ``return_samples`` adds the per-sample terms (S_w, S_l),
    each (n, B)."""
    prompts = torch.cat([prompt_ids, prompt_ids])  # (2B, P)
    answers = torch.cat([chosen_ids, rejected_ids])  # (2B, L)
    elbo, per = elbo_from_plan(model, prompts, answers, plan, mask_id, return_samples=True,
                               samples_per_forward=samples_per_forward)  # (2B,), (n, 2B)
    return (*elbo.chunk(2), *per.chunk(2, dim=1)) if return_samples else elbo.chunk(2)


def preference_score(policy, ref, prompt_ids, chosen_ids, rejected_ids, mask_id: int, cfg: VRPOConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) one estimate of the preference score ``β·((B_θw − B_rw) − (B_θl − B_rl))`` (no grad).

    Its variance over repeated draws is what VRPO reduces (benchmarks/bench_vrpo_variance.py).
    """
    with torch.no_grad():
        e_w, e_l, r_w, r_l = preference_elbos(policy, ref, prompt_ids, chosen_ids, rejected_ids, mask_id, cfg,
                                              generator)
    return cfg.beta * ((e_w - r_w) - (e_l - r_l))


def pair_plans(rows: torch.Tensor, seed: int, answer_len: int, cfg: VRPOConfig, device=None,
               prompt_len: int = 0, block_size: int | None = None) -> tuple[MaskPlan, MaskPlan]:
    """(policy plan, reference plan) over 2B rows (chosen rows, then rejected rows), each pair drawn
    from its own generator (seed, row id): the same draws on whichever rank the pair lands.

    ``block_size`` (a block-causal policy): the block-diffusion ELBO's draws instead
    (``make_block_mask_plan``: one block per sample, earlier blocks clean, as the block sampler
    conditions), blocks aligned to position 0 of prompt (``prompt_len`` tokens) + answer."""
    def draw(gen):
        if block_size is not None:
            return make_block_mask_plan(2, prompt_len, answer_len, block_size, cfg.n_samples, gen,
                                        allocation=cfg.allocation)
        return make_mask_plan(2, answer_len, cfg.n_samples, gen, form=cfg.form, allocation=cfg.allocation)

    pol, ref = [], []
    for r in rows.tolist():
        gen = row_generator(seed, r)
        p = draw(gen)
        pol.append(p)
        ref.append(p if cfg.antithetic else draw(gen))

    def stack(plans: list[MaskPlan]) -> MaskPlan:
        order = [0] * len(plans) + [1] * len(plans)  # chosen rows first, then rejected rows
        pick = lambda name: torch.stack([getattr(p, name)[:, j] for j, p in zip(order, plans + plans)], 1)  # noqa: E731
        return MaskPlan(pick("masks").to(device), pick("weights").to(device), pick("t").to(device), cfg.form)

    return stack(pol), stack(ref)


@register_algorithm("vrpo")
class VRPO(Algorithm):
    """VRPO (LLaDA 1.5): DPO on variance-reduced ELBO estimates of text pairs."""

    family = "masked_lm"
    data = "pairs"
    config = VRPOConfig

    def uses_reference(self, lora: bool) -> bool:
        return True

    def check_job(self, job) -> None:
        from rlgen.families.masked_lm import check_masked_lm_job

        conv = check_masked_lm_job(job)
        if conv is not None and conv.attention == "block_causal" and self.cfg.form != "l":
            raise ValueError(f"algo.form={self.cfg.form}: a block-causal policy's ELBO is the per-block l-form "
                             f"(make_block_mask_plan); use algo.form=l")

    def update(self, ctx: LearnerContext, batch: TextPairs) -> dict:
        dev, policy = ctx.device, ctx.policy
        block = getattr(policy, "block_size", None)  # set for block-causal policies only
        acc = Accumulator()
        policy.train()
        for b in batch.buckets:
            chunk = ctx.micro_batch_size or len(b)
            for lo in range(0, len(b), chunk):
                hi = min(lo + chunk, len(b))
                w, l = b.chosen_ids[lo:hi].to(dev), b.rejected_ids[lo:hi].to(dev)  # (b, L)
                plans = pair_plans(b.rows[lo:hi], batch.seed, w.shape[1], self.cfg, dev, b.prompt_ids.shape[1],
                                   block)
                prompt, spf = b.prompt_ids[lo:hi].to(dev), self.cfg.samples_per_forward or None
                # the reference first, on its own: under LoRA it is the policy with its adapter disabled
                with torch.no_grad(), ctx.reference() as ref:
                    r_w, r_l, rs_w, rs_l = pair_elbos(ref, prompt, w, l, plans[1], policy.mask_id, spf, True)
                e_w, e_l, ps_w, ps_l = pair_elbos(ctx.engine, prompt, w, l, plans[0], policy.mask_id, spf, True)
                rows, m = vrpo_loss(e_w, e_l, r_w, r_l, self.cfg.beta, self.cfg.sft_weight, w.shape[1],
                                    reduction="none")
                if self.cfg.n_samples > 1:  # the score's variance at the current policy, both estimators
                    est = score_variance_estimates(ps_w, ps_l, rs_w, rs_l, self.cfg.beta)
                    if not self.cfg.antithetic:  # separate draws: their differences mean nothing
                        est.pop("score_var_antithetic")
                    m.update(est)
                wt = b.weight[lo:hi].to(dev)
                ctx.engine.backward((rows * wt).sum() / batch.global_size)
                acc.add(m, float(wt.sum()))
        return {**acc.mean(), "grad_norm": ctx.engine.step()}
