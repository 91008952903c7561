"""LoRA for text policies (Hu et al. 2021, arXiv:2106.09685) through transformers' peft integration.

``add_lora(model, LoraOptions(...))`` injects low-rank adapters into the linear layers of a
``MaskedDiffusionLM``'s transformers network (``model.lora_module()``) and freezes everything else.
The adapter-disabled network is the base model, so RL needs no second copy for its reference
policy: ``with adapters_disabled(model): ref_logits = model(x)`` (d1, arXiv:2504.12216, trains
LLaDA-8B-Instruct this way).

A LoRA checkpoint is a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``), the
tokenizer, and ``rlgen_model.json`` whose ``lora_base`` points at the base model (an absolute folder
or a Hub id), so ``rlgen.models.load_model(checkpoint)`` rebuilds the base and re-attaches the adapter
on its own. Rollout workers that only need new adapter weights use ``adapter_state_dict`` /
``load_adapter_state_dict`` (megabytes instead of the full model).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch

from rlgen.models import ModelLoadError
from rlgen.models.hf_lm import LoraOptions, resolve_conventions

# Linear layers to adapt by default, per config.json model_type. Matched only *inside numbered
# layers* (``….<i>.….name``), so an output head that shares a name (LLaDA's top-level ``ff_out``) is
# never adapted.
DEFAULT_TARGETS = {
    "llada": ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"],
    "dream": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llada2_moe": ["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
}


def default_targets(net) -> str:
    """A peft regex (full match) for the architecture's attention and MLP projections."""
    model_type = str(getattr(net.config, "model_type", "")).lower()
    names = DEFAULT_TARGETS.get(model_type)
    if names is None:
        return "all-linear"  # peft: every linear layer except the output head
    return rf".*\.\d+\.(.*\.)?({'|'.join(names)})"


def add_lora(model, options: LoraOptions | None = None):
    """Attach a LoRA adapter named "default" to ``model.lora_module()``; only adapter weights train."""
    from peft import LoraConfig

    opts = options or LoraOptions()
    net = model.lora_module()
    targets = opts.target_modules if opts.target_modules else default_targets(net)
    cfg = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                     bias="none")
    try:
        net.add_adapter(cfg)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ModelLoadError(f"policy.lora.target_modules {targets!r}: {e}") from None
    _freeze_all_but_adapters(net)
    model.lora_base = model.source
    return model


def _freeze_all_but_adapters(net) -> None:
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)


def has_lora(model) -> bool:
    return bool(getattr(model.lora_module(), "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model inside the block (the RL reference policy), the adapted one after it."""
    net = model.lora_module()
    net.disable_adapters()
    try:
        yield model
    finally:
        net.enable_adapters()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's weights only (CPU tensors), in peft's key format."""
    return {k: v.detach().cpu() for k, v in model.lora_module().get_adapter_state_dict().items()}


def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter's weights (e.g. a rollout worker receiving the learner's update)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model.lora_module(), state, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapter weights do not match the policy's adapter: unexpected "
                         f"{result.unexpected_keys[:3]}, missing {missing[:3]}")


def save_lora(model, path: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (transformers saves only the adapter)."""
    from rlgen.models import quiet_hf_progress

    if model.lora_base is None:  # e.g. LoRA on a freshly built model: nothing on disk to point at
        raise ValueError("save_lora: the LoRA policy's base model was never saved (no folder or Hub id to "
                         "point at); save the base first and load it with policy.lora")
    with quiet_hf_progress():
        model.lora_module().save_pretrained(str(path))
    if not (path / "adapter_config.json").is_file():
        raise RuntimeError(f"{path}: transformers did not write adapter_config.json")


def load_lora_checkpoint(cls, path: Path, meta: dict, device, opts):
    """Rebuild the base from ``meta["lora_base"]`` (with the caller's trust_remote_code) + the adapter."""
    base = meta["lora_base"]
    base_opts = replace(opts, lora=None, mask_token_id=opts.mask_token_id if opts.mask_token_id is not None
                        else meta["mask_id"])
    try:
        model = cls.load(base, device=device, options=base_opts)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: LoRA checkpoint on base {base!r}: {e}") from None
    model.conventions = resolve_conventions(model.net.config, base_opts, meta.get("conventions"))
    from rlgen.models import quiet_hf_progress

    with quiet_hf_progress():
        model.lora_module().load_adapter(str(path), adapter_name="default", is_trainable=True)
    _freeze_all_but_adapters(model.lora_module())
    model.lora_base = base
    model.pad_id, model.eos_id = meta.get("pad_id", model.pad_id), meta.get("eos_id", model.eos_id)
    return model.to(device).eval()
