"""VRPO on a Hugging Face block-causal LM with LoRA: the reference ELBOs are the base model's (adapter
off, scored on its own, not around the policy's forward), and the ELBO draws are block diffusion's (one
block per sample, blocks aligned to position 0 of prompt + answer)."""
import pytest
import torch

import rlgen  # noqa: F401

from rlgen.algos.vrpo import VRPO, VRPOConfig, pair_elbos, pair_plans
from rlgen.batches import TextPairBucket, TextPairs
from rlgen.families import LoraSpec, family_of
from rlgen.models import load_model
from rlgen.runtime.engine import OptimConfig, TorchEngine
from rlgen.testing.tiny_lms import build_tiny_llada2
from tests.algos.engines import context

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = VRPOConfig(beta=0.5, n_samples=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_llada2(tmp_path_factory.mktemp("vrpo") / "m", block_size=4, init_std=0.5)
    tok = load_model(path, trust_remote_code=True).tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, good, bad = enc("What is 1 + 2?"), enc("The answer is 3."), enc("The answer is 4.")
    assert len(good) == len(bad)
    batch = TextPairs([TextPairBucket(torch.tensor([prompt] * 3), torch.tensor([good] * 3), torch.tensor([bad] * 3),
                                      torch.arange(3))], global_size=3, seed=7)
    return path, batch


def test_block_causal_pairs_draw_one_block_per_sample(setup):
    _, batch = setup
    b = batch.buckets[0]
    P, L = b.prompt_ids.shape[1], b.chosen_ids.shape[1]
    plan, ref_plan = pair_plans(b.rows, batch.seed, L, CFG, None, P, block_size=4)
    assert plan.masks.shape == (4, 6, L) and torch.equal(plan.masks, ref_plan.masks)  # antithetic
    blocks = (P + torch.arange(L)) // 4  # absolute blocks of the answer positions
    for j in range(4):
        for row in range(6):
            hit = blocks[plan.masks[j, row]]
            assert hit.numel() >= 1 and (hit == hit[0]).all()  # masked tokens lie in one block
    assert len({int(blocks[plan.masks[j, r]][0]) for j in range(4) for r in range(6)}) > 1  # every block drawn


def test_lora_reference_is_the_base_scored_on_the_same_draws(setup):
    path, batch = setup
    torch.manual_seed(0)
    policy = load_model(path, trust_remote_code=True)
    base = load_model(path, trust_remote_code=True)
    family_of(policy).add_lora(policy, LoraSpec(rank=4))
    algo = VRPO(CFG)
    ctx = context(policy, TorchEngine(policy, OptimConfig(lr=1e-2)), lora=True)
    first = algo.update(ctx, batch)
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # B = 0: policy = base
    second = algo.update(ctx, batch)  # the adapter moved: policy and reference now differ
    b = batch.buckets[0]
    P, L = b.prompt_ids.shape[1], b.chosen_ids.shape[1]
    plans = pair_plans(b.rows, batch.seed, L, CFG, None, P, block_size=4)
    with torch.no_grad():
        r_w, _ = pair_elbos(base, b.prompt_ids, b.chosen_ids, b.rejected_ids, plans[1], base.mask_id)
    ref_w = second["elbo_w"] - second["chosen_reward"] / CFG.beta  # what the update used as B_ref(y_w)
    assert second["chosen_reward"] != 0 and ref_w == pytest.approx(r_w.mean().item(), abs=1e-4)
