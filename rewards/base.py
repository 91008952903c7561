"""The reward plug-in API: resolve a reward from config, call it, mix several with weights.

A reward is a callable ``(samples, prompts, **meta) -> list[float | None] | Tensor (B,)``.
``samples`` are images (B, C, H, W) in [-1, 1] or texts (list of str); ``prompts`` a list of B
strings; ``meta`` holds per-batch extras (e.g. ``problems=[...]`` for text verifiers).

Four ways to name one (``resolve_reward``):
  1. a registered name: ``@register_reward("my_reward")`` in an imported module;
  2. ``module.path:attribute`` in config, imported on demand;
  3. an entry point in the group ``rlgen.rewards`` of an installed package;
  4. a function written for trl's ``reward_funcs``, ``(prompts, completions, **kwargs)``, named
     through any of the three above; it is called as ``fn(prompts=..., completions=samples, ...)``.
A registry entry that is a class is instantiated once with the config's kwargs (it may hold a
model) and the instance is called; kwargs for a function are bound to it as keyword arguments.

Scores: ``None`` means "no score for this sample" (e.g. an unparsable completion a judge could not
rate); the sample is excluded from group statistics and counted in the metrics. NaN or ±inf is a
bug by default (``nan: error``) and names the reward, sample and prompt; ``nan: drop`` treats it
like None. A reward that returns None for *every* sample of a call scored nothing (typically a
trl reward reading columns this dataset lacks): an error under ``nan: error``, counted under ``drop``. A sample is valid only when every reward scored it: mixing a partial set of rewards
would compare samples on different scales.
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from rlgen.registry import REWARDS


class RewardError(RuntimeError):
    """A reward failed or returned something unusable; the message names the reward and, where
    known, the sample index and its prompt (also kept as attributes)."""

    def __init__(self, message: str, reward: str | None = None, index: int | None = None,
                 prompt: str | None = None):
        super().__init__(message)
        self.reward, self.index, self.prompt = reward, index, prompt

    def __reduce__(self):  # keep the attributes when pickled across Ray actors
        return (type(self), (str(self), self.reward, self.index, self.prompt))


# ----------------------------------------------------------------------------------------------
# Resolution: a config string → one callable with the rlgen convention
# ----------------------------------------------------------------------------------------------
def _is_trl_style(fn: Callable) -> bool:
    """trl's reward_funcs take ``completions`` (and ``prompts``) by name and no ``samples``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume rlgen's convention
        return False
    return "completions" in params and "samples" not in params


