"""DeepSpeed learners in Ray actors: data parallelism takes the same step as one process, weights
sync exactly, checkpoints resume exactly.

The reference facts are computed in this process: the Flow-GRPO update with a plain torch AdamW
(``TorchEngine``) on the whole batch, and the initial policy saved to disk.
"""
import copy
import shutil
import tempfile

import numpy as np
import pytest
import torch

from rlgen.algos.flow_grpo import FlowGRPOConfig
from rlgen.models.flow import FlowPolicy
from rlgen.runtime.flow_update import LearnerConfig, TorchEngine, flow_grpo_update, grad_accum_steps
from rlgen.runtime.learner import load_numpy_weights

from test_flow_update import make_rollout, tiny_flow_config

ray = pytest.importorskip("ray")

BATCH, SDE_STEPS = 4, 3
ALGO = FlowGRPOConfig(kl_beta=0.01)


def learner_cfg(**kw) -> LearnerConfig:
    # grad_clip is active (grad norm ≈ 0.2): DeepSpeed must clip by the norm over all ranks
    base = dict(micro_batch_size=2, lr=1e-3, grad_clip=0.1, weight_decay=0.01)
    return LearnerConfig(**{**base, **kw})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def params_np(module) -> dict:
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny saved policy, a rollout batch, its single-process update, and a Ray cluster."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = FlowPolicy.build(tiny_flow_config())
    path = tmp_path_factory.mktemp("learner") / "policy"
    policy.save_pretrained(path)
    batch = make_rollout(policy)
    trained = copy.deepcopy(policy)
    cfg = learner_cfg()
    engine = TorchEngine.adamw(trained, cfg, grad_accum_steps(cfg, BATCH, SDE_STEPS))
    ref = copy.deepcopy(policy).requires_grad_(False)
    flow_grpo_update(trained, ref, batch, ALGO, cfg, engine, torch.Generator().manual_seed(0))
    ray_dir = tempfile.mkdtemp(prefix="rlgen_learner_ray_", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    yield dict(policy=policy, path=str(path), batch=batch, trained=trained)
    ray.shutdown()
    shutil.rmtree(ray_dir, ignore_errors=True)
    torch.set_num_threads(n_threads)


def start_group(world, **kw):
    from rlgen.runtime.learner import LearnerGroup

    # 2 logical CPUs: half a CPU per learner leaves room for a second group and the driver
    return LearnerGroup(world["path"], learner_cfg(**kw), ALGO, batch_size=BATCH, num_sde_steps=SDE_STEPS,
                        num_cpus=0.5)


@pytest.fixture(scope="module")
def one_learner(world):
    group = start_group(world, num_learners=1, zero_stage=2)
    metrics = group.train(world["batch"])
    yield group, metrics, group.get_weights()[1]  # weights after this first update (later tests train on)
    group.shutdown()


def test_one_learner_matches_the_single_process_update(world, one_learner):
    group, metrics, weights = one_learner
    assert group.version >= 1 and metrics["samples"] == BATCH and metrics["num_train_steps"] == SDE_STEPS
    assert max_diff(weights, params_np(world["trained"])) <= 1e-5
    assert max_diff(weights, params_np(world["policy"])) > 1e-4  # the update did move the weights


def test_two_zero2_learners_take_the_same_step_as_one(world, one_learner):
    w1 = one_learner[2]
    group = start_group(world, num_learners=2, zero_stage=2)
    try:
        metrics = group.train(world["batch"])
        version, w2 = group.get_weights()
    finally:
        group.shutdown()
    assert version == 1 and metrics["samples"] == BATCH
    assert max_diff(w1, w2) <= 1e-5


def test_weight_sync_into_a_separate_policy(world, one_learner):
    weights = one_learner[2]
    worker = FlowPolicy.from_pretrained(world["path"])
    ptrs = [p.data_ptr() for p in worker.parameters()]
    load_numpy_weights(worker, weights)
    assert [p.data_ptr() for p in worker.parameters()] == ptrs  # copied in place
    assert max_diff(params_np(worker), weights) == 0
    batch = world["batch"]
    x, sigma = batch.latents[:, 1], batch.sigmas[1].expand(len(batch))
    with torch.no_grad():
        v = worker.velocity_fn(batch.prompts)(x, sigma)
        torch.testing.assert_close(v, world["trained"].velocity_fn(batch.prompts)(x, sigma), rtol=0, atol=1e-4)
        assert (v - world["policy"].velocity_fn(batch.prompts)(x, sigma)).abs().max() > 1e-4


def test_save_then_resume_repeats_the_next_update(world, one_learner, tmp_path):
    group = one_learner[0]
    group.save(tmp_path / "ckpt")
    version, saved = group.get_weights()
    assert max_diff(params_np(FlowPolicy.from_pretrained(tmp_path / "ckpt")), saved) == 0
    group.train(world["batch"])  # a second update: Adam's moments now matter
    _, after = group.get_weights()
    group.load(tmp_path / "ckpt")
    assert group.get_weights()[0] == version and max_diff(group.get_weights()[1], saved) == 0
    group.train(world["batch"])
    assert max_diff(group.get_weights()[1], after) <= 1e-6


def test_zero3_partitions_and_gathers_full_weights(world, one_learner):
    w1 = one_learner[2]
    group = start_group(world, num_learners=2, zero_stage=3, zero3_persistence_threshold=0)
    try:
        total = sum(p.numel() for p in world["policy"].parameters())
        assert all(n < 0.6 * total for n in group.local_param_numel())  # each rank holds about half
        _, w0 = group.get_weights()
        assert max_diff(w0, params_np(world["policy"])) == 0  # full shapes, exact values
        group.train(world["batch"])
        _, w3 = group.get_weights()
    finally:
        group.shutdown()
    assert max_diff(w3, w1) <= 1e-5


def test_load_numpy_weights_rejects_mismatches(world):
    policy = copy.deepcopy(world["policy"])
    state = {n: p.detach().numpy() + 1 for n, p in policy.named_parameters()}
    name = next(iter(state))
    before = params_np(policy)
    with pytest.raises(KeyError, match="missing"):
        load_numpy_weights(policy, {k: v for k, v in state.items() if k != name})
    with pytest.raises(KeyError, match="unexpected"):
        load_numpy_weights(policy, {**state, "nope.weight": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_numpy_weights(policy, {**state, name: np.zeros((1, 2), np.float32)})
    assert max_diff(params_np(policy), before) == 0  # nothing was copied
    load_numpy_weights(policy, {name: state[name]}, strict=False)  # a subset, e.g. LoRA weights
    assert np.array_equal(params_np(policy)[name], state[name])
