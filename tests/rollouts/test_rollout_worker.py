"""RolloutWorker in-process (the Ray actor is the same class): weight sync, full and LoRA."""
import numpy as np
import pytest
import torch

from rlgen.families import LoraSpec, get_family
from rlgen.families.flow import ImageRolloutConfig
from rlgen.models.flow import FlowPolicy
from rlgen.runtime.engine import trainable_parameters
from rollouts.worker import RolloutWorker
from tests.tests_helpers import tiny_flow_policy

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_flow_policy(tmp_path_factory.mktemp("policy") / "p")


def velocity(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(PROMPTS), *policy.sample_shape), generator=g)
    with torch.no_grad():
        return policy.velocity_fn(PROMPTS)(x, torch.full((len(PROMPTS),), 0.6))


def test_lora_adapter_weights_sync_onto_the_workers_base(policy_dir, one_thread):
    learner = FlowPolicy.from_pretrained(policy_dir)
    get_family("flow").add_lora(learner, LoraSpec(rank=2))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for _, p in trainable_parameters(learner):
            p.add_(0.05 * torch.randn_like(p))
    adapter = {n: p.detach().numpy().copy() for n, p in trainable_parameters(learner)}
    assert adapter and all("lora_" in n for n in adapter)

    worker = RolloutWorker(str(policy_dir), {}, ImageRolloutConfig(), LoraSpec(rank=2), num_threads=1, device="cpu")
    base_v = velocity(worker.policy)
    assert worker.load_weights(3, adapter) == 3
    v = velocity(worker.policy)
    torch.testing.assert_close(v, velocity(learner), rtol=0, atol=1e-5)
    assert (v - base_v).abs().max() > 1e-3  # the adapter changed what the worker samples


def test_full_weights_must_cover_every_parameter(policy_dir, one_thread):
    worker = RolloutWorker(str(policy_dir), {}, ImageRolloutConfig(), num_threads=1, device="cpu")
    state = {n: p.detach().numpy().copy() for n, p in worker.policy.named_parameters()}
    name = next(iter(state))
    partial = {k: v for k, v in state.items() if k != name}
    with pytest.raises(KeyError, match="missing"):
        worker.load_weights(1, partial)
    state[name] = np.zeros_like(state[name])
    worker.load_weights(2, state)
    assert dict(worker.policy.named_parameters())[name].abs().sum() == 0 and worker.get_version() == 2
