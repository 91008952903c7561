"""Flow-matching samplers: Euler ODE and Flow-GRPO's SDE steps with exact per-step log-probs.

Flow time follows diffusers/SD3 (see DESIGN.md, "Flow time"): ``x_σ = (1−σ)·x_data + σ·ε``, σ runs
from 1 (noise) to 0 (data) and the model predicts ``v = ε − x_data``. Flow-GRPO (Liu et al. 2025,
arXiv:2505.05470) turns the deterministic sampler into an SDE with the same marginals, so each
denoising step is a Gaussian policy whose log-density an RL learner can differentiate.

Every step takes ``sigma`` and ``sigma_next`` explicitly (no hidden step counter, unlike diffusers'
schedulers), so the learner can re-score any stored step with :func:`score_steps`.
All functions here are pure torch: no I/O, no global state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from rlgen.samplers.dpm_solver import dpmpp_2m_step

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """One denoising step. ``log_prob`` is None for an ODE step (noise_level 0)."""

    prev_sample: torch.Tensor  # (B, *D) x at sigma_next, in x's dtype
    log_prob: torch.Tensor | None  # (B,) float32+, summed over D
    mean: torch.Tensor  # (B, *D) float32+
    std: torch.Tensor  # (B or 1, 1, ..., 1) float32+, broadcastable to x


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 log-densities lose the per-dimension differences PPO ratios are made of.
    return torch.promote_types(dtype, torch.float32)


def _as_column(sigma, x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """float, 0-d or (B,) sigma -> (B or 1, 1, ..., 1) tensor on x's device."""
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if s.ndim == 0:
        return s.reshape((1,) * x.ndim)
    if s.ndim == 1 and s.shape[0] == x.shape[0]:
        return s.reshape((-1,) + (1,) * (x.ndim - 1))
    raise ValueError(f"{name} must be a float or a ({x.shape[0]},) tensor, got shape {tuple(s.shape)}")


def _check_step(x, v, sigma, sigma_next, noise_level, prev_sample) -> None:
    if v.shape != x.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal x shape {tuple(x.shape)}")
    if prev_sample is not None and prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} must equal x shape {tuple(x.shape)}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if torch.is_tensor(sigma) or torch.is_tensor(sigma_next):
        # One host sync; sample()/score_steps() pass floats so their loops stay sync-free.
        s, sn = torch.as_tensor(sigma), torch.as_tensor(sigma_next, device=torch.as_tensor(sigma).device)
        bad = bool(((sn >= s) | (sn < 0) | (s > 1)).any())
    else:
        bad = not (0.0 <= sigma_next < sigma <= 1.0)
    if bad:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """One step of Flow-GRPO's SDE (Liu et al. 2025, arXiv:2505.05470, Eq. 9) from sigma to sigma_next.

    ``dt = sigma_next − sigma < 0``; ``std_σ = noise_level·sqrt(σ/(1−σ))``,
    ``mean = x·(1 + std_σ²·dt/(2σ)) + v·(1 + std_σ²·(1−σ)/(2σ))·dt``,
    ``prev_sample = mean + std_σ·sqrt(−dt)·ε`` and ``log_prob`` is the Normal(mean, std_σ·sqrt(−dt))
    log-density of prev_sample summed over non-batch dims. At σ = 1 the ratio's denominator would be
    0; like Flow-GRPO (``torch.where(sigma == 1, sigma_max, sigma)`` with ``sigma_max = sigmas[1]``)
    we put sigma_next in the denominator only, i.e. ``std_σ = noise_level·sqrt(1/(1−sigma_next))``.

    With ``prev_sample`` given it is scored, not drawn (no noise is drawn). ``noise_level = 0`` is
    the Euler ODE step ``x + v·dt`` with ``log_prob = None`` and zero std. The math runs in at least
    float32; prev_sample comes back in x's dtype and log_prob scores exactly that stored value.
    """
    _check_step(x, v, sigma, sigma_next, noise_level, prev_sample)
    cdtype = _compute_dtype(x.dtype)
    xf, vf = x.to(cdtype), v.to(cdtype)  # (B, *D)
    s = _as_column(sigma, x, cdtype, "sigma")  # (B or 1, 1, ..., 1)
    sn = _as_column(sigma_next, x, cdtype, "sigma_next")
    dt = sn - s  # negative: we integrate from noise towards data

    if noise_level == 0:
        mean = xf + vf * dt  # (B, *D) plain Euler
        out = mean.to(x.dtype) if prev_sample is None else prev_sample
        return StepOutput(out, None, mean, torch.zeros_like(s * sn))

    # σ == 1 only on the first grid step, where sigma_next is Flow-GRPO's sigmas[1].
    s_den = torch.where(s == 1, sn, s)
    std_sigma = noise_level * torch.sqrt(s / (1 - s_den))  # (B or 1, 1, ..., 1)
    mean = xf * (1 + std_sigma**2 * dt / (2 * s)) + vf * (1 + std_sigma**2 * (1 - s) / (2 * s)) * dt
    std = std_sigma * torch.sqrt(-dt)  # (B or 1, 1, ..., 1)

    return gaussian_step(x, mean, std, generator, prev_sample)


