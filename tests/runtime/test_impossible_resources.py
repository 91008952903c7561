"""Impossible resource requests (issue #8, item 3; the rest of the bad-input suite is in
tests/test_bad_inputs.py, kept apart because starting Ray costs most of a minute on a busy box).

Ray queues a request no node can satisfy and waits forever; ``RayActorGroup`` (every learner
group) checks the request against the cluster first and fails at once, naming it.
"""
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


class _Idle:
    def __init__(self, *args):
        pass


@pytest.fixture(scope="module")
def small_ray_cluster():
    """A local cluster of 1 CPU, 0 GPUs, started the way the Trainer starts one (init_ray)."""
    import ray

    from rlgen.runtime.cluster import RayConfig, init_ray

    started = init_ray(RayConfig(num_cpus=1, num_gpus=0), min_cpus=1)
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("n, request_kw, match", [
    (1, dict(num_gpus=1.0), r"1 _Idle actor\(s\): asks for 1 GPU in all \(1 × 1\), but the Ray cluster has 0 GPU"),
    (2, dict(num_cpus=4.0), r"2 _Idle actor\(s\): asks for 8 CPU in all \(2 × 4\), but the Ray cluster has 1 CPU"),
])
def test_impossible_resource_request_fails_fast(small_ray_cluster, n, request_kw, match):
    import time

    import ray

    from rlgen.runtime.actor_group import RayActorGroup

    t0 = time.time()
    with pytest.raises(RuntimeError, match=match):
        RayActorGroup(_Idle, n, lambda rank, addr, port: ((), {}), **request_kw)
    assert time.time() - t0 < 10  # not the placement group's 120 s wait, nor Ray's endless queue
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_trainer_refuses_an_impossible_request_before_writing_the_run(small_ray_cluster, tmp_path, capsys):
    """The job's own actors (rollout / reward / learner) are checked the same way: one line, exit
    status 2, and the run folder is not created for a job that cannot start."""
    import time

    import train_rl
    from tests_helpers import tiny_flow_policy

    policy = tiny_flow_policy(tmp_path / "tiny")
    t0 = time.time()
    assert train_rl.main(["--config", "configs/rl/flow_grpo_shapes.yaml", f"run.root={tmp_path}", "run.name=r",
                          f"policy.checkpoint={policy}", "resources.rollout_gpus=1", "resources.rollout_cpus=0.25",
                          "resources.reward_cpus=0.25", "resources.learner_cpus=0.25", "run.progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: resources: rollout, reward and learner actors: asks for 1 GPU in all"), err
    assert time.time() - t0 < 30 and not (tmp_path / "r").exists()
