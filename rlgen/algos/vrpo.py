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

Pure torch; the ELBO draws come from a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlgen.registry import register_algorithm
from rlgen.samplers.likelihood import ALLOCATIONS, FORMS, elbo_from_plan, make_mask_plan


@dataclass
class VRPOConfig:
    beta: float = 0.1               # DPO β on ELBO log-ratios (sequence-level, as DPO's log-probs)
    n_samples: int = 8              # sampling budget n per ELBO (LLaDA 1.5 uses 8)
    allocation: str = "optimal"     # optimal: n stratified timesteps, one mask each | naive: i.i.d.
    antithetic: bool = True         # share the timesteps and masks between policy and reference
    form: str = "l"                 # ELBO form: l (exactly l tokens masked; bounded weights) | t
    samples_per_forward: int = 0    # 0 = all n samples in one forward batch

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"algo.beta must be > 0, got {self.beta}")
        if self.n_samples < 1:
            raise ValueError(f"algo.n_samples must be >= 1, got {self.n_samples}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"algo.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.form not in FORMS:
            raise ValueError(f"algo.form must be one of {FORMS}, got {self.form!r}")


@register_algorithm("vrpo")
def dpo_loss(elbo_w: torch.Tensor, elbo_l: torch.Tensor, ref_elbo_w: torch.Tensor, ref_elbo_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict]:
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
    out = -F.logsigmoid(score).mean()
    with torch.no_grad():
        metrics = {
            "loss": out.item(),
            "implicit_acc": (score > 0).float().mean().item(),
            "reward_margin": score.mean().item(),
            "chosen_reward": (beta * chosen).mean().item(),
            "rejected_reward": (beta * rejected).mean().item(),
            "elbo_w": elbo_w.mean().item(),
            "elbo_l": elbo_l.mean().item(),
        }
    return out, metrics


def preference_elbos(policy, ref, prompt_ids: torch.Tensor, chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                     mask_id: int, cfg: VRPOConfig, generator: torch.Generator | None = None,
                     chosen_mask: torch.Tensor | None = None, rejected_mask: torch.Tensor | None = None):
    """(B_θw, B_θl, B_rw, B_rl), each (B,): the four ELBO estimates of one batch of pairs.

    ``prompt_ids`` (B, P); ``chosen_ids``/``rejected_ids`` (B, L) (pad both to one L); optional
    ``*_mask`` (B, L) bool mark real answer tokens. Winner and loser rows go through each model in
    ONE forward (2B rows), so a training engine sees one forward per backward. The policy keeps
    autograd; the reference runs under no_grad. With ``cfg.antithetic`` the reference reuses the
    policy's mask plan, otherwise it draws its own.
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
    policy_plan = plan()
    elbo = elbo_from_plan(policy, prompts, answers, policy_plan, mask_id, samples_per_forward=chunk)  # (2B,)
    with torch.no_grad():
        ref_plan = policy_plan if cfg.antithetic else plan()
        ref_elbo = elbo_from_plan(ref, prompts, answers, ref_plan, mask_id, samples_per_forward=chunk)  # (2B,)
    e_w, e_l = elbo.chunk(2)
    r_w, r_l = ref_elbo.chunk(2)
    return e_w, e_l, r_w, r_l


def preference_score(policy, ref, prompt_ids, chosen_ids, rejected_ids, mask_id: int, cfg: VRPOConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) one estimate of the preference score ``β·((B_θw − B_rw) − (B_θl − B_rl))`` (no grad).

    Its variance over repeated draws is what VRPO reduces (benchmarks/bench_vrpo_variance.py).
    """
    with torch.no_grad():
        e_w, e_l, r_w, r_l = preference_elbos(policy, ref, prompt_ids, chosen_ids, rejected_ids, mask_id, cfg,
                                              generator)
    return cfg.beta * ((e_w - r_w) - (e_l - r_l))
