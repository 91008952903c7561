"""Diffusion-DPO for flow-matching models (Wallace et al. 2023, arXiv:2311.12908).

DPO needs log-likelihood ratios; a diffusion model has none in closed form, but its ELBO is a
weighted denoising error. Diffusion-DPO replaces each log-ratio by (minus) the difference of the
policy's and the reference's denoising errors on the same noised sample, giving (their Eq. 14,
with the 1/2 of their code):

    loss = −log σ(−β/2 · ((e_θ(x_w) − e_θ(x_l)) − (e_ref(x_w) − e_ref(x_l))))

For a flow model (SD3 convention, DESIGN.md) the error is the velocity MSE at ``x_σ = (1−σ)·x +
σ·ε`` against the target ``ε − x``, as in Flow-DPO (Liu et al. 2025, arXiv:2501.13918). Winner
and loser share the noise ε and σ, so the difference of their errors carries no noise from those
draws; σ comes from the pretraining density (logit-normal by default).

β scale: errors are per-sample *means* over pixels, so their differences are small (≈1e-3 here);
β is therefore large. The paper uses β = 5000 (SD1.5) and 2500 (SDXL) on 4×64×64 latents; on this
repo's 3×32×32 pixel models a few hundred to a few thousand works (docs/preference.md).

Everything here is a pure function of tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, register_algorithm
from rlgen.batches import ImagePairs, row_generator
from rlgen.config import FieldError, check_choice, check_range


@dataclass
class DiffusionDPOConfig(AlgoConfig):
    name: str = "diffusion_dpo"
    beta: float = 2000.0                 # β of the loss (see the module docstring for its scale)
    sigma_density: str = "logit_normal"  # σ density, as in pretraining: uniform | logit_normal
    sigma_mean: float = 0.0              # logit-normal location
    sigma_std: float = 1.0               # logit-normal scale
    noise_draws: int = 1                 # (ε, σ) draws per pair per step, averaged in the loss
    # σ drawn from the density is mapped linearly onto [lo, hi]: [0.6, 1.0] trains only the high-noise
    # part where count, layout and position are decided (the lesson of Flow-GRPO's SDE window)
    sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self):
        check_range(self, "beta", lo=0, lo_open=True)
        check_choice(self, "sigma_density", ("uniform", "logit_normal"))
        check_range(self, "sigma_std", lo=0, lo_open=True)
        r = [float(v) for v in self.sigma_range]
        if len(r) != 2 or not 0.0 <= r[0] < r[1] <= 1.0:
            raise FieldError("sigma_range", f"must be [lo, hi] with 0 <= lo < hi <= 1, got {self.sigma_range}")
        self.sigma_range = r
        check_range(self, "noise_draws", lo=1)


def loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
         beta: float, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO loss, mean over the batch; every input is a per-sample MSE of shape (B,).

    ``−log σ(−β/2·((e_θw − e_θl) − (e_rw − e_rl)))``. The reference errors carry no gradient.
    Metrics: ``implicit_acc`` (fraction of pairs whose inside term is > 0: the policy lowered the
    winner's error relative to the loser's more than the reference does), ``reward_margin`` (mean
    inside term, the implicit reward of the winner minus that of the loser), and the raw
    differences.
    """
    if not (model_err_w.shape == model_err_l.shape == ref_err_w.shape == ref_err_l.shape):
        raise ValueError(f"error shapes differ: {tuple(model_err_w.shape)}, {tuple(model_err_l.shape)}, "
                         f"{tuple(ref_err_w.shape)}, {tuple(ref_err_l.shape)}")
    model_diff = model_err_w - model_err_l  # (B,) < 0 when the policy fits the winner better
    ref_diff = (ref_err_w - ref_err_l).detach()  # (B,)
    inside = -0.5 * beta * (model_diff - ref_diff)  # (B,)
    rows = -F.logsigmoid(inside)  # (B,)
    out = rows if reduction == "none" else rows.mean()
    with torch.no_grad():
        metrics = {
            "loss": rows.mean().item(),
            "implicit_acc": (inside > 0).float().mean().item(),
            "reward_margin": inside.mean().item(),
            "model_diff": model_diff.mean().item(),
            "ref_diff": ref_diff.mean().item(),
            "model_err_w": model_err_w.mean().item(),
            "model_err_l": model_err_l.mean().item(),
        }
    return out, metrics


