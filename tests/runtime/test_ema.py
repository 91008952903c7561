"""train.ema: an EMA of the trainable weights (Flow-GRPO's SD3 recipes) on learner rank 0, used for
evaluation and the checkpoints' policy folders while training and rollouts keep the raw policy.

The expected averages are computed here by hand from the raw weights the learner reports after
each update: ema_n = ema_{n-1} + (1 − d_n)(θ_n − ema_{n-1}), d_n = min((1 + n)/(10 + n), decay).
"""
import shutil
import tempfile

import numpy as np
import pytest
import torch

from rlgen.algos.flow_grpo import FlowGRPOConfig
from rlgen.families import LoraSpec
from rlgen.models.flow import FlowPolicy
from rlgen.runtime.ema import EmaConfig, PolicyEma, evaluate_with_weights
from rlgen.runtime.engine import OptimConfig
from tests.algos.test_flow_grpo_update import make_rollout, tiny_flow_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = "tests.runtime.test_ema:weights_benchmark"


def probe(policy) -> float:
    """A number that depends on every trained weight: the velocity on fixed inputs (LoRA or merged alike)."""
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = policy.velocity_fn(["red circle", "blue square"])(x.to(policy.device), torch.full((2,), 0.7))
    return float((v.double() ** 2).sum())


def weights_benchmark(req, policy) -> dict:
    """A benchmark that reports the weights it was run with (``probe`` reaches the run's eval rows)."""
    params = {n: p.detach().cpu().numpy().copy() for n, p in policy.named_parameters()}
    return {"accuracy": 0.0, "per_task": {}, "n": 0, "params": params, "probe": probe(policy)}


def failing_benchmark(req, policy) -> dict:
    raise RuntimeError("benchmark failed on purpose")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def hand_ema(ema: dict, theta: dict, n: int, decay: float) -> dict:
    d = min((1 + n) / (10 + n), decay)
    return {k: ema[k] + (1 - d) * (theta[k] - ema[k]) for k in ema}


# ----------------------------------------------------------------------------------------------
# in-process: the schedule, the config, the swap on a rollout worker
# ----------------------------------------------------------------------------------------------
def test_schedule_warmup_and_interval_match_the_hand_numbers():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = PolicyEma([("w", p)], EmaConfig(decay=0.9, every=2))
    expect = np.zeros(3)
    for n in range(1, 6):
        with torch.no_grad():
            p.fill_(float(n))
        moved = ema.update([("w", p)], n)
        assert moved == ((n + 1) % 2 == 0)  # after updates 1, 3, 5 (Flow-GRPO's (step + 1) % interval)
        if moved:
            expect = expect + (1 - min((1 + n) / (10 + n), 0.9)) * (n - expect)
        np.testing.assert_allclose(ema.numpy()["w"], expect, rtol=1e-6)
    flat = PolicyEma([("w", p)], EmaConfig(decay=0.5, warmup=False))
    flat.shadow["w"].zero_()
    flat.update([("w", p)], 1)  # no warm-up: d = 0.5 from the first update
    np.testing.assert_allclose(flat.numpy()["w"], 0.5 * 5.0)


