"""RolloutWorker: a Ray actor holding a policy copy of any family; samples rollouts, runs evaluations.

Thin on purpose: sampling is the family's (``rlgen.families.<family>.rollout``), evaluation the
benchmark's (``rlgen.evaluate``), weight loading ``rlgen.runtime.engine.load_numpy_weights`` or a
broadcast (``rlgen.runtime.weight_sync``). Every rollout carries the weights version it was
sampled with, so the driver can tell a restarted worker's stale samples from current ones.
"""
from __future__ import annotations

import os

import torch


class RolloutWorker:
    def __init__(self, policy_path: str, load_options: dict, rollout_cfg, lora=None, num_threads: int = 1,
                 device: str = "auto", worker_index: int = 0, dtype: str = "float32"):
        import rlgen  # noqa: F401  (torchvision compatibility in this process)
        from rlgen.families import family_of
        from rlgen.models import load_model
        from rlgen.utils import compute_dtype, resolve_device, set_threads

        set_threads(num_threads)
        self.index, self.cfg, self.load_options = worker_index, rollout_cfg, dict(load_options)
        self.device = str(resolve_device(device))
        # policy.dtype on CUDA: weights (a pipeline's VAE and text encoders too) loaded in it, not cast after
        dt = compute_dtype(dtype, self.device)
        if dt != torch.float32:
            self.load_options["dtype"] = dt
        self.policy = load_model(policy_path, device=self.device, **self.load_options).eval()
        self.family = family_of(self.policy)
        # Under LoRA the learner syncs only the adapter: hold the same adapter, so its weights load
        # by name onto the frozen base this worker already has.
        self.lora = lora is not None and lora.enabled
        if self.lora:
            self.family.add_lora(self.policy, lora)
        self.policy.requires_grad_(False)
        self.version = 0

    def pid(self) -> int:
        return os.getpid()

    def get_version(self) -> int:
        return self.version

    def generate(self, items: list[dict], group_ids: torch.Tensor, seed: int, step: int = 0):
        """One rollout per item (the driver repeats each prompt G times), with this worker's weights;
        ``step`` is the training step it is for (e.g. MixGRPO's window position follows it)."""
        gen = torch.Generator().manual_seed(int(seed))
        return self.family.rollout(self.policy, items, group_ids, self.cfg, gen, self.version, step)

    @torch.no_grad()
    def evaluate(self, benchmark: str, request: dict, checkpoint: str | None = None) -> dict:
        """Run a registered benchmark on this worker's policy (or on ``checkpoint``, e.g. a teacher)."""
        from rlgen.evaluate import EvalRequest, run_benchmark

        req = EvalRequest(device=self.device, progress=False, **request)
        if checkpoint is not None:
            from rlgen.models import load_model

            model = load_model(checkpoint, device=self.device, **self.load_options).eval()
            return run_benchmark(benchmark, req, model)
        return run_benchmark(benchmark, req, self.policy)

    def prepare_pairs(self, pairs) -> object:
        """Pair tensors in this policy's sample space / token ids (``Family.prepare_pairs``)."""
        return self.family.prepare_pairs(self.policy, pairs)

    def load_weights(self, version: int, state: dict) -> int:
        from rlgen.runtime.engine import load_numpy_weights

        load_numpy_weights(self.policy, state, strict=not self.lora)
        self.version = int(version)
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
