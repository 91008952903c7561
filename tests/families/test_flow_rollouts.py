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


# --- MixGRPO's sliding window, DanceGRPO's shared group noise (rlgen/samplers/sde_window.py) ---------
from rlgen.samplers.sde_window import compress_tail, window_start  # noqa: E402


def test_constant_schedule_slides_every_tau_steps_and_stays_or_restarts_at_the_end():
    # by hand: τ = 2, stride 1, 10 steps, window 3 -> positions 0,0,1,1,...,7,7 then stay at 7
    got = [window_start(n, 0, 3, 10, every=2) for n in range(1, 21)]
    assert got == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7, 7, 7, 7]
    assert [window_start(n, 1, 3, 10, every=1, stride=3, at_end="restart") for n in range(1, 6)] == [1, 4, 7, 1, 4]
    assert window_start(99, 2, 3, 10, every=0) == 2  # every 0: a fixed window


def test_progressive_schedule_spends_fewer_steps_on_later_positions():
    # τ(l) = ceil(4·exp(−0.5·max(0, l − 1))): l0: 4, l1: 4, l2: ceil(2.43) = 3, l3: ceil(1.47) = 2, l4: 1
    got = [window_start(n, 0, 2, 8, every=4, schedule="progressive", decay=0.5, decay_after=1) for n in range(1, 16)]
    assert got == [0] * 4 + [1] * 4 + [2] * 3 + [3] * 2 + [4, 5]


def test_compress_tail_keeps_the_window_and_k_grid_points_after_it():
    sigmas = torch.linspace(1, 0, 11)
    mask = sde_mask_for(10, 3, None, start=2)
    s2, m2 = compress_tail(sigmas, mask, 2)  # tail: grid indices 5..10 -> 5, round(7.5)=8, 10
    torch.testing.assert_close(s2, sigmas[[0, 1, 2, 3, 4, 5, 8, 10]])
    assert m2.tolist() == [False, False, True, True, True, False, False]
    assert compress_tail(sigmas, mask, 9)[0] is sigmas  # asking for more steps than the tail has: unchanged