def _accepted_meta(fn: Callable) -> set[str] | None:
    """Names of keyword arguments ``fn`` accepts, or None when it takes ``**kwargs`` (all)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


# Arguments a reward always gets from rlgen (never dataset columns); trl passes the last three itself.
_NOT_COLUMNS = {"samples", "prompts", "completions", "completion_ids", "log_extra", "log_metric", "trainer_state"}


def columns_needed(fn: Callable) -> list[str | tuple[str, ...]]:
    """Dataset columns a reward needs: its required keyword parameters beyond what every reward
    gets (samples/completions, prompts), plus those it declares in ``required_columns`` (a name, or a
    tuple of alternatives such as ``("solution", "answer")``)."""
    needs = list(getattr(fn, "required_columns", ()))
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return needs
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not _is_trl_style(fn):
        named = named[2:]  # rlgen style: the first two are samples and prompts, whatever their names
    needs += [p.name for p in named if p.default is p.empty and p.name not in _NOT_COLUMNS]
    return needs


class Reward:
    """A resolved reward: ``reward(samples, prompts, **meta)`` whatever the underlying style."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        self.style = "trl" if _is_trl_style(fn) else "rlgen"
        # A function without **kwargs gets only the meta keys it names, so a plain
        # `def r(samples, prompts)` works next to rewards that need `problems=` or `task=`.
        self._accepts = _accepted_meta(fn)

    def __call__(self, samples, prompts, **meta):
        if self._accepts is not None:
            meta = {k: v for k, v in meta.items() if k in self._accepts}
        if self.style == "trl":
            return self.fn(prompts=list(prompts), completions=samples, **meta)
        return self.fn(samples, prompts, **meta)

    def close(self) -> None:
        """Release what the underlying reward holds, if it has a ``close()``."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, style={self.style})"


def resolve_reward(spec: str | Callable, **kwargs) -> Reward:
    """A registered name, ``module.path:attribute``, an entry-point name, or a callable → Reward.

    A class is instantiated with ``kwargs``; for a function they are bound as keyword arguments.
    """
    if callable(spec) and not isinstance(spec, str):
        obj, name = spec, getattr(spec, "__name__", type(spec).__name__)
    else:
        obj, name = REWARDS.get(spec), spec  # RegistryError (a KeyError) names the candidates
    if inspect.isclass(obj):
        try:
            obj = obj(**kwargs)
        except Exception as e:
            raise RewardError(f"reward '{name}': cannot build {obj.__name__}(**{kwargs}): "
                              f"{type(e).__name__}: {e}", reward=name) from e
    elif kwargs:
        obj = functools.partial(obj, **kwargs)
    if not callable(obj):
        raise RewardError(f"reward '{name}' resolved to {obj!r}, which is not callable", reward=name)
    return Reward(name, obj)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class RewardSpec:
    """One reward of a mix, fully resolved from config."""
    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 0.0  # 0 = no limit


@dataclass
class RewardsConfig:
    """``rewards: {shapes_verifier: 1.0, clip_score: 0.5}`` plus optional per-reward settings."""
    rewards: dict[str, float] = field(default_factory=dict)           # name → weight
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → constructor kwargs
    nan: str = "error"        # error | drop: a NaN/inf score raises, or leaves the sample unscored
    timeout_s: float = 0.0    # limit per call for every reward (0 = none) …
    timeouts: dict[str, float] = field(default_factory=dict)  # … or per reward name

    def __post_init__(self):
        if self.nan not in ("error", "drop"):
            raise ValueError(f"rewards.nan must be 'error' or 'drop', got {self.nan!r}")
        for key, table in (("reward_kwargs", self.reward_kwargs), ("timeouts", self.timeouts)):
            extra = sorted(set(table) - set(self.rewards))
            if extra:  # almost always a typo in the reward's name
                raise ValueError(f"rewards.{key} names {extra}, which are not in rewards "
                                 f"({sorted(self.rewards)})")
        for name, w in self.rewards.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"rewards: weight of '{name}' must be a finite number, got {w!r}")

    def specs(self) -> list[RewardSpec]:
        return [RewardSpec(n, float(w), dict(self.reward_kwargs.get(n, {})),
                           float(self.timeouts.get(n, self.timeout_s))) for n, w in self.rewards.items()]


def as_rewards_config(cfg: RewardsConfig | dict) -> RewardsConfig:
    """Accept a RewardsConfig, its fields as a dict, or a bare ``{name: weight}`` mapping."""
    if isinstance(cfg, RewardsConfig):
        return cfg
    if isinstance(cfg, dict):
        if "rewards" in cfg:
            return RewardsConfig(**cfg)
        return RewardsConfig(rewards=dict(cfg))
    raise TypeError(f"rewards config must be a RewardsConfig or a mapping, got {type(cfg).__name__}")


# ----------------------------------------------------------------------------------------------
# Mixing
# ----------------------------------------------------------------------------------------------
@dataclass
class MixedRewards:
    """Scores of one batch, CPU tensors. ``total`` is NaN where ``valid`` is False."""
    total: torch.Tensor                  # (B,) float32, Σ_k w_k · r_k
    components: dict[str, torch.Tensor]  # name → (B,) float32, NaN where that reward gave no score
    valid: torch.Tensor                  # (B,) bool, every reward scored the sample
    metrics: dict[str, float]            # reward/<name>/{mean,std,none,dropped,seconds}, reward/total/…


def _prompt_at(prompts, i: int) -> str:
    try:
        return str(prompts[i])
    except (IndexError, TypeError):
        return "?"


def to_score_tensor(out, name: str, prompts, nan: str) -> tuple[torch.Tensor, int, int]:
    """A reward's output → ((B,) float32 with NaN = no score, #None, #dropped NaN/inf)."""
    n = len(prompts)
    if isinstance(out, torch.Tensor) or (isinstance(out, np.ndarray) and out.dtype != object):
        t = torch.as_tensor(out).detach().to("cpu", torch.float32)
        if t.dim() != 1:
            raise RewardError(f"reward '{name}' returned a tensor of shape {tuple(t.shape)}; expected ({n},)",
                              reward=name)
        values, n_none = t, 0
    else:
        try:
            items = list(out)
        except TypeError:
            raise RewardError(f"reward '{name}' returned {type(out).__name__}; expected a list of "
                              f"floats or a tensor of shape ({n},)", reward=name) from None
        vals = []
        for i, v in enumerate(items):
            if v is not None and not isinstance(v, (int, float, np.number)) and not (
                    isinstance(v, torch.Tensor) and v.numel() == 1):
                raise RewardError(f"reward '{name}' returned {type(v).__name__} {v!r} for sample {i} "
                                  f"(prompt {_prompt_at(prompts, i)!r}); expected a float or None",
                                  reward=name, index=i, prompt=_prompt_at(prompts, i))
            vals.append(math.nan if v is None else float(v))
        values = torch.tensor(vals, dtype=torch.float32)
        n_none = sum(v is None for v in items)
    if len(values) != n:
        raise RewardError(f"reward '{name}' returned {len(values)} scores for {n} samples", reward=name)
    bad = ~torch.isfinite(values)
    if n_none:  # None became NaN above: only other non-finite values are errors
        bad &= torch.tensor([v is not None for v in items])
    if bad.any() and nan == "error":
        i = int(bad.nonzero()[0])
        raise RewardError(f"reward '{name}' returned {values[i].item()} for sample {i} (prompt "
                          f"{_prompt_at(prompts, i)!r}); fix the reward, or set reward_nan=drop to "
                          f"leave such samples unscored", reward=name, index=i, prompt=_prompt_at(prompts, i))
    values = torch.where(bad, torch.full_like(values, math.nan), values)
    return values, n_none, int(bad.sum())


