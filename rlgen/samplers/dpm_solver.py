"""DPM-Solver++(2M) for flow-matching ODEs, one stateless step at a time (MixGRPO's ODE steps).

DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) integrates the probability-flow ODE in the
log-SNR ``λ = log((1−σ)/σ)`` with the model's data prediction, exactly for the linear part; the
multistep 2nd-order variant reuses the previous step's data prediction instead of a second model
call. MixGRPO (Li et al. 2025, arXiv:2507.21802) runs the ODE steps after its SDE window with it, so
fewer post-window steps reach the same sample quality.

Flow time (DESIGN.md): ``α_σ = 1−σ``, the data prediction is ``x̂ = x − σ·v``. Unlike diffusers'
``DPMSolverMultistepScheduler`` (same math, ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
``prediction_type="flow_prediction"``) there is no hidden state: the caller passes the previous
step's σ and data prediction, so any σ grid and any mix with SDE steps works. The first step
(no history) and a step to σ' = 0 are 1st order, as diffusers' ``lower_order_final``; the 1st-order
step is exactly Euler's ``x + (σ'−σ)·v`` in flow time.
"""
from __future__ import annotations

import math

import torch


def _lam(sigma: float) -> float:
    return math.log(1.0 - sigma) - math.log(sigma)  # log-SNR λ of flow time (α = 1 − σ)


def dpmpp_2m_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
                  prev_x0: torch.Tensor | None = None, prev_sigma: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step σ → σ' (midpoint form). Returns ``(x_next, x0)``.

    x, v (B, *D); ``x0 = x − σ·v`` is returned for the next step's history. With ``prev_x0`` (the data
    prediction made at ``prev_sigma`` > σ) the step is 2nd order; without it, or when σ' = 0 or the
    history is at σ = 1 (λ = −∞), it is the 1st-order step (Euler in flow time). σ floats in (0, 1].
    """
    if not 0.0 <= sigma_next < sigma <= 1.0:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    cdtype = torch.promote_types(x.dtype, torch.float32)
    xf, vf = x.to(cdtype), v.to(cdtype)
    x0 = xf - sigma * vf  # (B, *D) data prediction
    if sigma_next == 0.0:
        return x0.to(x.dtype), x0  # the 1st-order step to σ' = 0 lands on the data prediction
    if sigma >= 1.0:
        return (xf + (sigma_next - sigma) * vf).to(x.dtype), x0  # λ = −∞ at σ = 1: Euler
    alpha_next = 1.0 - sigma_next
    h = _lam(sigma_next) - _lam(sigma)
    phi = math.expm1(-h)  # e^{−h} − 1
    x_next = (sigma_next / sigma) * xf - alpha_next * phi * x0  # (B, *D) 1st order (DDIM)
    second = prev_x0 is not None and prev_sigma is not None and prev_sigma < 1.0
    if second:
        if not prev_sigma > sigma:
            raise ValueError(f"prev_sigma={prev_sigma} must exceed sigma={sigma}")
        r0 = (_lam(sigma) - _lam(prev_sigma)) / h
        d1 = (x0 - prev_x0.to(cdtype)) / r0  # (B, *D) finite-difference of x̂ in λ, scaled to h
        x_next = x_next - 0.5 * alpha_next * phi * d1
    return x_next.to(x.dtype), x0
