"""The unseen shapes captions: a fixed quarter per task, never drawn by exclude_unseen training."""
import numpy as np
import pytest
import torch

from rlgen.data import shapes as S
from rlgen.data.shapes_heldout import is_unseen, unseen_captions, unseen_prompts
from rlgen.eval.shapes import group_diversity
from rlgen.runtime.job import PromptsConfig
from rlgen.runtime.sources import PromptSource
from rlgen.config import FieldError


def test_a_quarter_of_each_large_task_is_held_out_and_the_small_ones_keep_theirs():
    for task in S.TASK_TYPES:
        allc, held = S.all_prompts(task), unseen_captions(task)
        if len(allc) < 50:
            assert held == ()
        else:
            assert len(held) == round(len(allc) / 4) and set(held) < set(allc)
    assert unseen_captions("position") == unseen_captions("position")  # fixed, not drawn per call
    items = unseen_prompts(8)
    assert len(items) == 8 * len(S.TASK_TYPES)
    for prompt, task in items:
        assert is_unseen(prompt) or task in ("single_object", "colors")


def _drawn(exclude: bool, steps: int = 30) -> list[str]:
    src = PromptSource(PromptsConfig(source="shapes", per_step=16, exclude_unseen=exclude), seed=0, modality="image")
    return [it["prompt"] for step in range(1, steps + 1) for it in src.sample(step)]


def test_exclude_unseen_training_never_draws_a_held_out_caption():
    plain, kept = _drawn(False), _drawn(True)
    assert sum(map(is_unseen, plain)) > 20  # ~a quarter of the multi-object prompts otherwise
    assert not any(map(is_unseen, kept)) and len(kept) == len(plain)
    assert kept == _drawn(True)  # still a pure function of (seed, step)


def test_exclude_unseen_needs_the_shapes_source():
    with pytest.raises(FieldError, match="exclude_unseen"):
        PromptsConfig(source="fashion_mnist", exclude_unseen=True)


def test_group_diversity_is_the_mean_pairwise_rms_distance():
    a, b, c = torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), -1.0)
    # two prompts, k = 2: RMS distances 0.5 and 0 → mean 0.25
    assert group_diversity(torch.stack([a, b, c, c]), 2) == pytest.approx(0.25)
    # one prompt, k = 3: pairs (a,b) 0.5, (a,c) 1, (b,c) 1.5 → 1.0
    assert group_diversity(torch.stack([a, b, c]), 3) == pytest.approx(1.0)
    assert group_diversity(torch.stack([a]), 1) is None
