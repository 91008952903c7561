"""The one-step off-policy pipeline (train.async_rollouts): iteration k+1's rollouts are sampled
while the learners train on iteration k, so they come from the weights before update k.

Checked against an independent re-sampling: checkpoint j is the policy after j updates; drawing
iteration k's prompts and seed with it in this process must reproduce the logged rewards exactly
when j = k - 2 (async) and not when j = k - 1 (what a synchronous run would have used).
"""
import pytest
import torch

from rlgen.runtime.rundir import read_metrics
from tests_helpers import tiny_flow_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def job(tmp_path, policy, name, iterations, extra=()):
    return ["--config", "configs/rl/flow_grpo_shapes.yaml", f"run.root={tmp_path}", f"run.name={name}",
            "run.progress=false", "run.tensorboard=false", f"policy.checkpoint={policy}",
            "rewards={'rewards.examples:brightness': 1.0}", "prompts.per_step=2", "prompts.group_size=4",
            "rollout.num_steps=4", "rollout.sde_window=0", "rollout.batch_size=8", "learner.micro_batch_size=4",
            "algo.num_minibatches=1", "algo.timestep_fraction=0.5", "policy.lora.rank=0",
            "optim.lr=0.003", "algo.kl_beta=0", "algo.clip_range=1.0", f"train.steps={iterations}", "train.save_every=1", "train.max_minutes=0",
            "train.keep_checkpoints=10", "train.grid_every=0", "eval.benchmark=", "train.async_rollouts=true",
            "resources.rollout_threads=1", "resources.learner_threads=1", *extra]


def resampled_reward(run, it: int, ckpt: int) -> float:
    """Mean brightness of iteration ``it``'s rollouts drawn here with checkpoints/<ckpt>."""
    from rlgen.config import load_config
    from rlgen.models import load_model
    from rlgen.families.flow import rollout_images
    from rlgen.runtime.sources import PromptSource
    from rlgen.utils import derive_seed

    cfg = load_config(run / "config.yaml")
    prompts = [x["prompt"] for x in PromptSource(cfg.prompts, cfg.run.seed, "image").sample(it)]  # one worker: one shard
    g = cfg.prompts.group_size
    group = [p for p in prompts for _ in range(g)]
    gids = torch.tensor([i for i in range(len(prompts)) for _ in range(g)])
    policy = load_model(run / "checkpoints" / str(ckpt)).eval()
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, it, 0))
    ro = rollout_images(policy, group, gids, cfg.rollout, gen)
    return ro.images.float().flatten(1).mean(1).mean().item()


@pytest.mark.parametrize("transport", ["object_store", pytest.param("collective", marks=pytest.mark.slow)])
def test_async_rollouts_come_from_the_weights_before_the_last_update(tmp_path, transport):
    import train_rl

    policy = tiny_flow_policy(tmp_path / "tiny")
    assert train_rl.main(job(tmp_path, policy, "async", 4, [f"train.weight_sync={transport}"])) == 0
    run = tmp_path / "async"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # iteration 1 has nothing to overlap with; from then on the behaviour policy is one update behind
    assert [r["rollout_weights_version"] for r in rows[1:]] == [0, 0, 1, 2]
    assert [r["rollout_staleness"] for r in rows[1:]] == [0, 1, 1, 1]
    for it in (3, 4):
        logged = rows[it]["reward_mean"]
        assert resampled_reward(run, it, it - 2) == pytest.approx(logged, abs=1e-5)
        # the test can tell the two apart: the newer weights give a different batch
        assert abs(resampled_reward(run, it, it - 1) - logged) > 1e-4


@pytest.mark.slow  # two short Ray jobs: about 3 minutes on a busy 2-core machine
def test_async_pipeline_recovers_killed_rollout_workers_with_the_right_weights(tmp_path):
    """Reward call 5 is iteration 3's first shard; iteration 3 was sampled with v1 while v2 was
    already sent: a restarted worker must get v1 back (not v2, not the base) for its re-issued
    shard, and v2 afterwards. Same rewards as an undisturbed async run."""
    import train_rl

    policy = tiny_flow_policy(tmp_path / "tiny")
    injector = "rewards.testing:FaultInjector"

    def faulty_job(name, kwargs):
        return job(tmp_path, policy, name, 4, [f"rewards={{'{injector}': 1.0}}",
                                               f"reward_kwargs={{'{injector}': {kwargs}}}",
                                               "resources.rollout_workers=2", "resources.rollout_cpus=0.5",
                                               "resources.reward_cpus=0.5", "train.save_every=4"])

    faulty = {"marker_dir": str(tmp_path / "faults"), "kill_rollout_at": [5]}
    assert train_rl.main(faulty_job("faulty", faulty)) == 0
    assert (tmp_path / "faults" / "killed-rollout-5").read_text().split()  # the kill really happened
    rows = read_metrics(tmp_path / "faulty")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert sum(r.get("worker_faults", 0) for r in rows) >= 1
    assert train_rl.main(faulty_job("clean", {"marker_dir": str(tmp_path / "clean")})) == 0
    ref = read_metrics(tmp_path / "clean")
    for a, b in zip(rows[1:], ref[1:]):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["rollout_weights_version"] == b["rollout_weights_version"]
