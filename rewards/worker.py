"""RewardWorker: a Ray actor that builds its rewards once and scores batches for the driver.

    worker = make_reward_worker({"rewards": {"shapes_verifier": 1.0, "clip_score": 0.5}}, num_cpus=1)
    ref = worker.score.remote(images_np, prompts)   # returns at once: rollouts go on meanwhile
    mixed = ray.get(ref)                             # MixedRewards, CPU tensors

Scoring "asynchronously" is just Ray's ObjectRef. Images may be sent as numpy arrays: Ray reads
them from the object store without a copy and the worker wraps them with ``torch.from_numpy``.
Per-reward timeouts live in the RewardMixer (a thread pool + ``future.result(timeout)`` inside
the actor). An error inside the actor reaches the driver as a ``RayTaskError`` whose message
carries the RewardError's text: reward name, sample index and prompt where known.

``LocalRewardWorker`` has the same methods without Ray, for tests and debugging.
"""
from __future__ import annotations

import warnings

import numpy as np
import ray
import torch

from rewards.base import MixedRewards, RewardMixer, RewardsConfig, as_rewards_config


def _as_samples(samples):
    """numpy → torch without a copy (object-store arrays are read-only: rewards must not write
    into samples, and torch warns about that; the warning is silenced here on purpose)."""
    if isinstance(samples, np.ndarray) and samples.dtype != object:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(samples)
    return samples


class LocalRewardWorker:
    """Holds one RewardMixer; ``score(samples, prompts, meta)`` → MixedRewards (CPU tensors)."""

    def __init__(self, cfg: RewardsConfig | dict, num_threads: int = 0):
        if num_threads > 0:  # Ray gives an actor its CPUs; torch would otherwise use every core
            torch.set_num_threads(num_threads)
        import rlgen  # noqa: F401  (torchvision fix for open_clip in this process)

        self.cfg = as_rewards_config(cfg)
        self.mixer = RewardMixer(self.cfg)

    def names(self) -> list[str]:
        return self.mixer.names

    def score(self, samples, prompts: list[str], meta: dict | None = None) -> MixedRewards:
        return self.mixer(_as_samples(samples), list(prompts), **(meta or {}))

    def ping(self) -> str:
        return "ok"

    def close(self) -> None:
        self.mixer.close()


@ray.remote(num_cpus=1)
class RewardWorker(LocalRewardWorker):
    """The Ray actor. ``RewardWorker.options(num_cpus=2).remote(cfg)`` or ``make_reward_worker``."""


def make_reward_worker(cfg: RewardsConfig | dict, num_cpus: float = 1, num_threads: int | None = None, **options):
    """Start one RewardWorker actor; ``options`` go to ``.options()`` (num_gpus, name, …).
    ``num_threads`` (torch intra-op threads in the actor) defaults to its CPU count, at least 1."""
    threads = max(1, int(num_cpus)) if num_threads is None else num_threads
    return RewardWorker.options(num_cpus=num_cpus, **options).remote(cfg, threads)
