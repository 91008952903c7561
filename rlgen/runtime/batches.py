"""Typed batches that cross actor boundaries: dataclasses of CPU tensors, never ad-hoc dicts.

Large tensors travel through Ray's object store; ``to_numpy``/``from_numpy`` let callers send numpy
arrays instead, which Ray reads zero-copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch


@dataclass
class ImageRollout:
    """G samples per prompt from the SDE sampler, with everything needed to re-score any step.

    B samples, S denoising steps, image shape (C, H, W).
    """
    prompts: list[str]            # (B,) prompt of each sample (repeated G times per group)
    group_ids: torch.Tensor       # (B,) int64: samples of one prompt share an id
    latents: torch.Tensor         # (B, S+1, C, H, W): x at every grid σ, start noise first, sample last
    log_probs: torch.Tensor       # (B, S): behaviour-policy log-density of each step (0 on ODE steps)
    sigmas: torch.Tensor          # (S+1,) from 1 to 0
    sde_mask: torch.Tensor        # (S,) bool: which steps were stochastic (trainable)
    noise_level: float = 0.7
    cfg_scale: float = 1.0
    weights_version: int = 0      # version of the policy weights that sampled it (stale-weight check)
    rewards: torch.Tensor | None = None      # (B,) combined reward; NaN = no score
    advantages: torch.Tensor | None = None   # (B,)
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (B,)

    def __post_init__(self):
        b, s1 = self.latents.shape[:2]
        if len(self.prompts) != b or self.group_ids.shape != (b,) or self.log_probs.shape != (b, s1 - 1):
            raise ValueError(f"inconsistent ImageRollout: {len(self.prompts)} prompts, group_ids "
                             f"{tuple(self.group_ids.shape)}, latents {tuple(self.latents.shape)}, "
                             f"log_probs {tuple(self.log_probs.shape)}")
        if self.sigmas.shape != (s1,) or self.sde_mask.shape != (s1 - 1,):
            raise ValueError(f"sigmas {tuple(self.sigmas.shape)} / sde_mask {tuple(self.sde_mask.shape)} do not "
                             f"match {s1 - 1} steps")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def samples(self) -> torch.Tensor:
        return self.latents[:, -1]  # (B, C, H, W)

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    def select(self, idx: torch.Tensor | list[int]) -> "ImageRollout":
        """Rows ``idx`` (shared per-step tensors are kept as they are)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(self, prompts=[self.prompts[i] for i in idx.tolist()], group_ids=self.group_ids[idx],
                       latents=self.latents[idx], log_probs=self.log_probs[idx], rewards=pick(self.rewards),
                       advantages=pick(self.advantages),
                       reward_components={k: v[idx] for k, v in self.reward_components.items()})

    def shard(self, n: int) -> list["ImageRollout"]:
        """Split into n contiguous, equal-size shards (for data-parallel learners)."""
        if len(self) % n:
            raise ValueError(f"batch of {len(self)} samples does not split into {n} equal shards")
        k = len(self) // n
        return [self.select(list(range(i * k, (i + 1) * k))) for i in range(n)]

    @staticmethod
    def cat(parts: list["ImageRollout"]) -> "ImageRollout":
        first = parts[0]
        for p in parts[1:]:
            if not torch.equal(p.sigmas, first.sigmas) or not torch.equal(p.sde_mask, first.sde_mask):
                raise ValueError("cannot concatenate rollouts sampled on different σ grids")
        opt = lambda name: (None if getattr(first, name) is None  # noqa: E731
                            else torch.cat([getattr(p, name) for p in parts]))
        comps = {k: torch.cat([p.reward_components[k] for p in parts]) for k in first.reward_components}
        return replace(first, prompts=[x for p in parts for x in p.prompts],
                       group_ids=torch.cat([p.group_ids for p in parts]),
                       latents=torch.cat([p.latents for p in parts]),
                       log_probs=torch.cat([p.log_probs for p in parts]),
                       weights_version=min(p.weights_version for p in parts),
                       rewards=opt("rewards"), advantages=opt("advantages"), reward_components=comps)


def state_dict_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Weights as numpy arrays: Ray's object store hands these to readers zero-copy."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().numpy()
            for k, v in state.items()}


def numpy_to_state_dict(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) if not v.flags.writeable else torch.from_numpy(v)
            for k, v in state.items()}


def tensor_fields(obj) -> list[str]:
    return [f.name for f in fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor)]
