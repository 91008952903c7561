"""Which denoising steps of a rollout are stochastic: MixGRPO's sliding SDE window.

MixGRPO (Li et al. 2025, arXiv:2507.21802) samples with SDE steps only inside a window of w
consecutive steps and ODE steps elsewhere, and trains only the window's steps. The window starts at
the noisy end and slides towards the data by a stride s every τ training iterations; its
"progressive" schedule shortens τ as the window moves, τ(l) = ⌈τ₀·exp(−k·max(0, l − l_thr))⌉ (the
paper's exponential decay: the early, high-noise steps get the most iterations). Everything here
is a pure function of the training step, so a resumed run recomputes the same window position.

MixGRPO-Flash also shortens the ODE tail after the window (its steps then run with DPM-Solver++,
``rlgen.samplers.dpm_solver``): :func:`compress_tail` keeps k of the grid's points after the window.
"""
from __future__ import annotations

import math

import torch


def slide_interval(position: int, every: int, schedule: str, decay: float, decay_after: int) -> int:
    """τ at window position ``position``: ``every`` ("constant") or its exponential decay ("progressive")."""
    if schedule == "constant":
        return every
    if schedule == "progressive":
        return max(1, math.ceil(every * math.exp(-decay * max(0, position - decay_after))))
    raise ValueError(f"window schedule must be 'constant' or 'progressive', got {schedule!r}")


def window_start(step: int, start: int, size: int, num_steps: int, every: int, stride: int = 1,
                 schedule: str = "constant", decay: float = 0.1, decay_after: int = 0,
                 at_end: str = "stay") -> int:
    """First step of the SDE window at training step ``step`` (1-based; step ≤ 1 gives ``start``).

    After each training iteration a counter advances; when it reaches τ of the current position the
    window moves by ``stride`` steps. Past the last position that fits (``num_steps − size``) it
    stays there (``at_end="stay"``) or goes back to ``start`` ("restart"). ``every = 0``: fixed window.
    """
    last = num_steps - size
    if not 0 <= start <= last:
        raise ValueError(f"window start {start} with size {size} does not fit in {num_steps} steps")
    if at_end not in ("stay", "restart"):
        raise ValueError(f"at_end must be 'stay' or 'restart', got {at_end!r}")
    if every <= 0:
        return start
    position, count = start, 0
    for _ in range(max(0, step - 1)):  # O(step) integer work: negligible beside one rollout
        count += 1
        if count >= slide_interval(position, every, schedule, decay, decay_after):
            count, position = 0, position + stride
            if position > last:
                position = start if at_end == "restart" else last
    return position


def compress_tail(sigmas: torch.Tensor, sde_mask: torch.Tensor, tail_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``tail_steps`` steps after the last SDE step: grid points evenly spaced in index.

    sigmas (S+1,), sde_mask (S,) -> (S'+1,), (S',). The grid up to the window's end is unchanged; the
    tail keeps its first and last point (σ = 0) and ``tail_steps − 1`` of those in between, so every
    σ is one the model's own schedule has. ``tail_steps`` ≥ the tail's length leaves it as it is.
    """
    num_steps = len(sde_mask)
    sde = torch.nonzero(sde_mask).flatten()
    end = int(sde.max()) + 1 if len(sde) else 0  # first grid index after the window
    tail = num_steps - end
    if tail_steps <= 0 or tail_steps >= tail:
        return sigmas, sde_mask
    keep = torch.linspace(end, num_steps, tail_steps + 1).round().long()  # (k+1,) strictly increasing
    new_sigmas = torch.cat([sigmas[:end], sigmas[keep]])
    new_mask = torch.cat([sde_mask[:end], torch.zeros(tail_steps, dtype=torch.bool, device=sde_mask.device)])
    return new_sigmas, new_mask
