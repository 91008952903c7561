"""The stochastic steps of the Flow-GRPO family, selectable by name (``rollout.sde_kind``).

Every kind is a Gaussian step ``x_σ' ~ N(mean(x, v), std²·I)`` with the signature and exact log-prob
of :func:`rlgen.samplers.flow.sde_step` (Flow time as DESIGN.md: ``x_σ = (1−σ)·x_data + σ·ε``,
``v = ε − x_data``). They differ in how much noise each step injects and how the mean compensates:

- ``flow_grpo``: Flow-GRPO (Liu et al. 2025, arXiv:2505.05470), the marginal-preserving SDE with
  diffusion ``g_σ = a·sqrt(σ/(1−σ))`` (:func:`rlgen.samplers.flow.sde_step`).
- ``dance``: DanceGRPO (Xue et al. 2025, arXiv:2505.07818), the same reverse SDE
  ``dx = [v − ½g²·∇log p_σ(x)]dσ + g·dW`` with a constant diffusion ``g = η`` (η = noise_level),
  the score taken from the velocity, ``∇log p_σ(x) = −(x + (1−σ)·v)/σ``.
- ``cps``: Coefficients-Preserving Sampling (Wang & Yu 2025, arXiv:2509.05952). The predicted
  data ``x̂ = x − σ·v`` and noise ``ε̂ = x + (1−σ)·v`` are recombined as
  ``(1−σ')·x̂ + σ'·(cos(ηπ/2)·ε̂ + sin(ηπ/2)·ε)``, ε fresh: the step lands on the flow marginal's
  coefficients ``(1−σ', σ')`` of data and (unit) noise exactly, not only to first order in dσ.
  Its std ``σ'·sin(ηπ/2)`` vanishes at σ' = 0, so a final step to 0 is deterministic (no density).

All pure torch; log-probs are summed over a sample's dimensions (B,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from rlgen.samplers.flow import StepOutput, _as_column, _check_step, _compute_dtype, gaussian_step, sde_step


def _prepare(x, v, sigma, sigma_next, noise_level, prev_sample):
    _check_step(x, v, sigma, sigma_next, noise_level, prev_sample)
    cdtype = _compute_dtype(x.dtype)
    return (x.to(cdtype), v.to(cdtype), _as_column(sigma, x, cdtype, "sigma"),
            _as_column(sigma_next, x, cdtype, "sigma_next"))


def dance_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
               noise_level: float, generator: torch.Generator | None = None,
               prev_sample: torch.Tensor | None = None) -> StepOutput:
    """One Euler–Maruyama step of DanceGRPO's SDE (Xue et al. 2025, arXiv:2505.07818).

    ``dt = σ' − σ < 0``, η = noise_level: ``mean = x + [v + η²/(2σ)·(x + (1−σ)·v)]·dt``,
    ``std = η·sqrt(−dt)``. Flow-GRPO's mean with its σ-dependent diffusion replaced by the constant η,
    so the noise per unit of σ is the same at every step (Flow-GRPO's grows without bound as σ → 1).
    ``noise_level = 0`` is the Euler ODE step (log_prob None).
    """
    xf, vf, s, sn = _prepare(x, v, sigma, sigma_next, noise_level, prev_sample)
    dt = sn - s  # (B or 1, 1, ..., 1), negative
    if noise_level == 0:
        mean = xf + vf * dt
        return StepOutput(mean.to(x.dtype) if prev_sample is None else prev_sample, None, mean, torch.zeros_like(dt))
    eta2 = noise_level ** 2
    mean = xf + (vf + eta2 / (2 * s) * (xf + (1 - s) * vf)) * dt  # (B, *D): drift − ½η²·score
    std = noise_level * torch.sqrt(-dt)
    return gaussian_step(x, mean, std, generator, prev_sample)


def cps_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
             noise_level: float, generator: torch.Generator | None = None,
             prev_sample: torch.Tensor | None = None) -> StepOutput:
    """One Coefficients-Preserving Sampling step (Wang & Yu 2025, arXiv:2509.05952).

    With θ = noise_level·π/2 (noise_level in [0, 1]): ``x̂ = x − σ·v``, ``ε̂ = x + (1−σ)·v``,
    ``mean = (1−σ')·x̂ + σ'·cos θ·ε̂`` and ``std = σ'·sin θ``; ``prev_sample = mean + std·ε``.
    noise_level 0 is the Euler/DDIM step (log_prob None); at σ' = 0 the std is 0 and there is no
    density to score: callers make that step an ODE step (``SDEKind.needs_noise_at_end``).
    """
    if noise_level > 1:
        raise ValueError(f"cps noise_level is the fraction of π/2 the noise angle turns, in [0, 1]; got {noise_level}")
    xf, vf, s, sn = _prepare(x, v, sigma, sigma_next, noise_level, prev_sample)
    x_data = xf - s * vf  # (B, *D) predicted clean sample
    eps_hat = xf + (1 - s) * vf  # (B, *D) predicted noise
    theta = noise_level * math.pi / 2
    mean = (1 - sn) * x_data + sn * math.cos(theta) * eps_hat
    std = sn * math.sin(theta)  # (B or 1, 1, ..., 1)
    if noise_level == 0:
        return StepOutput(mean.to(x.dtype) if prev_sample is None else prev_sample, None, mean, torch.zeros_like(std))
    if bool((std <= 0).any()):
        raise ValueError("cps_step to sigma_next = 0 has no noise and no log-prob; make the final step an ODE step")
    return gaussian_step(x, mean, std, generator, prev_sample)


StepFn = Callable[..., StepOutput]


@dataclass(frozen=True)
class SDEKind:
    """A named stochastic step. ``deterministic_at_zero``: its std is 0 when σ' = 0 (the final step
    to data then runs as an ODE step and is not trained)."""

    name: str
    step: StepFn
    deterministic_at_zero: bool = False


SDE_KINDS: dict[str, SDEKind] = {
    "flow_grpo": SDEKind("flow_grpo", sde_step),
    "dance": SDEKind("dance", dance_step),
    "cps": SDEKind("cps", cps_step, deterministic_at_zero=True),
}


def sde_kind(name: str) -> SDEKind:
    """The registered step kind ``name`` (``rollout.sde_kind``); one clear error otherwise."""
    if name not in SDE_KINDS:
        raise ValueError(f"unknown SDE step kind {name!r}; choose one of {sorted(SDE_KINDS)}")
    return SDE_KINDS[name]


def sde_step_fn(name: str) -> StepFn:
    """The step function of kind ``name``: ``(x, v, sigma, sigma_next, noise_level, generator=None,
    prev_sample=None) -> StepOutput``."""
    return sde_kind(name).step
