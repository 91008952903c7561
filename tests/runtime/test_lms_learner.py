"""A Hugging Face diffusion LM (LLaDA layout, remote code) with LoRA on two ZeRO-3 learner ranks takes
the text GRPO step one process takes with plain torch AdamW; only adapter weights leave the learner and
they load, by name, into a rollout worker's copy (``load_numpy_weights(strict=False)``)."""
import copy
import shutil
import tempfile

import numpy as np
import pytest
import torch

from rlgen.algos.mdm_grpo import MDMGRPO, MDMGRPOConfig
from rlgen.families import LoraSpec, family_of
from rlgen.models import load_model
from rlgen.runtime.engine import OptimConfig, TorchEngine, load_numpy_weights, trainable_parameters
from tests.algos.engines import context
from tests.runtime.tiny import text_rollout_batch

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIM = OptimConfig(lr=1e-3, grad_clip=0.5)  # Adam moves each weight by ~lr on step 1
ALGO = MDMGRPOConfig(kl_beta=0.04, inner_iterations=2)
LORA = LoraSpec(rank=4)
ITEMS = [{"prompt": "What is 1 + 2?", "gen_length": 6, "answer": "3"},
         {"prompt": "Add 30 and 12, please.", "gen_length": 6, "answer": "42"}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from rlgen.testing.tiny_lms import build_tiny_llada

    path = build_tiny_llada(tmp_path_factory.mktemp("zero3") / "llada", init_std=0.5)
    torch.manual_seed(0)  # what a learner rank does before loading (LoRA's A is random)
    policy = load_model(path, trust_remote_code=True)
    family_of(policy).add_lora(policy, LORA)
    batch = text_rollout_batch(policy, ITEMS, group_size=3)
    return path, policy, batch


def lora_state(policy) -> dict:
    return {n: p.detach().numpy().copy() for n, p in trainable_parameters(policy)}


def test_adapter_weights_alone_reach_a_rollout_copy(lm):
    path, policy, batch = lm
    trained = copy.deepcopy(policy)
    MDMGRPO(ALGO).update(context(trained, TorchEngine(trained, OPTIM), lora=True), batch)
    sent = lora_state(trained)  # what Learner.get_weights sends under LoRA
    assert sent and all("lora_" in n for n in sent)
    worker = load_model(path, trust_remote_code=True)  # a rollout worker: base + the same (untrained) adapter
    family_of(worker).add_lora(worker, LORA)
    with pytest.raises(KeyError, match="missing"):
        load_numpy_weights(worker, sent)  # strict: the frozen base is not sent
    load_numpy_weights(worker, sent, strict=False)
    x = batch.buckets[0].tokens
    with torch.no_grad():
        assert torch.equal(worker(x), trained(x)) and not torch.equal(worker(x), policy(x))


@pytest.mark.slow
def test_two_zero3_ranks_take_the_single_process_lora_step(lm):
    import ray

    from rlgen.runtime.learner import LearnerGroup, LearnerSpec

    path, policy, batch = lm
    trained = copy.deepcopy(policy)
    MDMGRPO(ALGO).update(context(trained, TorchEngine(trained, OPTIM), lora=True), batch)
    ray_dir = tempfile.mkdtemp(prefix="rlgen_lms_ray_", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    try:
        spec = LearnerSpec(str(path), {"trust_remote_code": True}, LORA, ALGO, OPTIM, zero_stage=3,
                           zero3_persistence_threshold=0, micro_batch_size=2)
        group = LearnerGroup(spec, 2, num_cpus=0.5)
        total = sum(p.numel() for p in policy.parameters())
        assert all(n < 0.6 * total for n in group.local_param_numel())  # each rank holds about half
        _, before = group.get_weights()
        assert max(float(np.abs(before[k] - v).max()) for k, v in lora_state(policy).items()) == 0
        group.train(batch)
        _, after = group.get_weights()
        group.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    want = lora_state(trained)
    assert after.keys() == want.keys()
    assert max(float(np.abs(after[k] - want[k]).max()) for k in want) <= 1e-5
    assert max(float(np.abs(after[k] - before[k]).max()) for k in want) > 1e-4  # it did train