def draw_noise(x: torch.Tensor, cfg: DiffusionDPOConfig, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One (ε, σ) per pair, shared by winner and loser: ε like x (B, C, H, W), σ (B,) on x's device.

    σ comes from ``cfg.sigma_density`` mapped onto ``cfg.sigma_range``. Drawn on CPU (where the
    generator lives) so a seed gives the same draws on any device.
    """
    from rlgen.pretrain.flow_matching import sample_sigmas

    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    sigma = sample_sigmas(x.shape[0], cfg.sigma_density, cfg.sigma_mean, cfg.sigma_std, generator)
    lo, hi = cfg.sigma_range
    sigma = lo + (hi - lo) * sigma  # (B,) in [lo, hi]
    return noise, sigma.to(x.device)


def noised(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_σ, target): ``x_σ = (1−σ)·x + σ·ε`` and the velocity target ``ε − x``; x, noise (B, C, H, W)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    return (1 - s) * x + s * noise, noise - x


def velocity_errors(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (B,) of a predicted velocity (B, C, H, W) against its target, in float32."""
    return (v.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def pair_errors(velocity, x_w: torch.Tensor, x_l: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_w, e_l), each (B,): one forward of ``velocity(x (2B, …), sigma (2B,)) -> v`` on both halves.

    Winner and loser go through the model together, so a training engine sees one forward per
    backward (DeepSpeed's bookkeeping expects that).
    """
    xs_w, t_w = noised(x_w, noise, sigma)
    xs_l, t_l = noised(x_l, noise, sigma)
    v = velocity(torch.cat([xs_w, xs_l]), torch.cat([sigma, sigma]))  # (2B, C, H, W)
    err = velocity_errors(v, torch.cat([t_w, t_l]))  # (2B,)
    return err.chunk(2)


@register_algorithm("diffusion_dpo")
class DiffusionDPO(Algorithm):
    """Diffusion-DPO on image pairs: one optimizer update per step over the step's pairs."""

    family = "flow"
    data = "pairs"
    config = DiffusionDPOConfig

    def uses_reference(self, lora: bool) -> bool:
        return True

    def update(self, ctx: LearnerContext, batch: ImagePairs) -> dict:
        k, dev = self.cfg.noise_draws, ctx.device
        draws = [draw_noise(batch.chosen[i:i + 1].expand(k, *batch.chosen.shape[1:]), self.cfg,
                            row_generator(batch.seed, int(batch.rows[i]))) for i in range(len(batch))]
        chunk = ctx.micro_batch_size or len(batch)
        acc = Accumulator()
        ctx.policy.train()
        for lo in range(0, len(batch), chunk):
            idx = list(range(lo, min(lo + chunk, len(batch))))
            rep = [i for i in idx for _ in range(k)]  # k (ε, σ) draws per pair, in one forward
            prompts = [batch.prompts[i] for i in rep]
            x_w, x_l = batch.chosen[rep].to(dev), batch.rejected[rep].to(dev)  # (b·k, C, H, W)
            noise = torch.cat([draws[i][0] for i in idx]).to(dev, x_w.dtype)
            sigma = torch.cat([draws[i][1] for i in idx]).to(dev)
            with torch.no_grad(), ctx.reference() as ref:
                r_w, r_l = pair_errors(ref.velocity_fn(prompts + prompts), x_w, x_l, noise, sigma)
            e_w, e_l = pair_errors(lambda x, s: ctx.engine(prompts + prompts, x, s, 1.0), x_w, x_l, noise, sigma)
            rows, m = loss(e_w, e_l, r_w, r_l, self.cfg.beta, reduction="none")  # (b·k,)
            w = batch.weight[rep].to(dev) / k
            ctx.engine.backward((rows * w).sum() / batch.global_size)
            acc.add(m, float(w.sum()))
        return {**acc.mean(), "grad_norm": ctx.engine.step()}
