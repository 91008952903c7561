"""Hugging Face diffusion LMs as rlgen policies: LLaDA, Dream and LLaDA2 layouts through real remote code.

Each tiny model folder carries its own modeling file and ``auto_map`` (rlgen/testing/tiny_lms.py), so
transformers' ``trust_remote_code`` path runs exactly as it would for the published checkpoints.
Expected values come from the raw network (``model.net``) called directly, not from the wrapper.
"""
import json
import shutil

import pytest
import torch

import rlgen  # noqa: F401  (first: makes torchvision importable before transformers' model classes)

from rlgen.models import ModelLoadError, load_model
from rlgen.models.masked_lm import MaskedDiffusionLM
from rlgen.testing.tiny_lms import build_tiny_dream, build_tiny_llada, build_tiny_llada2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_lms")
    return {"llada": build_tiny_llada(root / "llada", init_std=0.3),
            "dream": build_tiny_dream(root / "dream", init_std=0.3),
            "llada2": build_tiny_llada2(root / "llada2", block_size=4, init_std=0.3)}


def _ids(shape, seed=0):
    return torch.randint(5, 380, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,files", [("llada", "configuration_llada.py, modeling_llada.py"),
                                        ("dream", "modeling_dream.py, tokenization_dream.py"),
                                        ("llada2", "modeling_llada2_moe.py")])
def test_remote_code_needs_the_callers_flag(folders, kind, files):
    with pytest.raises(ModelLoadError, match="policy.trust_remote_code=true") as e:
        load_model(folders[kind])
    assert files in str(e.value) and "\n" not in str(e.value)


def test_llada_mask_id_only_in_config_and_plain_logits(folders):
    model = load_model(folders["llada"], trust_remote_code=True)
    assert model.tokenizer.mask_token_id is None  # the tokenizer does not know it …
    cfg = json.loads((folders["llada"] / "config.json").read_text())
    assert model.mask_id == cfg["mask_token_id"] == model.tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert model.conventions.attention == "bidirectional" and not model.conventions.shift_logits
    x = _ids((2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), model.net(input_ids=x).logits)
        y = x.clone()
        y[:, 10] = model.mask_id
        assert not torch.allclose(model(x)[:, 0], model(y)[:, 0])  # bidirectional: 0 sees 10


def test_dream_remote_tokenizer_mask_and_shifted_logits(folders):
    model = load_model(folders["dream"], trust_remote_code=True)
    assert type(model.tokenizer).__name__ == "DreamTokenizer"  # the folder's own class ran
    assert model.mask_id == model.tokenizer.convert_tokens_to_ids("<|mask|>") == model.tokenizer.mask_token_id
    assert model.conventions.shift_logits
    x = _ids((2, 12))
    with torch.no_grad():
        raw = model.net(input_ids=x).logits  # raw[:, i] predicts token i + 1
        out = model(x)
    assert torch.equal(out[:, 1:], raw[:, :-1]) and torch.equal(out[:, 0], raw[:, 0])
    unshifted = load_model(folders["dream"], trust_remote_code=True, shift_logits=False)  # explicit option wins
    with torch.no_grad():
        assert torch.equal(unshifted(x), raw)


@pytest.mark.parametrize("kind", ["llada", "dream", "llada2"])
def test_left_padding_leaves_real_positions_unchanged(folders, kind):
    model = load_model(folders[kind], trust_remote_code=True)
    x = _ids((1, 8), seed=1)
    pad = 3 if kind != "llada2" else 4  # llada2: pad whole blocks, so block boundaries stay aligned
    padded = torch.cat([torch.full((1, pad), model.pad_id), x], dim=1)
    am = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, with_pad = model(x), model(padded, attention_mask=am)
    assert not with_pad.isnan().any()
    first = 1 if kind == "dream" else 0  # Dream's position 0 has no prediction of its own (shifted logits)
    assert torch.allclose(with_pad[:, pad + first:], alone[:, first:], atol=1e-4)


def test_llada2_is_block_causal_and_its_cache_exact(folders):
    model = load_model(folders["llada2"], trust_remote_code=True)
    assert model.is_block_causal and model.block_size == 4
    assert model.conventions.attention_mask_format == "additive"
    x = _ids((2, 12), seed=2)
    y = x.clone()
    y[:, 9] = model.mask_id  # block 2 (positions 8..11)
    with torch.no_grad():
        a, b = model(x), model(y)
        assert torch.equal(a[:, :8], b[:, :8])  # blocks 0-1 never see block 2
        assert not torch.allclose(a[:, 8], b[:, 8])  # inside a block: bidirectional
        assert torch.allclose(a, model.net(input_ids=x).logits, atol=1e-5)  # = the network's own 2-D path
        cache = model(x[:, :8], use_cache=True).past_key_values
        cached = model(x[:, 8:], past_key_values=cache)
        assert torch.allclose(cached.logits, a[:, 8:], atol=1e-5)


def test_missing_mask_token_names_the_option(folders, tmp_path):
    folder = tmp_path / "nomask"
    shutil.copytree(folders["llada"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"no mask token: .*set policy.mask_token_id="):
        load_model(folder, trust_remote_code=True)
    assert load_model(folder, trust_remote_code=True, mask_token_id=1).mask_id == 1


def test_hub_id_offline_and_from_the_local_cache(folders, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"Hub id 'acme/llada-tiny' is not in the local cache \(Hugging Face\)"):
        load_model("acme/llada-tiny", trust_remote_code=True)
    repo = tmp_path / "hub" / "models--acme--llada-tiny"  # the cache layout huggingface_hub writes
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folders["llada"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_model("acme/llada-tiny", trust_remote_code=True)
    assert model.source == "acme/llada-tiny" and model.mask_id == 1
    with pytest.raises(ModelLoadError, match="model not found: ./nowhere"):
        load_model("./nowhere")


def test_rlgen_round_trip_keeps_conventions_but_never_the_flag(folders, tmp_path):
    model = load_model(folders["dream"], trust_remote_code=True)
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "rlgen_model.json").read_text())
    assert "trust_remote_code" not in meta and meta["conventions"]["shift_logits"] is True
    assert (tmp_path / "ckpt" / "modeling_dream.py").is_file()  # the checkpoint loads on its own
    with pytest.raises(ModelLoadError, match="policy.trust_remote_code=true"):
        load_model(tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt", trust_remote_code=True)
    x = _ids((2, 10))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_bf16_and_gradient_checkpointing(folders):
    model = load_model(folders["llada2"], trust_remote_code=True, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model(_ids((1, 8))).dtype == torch.bfloat16
    plain = load_model(folders["llada2"], trust_remote_code=True).train()
    ckpt = load_model(folders["llada2"], trust_remote_code=True, gradient_checkpointing=True).train()
    assert ckpt.net.is_gradient_checkpointing and not plain.net.is_gradient_checkpointing
    x = _ids((2, 8), seed=4)
    grads = []
    for m in (plain, ckpt):
        m(x).logsumexp(-1).mean().backward()
        grads.append(m.net.embed_tokens.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_unknown_option_and_bad_values_are_named(folders):
    with pytest.raises(TypeError, match=r"unknown masked-LM option\(s\) \['shift'\]"):
        load_model(folders["llada"], trust_remote_code=True, shift=True)
    with pytest.raises(ValueError, match="policy.lm.attention must be one of"):
        MaskedDiffusionLM.from_hf(folders["llada"], trust_remote_code=True, attention="causal")
