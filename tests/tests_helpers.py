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