def gaussian_step(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None,
                  prev_sample: torch.Tensor | None) -> StepOutput:
    """Draw ``prev_sample ~ N(mean, std²·I)`` (or take the given one) and score it exactly.

    mean (B, *D) in the compute dtype, std (B or 1, 1, ..., 1) > 0, shared over a sample's dims; the
    draw is stored in x's dtype and the log-density scores exactly that stored value. Every SDE step
    kind (``rlgen.samplers.flow_sde``) ends here, so they all share one log-prob convention.
    """
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=mean.dtype)
        prev_sample = (mean + std * eps).to(x.dtype)  # (B, *D) what the trajectory stores
    # The sample is data, not a function of the policy: no gradient flows through it.
    diff = prev_sample.detach().to(mean.dtype) - mean  # (B, *D)
    dims = diff[0].numel()
    # Σ_d log N(p_d; m_d, s) = −Σ(p−m)²/(2s²) − D·(log s + ½log 2π), s shared over a sample's dims.
    log_prob = -diff.pow(2).flatten(1).sum(1) / (2 * std.reshape(-1) ** 2) - dims * (
        torch.log(std.reshape(-1)) + _HALF_LOG_2PI
    )  # (B,)
    return StepOutput(prev_sample, log_prob, mean, std)


def sigma_schedule(num_steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """(num_steps+1,) float32 sigmas from 1 to 0: uniform, then SD3's shift ``shift·σ/(1+(shift−1)·σ)``.

    Equals diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(sigmas=
    linspace(1, 1/num_steps, num_steps))`` (the SD3 pipeline's call) with its terminal 0 appended.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # Build in float64 so the float32 grid is the correctly rounded value of the formula.
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.to(device=device, dtype=torch.float32)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on velocities: ``v_u + w·(v_c − v_u)``; w may be a float or (B,)."""
    if v_cond.shape != v_uncond.shape:
        raise ValueError(f"v_cond {tuple(v_cond.shape)} and v_uncond {tuple(v_uncond.shape)} differ in shape")
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.reshape((-1,) + (1,) * (v_cond.ndim - 1))  # (B, 1, ..., 1) per-sample guidance
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass
class Trajectory:
    """A sampled batch of denoising chains over a shared sigma grid of S steps."""

    latents: torch.Tensor  # (B, S+1, *D) x at every grid sigma, start noise first; (B, 2, *D) if not kept
    log_probs: torch.Tensor  # (B, S) float32; 0 at ODE steps (see sde_mask)
    stds: torch.Tensor  # (S,) per-step std of the Gaussian step; 0 at ODE steps
    sigmas: torch.Tensor  # (S+1,) float32 grid, 1 -> 0
    sde_mask: torch.Tensor  # (S,) bool, True where the step was stochastic
    means: torch.Tensor | None = None  # (B, S, *D) float32 step means, when asked for
    skipped: torch.Tensor | None = None  # (S,) bool, True where TeaCache reused the last velocity

    @property
    def samples(self) -> torch.Tensor:
        """(B, *D) the final samples at sigmas[-1]."""
        return self.latents[:, -1]


def _grid(sigmas: torch.Tensor | Sequence[float]) -> tuple[torch.Tensor, list[float]]:
    """Validated (S+1,) float32 grid and its Python floats (one host sync for the whole loop)."""
    grid = torch.as_tensor(sigmas, dtype=torch.float32)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of >= 2 values, got shape {tuple(grid.shape)}")
    values = grid.tolist()
    if any(b >= a for a, b in zip(values, values[1:])) or values[0] > 1 or values[-1] < 0:
        raise ValueError(f"sigmas must decrease strictly within [0, 1], got {values}")
    return grid, values


def _sde_mask(sde_steps, num_steps: int, noise_level: float) -> list[bool]:
    """None -> every step; a bool mask of length S; or an iterable of step indices."""
    if noise_level == 0:
        return [False] * num_steps
    if sde_steps is None:
        return [True] * num_steps
    # tolist() turns torch/numpy bools and ints into Python ones (np.bool_ is not a bool).
    items = sde_steps.tolist() if hasattr(sde_steps, "tolist") else list(sde_steps)
    if items and all(isinstance(i, bool) for i in items):
        if len(items) != num_steps:
            raise ValueError(f"sde_steps bool mask has length {len(items)}, expected {num_steps}")
        return items
    mask = [False] * num_steps
    for i in items:
        if isinstance(i, bool) or not 0 <= int(i) < num_steps or int(i) != i:
            raise ValueError(f"sde_steps index {i!r} is not a step in [0, {num_steps})")
        mask[int(i)] = True
    return mask


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    sde_steps: Iterable[int] | Sequence[bool] | torch.Tensor | None = None,
    return_means: bool = False,
    keep_latents: bool = True,
    progress: bool = False,
    teacache=None,
    sde_kind: str = "flow_grpo",
    ode_solver: str = "euler",
) -> Trajectory:
    """Integrate from ``noise`` (x at sigmas[0]) down the grid, recording per-step log-probs.

    ``velocity_fn(x (B, *D), sigma (B,) float32) -> v (B, *D)``; CFG and prompt conditioning are
    folded into it by the caller. ``sde_steps`` picks the stochastic steps (None: all of them when
    noise_level > 0); the others are Euler ODE steps, as in Flow-GRPO-Fast / MixGRPO training
    windows. ``keep_latents=False`` keeps only the start noise and final sample (latents (B, 2, *D)),
    which is enough for evaluation but not for :func:`score_steps`.

    ``teacache`` (a :class:`rlgen.samplers.teacache.TeaCache`) may reuse the last computed velocity on
    ODE steps; SDE steps and the last step always run the model, so stored log-probs stay exact.
    ``sde_kind`` names the stochastic step (``rlgen.samplers.flow_sde``: flow_grpo, dance, cps); a kind
    whose noise vanishes at σ' = 0 (cps) runs a final step to 0 as an ODE step. ``ode_solver="dpm2"``
    runs the ODE steps after the last stochastic step (all steps if none is) with DPM-Solver++(2M)
    (``rlgen.samplers.dpm_solver``; MixGRPO), its history seeded by the steps before; "euler" is plain Euler.
    """
    from rlgen.samplers.flow_sde import sde_kind as _kind

    if ode_solver not in ("euler", "dpm2"):
        raise ValueError(f"ode_solver must be 'euler' or 'dpm2', got {ode_solver!r}")
    kind = _kind(sde_kind)
    grid, values = _grid(sigmas)
    num_steps = len(values) - 1
    mask = _sde_mask(sde_steps, num_steps, noise_level)
    if kind.deterministic_at_zero and values[-1] == 0.0:
        mask[-1] = False  # no noise, no density: the last step is the ODE step it equals
    last_sde = max((i for i, m in enumerate(mask) if m), default=-1)
    batch, device = noise.shape[0], noise.device
    grid = grid.to(device)
    latents = noise.new_empty((batch, num_steps + 1 if keep_latents else 2, *noise.shape[1:]))
    latents[:, 0] = noise
    log_probs = torch.zeros(batch, num_steps, dtype=_compute_dtype(noise.dtype), device=device)
    stds = torch.zeros(num_steps, dtype=log_probs.dtype, device=device)
    means = None
    if return_means:
        means = torch.empty((batch, num_steps, *noise.shape[1:]), dtype=log_probs.dtype, device=device)

    skipped = [False] * num_steps
    if teacache is not None:
        teacache.reset()
    x, prev_x0, prev_sigma = noise, None, None
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        if teacache is None:
            v = velocity_fn(x, grid[i].expand(batch))  # (B, *D)
        else:
            before = teacache.skipped
            v = teacache(velocity_fn, x, grid[i].expand(batch), may_skip=not mask[i] and i < num_steps - 1)
            skipped[i] = teacache.skipped > before
        if ode_solver == "dpm2" and i > last_sde:
            x_next, x0 = dpmpp_2m_step(x, v, values[i], values[i + 1], prev_x0, prev_sigma)
            out = StepOutput(x_next, None, x_next.to(log_probs.dtype), stds[i])
        else:
            out = kind.step(x, v, values[i], values[i + 1], noise_level if mask[i] else 0.0, generator=generator)
            x0 = x - values[i] * v if ode_solver == "dpm2" else None  # (B, *D) history for the DPM steps
        prev_x0, prev_sigma = x0, values[i]
        x = out.prev_sample
        if mask[i]:
            log_probs[:, i] = out.log_prob
            stds[i] = out.std.reshape(())
        if means is not None:
            means[:, i] = out.mean
        if keep_latents:
            latents[:, i + 1] = x
    if not keep_latents:
        latents[:, 1] = x
    sde_mask = torch.tensor(mask, dtype=torch.bool, device=device)
    skip_mask = torch.tensor(skipped, dtype=torch.bool, device=device) if teacache is not None else None
    return Trajectory(latents, log_probs, stds, grid, sde_mask, means, skip_mask)


