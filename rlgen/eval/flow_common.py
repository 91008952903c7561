"""Sampling settings and batched generation shared by the image benchmarks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rlgen.utils import resolve_device

_KNOWN = {"steps", "cfg", "noise_level", "shift", "grid_size"}


@dataclass
class FlowSampling:
    steps: int = 20
    cfg: float = 1.0
    noise_level: float = 0.0   # 0 = Euler ODE (deterministic given the start noise)
    shift: float = 1.0


def flow_sampling_from(options: dict, defaults: FlowSampling | None = None) -> FlowSampling:
    unknown = set(options) - _KNOWN
    if unknown:
        raise ValueError(f"unknown image-benchmark option(s) {sorted(unknown)}; valid: {sorted(_KNOWN)}")
    s = defaults or FlowSampling()
    return FlowSampling(steps=int(options.get("steps", s.steps)), cfg=float(options.get("cfg", s.cfg)),
                        noise_level=float(options.get("noise_level", s.noise_level)),
                        shift=float(options.get("shift", s.shift)))


def load_flow_policy(checkpoint, device: str):
    from rlgen.models import load_model
    from rlgen.models.flow import FlowPolicy

    model = load_model(checkpoint, device=str(resolve_device(device)))
    if not isinstance(model, FlowPolicy):
        raise ValueError(f"{checkpoint}: holds a {type(model).__name__}, not a flow image model")
    return model.eval()


@torch.no_grad()
def generate_images(policy, prompts: list[str], sampling: FlowSampling, seed: int, batch_size: int,
                    progress: bool) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] on CPU; seeded so the same request gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    return policy.generate(prompts, num_steps=sampling.steps, cfg_scale=sampling.cfg,
                           noise_level=sampling.noise_level, shift=sampling.shift, generator=gen,
                           batch_size=batch_size, progress=progress).cpu()


def settings_dict(sampling: FlowSampling, samples_per_prompt: int) -> dict:
    return {**asdict(sampling), "samples_per_prompt": samples_per_prompt}