def _stats(x: torch.Tensor) -> tuple[float, float]:
    """Mean and population std over the finite entries (NaN when none)."""
    x = x[torch.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    return x.mean().item(), x.std(unbiased=False).item()


class RewardMixer:
    """Builds the configured rewards once; ``mixer(samples, prompts, **meta) -> MixedRewards``.

    Rewards with a timeout run on a thread pool and are waited for with ``future.result(timeout)``;
    Python cannot stop a thread, so a timed-out reward keeps its thread until it returns.
    """

    def __init__(self, cfg: RewardsConfig | dict):
        self.cfg = as_rewards_config(cfg)
        if not self.cfg.rewards:
            raise ValueError("RewardMixer needs at least one reward, e.g. rewards: {shapes_verifier: 1.0}")
        self.specs = self.cfg.specs()
        self.rewards = {s.name: resolve_reward(s.name, **s.kwargs) for s in self.specs}
        timed = sum(s.timeout_s > 0 for s in self.specs)
        self._pool = ThreadPoolExecutor(max_workers=timed, thread_name_prefix="reward") if timed else None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def _call(self, spec: RewardSpec, samples, prompts, meta: dict):
        fn = self.rewards[spec.name]
        try:
            if spec.timeout_s <= 0:
                return fn(samples, prompts, **meta)
            future = self._pool.submit(fn, samples, prompts, **meta)
            try:
                return future.result(timeout=spec.timeout_s)
            except FutureTimeout:
                future.cancel()
                raise RewardError(f"reward '{spec.name}' timed out after {spec.timeout_s:g} s on a batch of "
                                  f"{len(prompts)} (first prompt {_prompt_at(prompts, 0)!r})",
                                  reward=spec.name) from None
        except RewardError as e:
            if e.reward == spec.name:  # ours (timeout) or raised by the reward naming itself
                raise
            raise RewardError(f"reward '{spec.name}': {e}", spec.name, e.index, e.prompt) from e
        except Exception as e:
            raise RewardError(f"reward '{spec.name}' failed on a batch of {len(prompts)} (first prompt "
                              f"{_prompt_at(prompts, 0)!r}): {type(e).__name__}: {e}", reward=spec.name) from e

    def __call__(self, samples, prompts, **meta) -> MixedRewards:
        if isinstance(prompts, str):
            raise RewardError("rewards: prompts must be a list of strings, got a single string")
        prompts = list(prompts)
        n = len(samples) if not isinstance(samples, (torch.Tensor, np.ndarray)) else samples.shape[0]
        if n != len(prompts):
            raise RewardError(f"rewards: {n} samples but {len(prompts)} prompts; they must pair up")
        components, metrics = {}, {}
        total = torch.zeros(n)
        for spec in self.specs:
            t0 = time.perf_counter()
            out = self._call(spec, samples, prompts, meta)
            scores, n_none, n_dropped = to_score_tensor(out, spec.name, prompts, self.cfg.nan)
            if n and n_none == n and self.cfg.nan == "error":  # e.g. a trl reward for another dataset's columns
                raise RewardError(f"reward '{spec.name}' returned None for all {n} samples (first prompt "
                                  f"{_prompt_at(prompts, 0)[:80]!r}): it scored none of them; fix the reward, or "
                                  f"set reward_nan=drop to leave such samples unscored and count them", reward=spec.name)
            components[spec.name] = scores
            total += spec.weight * scores  # NaN propagates: a sample missing any score is invalid
            mean, std = _stats(scores)
            metrics.update({f"reward/{spec.name}/mean": mean, f"reward/{spec.name}/std": std,
                            f"reward/{spec.name}/none": float(n_none),
                            f"reward/{spec.name}/dropped": float(n_dropped),
                            f"reward/{spec.name}/seconds": time.perf_counter() - t0})
        valid = torch.isfinite(total)
        mean, std = _stats(total)
        metrics.update({"reward/total/mean": mean, "reward/total/std": std,
                        "reward/valid_frac": valid.float().mean().item() if n else math.nan})
        return MixedRewards(total, components, valid, metrics)

    def close(self) -> None:
        """Stop the timeout pool and close every reward that holds resources (``close()``: an LLM
        judge's engine, a remote endpoint's session)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for reward in self.rewards.values():
            reward.close()
