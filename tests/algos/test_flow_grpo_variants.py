"""The Flow-GRPO family through rollouts and the learner: each SDE kind is re-scored by the learner with
the kind that drew it (first-pass ratio 1), DanceGRPO's shared group noise, MixGRPO's sliding window
with DPM-Solver++ after it (only the window is trained)."""
import pytest
import torch

from rlgen.algos.flow_grpo import FlowGRPO, FlowGRPOConfig
from rlgen.families.flow import ImageRolloutConfig, PolicyVelocity, WindowSlideConfig, rollout_images
from rlgen.models.flow import FlowPolicy
from tests.algos.engines import RecordingEngine, context
from tests.algos.test_flow_grpo_update import tiny_flow_config

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["red circle", "red circle", "blue square", "blue square"]
GIDS = torch.tensor([0, 0, 1, 1])


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return FlowPolicy.build(tiny_flow_config())


def _rollout(policy, step=0, seed=0, **kw):
    cfg = ImageRolloutConfig(num_steps=4, noise_level=0.5, **kw)
    return rollout_images(policy, PROMPTS, GIDS, cfg, torch.Generator().manual_seed(seed), step=step)


def _first_pass_kl(policy, batch):
    batch.advantages, batch.global_size = torch.tensor([1.0, -1.0, 0.5, -0.5]), len(batch)
    algo = FlowGRPO(FlowGRPOConfig(kl_beta=0.0, clip_range=1e6, adv_clip_max=1e6))
    metrics = algo.update(context(policy, RecordingEngine(PolicyVelocity(policy)), None, None, 0, False), batch)
    return metrics["approx_kl_old"], metrics["num_train_steps"]


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_learner_rescores_with_the_rollouts_kind(policy, kind):
    batch = _rollout(policy, sde_kind=kind)
    assert batch.sde_kind == kind
    kl, n_steps = _first_pass_kl(policy, batch)
    assert kl < 1e-8 and n_steps == (3 if kind == "cps" else 4)  # cps: the step to σ = 0 is an ODE step
    batch.sde_kind = "dance" if kind != "dance" else "flow_grpo"  # scored as another kind: the ratio is off
    assert _first_pass_kl(policy, batch)[0] > 1e-2


def test_shared_group_noise_diversity_comes_from_the_sde_steps_only(policy):
    batch = _rollout(policy, shared_group_noise=True, sde_window=1, sde_window_start=2)
    lat = batch.latents  # (4, 5, C, H, W): steps 0, 1 ODE, step 2 SDE
    for j in (0, 1, 2):  # identical start noise, hence identical ODE states, within a group
        torch.testing.assert_close(lat[0, j], lat[1, j])
        torch.testing.assert_close(lat[2, j], lat[3, j])
    assert not torch.allclose(lat[0, 0], lat[2, 0])  # groups start from different noise
    assert (lat[0, 3] - lat[1, 3]).abs().max() > 1e-3  # the SDE step splits the group
    default = _rollout(policy, sde_window=1, sde_window_start=2)
    assert not torch.allclose(default.latents[0, 0], default.latents[1, 0])  # off: each sample its own noise


def test_mixgrpo_window_follows_the_step_and_only_it_is_trained(policy):
    slide = WindowSlideConfig(every=2)
    masks = [_rollout(policy, step=n, sde_window=2, sde_window_start=0, sde_window_slide=slide).sde_mask.tolist()
             for n in (1, 2, 3, 5)]
    assert masks == [[True, True, False, False]] * 2 + [[False, True, True, False], [False, False, True, True]]
    batch = _rollout(policy, step=1, sde_window=2, sde_window_start=0, sde_window_slide=slide, ode_solver="dpm2",
                     post_window_steps=1)
    assert batch.latents.shape[1] == 4 and batch.sde_mask.tolist() == [True, True, False]  # tail 2 steps -> 1
    assert (batch.log_probs[:, 2] == 0).all() and (batch.log_probs[:, :2] != 0).all()
    kl, n_steps = _first_pass_kl(policy, batch)
    assert kl < 1e-8 and n_steps == 2


def test_bad_options_are_one_clear_error():
    with pytest.raises(ValueError, match="sde_kind"):
        ImageRolloutConfig(sde_kind="ddim")
    with pytest.raises(ValueError, match="sde_window_slide.every"):
        ImageRolloutConfig(sde_window=0, sde_window_slide=WindowSlideConfig(every=2))
    with pytest.raises(ValueError, match="noise_level"):
        ImageRolloutConfig(sde_kind="cps", noise_level=1.5)
