"""TeaCache: skip model forwards on deterministic flow steps whose output barely changes.

TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv:2411.19108) observes that the relative L1 change of a model's *timestep-modulated input* (for a
DiT, the first block's AdaLayerNorm output) between consecutive sampling steps predicts, after a
polynomial rescaling fitted once per model, the relative L1 change of its *output*. The sampler adds
the predicted output changes up and, while the sum stays below a threshold, reuses the last computed
output instead of running the model; when the sum crosses the threshold the model runs and the sum
restarts at 0.

rlgen's variant reuses the last computed **velocity** (model output) on a skipped step: the sampler's
Euler update then proceeds with it. (Holding the data prediction ``x̂0 = x − σ·v`` or the noise
prediction ``x̂0 + v`` fixed instead gives the same step: an Euler step along v stays on the straight line
through x̂0, so ``(x' − x̂0)/σ' = v`` — there is no better "what to reuse" at the velocity level.) Steps the caller marks as not skippable (Flow-GRPO's stochastic steps,
whose log-probs a learner trains on; the first and last steps) always run the full model, so their
velocities and log-probs are exactly those of the uncached sampler given the same input.

Everything here is pure torch and model-agnostic: the model side (rlgen/models/teacache.py) supplies a
``probe`` that runs the velocity function while reporting the modulated input to a callback, and aborts
the forward when the callback answers "skip".
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# probe(velocity_fn, x, sigma, decide) -> v, or None when decide(indicator) returned False (forward aborted)
Probe = Callable[[Callable, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], bool]], "torch.Tensor | None"]

IDENTITY = (1.0, 0.0)  # poly(x) = x: the raw indicator change, before any calibration


def polyval(coefficients: Sequence[float], x):
    """Horner's rule, highest degree first (numpy.poly1d's order); x a float or a tensor."""
    out = 0.0 * x
    for c in coefficients:
        out = out * x + c
    return out


def fit_polynomial(x: torch.Tensor, y: torch.Tensor, degree: int) -> list[float]:
    """Least-squares coefficients (highest degree first) of ``y ≈ poly(x)``; x, y (N,) with N > degree."""
    x, y = torch.as_tensor(x, dtype=torch.float64).flatten(), torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"fit_polynomial: x has {x.numel()} values but y has {y.numel()}")
    if degree < 0 or x.numel() <= degree:
        raise ValueError(f"fit_polynomial: degree {degree} needs more than {degree} points, got {x.numel()}")
    vander = torch.stack([x ** k for k in range(degree, -1, -1)], 1)  # (N, degree+1), highest power first
    # Columns x^k of small x differ by orders of magnitude: scale each to unit norm (as numpy.polyfit does)
    # so the least-squares solve stays well conditioned, then undo the scaling on the solution.
    scale = vander.norm(dim=0).clamp_min(1e-300)
    sol = torch.linalg.lstsq(vander / scale, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return [float(c) for c in sol / scale]


def rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> float:
    """mean|cur − prev| / mean|prev| over the whole batch (one host sync)."""
    prev32 = prev.float()
    return float((cur.float() - prev32).abs().mean() / prev32.abs().mean().clamp_min(1e-12))


class TeaCacheState:
    """The skip decision of one trajectory: accumulate poly(rel-L1 change of the indicator) and compute
    when the sum reaches ``threshold`` (then restart it at 0)."""

    def __init__(self, threshold: float, coefficients: Sequence[float] = IDENTITY):
        if threshold < 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {threshold}")
        if not coefficients:
            raise ValueError("TeaCache needs at least one polynomial coefficient")
        self.threshold, self.coefficients = float(threshold), [float(c) for c in coefficients]
        self.reset()

    def reset(self) -> None:
        self.previous: torch.Tensor | None = None  # the indicator at the last step, computed or not
        self.accumulated = 0.0

    def decide(self, indicator: torch.Tensor, must_compute: bool) -> bool:
        """True: run the model at this step. The indicator is remembered either way (as TeaCache does)."""
        compute = must_compute or self.previous is None
        if not compute:
            # A predicted change is never negative (a fitted polynomial can dip below 0 near x = 0), so a
            # threshold of 0 never skips.
            self.accumulated += max(0.0, polyval(self.coefficients, rel_l1(indicator, self.previous)))
            compute = self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
        self.previous = indicator.detach()
        return compute


class TeaCache:
    """A velocity cache for :func:`rlgen.samplers.flow.sample`: ``cache(velocity_fn, x, sigma, may_skip)``.

    ``probe`` is the model side (rlgen.models.teacache.probe_for(policy)). ``sample`` calls :meth:`reset`
    at the start of each trajectory and passes ``may_skip=False`` on SDE steps and on the last step.
    Counters ``computed`` / ``skipped`` add up over every trajectory since construction.
    """

    def __init__(self, probe: Probe, threshold: float, coefficients: Sequence[float] = IDENTITY):
        self.probe, self.state = probe, TeaCacheState(threshold, coefficients)
        self.computed = self.skipped = 0
        self.velocity: torch.Tensor | None = None

    def reset(self) -> None:
        self.state.reset()
        self.velocity = None

    def __call__(self, velocity_fn: Callable, x: torch.Tensor, sigma: torch.Tensor, may_skip: bool) -> torch.Tensor:
        asked = []

        def decide(indicator: torch.Tensor) -> bool:
            if asked:  # a velocity_fn that calls the model twice (e.g. CFG in two passes): decided already
                return True
            asked.append(True)
            return self.state.decide(indicator, must_compute=not may_skip or self.velocity is None)

        v = self.probe(velocity_fn, x, sigma, decide)
        if not asked:
            raise RuntimeError("TeaCache: the model never reached its probed module; cannot decide whether to skip")
        if v is None:
            self.skipped += 1
            return self.velocity
        self.computed += 1
        self.velocity = v
        return v

    @property
    def skip_fraction(self) -> float:
        total = self.computed + self.skipped
        return self.skipped / total if total else 0.0
