"""Loading DeepSpeed checkpoints (placeholder until the no-unpickling loader lands)."""
from __future__ import annotations

from pathlib import Path


def load_deepspeed_checkpoint(ds_engine, load_dir: Path, tag: str) -> dict:
    """Weights, optimizer state and client state of ``load_dir/tag`` into ``ds_engine``."""
    # frozen parameters are not in the checkpoint (saved with exclude_frozen_parameters): not strict
    load_path, client_state = ds_engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {load_dir}")
    return client_state or {}
