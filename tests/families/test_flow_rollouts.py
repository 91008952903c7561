"""Which steps of an image rollout are stochastic (the SDE window)."""
import pytest
import torch

from rlgen.families.flow import sde_mask_for


def test_window_at_a_fixed_start_covers_exactly_those_steps():
    assert sde_mask_for(10, 3, None, start=0).tolist() == [True] * 3 + [False] * 7
    assert sde_mask_for(10, 3, None, start=7).tolist() == [False] * 7 + [True] * 3
    with pytest.raises(ValueError, match="sde_window_start=8"):
        sde_mask_for(10, 3, None, start=8)


def test_random_start_moves_the_window_and_full_window_is_every_step():
    starts = {int(torch.nonzero(sde_mask_for(10, 3, torch.Generator().manual_seed(s))).min()) for s in range(30)}
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= 7
    assert sde_mask_for(10, 3, torch.Generator()).sum() == 3
    assert sde_mask_for(10, 0, None).all() and sde_mask_for(10, 10, None, start=0).all()
