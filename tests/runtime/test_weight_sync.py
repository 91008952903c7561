"""Weight sync transports (rlgen/runtime/weight_sync.py): after a sync every rollout worker holds
exactly the learner's trainable weights, whichever transport carried them.

The reference fact is the learner's own copy (``get_weights``: rank 0's parameters as numpy),
compared with what each worker holds; the collective path runs over gloo here and NCCL on CUDA.
"""
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

from rlgen.algos.flow_grpo import FlowGRPOConfig
from rlgen.families import LoraSpec
from rlgen.runtime.engine import OptimConfig
from tests_helpers import tiny_flow_policy

ray = pytest.importorskip("ray")
# the helpers below run inside actors, where this test module is not importable: ship them by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
LORA = LoraSpec(rank=4, alpha=4.0, targets=["to_q", "to_k", "to_v", "to_out.0"])


def _perturb(learner, seed: int) -> None:
    """Move the learner's trainable weights (as an update would), on every rank alike."""
    from rlgen.runtime.engine import trainable_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(learner.policy):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _named(worker) -> dict:
    return {n: p.detach().numpy().copy() for n, p in worker.policy.named_parameters()}


@pytest.fixture(scope="module")
def actors(tmp_path_factory):
    from rlgen.runtime.cluster import RayConfig, init_ray
    from rlgen.families.flow import ImageRolloutConfig
    from rlgen.runtime.learner import LearnerGroup, LearnerSpec
    from rollouts.worker import RolloutWorker

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = tiny_flow_policy(tmp_path_factory.mktemp("sync") / "policy")
    started = init_ray(RayConfig(num_cpus=3, temp_dir=tempfile.mkdtemp(prefix="rlgen_ws_", dir="/tmp")), 3)
    learners = LearnerGroup(LearnerSpec(str(policy), {}, LORA, FlowGRPOConfig(kl_beta=0.0), OptimConfig()), 1,
                            num_cpus=1)
    worker = ray.remote(num_cpus=0.5, max_restarts=1)(RolloutWorker)
    workers = [worker.remote(str(policy), {}, ImageRolloutConfig(), LORA, 1, "cpu", i) for i in range(2)]
    yield learners, workers
    learners.shutdown()
    if started:
        ray.shutdown()
    torch.set_num_threads(before)


def assert_workers_hold_learner_weights(learners, workers, version):
    _, want = learners.get_weights()  # only the adapter: LoRA syncs lora_A/lora_B
    assert want and all("lora_" in k for k in want)
    for got, v in zip(ray.get([w.__ray_call__.remote(_named) for w in workers]),
                      ray.get([w.get_version.remote() for w in workers])):
        assert v == version
        for k, a in want.items():
            np.testing.assert_array_equal(got[k], a)


@pytest.mark.parametrize("kind", ["object_store", "collective"])
def test_sync_gives_every_worker_the_learner_weights(actors, kind):
    from rlgen.runtime.weight_sync import make_weight_sync

    learners, workers = actors
    seed = 1 if kind == "object_store" else 2
    learners.group.call("__ray_call__", _perturb, seed)
    sync = make_weight_sync(kind, learners, workers)
    version = sync.publish(learners)
    ray.get(sync.send(workers, version))
    assert_workers_hold_learner_weights(learners, workers, version)


@pytest.mark.slow  # waits for a killed actor's restart (~30 s more on a busy machine)
def test_collective_group_is_rebuilt_after_a_worker_restart(actors):
    from rlgen.runtime.weight_sync import CollectiveSync

    learners, workers = actors
    sync = CollectiveSync(learners, workers)
    learners.group.call("__ray_call__", _perturb, 3)
    old_pid = ray.get(workers[1].pid.remote())
    ray.kill(workers[1], no_restart=False)  # Ray restarts it with the base weights
    for _ in range(240):  # as the Trainer does: wait until the restarted worker answers
        try:
            if ray.get(workers[1].pid.remote(), timeout=30) != old_pid:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.5)
    assert ray.get(workers[1].get_version.remote()) == 0  # a fresh process: base weights
    sync.publish(learners)
    assert sync.restore(workers[1], sync.version) == sync.version
    assert_workers_hold_learner_weights(learners, workers, sync.version)
