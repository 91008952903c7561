"""LoRA and checkpoints of post-trained diffusers pipelines (``DiffusersFlowPolicy``).

A checkpoint folder never copies the frozen base (a T5-XXL alone is ~10 GB); it points at it:

    rlgen_model.json                    {"model_type": "diffusers_flow", "base": "<folder or Hub id>",
                                         "pipeline_class": …, "weights": "lora" | "full",
                                         "lora": {"rank", "alpha", "target_modules"}, "options": {…}}
    pytorch_lora_weights.safetensors    weights "lora": diffusers' LoRA format ("transformer.<module>.lora_A/B
                                         .weight" + the peft config as metadata), so plain diffusers applies it:
                                         pipe = StableDiffusion3Pipeline.from_pretrained(base)
                                         pipe.load_lora_weights(checkpoint_dir)
    transformer/                        weights "full": a diffusers model folder (full fine-tuning); plain
                                         diffusers: pipe.transformer = SD3Transformer2DModel.from_pretrained(…)

``rlgen.models.load_model(checkpoint_dir)`` rebuilds the policy on its own: base, then the adapter
(trainable again, for resuming) or the transformer.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from rlgen.models import ModelLoadError, quiet_hf_progress, read_model_meta

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name


def lora_config(rank: int, alpha: float, target_modules: Sequence[str], init: str | bool = "gaussian"):
    """A peft ``LoraConfig`` for the transformer (Flow-GRPO: r 32, α 64, gaussian init)."""
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=init)


def lora_state_dict(policy, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's naming ("<module>.lora_A.weight"), e.g. for learner → rollout sync."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(policy.transformer, adapter_name=adapter_name)


def load_lora_state_dict(policy, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy adapter tensors (peft naming, as :func:`lora_state_dict` gives) into the attached adapter."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(policy.transformer, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ModelLoadError(f"LoRA state has keys the adapter lacks, e.g. {unexpected[0]}")


def save_lora(policy, path: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter in diffusers' LoRA format (``pipe.load_lora_weights(path)`` reads it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(policy, adapter_name).items()}
    meta = policy.transformer.peft_config[adapter_name].to_dict()
    type(policy.pipeline).save_lora_weights(str(path), transformer_lora_layers=state,
                                            transformer_lora_adapter_metadata=meta, weight_name=LORA_FILE)
    return path / LORA_FILE


def save_checkpoint(policy, path: Path, weights: str = "auto") -> Path:
    """A checkpoint folder (see the module doc). ``weights``: auto (LoRA when attached, else the full
    transformer), lora, or full."""
    from rlgen.models.diffusers_flow import write_meta

    if weights == "auto":
        weights = "lora" if policy.has_lora else "full"
    if weights not in ("lora", "full"):
        raise ValueError(f"weights must be auto, lora or full, got {weights!r}")
    path.mkdir(parents=True, exist_ok=True)
    meta = {"model_type": "diffusers_flow", "base": policy.base, "pipeline_class": policy.adapter.pipeline_class,
            "weights": weights, "options": policy.options}
    if weights == "lora":
        if not policy.has_lora:
            raise ValueError("save_checkpoint(weights='lora'): the policy has no LoRA adapter")
        cfg = policy.transformer.peft_config["default"]
        meta["lora"] = {"rank": cfg.r, "alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
        save_lora(policy, path)
    else:
        with quiet_hf_progress():
            policy.transformer.save_pretrained(str(path / "transformer"), safe_serialization=True)
    write_meta(path, meta)
    return path


def load_checkpoint(cls, path: Path, device="cpu", dtype: torch.dtype | None = None, **options):
    """Rebuild a policy from an rlgen checkpoint: load its base, then its LoRA adapter or transformer."""
    from rlgen.models import load_model

    meta = read_model_meta(path)
    if "base" not in meta:
        raise ModelLoadError(f"{path}/rlgen_model.json: missing 'base' (the pipeline folder or Hub id)")
    opts = {**meta.get("options", {}), **options}
    policy = load_model(meta["base"], device="cpu", dtype=dtype, **opts)
    policy.base = meta["base"]
    weights = meta.get("weights", "lora")
    if weights == "full":
        sub = path / "transformer"
        if not sub.is_dir():
            raise ModelLoadError(f"{path}: weights 'full' but no transformer/ folder")
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        with quiet_hf_progress(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype → dtype in diffusers 0.42
            transformer = type(policy.transformer).from_pretrained(str(sub), **kw)
        policy.transformer = policy.pipeline.transformer = transformer
    elif weights == "lora":
        _load_lora_file(policy, path, meta)
    else:
        raise ModelLoadError(f"{path}/rlgen_model.json: weights {weights!r} is not 'lora' or 'full'")
    return policy.to(device).eval()


def _load_lora_file(policy, path: Path, meta: dict) -> None:
    from safetensors.torch import load_file

    file = path / LORA_FILE
    if not file.is_file():
        raise ModelLoadError(f"{path}: weights 'lora' but no {LORA_FILE}")
    lora = meta.get("lora", {})
    policy.add_lora(lora.get("rank", 32), lora.get("alpha", 64), lora.get("target_modules"))
    state = load_file(str(file))
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise ModelLoadError(f"{file}: no 'transformer.' LoRA tensors")
    load_lora_state_dict(policy, state)
