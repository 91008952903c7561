"""Training engines behind one surface: DeepSpeed (every learner rank) and plain torch (unit tests).

An algorithm trains through ``engine(...)`` (the trained forward), ``engine.backward(loss)`` and
``engine.step() -> grad norm`` (rlgen/algos/base.py). The accumulation boundary is the caller's:
any number of backwards, then one ``step`` — DeepSpeed's unmanaged gradient accumulation
(``managed_gradient_accumulation: false``), so an update may span a variable number of passes
(text buckets, filtered groups) without a fixed ``gradient_accumulation_steps``.

Scaling: each backward's loss is its share of the *global* objective (a sum over this rank's rows
divided by the step's global row count). DeepSpeed averages gradients over the K data-parallel
ranks, so :class:`DeepSpeedEngine` multiplies by K first: K ranks make the update one rank makes.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlgen.batches import state_dict_to_numpy
from rlgen.config import check_range

DS_SUBDIR, DS_TAG = "deepspeed", "state"


@dataclass
class OptimConfig:
    """``optim:`` — AdamW, as every rlgen learner uses it."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0          # global grad-norm clip at each update (0 = off)

    def __post_init__(self):
        check_range(self, "lr", lo=0, lo_open=True)
        check_range(self, "weight_decay", lo=0)
        check_range(self, "eps", lo=0, lo_open=True)
        check_range(self, "grad_clip", lo=0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            from rlgen.config import FieldError

            raise FieldError("betas", f"must be two numbers in [0, 1), got {self.betas}")


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class TorchEngine:
    """``backward``/``step`` on a plain torch AdamW, with the engine surface (one process)."""

    def __init__(self, module: nn.Module, cfg: OptimConfig):
        self.module, self.grad_clip = module, cfg.grad_clip
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3) with the surface above; ``ds`` is DeepSpeed's own."""

    def __init__(self, ds_engine, world_size: int):
        self.ds, self.world_size = ds_engine, world_size

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)  # through the engine: ZeRO-3 gathers parameters in its forward

    def backward(self, loss: torch.Tensor) -> None:
        # multiplying by 1.0 is exact, but skip it so a one-rank run does the very same float ops
        self.ds.backward(loss * self.world_size if self.world_size > 1 else loss)

    def step(self) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)


class DeepSpeedStrategy:
    """DeepSpeed behind one object: process group, engine config, ZeRO-3 gathering, checkpoints."""

    def __init__(self, zero_stage: int, optim: OptimConfig, rank: int, world_size: int, bf16: bool = False,
                 zero3_persistence_threshold: int = 100_000):
        self.zero_stage, self.optim, self.rank, self.world_size = zero_stage, optim, rank, world_size
        self.bf16, self.persistence = bf16, zero3_persistence_threshold
        self.cuda = torch.cuda.is_available()

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        from rlgen.runtime.rendezvous import init_process_group  # loopback store + gloo when the master is local

        # One process per actor: Ray shows each actor only its own GPU, so the local rank is 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if not self.cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.cuda:
            torch.cuda.set_device(0)
        backend = "nccl" if self.cuda else "gloo"
        init_process_group(master_addr, master_port, self.rank, self.world_size, backend)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.cuda else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 and self.cuda else torch.float32

    def ds_config(self) -> dict:
        o = self.optim
        zero = {"stage": self.zero_stage}
        if self.zero_stage == 3:
            zero["stage3_param_persistence_threshold"] = self.persistence
        return {
            # the caller owns the accumulation boundary (module docstring); sizes only label logs
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.world_size,
            "managed_gradient_accumulation": False,
            "gradient_clipping": o.grad_clip,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                      "weight_decay": o.weight_decay, "torch_adam": True}},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def prepare(self, model: nn.Module) -> DeepSpeedEngine:
        """The engine around ``model`` (only its trainable parameters are optimised)."""
        import deepspeed

        params = [p for _, p in trainable_parameters(model)]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config())
        return DeepSpeedEngine(engine, self.world_size)

    def gather_numpy(self, named: list[tuple[str, nn.Parameter]], bucket_numel: int = 2**26) -> dict | None:
        """Full fp32 copies of ``named`` on rank 0 (None elsewhere). Collective: all ranks must call.

        Under ZeRO-3 each rank holds 1/K of every parameter: ``GatheredParameters`` all-gathers a
        bucket (≤ bucket_numel elements) at a time, rank 0 copies it out, and leaving the context
        partitions it again, so peak memory is one bucket, not the model.
        """
        if self.zero_stage < 3:
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

    def save(self, engine: DeepSpeedEngine, path: Path, client_state: dict) -> None:
        # frozen parameters (a LoRA base, the text encoders of a pipeline) are in the policy folder
        engine.ds.save_checkpoint(str(path / DS_SUBDIR), tag=DS_TAG, client_state=client_state,
                                  exclude_frozen_parameters=True)

    def load(self, engine: DeepSpeedEngine, path: Path) -> dict:
        """Trainable weights, optimizer state and client state, without unpickling arbitrary objects
        (rlgen/runtime/safe_load.py); frozen parameters are not in the checkpoint: not strict."""
        from rlgen.runtime.safe_load import load_checkpoint

        load_path, client_state = load_checkpoint(engine.ds, path / DS_SUBDIR, DS_TAG, load_module_strict=False)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{DS_TAG}' under {path / DS_SUBDIR}")
        return client_state or {}


def load_numpy_weights(module: nn.Module, state: dict[str, np.ndarray], strict: bool = True) -> None:
    """Copy ``state`` into ``module``'s parameters in place (same tensors, no reallocation).

    Every key must name a parameter of the same shape (dtype/device are converted). ``strict``:
    every parameter must be given; ``strict=False`` allows a subset (a LoRA adapter's weights).
    Nothing is copied unless all keys and shapes check out.
    """
    import warnings

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
