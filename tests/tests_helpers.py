"""Builders shared by tests (imported as a top-level module: pytest puts tests/ on sys.path)."""
from pathlib import Path

import torch


def tiny_flow_policy(path):
    """A randomly initialised, very small shapes FlowPolicy saved at ``path``."""
    from rlgen.data.shapes import TASK_TYPES, all_prompts
    from rlgen.models.flow import FlowModelConfig, FlowPolicy

    words = sorted({w for t in TASK_TYPES for p in all_prompts(t) for w in p.split()})
    torch.manual_seed(0)
    cfg = FlowModelConfig(block_out_channels=[16, 32, 32], norm_num_groups=8, attention_heads=2, text_dim=32,
                          text_ff=64, text_layers=1, vocab=words)
    FlowPolicy.build(cfg).save_pretrained(path)
    return path


def offline_hub_cache(monkeypatch, cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` as the cached snapshot of Hub repo ``repo_id`` in a fresh cache at ``cache``, laid out
    as huggingface_hub writes it (models--owner--name/snapshots/<commit>, refs/main), offline."""
    import shutil

    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    repo, commit = cache / ("models--" + repo_id.replace("/", "--")), "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def visible_weights(model):
    """Redraw every weight from N(0, 0.3²): the 0.02 init makes every context effect tiny, so a test
    of what a cache keeps or drops would pass whatever it kept."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def tiny_bert_mdm(tok, layers: int = 2, seed: int = 0):
    """rlgen's BERT-style masked-diffusion LM, tiny, with visible weights."""
    from rlgen.models.masked_lm import MaskedDiffusionLM

    torch.manual_seed(seed)
    return visible_weights(MaskedDiffusionLM.tiny(tok, hidden_size=32, num_layers=layers, num_heads=2,
                                                  intermediate_size=64, max_length=24).eval())


def bidirectional_llama(layers: int, vocab_size: int):
    """A tiny transformers Llama attending in both directions (eager attention without a mask), the
    layout of a LLaDA-style model with RoPE applied before the cache."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64, is_causal=False)
    cfg._attn_implementation = "eager"  # no mask = full attention, also over the cached keys
    model = transformers.LlamaForCausalLM(cfg).eval()
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model
