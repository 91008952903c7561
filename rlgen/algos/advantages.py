"""Group-relative advantages (GRPO, Shao et al. 2024, arXiv:2402.03300; Flow-GRPO, Liu et al. 2025,
arXiv:2505.05470): each sample is compared with the other samples drawn for the same prompt."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4,
                     global_std: bool = False) -> torch.Tensor:
    """(B,) advantages ``(r − mean_group) / (std_group + eps)``; with ``global_std`` the std is the
    batch's (Flow-GRPO's option; it keeps easy prompts with near-identical rewards from having
    their tiny differences blown up).

    A NaN reward means "no score" (a reward returned None or the sample was dropped): it is left
    out of every statistic and gets advantage 0, so it contributes no gradient.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_ids must both be (B,), got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    r = rewards.double()
    valid = ~torch.isnan(r)
    _, gid = torch.unique(group_ids, return_inverse=True)  # (B,) group index 0..G-1
    n_groups = int(gid.max()) + 1 if len(gid) else 0
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = zeros.index_add(0, gid, valid.double())                   # (G,)
    mean = zeros.index_add(0, gid, r0) / count.clamp_min(1)           # (G,)
    centred = torch.where(valid, r - mean[gid], torch.zeros_like(r))  # (B,)
    if global_std:
        n = valid.sum()
        std = (r[valid] - r[valid].mean()).pow(2).sum().div((n - 1).clamp_min(1)).sqrt() if n > 0 else r.new_tensor(0.0)
        adv = centred / (std + eps)
    else:
        # unbiased per-group std (torch.std's default, as GRPO implementations use)
        var = zeros.index_add(0, gid, centred.pow(2)) / (count - 1).clamp_min(1)
        adv = centred / (var.sqrt()[gid] + eps)
    return torch.where(valid, adv, torch.zeros_like(adv)).to(rewards.dtype)
