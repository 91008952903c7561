"""The learner group: K data-parallel DeepSpeed ranks in Ray actors, and weight sync to rollouts.

``LearnerGroup`` (driver side) starts K ``FlowLearner`` actors in one placement group; each joins a
torch.distributed group (gloo on CPU, nccl on CUDA) and wraps the policy in a DeepSpeed engine
(ZeRO 0-3). ``train(batch)`` gives rank i the i-th equal shard; DeepSpeed averages gradients over
ranks, so K ranks on B/K samples take the same step as one rank on B (tests/runtime/test_learner.py).

Everything DeepSpeed-specific sits in ``DeepSpeedStrategy``; the Flow-GRPO math is
``rlgen.runtime.flow_update.flow_grpo_update``; the actor only wires them together.

Weight sync: ``get_weights() -> (version, {name: np.ndarray})`` holds the parameters that train —
all of them for full fine-tuning; for LoRA only the adapter's ``lora_A``/``lora_B`` (not merged),
named as in a policy that went through ``apply_lora`` — and rollout workers copy them in place with
``load_numpy_weights``. numpy arrays travel through Ray's object store zero-copy.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlgen.algos.flow_grpo import FlowGRPOConfig
from rlgen.runtime.actor_group import RayActorGroup
from rlgen.runtime.batches import ImageRollout, state_dict_to_numpy
from rlgen.runtime.flow_update import (LearnerConfig, PolicyVelocity, apply_lora, flow_grpo_update, grad_accum_steps,
                                       merge_lora)

DS_SUBDIR, DS_TAG = "deepspeed", "state"


def load_numpy_weights(module: nn.Module, state: dict[str, np.ndarray], strict: bool = True) -> None:
    """Copy ``state`` into ``module``'s parameters in place (same tensors, no reallocation).

    Every key must name a parameter of the same shape (dtype/device are converted). ``strict``:
    every parameter must be given; ``strict=False`` allows a subset (a LoRA adapter's weights).
    Nothing is copied unless all keys and shapes check out.
    """
    params = dict(module.named_parameters())
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state)) if strict else []
    if unexpected or missing:
        raise KeyError(f"weights do not match {type(module).__name__}: unexpected {unexpected[:5]}"
                       f"{'…' if len(unexpected) > 5 else ''} ({len(unexpected)}), missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''} ({len(missing)})")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state.items()
           if tuple(v.shape) != tuple(params[k].shape)]
    if bad:
        raise ValueError(f"shape mismatch (given vs parameter): {'; '.join(bad[:5])}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Ray's zero-copy arrays are read-only; we only read
        for k, v in state.items():
            params[k].copy_(torch.from_numpy(np.asarray(v)))


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class DeepSpeedStrategy:
    """DeepSpeed behind one object: process group, engine config, ZeRO-3 gathering, checkpoints."""

    def __init__(self, cfg: LearnerConfig, gradient_accumulation_steps: int, rank: int, world_size: int):
        self.cfg, self.gas, self.rank, self.world_size = cfg, gradient_accumulation_steps, rank, world_size
        self.cuda = torch.cuda.is_available()

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        # One process per actor: Ray shows each actor only its own GPU, so the local rank is 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if not self.cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.cuda:
            torch.cuda.set_device(0)
        from rlgen.runtime.rendezvous import init_process_group  # loopback store + gloo when master is local

        init_process_group(master_addr, master_port, self.rank, self.world_size, "nccl" if self.cuda else "gloo")
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", auto_mpi_discovery=False)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.cuda else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.bf16 and self.cuda else torch.float32

    def ds_config(self) -> dict:
        c = self.cfg
        zero = {"stage": c.zero_stage}
        if c.zero_stage == 3:
            zero["stage3_param_persistence_threshold"] = c.zero3_persistence_threshold
        return {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": self.gas,  # every (micro-batch × train step) backward
            "train_batch_size": c.micro_batch_size * self.gas * self.world_size,
            "gradient_clipping": c.grad_clip,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": c.lr, "betas": list(c.betas), "eps": c.adam_eps,
                                                      "weight_decay": c.weight_decay, "torch_adam": True}},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def prepare(self, model: nn.Module):
        """The DeepSpeed engine around ``model`` (only its trainable parameters are optimised)."""
        import deepspeed

        params = [p for _, p in trainable_parameters(model)]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config())
        return engine

    def gather_numpy(self, named: list[tuple[str, nn.Parameter]], bucket_numel: int = 2**26) -> dict | None:
        """Full fp32 copies of ``named`` on rank 0 (None elsewhere). Collective: all ranks must call.

        Under ZeRO-3 each rank holds 1/K of every parameter: ``GatheredParameters`` all-gathers a
        bucket (≤ bucket_numel elements) at a time, rank 0 copies it out, and leaving the context
        partitions it again, so peak memory is one bucket, not the model.
        """
        if self.cfg.zero_stage < 3:
            return state_dict_to_numpy({n: p.detach().clone() for n, p in named}) if self.rank == 0 else None
        import deepspeed

        out, bucket, size = {}, [], 0
        for i, (name, p) in enumerate(named):
            bucket.append((name, p))
            size += p.ds_numel
            if size >= bucket_numel or i == len(named) - 1:
                with deepspeed.zero.GatheredParameters([q for _, q in bucket], modifier_rank=None):
                    if self.rank == 0:  # clone: the gathered storage is freed on exit
                        out.update(state_dict_to_numpy({n: q.detach().clone() for n, q in bucket}))
                bucket, size = [], 0
        return out if self.rank == 0 else None

    def save(self, engine, path: Path, client_state: dict) -> None:
        engine.save_checkpoint(str(path / DS_SUBDIR), tag=DS_TAG, client_state=client_state)

    def load(self, engine, path: Path) -> dict:
        from rlgen.runtime.safe_load import load_checkpoint  # torch.load(weights_only=True), DeepSpeed's types only

        load_path, client_state = load_checkpoint(engine, path / DS_SUBDIR, DS_TAG)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{DS_TAG}' under {path / DS_SUBDIR}")
        return client_state or {}


class FlowLearner:
    """One data-parallel Flow-GRPO learner rank (a Ray actor: ``RayActorGroup`` applies ray.remote).

    ``batch_size`` is the global samples per iteration and ``num_sde_steps`` the SDE steps per
    trajectory: together with the config they fix DeepSpeed's accumulation count up front.
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, policy_path: str,
                 learner_cfg: LearnerConfig, algo_cfg: FlowGRPOConfig, batch_size: int, num_sde_steps: int,
                 num_threads: int = 1):
        from rlgen.models.flow import FlowPolicy

        cfg = learner_cfg
        torch.set_num_threads(max(1, num_threads))  # the actor's CPU share, not the machine's core count
        self.cfg, self.algo, self.policy_path = cfg, algo_cfg, str(policy_path)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.strategy = DeepSpeedStrategy(cfg, grad_accum_steps(cfg, batch_size, num_sde_steps), rank, world_size)
        self.strategy.init_distributed(master_addr, master_port)
        torch.manual_seed(cfg.seed)  # LoRA's random A init must agree across ranks
        policy = FlowPolicy.from_pretrained(self.policy_path, device=self.strategy.device).to(self.strategy.dtype)
        self.ref_policy = None
        if cfg.lora_rank > 0:  # the reference is the adapter-disabled base: no second copy
            apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        elif algo_cfg.kl_beta > 0:  # copied before DeepSpeed partitions (ZeRO-3) the policy
            self.ref_policy = copy.deepcopy(policy).requires_grad_(False).eval()
        self.policy = policy
        self.teacher = self._load_teacher(algo_cfg)
        self.engine = self.strategy.prepare(PolicyVelocity(policy))
        self.version = 0

    def _load_teacher(self, algo_cfg) -> nn.Module | None:
        """The frozen teacher of on-policy distillation (``algo.teacher``), or None for Flow-GRPO."""
        teacher = getattr(algo_cfg, "teacher", "")
        if not teacher:
            return None
        from rlgen.models.flow import FlowPolicy
        from rlgen.runtime.rundir import resolve_checkpoint

        model = FlowPolicy.from_pretrained(str(resolve_checkpoint(teacher)), device=self.strategy.device)
        return model.to(self.strategy.dtype).requires_grad_(False).eval()

    def get_version(self) -> int:
        return self.version

    def train(self, batch: ImageRollout) -> dict:
        """One Flow-GRPO iteration on this rank's shard: ``num_inner_epochs`` optimizer updates."""
        want = self.batch_size // self.world_size
        if len(batch) != want:
            raise ValueError(f"learner rank {self.rank} got {len(batch)} samples, configured for {want} "
                             f"(batch_size {self.batch_size} / {self.world_size} ranks)")
        # Seeded by (seed, version) alone: every rank draws the same train steps.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.version)
        metrics = flow_grpo_update(self.policy, self.ref_policy, batch, self.algo, self.cfg, self.engine, gen,
                                   self.teacher)
        self.version += 1
        return metrics

    def get_weights(self) -> tuple[int, dict[str, np.ndarray] | None]:
        """(version, trainable weights as fp32 numpy) on rank 0, (version, None) elsewhere. Collective."""
        return self.version, self.strategy.gather_numpy(trainable_parameters(self.policy))

    def local_param_numel(self) -> int:
        """Parameter elements this rank stores (under ZeRO-3, about 1/K of the model)."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.policy.parameters())

    def save(self, path: str) -> None:
        """``path``: a loadable model folder (rank 0; LoRA merged in) + ``deepspeed/`` (all ranks:
        weights and optimizer state for ``load``). Ranks must share the filesystem. Collective."""
        path = Path(path)
        _, weights = self.get_weights()
        if self.rank == 0:
            self._export(weights).save_pretrained(path)
        self.strategy.save(self.engine, path, {"version": self.version})

    def load(self, path: str) -> int:
        """Resume weights, optimizer state and version from ``save``'s folder (same K). Collective."""
        self.version = int(self.strategy.load(self.engine, Path(path)).get("version", 0))
        return self.version

    def _export(self, weights: dict[str, np.ndarray]):
        """A plain CPU FlowPolicy with the trained weights (base from policy_path under LoRA)."""
        from rlgen.models.flow import FlowPolicy

        policy = FlowPolicy.from_pretrained(self.policy_path)
        if self.cfg.lora_rank > 0:
            apply_lora(policy, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_targets)
        load_numpy_weights(policy, weights, strict=self.cfg.lora_rank == 0)
        return merge_lora(policy) if self.cfg.lora_rank > 0 else policy