def test_config_ranges_and_zero3_are_refused_with_the_key():
    from rlgen.config import load_config

    for bad in ("train.ema.decay=1.0", "train.ema.decay=-0.1", "train.ema.every=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            load_config("configs/quickstart.yaml", [bad])
    with pytest.raises(ValueError, match="train.ema.decay.*not with learner.zero_stage=3"):
        load_config("configs/quickstart.yaml", ["train.ema.decay=0.9", "learner.zero_stage=3"])
    assert load_config("configs/quickstart.yaml", []).train.ema.decay == 0.0  # off by default


class FakeWorker:
    """What evaluate_with_weights uses of a RolloutWorker: ``policy`` and ``evaluate``."""

    def __init__(self, policy):
        self.policy = policy

    def evaluate(self, benchmark, request):
        from rlgen.evaluate import EvalRequest, run_benchmark

        return run_benchmark(benchmark, EvalRequest(device="cpu", progress=False, **request), self.policy)


def test_evaluation_sees_the_given_weights_and_the_worker_gets_its_own_back():
    torch.manual_seed(0)
    policy = FlowPolicy.build(tiny_flow_config())
    own = {n: p.detach().numpy().copy() for n, p in policy.named_parameters()}
    other = {n: v + 1.0 for n, v in own.items()}
    worker = FakeWorker(policy)
    res = evaluate_with_weights(worker, other, BENCH, {})
    assert max_diff(res["params"], other) == 0
    assert max_diff({n: p.detach().numpy() for n, p in policy.named_parameters()}, own) == 0
    with pytest.raises(RuntimeError, match="on purpose"):
        evaluate_with_weights(worker, other, "tests.runtime.test_ema:failing_benchmark", {})
    assert max_diff({n: p.detach().numpy() for n, p in policy.named_parameters()}, own) == 0


# ----------------------------------------------------------------------------------------------
# a DeepSpeed learner (Ray actor) and a RolloutWorker actor
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    torch.manual_seed(0)
    policy = FlowPolicy.build(tiny_flow_config())
    policy.save_pretrained(root / "flow")
    ray_dir = tempfile.mkdtemp(prefix="rlgen_ema_ray_", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    yield dict(policy=policy, path=str(root / "flow"), batch=make_rollout(policy))
    ray.shutdown()
    shutil.rmtree(ray_dir, ignore_errors=True)


def test_ema_checkpoint_resume_and_rollout_worker_swap(flow, tmp_path):
    from rlgen.runtime.learner import LearnerGroup, LearnerSpec
    from rollouts.worker import RolloutWorker

    spec = LearnerSpec(flow["path"], {}, LoraSpec(), FlowGRPOConfig(kl_beta=0.01), OptimConfig(lr=1e-3),
                       micro_batch_size=2, ema=EmaConfig(decay=0.9))
    group = LearnerGroup(spec, 1, num_cpus=0.5)
    try:
        theta0 = {n: p.detach().numpy().copy() for n, p in flow["policy"].named_parameters()}
        assert max_diff(group.get_ema_weights(), theta0) == 0  # starts as the initial weights
        ema = theta0
        for n in (1, 2):
            group.train(flow["batch"])
            theta = group.get_weights()[1]
            ema = hand_ema(ema, theta, n, 0.9)
        got = group.get_ema_weights()
        assert max_diff(got, ema) <= 1e-6
        assert max_diff(got, theta) > 1e-5  # the EMA is not the raw policy
        theta2, ema2 = theta, got

        group.save(tmp_path / "ckpt")  # the policy folder holds the EMA; deepspeed/ the raw weights
        saved = {n: p.detach().numpy() for n, p in FlowPolicy.from_pretrained(tmp_path / "ckpt").named_parameters()}
        assert max_diff(saved, ema2) == 0
        assert (tmp_path / "ckpt" / "deepspeed" / "ema.safetensors").is_file()
        group.train(flow["batch"])
        theta3, ema3 = group.get_weights()[1], group.get_ema_weights()
        assert max_diff(ema3, hand_ema(ema2, theta3, 3, 0.9)) <= 1e-6
        group.load(tmp_path / "ckpt")
        assert group.version == 2 and max_diff(group.get_weights()[1], theta2) == 0
        assert max_diff(group.get_ema_weights(), ema2) == 0
        group.train(flow["batch"])  # the update after the resume is the uninterrupted one, EMA too
        assert max_diff(group.get_weights()[1], theta3) <= 1e-6 and max_diff(group.get_ema_weights(), ema3) <= 1e-6

        # a rollout worker holding the raw weights evaluates with the EMA, then samples with the raw ones
        from rlgen.families.flow import ImageRolloutConfig

        worker = ray.remote(num_cpus=0.5)(RolloutWorker).remote(flow["path"], {}, ImageRolloutConfig(num_steps=2))
        ray.get(worker.load_weights.remote(3, group.get_weights()[1]))
        res = ray.get(worker.__ray_call__.remote(evaluate_with_weights, ray.put(group.get_ema_weights()), BENCH, {}))
        assert max_diff(res["params"], ema3) <= 1e-6
        after = ray.get(worker.__ray_call__.remote(
            lambda w: {n: p.detach().numpy().copy() for n, p in w.policy.named_parameters()}))
        assert max_diff(after, theta3) <= 1e-6 and ray.get(worker.get_version.remote()) == 3
        ray.kill(worker)
    finally:
        group.shutdown()

