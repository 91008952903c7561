"""Held-out evaluation inside RL runs: fixed prompts, deterministic ODE samples, benchmark scores.

The same scoring code as ``python -m rlgen.evaluate`` (rlgen/eval/*), so numbers in a run's report
match the CLI on the same checkpoint and settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalConfig:
    benchmark: str = "shapes"       # shapes | fashion_mnist | "" (no held-out evaluation)
    every: int = 10                 # iterations between evaluations (and always at start and end)
    prompts_per_task: int = 16      # shapes: held-out prompts per task type
    samples_per_prompt: int = 2     # fashion_mnist: samples per class (FD needs a few hundred in all)
    num_steps: int = 20
    cfg_scale: float = 1.0
    seed: int = 1234


class ImageEvaluator:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        k = cfg.samples_per_prompt
        if cfg.benchmark == "shapes":
            from rlgen.data.shapes import heldout_prompts

            items = heldout_prompts(cfg.prompts_per_task)
            self.prompts = [p for p, _ in items for _ in range(k)]
            self.tasks = [t for _, t in items for _ in range(k)]
        elif cfg.benchmark == "fashion_mnist":
            from rlgen.data.fashion_mnist import CLASSES, class_prompt

            self.labels = [y for y in range(len(CLASSES)) for _ in range(k)]
            self.prompts = [class_prompt(y) for y in self.labels]
            self._reference = None  # classifier + test-split features, built at the first score()
        else:
            raise ValueError(f"eval.benchmark must be shapes, fashion_mnist or '', got {cfg.benchmark!r}")

    def score(self, images: torch.Tensor) -> dict:
        if self.cfg.benchmark == "shapes":
            from rlgen.eval.shapes import score_images

            return score_images(images, self.prompts, self.tasks)
        from rlgen.eval.fashion_mnist import FashionReference

        if self._reference is None:  # the 10k test features are computed once per run, not per evaluation
            self._reference = FashionReference.load()
        return self._reference.report(images, torch.tensor(self.labels))
