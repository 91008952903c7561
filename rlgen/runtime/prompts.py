"""Where RL prompts come from: the shapes grammar, or a prompts file (one per line).

Sampling is a pure function of (seed, iteration), so a resumed run draws exactly the prompts the
uninterrupted run would have, with no sampler state to checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class PromptsConfig:
    source: str = "shapes"            # "shapes" (grammar sampler) | "fashion_mnist" (class prompts) | "file"
    file: str = ""                    # source=file: one prompt per line
    tasks: list[str] = field(default_factory=list)  # shapes task types to draw from; [] = all six
    per_iteration: int = 8            # distinct prompts per iteration
    group_size: int = 8               # samples per prompt (G)


class PromptSource:
    def __init__(self, cfg: PromptsConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self._lines: list[str] = []
        if cfg.source == "file":
            p = Path(cfg.file)
            if not p.is_file():
                raise FileNotFoundError(f"prompts.file not found: {p}")
            self._lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            if not self._lines:
                raise ValueError(f"{p}: no prompts")
        elif cfg.source == "shapes":
            from rlgen.data.shapes import TASK_TYPES

            bad = [t for t in cfg.tasks if t not in TASK_TYPES]
            if bad:
                raise ValueError(f"prompts.tasks: unknown task types {bad}; valid: {list(TASK_TYPES)}")
        elif cfg.source != "fashion_mnist":
            raise ValueError(f"prompts.source must be shapes, fashion_mnist or file, got {cfg.source!r}")

    def sample(self, iteration: int) -> list[str]:
        """``per_iteration`` prompts for this iteration (distinct where the source allows)."""
        rng = np.random.default_rng([self.seed, iteration, 7])
        n = self.cfg.per_iteration
        if self.cfg.source == "file":
            idx = rng.choice(len(self._lines), size=n, replace=n > len(self._lines))
            return [self._lines[i] for i in idx]
        if self.cfg.source == "fashion_mnist":
            from rlgen.data.fashion_mnist import PROMPTS

            idx = rng.choice(len(PROMPTS), size=n, replace=n > len(PROMPTS))
            return [PROMPTS[i] for i in idx]
        from rlgen.data.shapes import sample_prompt

        tasks = self.cfg.tasks or [None]
        return [sample_prompt(rng, tasks[int(rng.integers(len(tasks)))])[0] for _ in range(n)]
