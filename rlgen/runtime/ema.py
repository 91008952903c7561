"""An exponential moving average (EMA) of the policy's trainable parameters, kept by learner rank 0.

Flow-GRPO's SD3 recipes (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
github.com/yifan123/flow_grpo) evaluate and save an EMA of the trainable weights while training and
rollouts use the raw ones. The schedule follows that code: after optimizer update ``n`` (1-based),
when ``(n + 1) % every == 0``,

    d_n = min((1 + n) / (10 + n), decay)   (warm-up; ``warmup=false``: d_n = decay)
    ema ← ema + (1 − d_n) · (θ_n − ema)

starting from a copy of the trainable weights before the first update. The shadow copy is fp32 on
the learner's device; it lives on rank 0 only (ZeRO ≤ 2: every rank holds the full parameters;
ZeRO-3 is refused at set-up, see ``JobConfig``). A checkpoint keeps it in
``deepspeed/ema.safetensors`` so a resumed run continues the same average.

``evaluate_with_weights`` runs on a rollout worker (through Ray's ``__ray_call__``): it swaps the
given weights in, evaluates, and puts the worker's own weights back before returning, so the next
rollout is sampled with the raw policy whatever else is queued on that actor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlgen.config import check_range

EMA_FILE = "ema.safetensors"


@dataclass
class EmaConfig:
    """``train.ema``: an EMA of the trainable weights for evaluation and saved policies."""

    decay: float = 0.0     # 0 = off (evaluation and checkpoints use the raw policy); Flow-GRPO SD3: 0.9
    every: int = 1         # update the average after updates n with (n + 1) % every == 0; Flow-GRPO SD3: 8
    warmup: bool = True    # d_n = min((1 + n) / (10 + n), decay), as Flow-GRPO; false: d_n = decay

    def __post_init__(self):
        check_range(self, "decay", lo=0, hi=1, hi_open=True)
        check_range(self, "every", lo=1)

    @property
    def enabled(self) -> bool:
        return self.decay > 0


class PolicyEma:
    """The fp32 shadow of ``named`` (name → parameter), updated in place after optimizer updates."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], cfg: EmaConfig):
        self.cfg = cfg
        self.shadow = {n: p.detach().float().clone() for n, p in named}

    def decay_at(self, n: int) -> float:
        c = self.cfg
        return min((1 + n) / (10 + n), c.decay) if c.warmup else c.decay

    @torch.no_grad()
    def update(self, named: list[tuple[str, torch.nn.Parameter]], n: int) -> bool:
        """After optimizer update ``n`` (1-based); returns whether the average moved."""
        if (n + 1) % self.cfg.every:
            return False
        w = 1.0 - self.decay_at(n)
        for name, p in named:
            e = self.shadow[name]
            e.add_(p.detach().float() - e, alpha=w)
        return True

    def numpy(self) -> dict[str, np.ndarray]:
        return {n: t.cpu().numpy().copy() for n, t in self.shadow.items()}

    def save(self, folder: Path) -> None:
        """safetensors: a resume reads tensors only, no pickled code."""
        from safetensors.torch import save_file

        save_file({n: t.contiguous().cpu() for n, t in self.shadow.items()}, str(folder / EMA_FILE))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        f = folder / EMA_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a run with train.ema.decay > 0 resumes its EMA from it")
        state = load_file(str(f))
        if set(state) != set(self.shadow):
            raise KeyError(f"{f}: holds {len(state)} tensors, the policy trains {len(self.shadow)} "
                           f"(another policy or LoRA setting?)")
        with torch.no_grad():
            for n, t in self.shadow.items():
                t.copy_(state[n])


def evaluate_with_weights(worker, state: dict[str, np.ndarray], benchmark: str, request: dict) -> dict:
    """On a RolloutWorker (``actor.__ray_call__``): evaluate with ``state`` swapped in, then restore
    the worker's own weights (its ``version`` is never changed)."""
    from rlgen.runtime.engine import load_numpy_weights

    params = dict(worker.policy.named_parameters())
    own = {n: params[n].detach().clone() for n in state if n in params}
    load_numpy_weights(worker.policy, state, strict=False)  # checks every name and shape first
    try:
        return worker.evaluate(benchmark, request)
    finally:
        with torch.no_grad():
            for n, t in own.items():
                params[n].copy_(t)
