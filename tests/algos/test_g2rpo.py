"""G²RPO (rlgen/algos/g2rpo.py, rlgen/families/flow_g2rpo.py) against facts computed here by hand:
one log-prob per trajectory, at its group's step k, with Euler steps everywhere else; each branch
equals an Euler integration written out on its grid; the integrated advantage of a reward table
equals the hand computation; the update's gradient is the one of each row's own step, scored alone."""
import copy
import statistics

import pytest
import torch

from rlgen.algos.g2rpo import G2RPO, G2RPOConfig, integrate_advantages
from rlgen.families.flow import PolicyVelocity
from rlgen.families.flow_g2rpo import G2RPORollout, G2RPORolloutConfig, rollout_g2rpo
from rlgen.models.flow import FlowPolicy
from rlgen.samplers.flow import sde_step
from tests.algos.engines import RecordingEngine, context
from tests.algos.test_flow_grpo_update import tiny_flow_config

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["red circle", "red circle", "blue square", "blue square", "red square", "red square"]
GIDS = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return FlowPolicy.build(tiny_flow_config()).eval()


def rollout(policy, seed=0, **kw):
    opts = dict(num_steps=5, noise_level=0.7, sde_window=3, sde_window_start=0, granularities=[1, 2, 3])
    cfg = G2RPORolloutConfig(**{**opts, **kw})
    return rollout_g2rpo(policy, PROMPTS, GIDS, cfg, torch.Generator().manual_seed(seed))


def euler(policy, prompt, x, grid):
    """Plain Euler ODE x ← x + v(x, σ_i)·(σ_{i+1} − σ_i) along ``grid`` (a list of floats), one row."""
    v_fn = policy.velocity_fn([prompt], 1.0)
    for s, s_next in zip(grid, grid[1:]):
        x = x + v_fn(x, torch.tensor([s])) * (s_next - s)
    return x


@torch.no_grad()
def test_one_sde_step_per_trajectory_at_its_groups_k_and_euler_elsewhere(policy):
    ro = rollout(policy)
    assert ro.sde_step.tolist() == [0, 0, 1, 1, 2, 2]  # stratified: group i takes window[i mod 3]
    nonzero = ro.log_probs != 0
    assert nonzero.sum(1).tolist() == [1] * 6
    assert nonzero.float().argmax(1).tolist() == ro.sde_step.tolist()
    sig = ro.sigmas.tolist()
    for b, k in enumerate(ro.sde_step.tolist()):
        partner = b ^ 1  # the other sample of the group
        assert torch.equal(ro.latents[b, :k + 1], ro.latents[partner, :k + 1])  # shared noise, ODE up to k
        assert not torch.allclose(ro.latents[b, k + 1], ro.latents[partner, k + 1])  # its own SDE noise
        for i in range(5):
            if i != k:  # every other step is the Euler step from the stored state
                want = euler(policy, PROMPTS[b], ro.latents[b, i:i + 1], sig[i:i + 2])
                torch.testing.assert_close(ro.latents[b, i + 1:i + 2], want, atol=1e-5, rtol=1e-5)
    assert ro.sde_mask.tolist() == [True, True, True, False, False]


@torch.no_grad()
def test_random_choice_keeps_one_step_per_group_inside_the_window(policy):
    ro = rollout(policy, sde_step_choice="random", sde_window=2, sde_window_start=1, seed=3)
    k = ro.sde_step.view(3, 2)
    assert (k[:, 0] == k[:, 1]).all() and set(k.flatten().tolist()) <= {1, 2}


@torch.no_grad()
def test_branches_equal_euler_on_their_coarser_grid(policy):
    ro = rollout(policy, granularities=[2, 1, 3])
    assert ro.branch_granularities == (2, 3) and ro.granularities == (2, 1, 3)
    sig = ro.sigmas.tolist()
    # grids written out: from index k+1 every g-th point, σ = 0 (index 5) always last
    grids = {(0, 2): [1, 3, 5], (0, 3): [1, 4, 5], (1, 2): [2, 4, 5], (1, 3): [2, 5], (2, 2): [3, 5], (2, 3): [3, 5]}
    for b, k in enumerate(ro.sde_step.tolist()):
        torch.testing.assert_close(ro.images[b], ro.latents[b, -1])  # granularity 1: the row's own final
        for m, g in enumerate((2, 3)):
            want = euler(policy, PROMPTS[b], ro.latents[b, k + 1:k + 2], [sig[i] for i in grids[(k, g)]])
            torch.testing.assert_close(ro.branch_images[b, m], want[0], atol=1e-5, rtol=1e-5)


def test_branch_scores_come_back_to_their_rows(policy):
    from rewards.base import MixedRewards

    ro = rollout(policy)
    images, prompts = ro.reward_inputs()
    assert len(images) == len(prompts) == 6 * 3 and prompts[6:9] == [PROMPTS[0]] * 3
    score = images.flatten(1).mean(1)  # a brightness "reward" of each scored image
    mixed = MixedRewards(score, {"bright": score}, torch.ones(18, dtype=torch.bool), {})
    own = ro.keep_scores(mixed)
    torch.testing.assert_close(own.total, ro.images.flatten(1).mean(1))
    torch.testing.assert_close(ro.branch_rewards, ro.branch_images.flatten(2).mean(2))
    both = G2RPORollout.cat([ro.select([0, 1]), ro.select([4, 5])])
    assert both.sde_step.tolist() == [0, 0, 2, 2] and both.branch_rewards.shape == (4, 2)


