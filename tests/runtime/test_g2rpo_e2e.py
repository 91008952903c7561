"""G²RPO end to end through ``train_rl.py`` on the shipped shapes base: one step on the one runtime
(local Ray cluster, rollout and reward workers, a DeepSpeed learner), the branch finals scored by the
same reward worker as the rows' own finals."""
import pytest

import train_rl
from rlgen.runtime.rundir import read_metrics

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_one_step_on_the_shapes_base(tmp_path):
    import ray

    args = ["--config", "configs/rl/g2rpo_shapes.yaml", f"run.root={tmp_path}", "run.name=g2rpo", "train.steps=1",
            "run.progress=false", "run.tensorboard=false", "run.device=cpu", "train.max_minutes=0",
            "resources.rollout_threads=1", "resources.learner_threads=1", "ray.num_cpus=3",
            "prompts.per_step=3", "prompts.group_size=4", "learner.micro_batch_size=6", "rollout.granularities=[1, 2, 3]",
            "eval.samples_per_prompt=1", "eval.options={prompts_per_task: 1, steps: 4}", "train.grid_every=1"]
    assert train_rl.main(args) == 0
    assert not ray.is_initialized()
    rows = read_metrics(tmp_path / "g2rpo")
    assert [r["step"] for r in rows] == [0, 1]
    step = rows[1]
    for key in ("reward_mean", "reward_g2", "reward_g3", "loss", "grad_norm", "sde_step_mean", "clip_frac"):
        assert key in step, key
    assert 0 <= step["reward_g2"] <= 1.5 and step["sde_step_mean"] == pytest.approx((0 * 4 + 1 * 4 + 2 * 4) / 12)
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[1]
    assert (tmp_path / "g2rpo" / "checkpoints" / "1").is_dir()
