"""DeepSpeed learners in Ray actors, for every family and kind of algorithm: data parallelism takes
the same step as one process, weights sync exactly, checkpoints resume exactly.

The reference facts are computed in this process: each algorithm's update with a plain torch AdamW
(``TorchEngine``) on the whole batch, and the initial policy saved to disk.
"""
import copy
import shutil
import tempfile

import numpy as np
import pytest
import torch

from rlgen.algos.flow_grpo import FlowGRPO, FlowGRPOConfig
from rlgen.algos.mdm_grpo import MDMGRPO, MDMGRPOConfig
from rlgen.algos.vrpo import VRPO, VRPOConfig
from rlgen.families import LoraSpec
from rlgen.families.flow import PolicyVelocity
from rlgen.models.flow import FlowPolicy
from rlgen.runtime.engine import OptimConfig, load_numpy_weights
from tests.algos.engines import context
from tests.algos.test_flow_grpo_update import make_rollout, tiny_flow_config
from tests.runtime.tiny import save_tiny_lm, text_items, text_pairs_batch, text_rollout_batch

ray = pytest.importorskip("ray")

FLOW_ALGO = FlowGRPOConfig(kl_beta=0.01)
# grad_clip is active (grad norm ≈ 0.2 for the flow model): DeepSpeed must clip by the norm over all ranks
OPTIM = OptimConfig(lr=1e-3, grad_clip=0.1, weight_decay=0.01)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def params_np(module) -> dict:
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