class LearnerGroup:
    """K = ``learner_cfg.num_learners`` ``FlowLearner`` ranks in a placement group, driven as one.

    ``batch_size``: global samples per iteration (prompts × group size); ``num_sde_steps``: SDE
    steps per trajectory (the rollout's sde_window when 0 < window < num_steps, else num_steps).
    ``num_cpus``/``num_gpus``/``resources`` (custom Ray resources, e.g. a node label): one learner's
    Ray resources (one placement-group bundle each).
    """

    def __init__(self, policy_path: str, learner_cfg: LearnerConfig, algo_cfg: FlowGRPOConfig, *, batch_size: int,
                 num_sde_steps: int, num_cpus: float = 1.0, num_gpus: float = 0.0, num_threads: int = 0,
                 resources: dict[str, float] | None = None):
        cfg = learner_cfg
        grad_accum_steps(cfg, batch_size, num_sde_steps)  # fail here, not inside K actors
        n, threads = cfg.num_learners, num_threads or max(1, int(num_cpus))

        def make_args(rank: int, addr: str, port: int):
            return (rank, n, addr, port, str(policy_path), cfg, algo_cfg, batch_size, num_sde_steps, threads), {}

        self.group = RayActorGroup(FlowLearner, n, make_args, num_cpus=num_cpus, num_gpus=num_gpus,
                                   strategy=cfg.placement_strategy, resources=resources)
        self.version = self.group.call("get_version")[0]  # waits for every rank's init (and its errors)

    def train(self, batch: ImageRollout) -> dict:
        """Shard the batch equally over ranks, train, and merge metrics (mean; samples summed)."""
        results = self.group.call_sharded("train", batch.shard(len(self.group)))
        merged = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        merged["samples"] = sum(r["samples"] for r in results)
        self.version += 1
        return merged

    def get_weights(self) -> tuple[int, dict[str, np.ndarray]]:
        return self.group.call("get_weights")[0]  # every rank takes part (ZeRO-3 gathers); rank 0 has them

    def save(self, path: str) -> None:
        self.group.call("save", str(path))

    def load(self, path: str) -> int:
        self.version = self.group.call("load", str(path))[0]
        return self.version

    def local_param_numel(self) -> list[int]:
        return self.group.call("local_param_numel")

    def shutdown(self) -> None:
        self.group.shutdown()
