"""LoRA on text policies (rlgen/models/lora.py): starts at the base, trains only the adapter, the
adapter-disabled model is the base, and a saved adapter checkpoint reloads on its own."""
import json

import pytest
import torch

import rlgen  # noqa: F401  (first: makes torchvision importable before transformers' model classes)

from rlgen.models import ModelLoadError, load_model
from rlgen.models.hf_lm import LoraOptions
from rlgen.models.lora import (adapter_state_dict, adapters_disabled, add_lora, has_lora,
                               load_adapter_state_dict)
from rlgen.testing.tiny_lms import build_tiny_llada, build_tiny_llada2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"llada": build_tiny_llada(root / "llada", init_std=0.3),
            "llada2": build_tiny_llada2(root / "llada2", block_size=4, init_std=0.3)}


def _ids(shape, seed=0):
    return torch.randint(5, 380, shape, generator=torch.Generator().manual_seed(seed))


def _train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = -torch.log_softmax(model(x), -1)[..., 7].mean()  # push every position towards token 7
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("kind", ["llada", "llada2"])
def test_lora_starts_at_base_and_trains_only_the_adapter(folders, kind):
    base = load_model(folders[kind], trust_remote_code=True)
    model = load_model(folders[kind], trust_remote_code=True, lora={"r": 4, "alpha": 8})
    assert has_lora(model) and not has_lora(base)
    x = _ids((2, 8))
    with torch.no_grad():
        ref = base(x)
        assert torch.equal(model(x), ref)  # lora_B starts at zero
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    _train_step(model.train(), x)
    model.eval()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)
        with adapters_disabled(model):  # the reference policy is the base, without a second copy
            assert torch.allclose(model(x), ref, atol=1e-6)
        assert not torch.allclose(model(x), ref)  # re-enabled after the block


def test_default_targets_follow_the_architecture(folders):
    llada = load_model(folders["llada"], trust_remote_code=True, lora=LoraOptions(r=2))
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in llada.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}
    assert not any("lm_head" in n and "lora" in n for n, _ in llada.named_parameters())
    llada2 = load_model(folders["llada2"], trust_remote_code=True, lora=LoraOptions(r=2))
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in llada2.named_parameters() if "lora_A" in n}
    assert adapted == {"query_key_value", "dense", "gate_proj", "up_proj", "down_proj"}
    only_q = load_model(folders["llada"], trust_remote_code=True, lora=LoraOptions(r=2, target_modules=["q_proj"]))
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in only_q.named_parameters() if "lora_A" in n} == {"q_proj"}
    with pytest.raises(ModelLoadError, match="policy.lora.target_modules"):
        load_model(folders["llada"], trust_remote_code=True, lora=LoraOptions(target_modules=["nope"]))


def test_save_load_adapter_checkpoint_same_logits(folders, tmp_path):
    model = load_model(folders["llada2"], trust_remote_code=True, lora=LoraOptions(r=4))
    x = _ids((2, 8), seed=1)
    _train_step(model.train(), x)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "rlgen_model.json"} <= files
    assert "model.safetensors" not in files  # adapter only
    meta = json.loads((tmp_path / "ckpt" / "rlgen_model.json").read_text())
    assert meta["lora_base"] == str(folders["llada2"].resolve())
    again = load_model(tmp_path / "ckpt", trust_remote_code=True)
    assert has_lora(again) and again.is_block_causal
    assert all(("lora_" in n) == p.requires_grad for n, p in again.named_parameters())
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)
        with adapters_disabled(again):
            assert torch.allclose(again(x), load_model(folders["llada2"], trust_remote_code=True)(x), atol=1e-6)


def test_adapter_weights_sync_to_another_copy(folders):
    learner = load_model(folders["llada"], trust_remote_code=True, lora=LoraOptions(r=4))
    worker = load_model(folders["llada"], trust_remote_code=True, lora=LoraOptions(r=4))
    x = _ids((2, 8), seed=2)
    _train_step(learner.train(), x)
    learner.eval()
    state = adapter_state_dict(learner)
    assert state and all("lora_" in k for k in state)
    load_adapter_state_dict(worker, state)
    with torch.no_grad():
        assert torch.allclose(worker(x), learner(x), atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        load_adapter_state_dict(worker, {"layers.0.attn.nope.lora_A.weight": torch.zeros(1)})


def test_add_lora_directly_on_rlgen_tiny_bert(tmp_path):
    from rlgen.data.tokenizer import build_tokenizer
    from rlgen.models.masked_lm import MaskedDiffusionLM

    model = MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=2, num_heads=2,
                                   intermediate_size=64, max_length=16)
    add_lora(model, LoraOptions(r=2))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert any("attention.self.query" in n for n in names)
    with pytest.raises(ValueError, match="base model was never saved"):
        model.save_pretrained(tmp_path)


def test_lora_with_gradient_checkpointing_and_bf16_trains_the_adapter(folders):
    model = load_model(folders["llada2"], trust_remote_code=True, dtype="bfloat16", gradient_checkpointing=True,
                       lora=LoraOptions(r=2)).train()
    assert model.dtype == torch.bfloat16 and model.net.is_gradient_checkpointing
    model(_ids((2, 8), seed=3)).float().logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for n, g in grads.items() if "lora_A" in n or "lora_B" in n)
