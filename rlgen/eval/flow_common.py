"""Sampling settings and batched generation shared by the image benchmarks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


SAMPLING_OPTIONS = {"steps", "cfg", "noise_level", "shift", "teacache", "teacache_calibration"}


@dataclass
class FlowSampling:
    steps: int = 20
    cfg: float = 1.0
    noise_level: float = 0.0   # 0 = Euler ODE (deterministic given the start noise)
    shift: float | None = None  # σ-grid shift; None = the model's own (1.0 for rlgen's pixel models)
    teacache: float = 0.0       # TeaCache threshold on the ODE steps (0 = off; docs/teacache.md)
    teacache_calibration: str = ""  # its polynomial: a `python -m rlgen.teacache calibrate` file ("" = raw change)


def flow_sampling_from(options: dict, defaults: FlowSampling | None = None) -> FlowSampling:
    unknown = set(options) - SAMPLING_OPTIONS
    if unknown:
        raise ValueError(f"unknown image-benchmark option(s) {sorted(unknown)}; valid: {sorted(SAMPLING_OPTIONS)}")
    s = defaults or FlowSampling()
    return FlowSampling(steps=int(options.get("steps", s.steps)), cfg=float(options.get("cfg", s.cfg)),
                        noise_level=float(options.get("noise_level", s.noise_level)),
                        shift=float(options["shift"]) if "shift" in options else s.shift,
                        teacache=float(options.get("teacache", s.teacache)),
                        teacache_calibration=str(options.get("teacache_calibration", s.teacache_calibration)))


def check_flow_policy(policy, benchmark: str) -> None:
    if getattr(policy, "family", None) != "flow":
        raise ValueError(f"the {benchmark} benchmark scores flow image models; this checkpoint holds a "
                         f"{type(policy).__name__}")


def attach_grid(req, result: dict, images: torch.Tensor, captions: list[str], idx: list[int], nrow: int,
                scale: int = 4) -> None:
    """Write ``req.grid`` (a PNG of samples ``idx``) and/or put them in the result (``req.return_samples``)."""
    if req.grid is not None:
        from rlgen.viz import save_image_grid

        save_image_grid(images[idx], req.grid, nrow=nrow, captions=[captions[i] for i in idx], scale=scale)
        result["grid"] = str(req.grid)
    if getattr(req, "return_samples", False):
        result["samples"] = {"images": images[idx].float().numpy(), "captions": [captions[i] for i in idx],
                             "nrow": nrow}


@torch.no_grad()
def generate_images(policy, prompts: list[str], sampling: FlowSampling, seed: int, batch_size: int,
                    progress: bool) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] on CPU; seeded so the same request gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    kw = {}
    if sampling.teacache > 0:  # only then: a policy class without the option still evaluates without it
        from rlgen.models.teacache import TeaCacheConfig

        kw["teacache"] = TeaCacheConfig(sampling.teacache, calibration=sampling.teacache_calibration)
    return policy.generate(prompts, num_steps=sampling.steps, cfg_scale=sampling.cfg,
                           noise_level=sampling.noise_level, shift=sampling.shift, generator=gen,
                           batch_size=batch_size, progress=progress, **kw).cpu()


def settings_dict(sampling: FlowSampling, samples_per_prompt: int) -> dict:
    return {**asdict(sampling), "samples_per_prompt": samples_per_prompt}
