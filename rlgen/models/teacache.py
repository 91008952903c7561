"""Model side of TeaCache (rlgen/samplers/teacache.py): where a flow policy's timestep-modulated input is read.

TeaCache (Liu et al. 2024, arXiv:2411.19108) compares the *timestep-modulated input* of consecutive steps:

- diffusers transformers (SD3 ``SD3Transformer2DModel``, FLUX ``FluxTransformer2DModel``; a
  ``DiffusersFlowPolicy`` or a ``FlowPolicy`` with the sd3 backbone): the output of the first transformer
  block's ``norm1`` (AdaLayerNormZero: ``LayerNorm(h)·(1 + scale(t)) + shift(t)``), its first return value;
  a FLUX without dual-stream blocks uses its first single block's ``norm``.
- rlgen's UNet (``UNet2DConditionModel``): the first ResNet block's hidden state right after the time
  (+ pooled prompt) embedding is added, i.e. the input of its ``norm2``.

A forward hook on that module reports the tensor to TeaCache's decision; when the answer is "skip" the
hook raises, which aborts the rest of the forward (so a skipped step costs only the model's stem). The
hook lives only for the duration of one call: the model is left unchanged between calls, and nothing
of diffusers is forked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from rlgen.config import FieldError, check_range
from rlgen.samplers.teacache import IDENTITY, TeaCache


@dataclass
class TeaCacheConfig:
    """``rollout.teacache`` / the evaluation's TeaCache options. ``threshold`` 0 turns TeaCache off.

    ``coefficients`` (highest degree first) map the modulated input's relative L1 change to the predicted
    change of the model output; ``calibration`` names the JSON file ``python -m rlgen.teacache calibrate``
    wrote instead. Neither: the raw change (poly(x) = x).
    """

    threshold: float = 0.0
    coefficients: list[float] = field(default_factory=list)
    calibration: str = ""

    def __post_init__(self):
        check_range(self, "threshold", lo=0)
        if self.coefficients and self.calibration:
            raise FieldError("coefficients", "give coefficients or calibration (a file), not both")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def resolved_coefficients(self) -> list[float]:
        if self.calibration:
            from rlgen.teacache import read_calibration

            return read_calibration(self.calibration)
        return list(self.coefficients) or list(IDENTITY)


class _SkipForward(Exception):
    """Raised inside the hook to abort a forward whose output TeaCache will not use."""


def probed_module(policy: nn.Module) -> tuple[nn.Module, bool]:
    """(module, read_input): the module to hook and whether its *input* (pre-hook) or output is read."""
    net = getattr(policy, "transformer", None)
    if net is None:
        backbone = getattr(policy, "backbone", None)
        net = getattr(backbone, "transformer", None) or getattr(backbone, "unet", None)
    if net is None:
        raise TypeError(f"TeaCache: {type(policy).__name__} has no diffusers transformer or UNet to probe")
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "norm1"):
        return blocks[0].norm1, False  # SD3 / FLUX dual-stream block: AdaLayerNormZero(h, temb)
    singles = getattr(net, "single_transformer_blocks", None)
    if singles is not None and len(singles) and hasattr(singles[0], "norm"):
        return singles[0].norm, False  # FLUX with single-stream blocks only
    down = getattr(net, "down_blocks", None)
    if down is not None and len(down) and getattr(down[0], "resnets", None):
        resnet = down[0].resnets[0]
        if getattr(resnet, "time_embedding_norm", "default") != "default":
            raise TypeError("TeaCache: the UNet's first ResNet uses time_embedding_norm="
                            f"'{resnet.time_embedding_norm}'; only 'default' (h + temb before norm2) is supported")
        return resnet.norm2, True  # its input: conv1(h) + time_emb_proj(temb)
    raise TypeError(f"TeaCache: cannot find the first block of {type(net).__name__} (no transformer_blocks, "
                    "single_transformer_blocks or down_blocks)")


def probe_for(policy: nn.Module) -> Callable:
    """A TeaCache probe for ``policy``: ``probe(velocity_fn, x, sigma, decide) -> v | None``."""
    module, read_input = probed_module(policy)

    def probe(velocity_fn, x: torch.Tensor, sigma: torch.Tensor, decide) -> torch.Tensor | None:
        def report(value) -> None:
            if not decide(value[0] if isinstance(value, tuple) else value):
                raise _SkipForward

        if read_input:
            handle = module.register_forward_pre_hook(lambda m, args: report(args))
        else:
            handle = module.register_forward_hook(lambda m, args, out: report(out))
        try:
            return velocity_fn(x, sigma)
        except _SkipForward:
            return None
        finally:
            handle.remove()

    return probe


def teacache_for(policy: nn.Module, cfg: TeaCacheConfig | TeaCache | None) -> TeaCache | None:
    """The cache ``sample(..., teacache=…)`` takes, or None when ``cfg`` is off (threshold 0). A ``TeaCache``
    passes through (a caller that wants its skip counters builds it and keeps it)."""
    if isinstance(cfg, TeaCache):
        return cfg
    if cfg is None or not cfg.enabled:
        return None
    return TeaCache(probe_for(policy), cfg.threshold, cfg.resolved_coefficients())


def record_steps(policy: nn.Module, velocity_fn: Callable) -> tuple[Callable, list]:
    """Wrap ``velocity_fn`` to record (indicator, velocity) at every call, never skipping (calibration)."""
    probe = probe_for(policy)
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen = []
        v = probe(velocity_fn, x, sigma, lambda ind: seen.append(ind.detach().float().clone()) or True)
        records.append((seen[0], v.detach().float().clone()))
        return v

    return fn, records
