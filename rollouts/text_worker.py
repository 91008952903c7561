"""TextRolloutWorker: a Ray actor holding a masked-diffusion policy copy; decodes G completions per problem.

Thin on purpose: decoding is ``rollouts/text.py``'s ``text_rollout`` (the same call the in-process
path makes). Rewards are scored on the driver (verifiers take microseconds), so a worker returns
its buckets with NaN rewards. Weights arrive as numpy arrays through the object store, versioned:
the driver checks the version on every returned batch.
"""
from __future__ import annotations

import torch

from rollouts.text import TextRolloutConfig, TextRolloutBatch, text_rollout


def _unscored(texts, prompts, problems=None):
    return torch.full((len(texts),), float("nan"))


class TextRolloutWorker:
    def __init__(self, policy_path: str, rollout_cfg: TextRolloutConfig, num_threads: int = 1, device: str = "auto"):
        import rlgen  # noqa: F401  (torchvision compatibility in this process)
        from rlgen.models import load_model
        from rlgen.utils import resolve_device, set_threads

        set_threads(num_threads)
        self.cfg = rollout_cfg
        self.policy = load_model(policy_path, device=str(resolve_device(device))).eval().requires_grad_(False)
        self.version = 0

    def generate(self, problems: list[dict], group_size: int, seed: int) -> tuple[int, list[TextRolloutBatch]]:
        """(weights version, buckets): group ids index ``problems``; rewards are NaN (scored by the driver)."""
        gen = torch.Generator(device=self.policy.device).manual_seed(int(seed))
        return self.version, text_rollout(self.policy, problems, self.cfg, group_size, _unscored, gen)

    def load_weights(self, version: int, state: dict) -> int:
        from rlgen.runtime.learner import load_numpy_weights

        load_numpy_weights(self.policy, state, strict=True)
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version
