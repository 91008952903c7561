"""RolloutWorker: a Ray actor holding a policy copy; samples SDE rollouts and evaluation images.

Thin on purpose: sampling lives in ``rollouts/image.py``, weight loading in the learner module and
``rlgen.runtime.weight_sync`` (numpy through the object store, or a broadcast group).
"""
from __future__ import annotations

import numpy as np
import torch

from rollouts.image import ImageRolloutConfig, rollout_images


class RolloutWorker:
    def __init__(self, policy_path: str, rollout_cfg: ImageRolloutConfig, num_threads: int = 1,
                 device: str = "auto", worker_index: int = 0, lora_rank: int = 0, lora_alpha: float = 0.0,
                 lora_targets: list[str] | None = None):
        import rlgen  # noqa: F401  (torchvision compatibility in this process)
        from rlgen.models import load_model
        from rlgen.utils import resolve_device, set_threads

        set_threads(num_threads)
        self.index = worker_index
        self.cfg = rollout_cfg
        self.policy = load_model(policy_path, device=str(resolve_device(device))).eval()
        # Under LoRA the learner syncs only the adapter: hold the same adapter, so its weights load
        # by name onto the frozen base this worker already has.
        self.lora = lora_rank > 0
        if self.lora:
            from rlgen.runtime.flow_update import apply_lora

            apply_lora(self.policy, lora_rank, lora_alpha, lora_targets)
        self.policy.requires_grad_(False)
        self.version = 0

    def pid(self) -> int:
        import os

        return os.getpid()

    def generate(self, prompts: list[str], group_ids: torch.Tensor, seed: int):
        gen = torch.Generator().manual_seed(int(seed))
        return rollout_images(self.policy, prompts, group_ids, self.cfg, gen, weights_version=self.version)

    @torch.no_grad()
    def generate_eval(self, prompts: list[str], num_steps: int, cfg_scale: float, seed: int,
                      batch_size: int = 64) -> np.ndarray:
        """Deterministic ODE samples for held-out evaluation, as (B, C, H, W) float32 numpy."""
        gen = torch.Generator().manual_seed(int(seed))
        images = self.policy.generate(prompts, num_steps=num_steps, cfg_scale=cfg_scale, noise_level=0.0,
                                      shift=self.cfg.shift, generator=gen, batch_size=batch_size)
        return images.float().cpu().numpy()

    def load_weights(self, version: int, state: dict) -> int:
        from rlgen.runtime.learner import load_numpy_weights

        load_numpy_weights(self.policy, state, strict=not self.lora)
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    # -- collective weight sync (rlgen.runtime.weight_sync.CollectiveSync) ----------------------
    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int, backend: str) -> None:
        from rlgen.runtime.weight_sync import new_group

        self._sync_group = new_group(addr, port, rank, world_size, backend)

    def leave_weight_group(self) -> None:
        self._sync_group = None

    def check_weight_specs(self, specs: list[tuple[str, list[int]]]) -> None:
        """Every (name, shape) the learner sends must name a parameter of that shape here."""
        self._params_for(specs)

    def _params_for(self, specs: list[tuple[str, list[int]]]) -> dict:
        params = dict(self.policy.named_parameters())
        bad = [f"{n}: {shape} vs {list(params[n].shape) if n in params else 'missing'}" for n, shape in specs
               if n not in params or list(params[n].shape) != list(shape)]
        if bad:
            raise ValueError(f"rollout worker {self.index} cannot receive the learner's weights: {'; '.join(bad[:5])}")
        return params

    def receive_weights(self, version: int, specs: list[tuple[str, list[int]]]) -> int:
        """Receive learner rank 0's broadcast into the parameters named in ``specs`` (in order)."""
        from rlgen.runtime.weight_sync import broadcast_buckets

        params = self._params_for(specs)
        broadcast_buckets(self._sync_group, [params[n] for n, _ in specs], next(self.policy.parameters()).device)
        self.version = int(version)
        return self.version

    def param_checksum(self) -> float:
        """Sum of all parameters: a cheap way for tests/driver to compare weights across actors."""
        return float(sum(p.double().sum() for p in self.policy.parameters()))
