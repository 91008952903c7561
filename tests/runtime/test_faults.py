"""Worker faults: SIGKILL rollout workers and a reward worker in the middle of a run (an image job
and a text job); Ray restarts them, the driver re-issues the lost work with the same seeds, and the
run finishes with every step logged exactly once and the same rewards as an undisturbed run."""
import pytest

from rlgen.runtime.rundir import read_metrics
from tests.runtime.tiny import save_tiny_lm
from tests_helpers import tiny_flow_policy

INJECTOR = "rewards.testing:FaultInjector"


def job(tmp_path, kind, name, kwargs):
    if kind == "image":
        policy = tiny_flow_policy(tmp_path / "tiny") if not (tmp_path / "tiny").exists() else tmp_path / "tiny"
        extra = ["--config", "configs/rl/flow_grpo_shapes.yaml", f"policy.checkpoint={policy}", "rollout.num_steps=4",
                 "rollout.sde_window=0", "rollout.batch_size=8", "learner.micro_batch_size=4",
                 "algo.timestep_fraction=0.5"]
    else:
        lm = tmp_path / "lm"
        if not lm.exists():
            save_tiny_lm(lm, max_length=16)
        extra = ["--config", "configs/rl/mdm_grpo_arith.yaml", f"policy.checkpoint={lm}", "algo.skip_uniform_groups=false"]
    return [*extra, f"run.root={tmp_path}", f"run.name={name}", "run.progress=false", "run.tensorboard=false",
            f"rewards={{'{INJECTOR}': 1.0}}", f"reward_kwargs={{'{INJECTOR}': {kwargs}}}",
            "prompts.per_step=2", "prompts.group_size=4", "train.steps=3", "train.save_every=3", "train.grid_every=0",
            "train.max_minutes=0", "eval.benchmark=", "resources.rollout_workers=2", "resources.rollout_cpus=0.5",
            "resources.reward_cpus=0.5", "resources.rollout_threads=1", "resources.learner_threads=1"]


@pytest.mark.slow  # two short Ray jobs per case
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["image", "text"])
def test_killed_rollout_and_reward_workers_are_restarted_and_their_work_reissued(tmp_path, kind):
    import train_rl

    # calls: 2 shards per step → call 3 is step 2's first shard: kill both rollout workers then
    # (one may still be sampling its shard); call 5 kills the reward worker itself.
    faulty = {"marker_dir": str(tmp_path / "faults"), "kill_rollout_at": [3], "kill_self_at": [5]}
    assert train_rl.main(job(tmp_path, kind, "faulty", faulty)) == 0
    assert (tmp_path / "faults" / "killed-rollout-3").read_text().split()  # the kill really happened
    assert (tmp_path / "faults" / "self-5").exists()
    rows = read_metrics(tmp_path / "faulty")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # nothing lost, nothing duplicated
    assert sum(r.get("worker_faults", 0) for r in rows) >= 2

    clean = {"marker_dir": str(tmp_path / "clean")}
    assert train_rl.main(job(tmp_path, kind, "clean", clean)) == 0
    ref = read_metrics(tmp_path / "clean")
    # same seeds, re-issued work: the disturbed run saw exactly the undisturbed run's rewards
    for a, b in zip(rows[1:], ref[1:]):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["weights_version"] == b["weights_version"]
