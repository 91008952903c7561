"""An independent prompt set for the shapes benchmark: captions RL training never draws.

The default held-out list (``rlgen.data.shapes.heldout_prompts``) comes from the same grammar as
training, so an RL run that memorises its prompts scores well on it too. Here a fixed quarter of
every task's captions is set aside (``unseen_captions``); ``prompts.exclude_unseen: true`` keeps
training off them and the benchmark option ``prompt_set: unseen`` evaluates on them only.
single_object and colors have 18 captions each (6 colours × 3 shapes, one surface form): too few
to hold any out, so those two columns stay seen captions under either prompt set.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from rlgen.data.shapes import TASK_TYPES, all_prompts, normalize_prompt

UNSEEN_FRACTION = 0.25
UNSEEN_SEED = 20251203
MIN_CAPTIONS_TO_HOLD_OUT = 50  # tasks with fewer captions (the 18 single-object ones) keep all


@lru_cache(maxsize=None)
def unseen_captions(task: str) -> tuple[str, ...]:
    """The captions of ``task`` that ``exclude_unseen`` training never draws (empty if too few)."""
    captions = all_prompts(task)
    if len(captions) < MIN_CAPTIONS_TO_HOLD_OUT:
        return ()
    k = TASK_TYPES.index(task)
    order = np.random.default_rng([UNSEEN_SEED, k]).permutation(len(captions))
    return tuple(captions[j] for j in sorted(order[: round(UNSEEN_FRACTION * len(captions))]))


@lru_cache(maxsize=None)
def _unseen_set() -> frozenset[str]:
    return frozenset(c for t in TASK_TYPES for c in unseen_captions(t))


def is_unseen(prompt: str) -> bool:
    """Whether a caption belongs to the held-out quarter (any task type)."""
    return normalize_prompt(prompt) in _unseen_set()


def unseen_prompts(n_per_task: int = 32, seed: int = 12345) -> list[tuple[str, str]]:
    """(prompt, task), ``n_per_task`` per task type, from the held-out captions (single_object and
    colors: from all their captions, as in ``heldout_prompts``), distinct while the pool allows."""
    out = []
    for k, task in enumerate(TASK_TYPES):
        pool = list(unseen_captions(task)) or all_prompts(task)
        rng = np.random.default_rng([seed, k, 1])
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n_per_task // len(pool)))])
        out.extend((pool[j], task) for j in order[:n_per_task])
    return out