def hand_advantages(table, groups, eps=1e-4):
    """Each column normalised within each group (statistics.stdev: the unbiased std)."""
    out = [[0.0] * len(table[0]) for _ in table]
    for m in range(len(table[0])):
        for g in set(groups):
            rows = [i for i, x in enumerate(groups) if x == g]
            vals = [table[i][m] for i in rows]
            mu, sd = statistics.mean(vals), statistics.stdev(vals)
            for i in rows:
                out[i][m] = (table[i][m] - mu) / (sd + eps)
    return out


def test_integrated_advantage_equals_the_hand_computation():
    # rows × granularities (1, 2): group 0 rows 0-2, group 1 rows 3-5
    table = [[1.0, 0.5], [0.0, 0.5], [0.5, 1.0], [0.2, 0.9], [0.8, 0.1], [0.2, 0.3]]
    groups = [0, 0, 0, 1, 1, 1]
    hand = hand_advantages(table, groups)
    got = integrate_advantages(torch.tensor(table), torch.tensor(groups), "sum")
    torch.testing.assert_close(got, torch.tensor([a + b for a, b in hand]), atol=1e-6, rtol=1e-6)
    got = integrate_advantages(torch.tensor(table), torch.tensor(groups), "mean")
    torch.testing.assert_close(got, torch.tensor([(a + b) / 2 for a, b in hand]), atol=1e-6, rtol=1e-6)
    # row 0 by hand: col 1 (1 − 0.5)/(0.5 + ε); col 2 (0.5 − 2/3)/(0.2887 + ε)
    assert abs(got[0].item() * 2 - (0.5 / (0.5 + 1e-4) + (0.5 - 2 / 3) / (0.28867513 + 1e-4))) < 1e-5

    # through the algorithm: granularity 1 is the rows' own reward, 2 their branch's
    ro = G2RPORollout(prompts=["p"] * 6, group_ids=torch.tensor(groups), latents=torch.zeros(6, 3, 1, 2, 2),
                      log_probs=torch.zeros(6, 2), sigmas=torch.tensor([1.0, 0.5, 0.0]),
                      sde_mask=torch.tensor([True, False]), sde_step=torch.zeros(6, dtype=torch.long),
                      granularities=(2, 1), branch_granularities=(2,))
    ro.rewards, ro.branch_rewards = torch.tensor([r[0] for r in table]), torch.tensor([[r[1]] for r in table])
    adv = G2RPO(G2RPOConfig()).advantages(ro).advantages
    torch.testing.assert_close(adv, torch.tensor([a + b for a, b in hand]), atol=1e-6, rtol=1e-6)


def test_update_gradient_is_each_rows_own_step_scored_alone(policy):
    ro = rollout(policy, granularities=[1])
    ro.rewards = torch.tensor([1.0, 0.0, 0.3, 0.9, 0.5, 0.4])
    algo = G2RPO(G2RPOConfig(clip_range=1e6, adv_clip_max=1e6))
    ro = algo.advantages(ro)
    ro.global_size, ro.seed = len(ro), 0
    pol = copy.deepcopy(policy)
    engine = RecordingEngine(PolicyVelocity(pol))
    metrics = algo.update(context(pol, engine, micro=3), ro)
    assert abs(metrics["ratio_mean"] - 1) < 1e-6 and metrics["clip_frac"] == 0  # on-policy: the stored log-probs
    # by hand: −mean_b A_b·log p(x_{k+1} | x_k)/D, each row forwarded alone at its own float σ
    ref = copy.deepcopy(policy)
    ref.train()
    sig, total = ro.sigmas.tolist(), 0.0
    for b, k in enumerate(ro.sde_step.tolist()):
        x = ro.latents[b:b + 1, k]
        v = ref.velocity_fn([PROMPTS[b]], 1.0)(x, torch.tensor([sig[k]]))
        lp = sde_step(x, v, sig[k], sig[k + 1], 0.7, prev_sample=ro.latents[b:b + 1, k + 1]).log_prob
        total = total - ro.advantages[b] * lp[0] / x[0].numel()
    (total / len(ro)).backward()
    want = [p.grad for p in ref.parameters()]
    got = engine.grads[0]
    assert len(engine.grads) == 1
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert max(w.abs().max().item() for w in want if w is not None) > 0


def test_config_checks():
    from rlgen.config import ConfigError, load_config

    cfg = load_config("configs/rl/g2rpo_shapes.yaml", ["rollout.granularities=[1, 3]"])
    assert isinstance(cfg.rollout, G2RPORolloutConfig) and cfg.rollout.granularities == [1, 3]
    with pytest.raises(ConfigError, match="granularities"):
        load_config("configs/rl/g2rpo_shapes.yaml", ["rollout.granularities=[0]"])
    with pytest.raises(ConfigError, match="rollout.granularities"):  # not a Flow-GRPO setting
        load_config("configs/rl/flow_grpo_shapes.yaml", ["rollout.granularities=[1, 2]"])
    for override in ("rollout.sde_kind=cps", "rollout.ode_solver=dpm2", "rollout.shared_group_noise=true",
                     "rollout.sde_window_slide.every=5", "rollout.teacache.threshold=0.1"):
        key = override.split("=")[0].split(".")[1]
        with pytest.raises(ConfigError, match=f"{key}.*not used by G²RPO"):  # refused, never silently ignored
            load_config("configs/rl/g2rpo_shapes.yaml", [override])
