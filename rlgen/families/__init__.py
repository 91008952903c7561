"""Model families: what rollout workers, learners, evaluation and pair building call on a policy.

The runtime never imports a concrete model class. A family is one module here, registered with
``@register_family(name)``; every policy object carries ``family = "<name>"`` and satisfies the
family's duck-typed surface (docs/architecture.md lists it). Families today:

- ``flow`` (rlgen/families/flow.py): text-conditioned flow-matching generators — rlgen's pixel
  ``FlowPolicy`` and diffusers pipelines (SD3/SD3.5, FLUX.1) in latent space;
- ``masked_lm`` (rlgen/families/masked_lm.py): masked-diffusion LMs — rlgen's tiny LMs and
  Hugging Face diffusion LMs (LLaDA, Dream, LLaDA2-style block diffusion).

A new family is one module plus its registration; a new pipeline or architecture inside a family
is an adapter of that family's policy class (see rlgen/models/).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rlgen.registry import Registry

FAMILIES = Registry("family", ("rlgen.families.flow", "rlgen.families.masked_lm"))


def register_family(name: str):
    def deco(cls):
        cls.name = name
        FAMILIES.register(name, cls())
        return cls
    return deco


def get_family(name: str) -> "Family":
    return FAMILIES.get(name)


def family_of(policy) -> "Family":
    name = getattr(policy, "family", None)
    if name is None:
        raise TypeError(f"{type(policy).__name__} declares no model family (a class attribute `family`)")
    return get_family(name)


@dataclass
class LoraSpec:
    """LoRA on the policy's trainable network (peft). rank 0 = full fine-tuning."""

    rank: int = 0
    alpha: float = 0.0                 # 0 = rank (scale 1)
    targets: list[str] = field(default_factory=list)  # [] = the policy's default targets
    dropout: float = 0.0

    def __post_init__(self):
        from rlgen.config import check_range

        check_range(self, "rank", lo=0)
        check_range(self, "alpha", lo=0)
        check_range(self, "dropout", lo=0, hi=1, hi_open=True)

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class Family:
    """What every family provides. Methods take the policy as their first argument."""

    name: str = ""
    modality: str = ""              # "image" | "text"
    rollout_config: type = object   # the sampler-settings dataclass of `rollout:` for this family

    # -- LoRA and the reference ----------------------------------------------------------------
    def add_lora(self, policy, lora: LoraSpec) -> None:
        """Freeze the policy and add a trainable adapter ("default") to ``policy.lora_module()``.

        peft initialises B = 0, so the adapted policy starts equal to the base. Rollout workers
        add the same adapter, so the learner's adapter weights load by name.
        """
        from peft import LoraConfig

        targets = list(lora.targets or getattr(policy, "default_lora_targets", []))
        if not targets:
            raise ValueError(f"{type(policy).__name__}: policy.lora.targets is empty and the model names no default "
                             f"LoRA targets")
        policy.requires_grad_(False)
        cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=targets,
                         lora_dropout=lora.dropout, init_lora_weights=True)
        policy.lora_module().add_adapter(cfg)
        for name, p in policy.named_parameters():
            p.requires_grad_("lora_" in name)

    @contextlib.contextmanager
    def adapters_disabled(self, policy):
        """The base model (the reference under LoRA) for the duration of the block."""
        module = policy.lora_module()
        module.disable_adapters()
        try:
            yield policy
        finally:
            module.enable_adapters()  # peft's set_adapter also restores requires_grad on the adapter

    def merged_copy(self, policy) -> nn.Module:
        """A plain policy with the adapter folded into the base weights (for a loadable folder)."""
        out = copy.deepcopy(policy)
        module = out.lora_module()
        if hasattr(module, "fuse_lora"):  # diffusers models
            module.fuse_lora()
            module.unload_lora()
        else:  # transformers models: peft's merge through the integration's adapter layers
            from peft.tuners.tuners_utils import BaseTunerLayer

            for m in module.modules():
                if isinstance(m, BaseTunerLayer):
                    m.merge()
            _unwrap_lora_layers(module)
        return out

    def save(self, policy, path: Path, lora: LoraSpec) -> None:
        """A folder ``rlgen.models.load_model`` loads on its own: the policy's own adapter format
        (adapter + a pointer to its base) where it has one, else the adapter merged in."""
        if lora.enabled and not self.saves_adapter(policy):
            policy = self.merged_copy(policy)
        policy.save_pretrained(path)

    def saves_adapter(self, policy) -> bool:
        """Whether ``policy.save_pretrained`` writes an adapter that loads onto its base by itself."""
        return False

    # -- training --------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, policy) -> None:
        """Recompute activations in backward (diffusers and transformers models both offer it)."""
        module = policy.lora_module()
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers
            module.gradient_checkpointing_enable()
        else:
            raise ValueError(f"{type(module).__name__} offers no gradient checkpointing")

    def train_module(self, policy) -> nn.Module:
        """What the DeepSpeed engine wraps: its forward is the call algorithms train through."""
        return policy

    # -- rollouts ----------------------------------------------------------------------------------
    def rollout(self, policy, items: list[dict], group_ids, cfg, generator, version: int = 0, step: int = 0):
        """One rollout per item; ``step`` is the training step it is for (a schedule may depend on it)."""
        raise NotImplementedError


def _unwrap_lora_layers(module: nn.Module) -> None:
    """Replace merged peft LoRA layers by their base layers (transformers' add_adapter leaves them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _unwrap_lora_layers(child)


def load_policy(path: str | Path, *, device: str = "cpu", **options: Any):
    """Any family's policy from a folder (see rlgen.models.load_model)."""
    from rlgen.models import load_model

    return load_model(path, device=device, **options)