def torch_update(policy, algo, batch, module=None, steps: int = 1):
    """The algorithm's update in this process, with torch AdamW and DeepSpeed's clipping."""
    from rlgen.runtime.engine import TorchEngine

    trained = copy.deepcopy(policy)
    ref = copy.deepcopy(policy).requires_grad_(False)
    engine = TorchEngine(module(trained) if module else trained, OPTIM)
    for _ in range(steps):
        trained.grad_norm = algo.update(context(trained, engine, ref), batch)["grad_norm"]
    return trained


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny saved policies, one batch per kind of algorithm, their single-process updates, a Ray cluster."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("learner")
    torch.manual_seed(0)
    flow = FlowPolicy.build(tiny_flow_config())
    flow.save_pretrained(root / "flow")
    flow_batch = make_rollout(flow)
    lm = save_tiny_lm(root / "lm")
    text_batch = text_rollout_batch(lm, text_items(n=5), group_size=3)
    assert len(text_batch.buckets) == 2 and any(len(b) % 2 for b in text_batch.buckets)  # odd: shards are padded
    pairs = text_pairs_batch(lm, n=5)
    text_algo, vrpo_algo = MDMGRPOConfig(kl_beta=0.04, inner_iterations=2), VRPOConfig(beta=0.5, n_samples=4)
    token_algo = MDMGRPOConfig(kl_beta=0.04, inner_iterations=2, loss_agg="token")  # d1: / the step's token count
    ray_dir = tempfile.mkdtemp(prefix="rlgen_learner_ray_", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    yield dict(
        flow=dict(policy=flow, path=str(root / "flow"), batch=flow_batch, algo=FLOW_ALGO,
                  trained=torch_update(flow, FlowGRPO(FLOW_ALGO), flow_batch, PolicyVelocity)),
        text=dict(policy=lm, path=str(root / "lm"), batch=text_batch, algo=text_algo,
                  trained=torch_update(lm, MDMGRPO(text_algo), text_batch)),
        text_token=dict(policy=lm, path=str(root / "lm"), batch=text_batch, algo=token_algo,
                        trained=torch_update(lm, MDMGRPO(token_algo), text_batch)),
        vrpo=dict(policy=lm, path=str(root / "lm"), batch=pairs, algo=vrpo_algo,
                  trained=torch_update(lm, VRPO(vrpo_algo), pairs)))
    ray.shutdown()
    shutil.rmtree(ray_dir, ignore_errors=True)
    torch.set_num_threads(n_threads)


def start_group(case: dict, num_learners: int, zero_stage: int = 2, micro: int = 2, **kw):
    from rlgen.runtime.learner import LearnerGroup, LearnerSpec

    spec = LearnerSpec(case["path"], {}, LoraSpec(), case["algo"], OPTIM, zero_stage=zero_stage, micro_batch_size=micro,
                       **kw)
    # 2 logical CPUs: half a CPU per learner leaves room for a second group and the driver
    return LearnerGroup(spec, num_learners, num_cpus=0.5)


@pytest.fixture(scope="module")
def one_flow_learner(world):
    group = start_group(world["flow"], 1)
    metrics = group.train(world["flow"]["batch"])
    yield group, metrics, group.get_weights()[1]  # weights after this first update (later tests train on)
    group.shutdown()


def test_one_learner_matches_the_single_process_update(world, one_flow_learner):
    group, metrics, weights = one_flow_learner
    case = world["flow"]
    assert group.version >= 1 and metrics["samples"] == 4 and metrics["num_train_steps"] == 3
    assert max_diff(weights, params_np(case["trained"])) <= 1e-5
    assert max_diff(weights, params_np(case["policy"])) > 1e-4  # the update did move the weights


@pytest.mark.parametrize("kind", ["flow", "text", "text_token", "vrpo"])
def test_two_zero2_learners_take_the_same_step_as_one(world, kind):
    """2 ranks on half the rows each (uneven text buckets padded with weight-0 rows) = 1 process."""
    case = world[kind]
    group = start_group(case, 2, micro=2 if kind == "flow" else 0)
    try:
        metrics = group.train(case["batch"])
        version, w2 = group.get_weights()
    finally:
        group.shutdown()
    assert version == 1
    # Adam and clipping make the weights nearly blind to a gradient's scale: the global pre-clip
    # gradient norm is what shows a rank summing where it should average
    assert metrics["grad_norm"] == pytest.approx(case["trained"].grad_norm, rel=1e-4)
    assert max_diff(w2, params_np(case["trained"])) <= 1e-5
    assert max_diff(w2, params_np(case["policy"])) > 1e-4


def test_weight_sync_into_a_separate_policy(world, one_flow_learner):
    weights, case = one_flow_learner[2], world["flow"]
    worker = FlowPolicy.from_pretrained(case["path"])
    ptrs = [p.data_ptr() for p in worker.parameters()]
    load_numpy_weights(worker, weights)
    assert [p.data_ptr() for p in worker.parameters()] == ptrs  # copied in place
    assert max_diff(params_np(worker), weights) == 0
    batch = case["batch"]
    x, sigma = batch.latents[:, 1], batch.sigmas[1].expand(len(batch))
    with torch.no_grad():
        v = worker.velocity_fn(batch.prompts)(x, sigma)
        torch.testing.assert_close(v, case["trained"].velocity_fn(batch.prompts)(x, sigma), rtol=0, atol=1e-4)
        assert (v - case["policy"].velocity_fn(batch.prompts)(x, sigma)).abs().max() > 1e-4


def test_save_then_resume_repeats_the_next_update(world, one_flow_learner, tmp_path):
    group, case = one_flow_learner[0], world["flow"]
    group.save(tmp_path / "ckpt")
    version, saved = group.get_weights()
    assert max_diff(params_np(FlowPolicy.from_pretrained(tmp_path / "ckpt")), saved) == 0
    group.train(case["batch"])  # a second update: Adam's moments now matter
    _, after = group.get_weights()
    group.load(tmp_path / "ckpt")
    assert group.get_weights()[0] == version and max_diff(group.get_weights()[1], saved) == 0
    group.train(case["batch"])
    assert max_diff(group.get_weights()[1], after) <= 1e-6


def test_zero3_partitions_and_gathers_full_weights(world, one_flow_learner):
    w1, case = one_flow_learner[2], world["flow"]
    group = start_group(case, 2, zero_stage=3, zero3_persistence_threshold=0)
    try:
        total = sum(p.numel() for p in case["policy"].parameters())
        assert all(n < 0.6 * total for n in group.local_param_numel())  # each rank holds about half
        _, w0 = group.get_weights()
        assert max_diff(w0, params_np(case["policy"])) == 0  # full shapes, exact values
        group.train(case["batch"])
        _, w3 = group.get_weights()
    finally:
        group.shutdown()
    assert max_diff(w3, w1) <= 1e-5


def test_load_numpy_weights_rejects_mismatches(world):
    policy = copy.deepcopy(world["flow"]["policy"])
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


def test_reference_refresh_every_n_updates_survives_a_resume(world, tmp_path):
    """algo.ref_refresh_every=2 (d1's reference sync): the reference is the base for updates 1-2, then the
    policy as it was after update 2; a checkpoint at version 3 restores that reference, and the update
    after the resume is the one the uninterrupted group made."""
    import dataclasses

    case = dict(world["text"], algo=dataclasses.replace(world["text"]["algo"], ref_refresh_every=2))
    base = params_np(case["policy"])
    group = start_group(case, 1, micro=0)
    try:
        for _ in range(2):
            group.train(case["batch"])
        _, w2 = group.get_weights()
        assert max_diff(group.get_reference_weights(), base) == 0  # not yet refreshed
        group.train(case["batch"])  # refreshes first, then trains against the policy of update 2
        assert max_diff(group.get_reference_weights(), w2) == 0 and max_diff(w2, base) > 1e-4
        group.save(tmp_path / "ckpt")
        group.train(case["batch"])
        _, w4 = group.get_weights()
        group.train(case["batch"])  # refreshed to w4 first
        assert max_diff(group.get_reference_weights(), w4) == 0
        group.load(tmp_path / "ckpt")  # the same ranks: the reference must come back from the checkpoint
        assert group.version == 3 and max_diff(group.get_reference_weights(), w2) == 0
        group.train(case["batch"])
        assert max_diff(group.get_weights()[1], w4) <= 1e-6
    finally:
        group.shutdown()


def test_reference_refresh_is_refused_where_there_is_no_copy_to_refresh():
    from rlgen.algos.base import get_algorithm
    from rlgen.config import load_config

    for extra, why in ((["policy.lora.rank=4"], "policy.lora.rank > 0"), (["learner.zero_stage=3"], "zero_stage=3"),
                       (["algo.kl_beta=0"], "algo.kl_beta=0")):
        cfg = load_config("configs/rl/mdm_grpo_arith.yaml", ["algo.ref_refresh_every=2", *extra])
        with pytest.raises(ValueError, match=f"algo.ref_refresh_every=2 refreshes a frozen reference copy: not with .*{why}"):
            get_algorithm("mdm_grpo")(cfg.algo).check_job(cfg)
    cfg = load_config("configs/rl/mdm_grpo_arith.yaml", ["algo.ref_refresh_every=2"])
    get_algorithm("mdm_grpo")(cfg.algo).check_job(cfg)  # full fine-tuning, ZeRO-2, a KL: accepted