def score_steps(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    step_indices: Iterable[int] | torch.Tensor,
    noise_level: float,
    sde_kind: str = "flow_grpo",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-score steps of a stored trajectory under ``velocity_fn`` (the learner's call; grad follows
    the caller's mode).

    ``latents`` is a trajectory's (B, S+1, *D); step i scores ``latents[:, i+1]`` given
    ``latents[:, i]``. Returns ``log_prob`` (B, k), ``mean`` (B, k, *D) and ``std`` (k,), where
    ``std[j]`` broadcasts against ``mean[:, j]`` (Flow-GRPO's KL term needs both). ``sde_kind`` must
    be the kind the trajectory was sampled with (``rlgen.samplers.flow_sde``).
    """
    from rlgen.samplers.flow_sde import sde_step_fn

    step_fn = sde_step_fn(sde_kind)
    grid, values = _grid(sigmas)
    if latents.ndim < 3 or latents.shape[1] != len(values):
        raise ValueError(f"latents must be (B, {len(values)}, ...) to match sigmas, got {tuple(latents.shape)}")
    if noise_level <= 0:
        raise ValueError(f"score_steps needs noise_level > 0 (ODE steps have no density), got {noise_level}")
    indices = step_indices.tolist() if hasattr(step_indices, "tolist") else list(step_indices)
    if not indices:
        raise ValueError("step_indices is empty")
    num_steps = len(values) - 1
    for i in indices:
        if isinstance(i, bool) or int(i) != i or not 0 <= int(i) < num_steps:
            raise ValueError(f"step index {i!r} is not a step in [0, {num_steps})")
    batch = latents.shape[0]
    grid = grid.to(latents.device)
    log_probs, means, stds = [], [], []
    for i in map(int, indices):
        # contiguous(): the same memory layout as the x the sampler fed the model, so a
        # deterministic model reproduces the rollout's velocity bit for bit.
        x = latents[:, i].contiguous()  # (B, *D)
        v = velocity_fn(x, grid[i].expand(batch))
        out = step_fn(x, v, values[i], values[i + 1], noise_level, prev_sample=latents[:, i + 1])
        log_probs.append(out.log_prob)
        means.append(out.mean)
        stds.append(out.std.reshape(()))
    return torch.stack(log_probs, 1), torch.stack(means, 1), torch.stack(stds)
