"""The learner group: K data-parallel DeepSpeed ranks in Ray actors, for every algorithm and family.

``LearnerGroup`` (driver side) starts K ``Learner`` actors in one placement group; each joins a
torch.distributed group (gloo on CPU, nccl on CUDA), loads the policy through its family, adds
LoRA or keeps a frozen reference copy when the algorithm needs one, loads the algorithm's teacher,
and wraps the family's train module in a DeepSpeed engine (ZeRO 0-3). ``train(batch)`` gives rank
i the i-th shard (``batch.shard(K)``) and calls the registered algorithm's ``update``; the loss
scaling in rlgen/runtime/engine.py makes K ranks take the step one rank takes
(tests/runtime/test_learner.py).

Weight sync: ``get_weights() -> (version, {name: np.ndarray})`` holds the parameters that train —
all of them under full fine-tuning, the adapter's ``lora_A``/``lora_B`` under LoRA — and rollout
workers copy them in place (rlgen/runtime/weight_sync.py). With ``train.ema`` rank 0 also keeps an
EMA of those weights (rlgen/runtime/ema.py) for evaluation and the saved policy folder.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlgen.algos.base import LearnerContext, TeacherSpec, get_algorithm
from rlgen.families import LoraSpec, family_of
from rlgen.runtime.actor_group import RayActorGroup
from rlgen.runtime.engine import DS_SUBDIR, DeepSpeedStrategy, OptimConfig, load_numpy_weights, trainable_parameters


@dataclass
class LearnerSpec:
    """Everything a learner rank needs to build itself (picklable: it travels to the actors)."""

    policy_path: str
    load_options: dict[str, Any]
    lora: LoraSpec
    algo_cfg: Any
    optim: OptimConfig
    zero_stage: int = 2
    zero3_persistence_threshold: int = 100_000
    micro_batch_size: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    num_threads: int = 1
    extra: dict = field(default_factory=dict)
    ema: Any = None                      # rlgen.runtime.ema.EmaConfig (train.ema); None or decay 0 = off


def load_teacher(spec: TeacherSpec, device, dtype, load_options: dict):
    """The frozen model an algorithm asked for: a policy of any family, or an AR LM on vLLM."""
    if spec.kind == "vllm":
        from rollouts.vllm_engine import VLLMTeacher

        return VLLMTeacher(spec.path)
    from rlgen.models import load_model

    model = load_model(spec.path, device=str(device), **with_dtype(load_options, dtype))
    return model.to(dtype).requires_grad_(False).eval()


def with_dtype(load_options: dict, dtype: torch.dtype) -> dict:
    """``load_model`` options that load the weights in ``dtype`` (not in float32 and cast after: a
    pipeline's frozen encoders would briefly need twice the memory)."""
    return {**load_options, "dtype": dtype} if dtype != torch.float32 else dict(load_options)


class Learner:
    """One data-parallel learner rank (a Ray actor: ``RayActorGroup`` applies ray.remote)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, spec: LearnerSpec):
        import rlgen  # noqa: F401  (torchvision compatibility in this process)
        from rlgen.models import load_model

        torch.set_num_threads(max(1, spec.num_threads))  # the actor's CPU share, not the machine's core count
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.strategy = DeepSpeedStrategy(spec.zero_stage, spec.optim, rank, world_size, spec.bf16,
                                          spec.zero3_persistence_threshold)
        self.strategy.init_distributed(master_addr, master_port)
        torch.manual_seed(spec.seed)  # LoRA's random A init must agree across ranks
        dev, dtype = self.strategy.device, self.strategy.dtype
        # loaded in the compute dtype (a pipeline's frozen encoders too); DeepSpeed keeps fp32 masters of what trains
        policy = load_model(spec.policy_path, device=str(dev), **with_dtype(spec.load_options, dtype)).to(dtype)
        self.family = family_of(policy)
        self.algo = get_algorithm(spec.algo_cfg.name)(spec.algo_cfg)
        self.ref_policy = None
        if spec.lora.enabled:  # the reference is the adapter-disabled base: no second copy
            self.family.add_lora(policy, spec.lora)
        elif self.algo.uses_reference(False):  # copied before DeepSpeed partitions (ZeRO-3) the policy
            self.ref_policy = copy.deepcopy(policy).requires_grad_(False).eval()
        if spec.gradient_checkpointing:
            self.family.enable_gradient_checkpointing(policy)
        self.policy = policy
        t = self.algo.teacher()
        teacher = load_teacher(t, dev, dtype, spec.load_options) if t is not None else None
        self.engine = self.strategy.prepare(self.family.train_module(policy))
        self.ctx = LearnerContext(policy, self.engine, self._reference, teacher, rank, world_size,
                                  spec.micro_batch_size)
        self.algo.setup(self.ctx)
        self.version = 0
        self._export = None
        self.ema = None  # rank 0 only: the other ZeRO <= 2 ranks hold the same parameters
        if spec.ema is not None and spec.ema.enabled and rank == 0:
            from rlgen.runtime.ema import PolicyEma

            self.ema = PolicyEma(trainable_parameters(self.policy), spec.ema)

    def _reference(self):
        if self.spec.lora.enabled:
            return self.family.adapters_disabled(self.policy)
        if self.ref_policy is None:
            raise ValueError(f"algorithm {self.algo.name} asked for the reference policy but uses_reference() "
                             f"said it would not")
        return contextlib.nullcontext(self.ref_policy)

    def get_version(self) -> int:
        return self.version

    def train(self, batch) -> dict:
        """One step of the algorithm on this rank's shard."""
        every = getattr(self.spec.algo_cfg, "ref_refresh_every", 0)
        if every and self.version and self.version % every == 0:
            self._refresh_reference()  # here, not after the update: a resumed rank does the same
        metrics = self.algo.update(self.ctx, batch)
        self.version += 1
        if self.ema is not None:
            self.ema.update(trainable_parameters(self.policy), self.version)
        return metrics

    def _refresh_reference(self) -> None:
        """The reference becomes the policy (d1's periodic sync; a full copy, ZeRO <= 2: set-up refuses others)."""
        with torch.no_grad():
            for r, p in zip(self.ref_policy.parameters(), self.policy.parameters(), strict=True):
                r.copy_(p.detach())

    def get_reference_weights(self) -> dict[str, np.ndarray] | None:
        """The frozen reference copy's weights (None when the reference is the adapter-disabled base)."""
        if self.ref_policy is None:
            return None
        return {n: p.detach().float().cpu().numpy() for n, p in self.ref_policy.named_parameters()}

    def get_weights(self) -> tuple[int, dict[str, np.ndarray] | None]:
        """(version, trainable weights as fp32 numpy) on rank 0, (version, None) elsewhere. Collective."""
        return self.version, self.strategy.gather_numpy(trainable_parameters(self.policy))

    def get_ema_weights(self) -> dict[str, np.ndarray] | None:
        """The EMA of the trainable weights (fp32 numpy) on rank 0; None elsewhere or with the EMA off."""
        return self.ema.numpy() if self.ema is not None else None

    def local_param_numel(self) -> int:
        """Parameter elements this rank stores (under ZeRO-3, about 1/K of the model)."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.policy.parameters())

    def save(self, path: str, ship: bool = False) -> dict[str, bytes] | None:
        """``path``: a policy folder ``load_model`` loads on its own (rank 0) + ``deepspeed/`` (all
        ranks: trainable weights and optimizer state, for ``load``). Collective. ``ship``: the
        driver's disk is not this node's; write into a local temp folder and return its files
        (``{relative path: bytes}``) for the driver to write (rlgen/runtime/storage.py)."""
        import shutil
        import tempfile

        from rlgen.runtime.storage import read_tree

        path = Path(tempfile.mkdtemp(prefix="rlgen-save-")) if ship else Path(path)
        try:
            _, weights = self.get_weights()
            if self.rank == 0:  # the policy folder holds the EMA when there is one (what Flow-GRPO saves)
                self.family.save(self._export_policy(self.ema.numpy() if self.ema else weights), path,
                                 self.spec.lora)
            self.strategy.save(self.engine, path, {"version": self.version})  # the raw weights, for a resume
            if getattr(self.spec.algo_cfg, "ref_refresh_every", 0) and self.rank == 0:
                self._save_reference(path)
            if self.ema is not None:
                self.ema.save(path / DS_SUBDIR)
            return read_tree(path) if ship else None
        finally:
            if ship:
                shutil.rmtree(path, ignore_errors=True)

    def _export_policy(self, weights: dict[str, np.ndarray]):
        """A CPU fp32 copy of the policy holding ``weights`` (loaded once; ZeRO-3 ranks hold shards)."""
        from rlgen.models import load_model

        if self._export is None:
            self._export = load_model(self.spec.policy_path, device="cpu", **self.spec.load_options).float()
            if self.spec.lora.enabled:
                self.family.add_lora(self._export, self.spec.lora)
        load_numpy_weights(self._export, weights, strict=not self.spec.lora.enabled)
        return self._export

    def load(self, path: str, files: dict[str, bytes] | None = None) -> int:
        """Resume trainable weights, optimizer state and version from ``save``'s folder (same K), or
        from ``files`` (its ``deepspeed/`` files, sent by a driver on another node). Collective."""
        import shutil
        import tempfile

        from rlgen.runtime.storage import write_tree

        if files is not None:
            path = tempfile.mkdtemp(prefix="rlgen-load-")
            write_tree(files, Path(path))
        try:
            self.version = int(self.strategy.load(self.engine, Path(path)).get("version", 0))
            if getattr(self.spec.algo_cfg, "ref_refresh_every", 0):
                self._load_reference(Path(path))
            if self.ema is not None:
                self.ema.load(Path(path) / DS_SUBDIR)
        finally:
            if files is not None:
                shutil.rmtree(path, ignore_errors=True)
        return self.version


    def _save_reference(self, path: Path) -> None:
        """A refreshed reference is state a resumed run needs (safetensors: loading runs no code)."""
        from safetensors.torch import save_file

        from rlgen.runtime.engine import DS_SUBDIR

        state = {n: p.detach().contiguous().cpu() for n, p in self.ref_policy.named_parameters()}
        save_file(state, str(Path(path) / DS_SUBDIR / REFERENCE_FILE))

    def _load_reference(self, path: Path) -> None:
        from safetensors.torch import load_file

        from rlgen.runtime.engine import DS_SUBDIR

        f = path / DS_SUBDIR / REFERENCE_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a run with algo.ref_refresh_every resumes its reference from it")
        state = load_file(str(f))
        with torch.no_grad():
            for n, p in self.ref_policy.named_parameters():
                p.copy_(state[n])


REFERENCE_FILE = "reference.safetensors"


class LearnerDied(RuntimeError):
    """A learner rank's process is gone (SIGKILL, OOM killer, a lost node): the update, and the
    DeepSpeed group it belonged to, cannot go on; the message names the rank, its pid and the call."""


def describe_death(err: Exception, group: RayActorGroup, method: str) -> str:
    import re

    rank = group.rank_of(getattr(err, "actor_id", None))
    pid = re.search(r"\bpid: (\d+)", str(err))
    who = f"learner rank {rank}" if rank is not None else "a learner rank"
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    first = re.split(r"(?<=\.)\s", lines[0])[0].rstrip(".")  # Ray's first sentence; the rest is a report
    return f"{who} (Learner actor{', pid ' + pid.group(1) if pid else ''}) died during {method}(): {first[:160]}"


class LearnerGroup:
    """K ``Learner`` ranks in a placement group, driven as one.

    ``num_cpus``/``num_gpus``/``resources`` (custom Ray resources, e.g. a node label): one learner's
    Ray resources (one placement-group bundle each).
    """

    def __init__(self, spec: LearnerSpec, num_learners: int, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 strategy: str = "PACK", resources: dict[str, float] | None = None):
        def make_args(rank: int, addr: str, port: int):
            return (rank, num_learners, addr, port, spec), {}

        self.group = RayActorGroup(Learner, num_learners, make_args, num_cpus=num_cpus, num_gpus=num_gpus,
                                   strategy=strategy, resources=resources)
        self.version = self._call("get_version")[0]  # waits for every rank's init (and its errors)

    def train(self, batch) -> dict:
        """Shard the batch over ranks, train, and merge metrics (means over the ranks that report them)."""
        results = self._call("train", batch.shard(len(self.group)), sharded=True)
        keys = sorted({k for r in results for k in r})
        merged = {k: float(np.mean([r[k] for r in results if k in r])) for k in keys}
        if "samples" in merged:
            merged["samples"] = sum(r.get("samples", 0) for r in results)
        self.version += 1
        return merged

    def get_weights(self) -> tuple[int, dict[str, np.ndarray]]:
        return self._call("get_weights")[0]  # every rank takes part (ZeRO-3 gathers); rank 0 has them

    def save(self, path: str, ship: bool = False) -> None:
        """Every rank writes its part of the checkpoint into ``path``; with ``ship`` (ranks on nodes
        that do not share the driver's disk) they return their files and the driver writes them."""
        from rlgen.runtime.storage import write_tree

        for files in self._call("save", str(path), ship):
            if files:
                write_tree(files, Path(path))

    def load(self, path: str, ship: bool = False) -> int:
        files = None
        if ship:  # each rank gets the DeepSpeed files (its own shard among them) through Ray
            from rlgen.runtime.engine import DS_SUBDIR
            from rlgen.runtime.storage import read_tree

            files = {f"{DS_SUBDIR}/{k}": v for k, v in read_tree(Path(path) / DS_SUBDIR).items()}
        self.version = self._call("load", str(path), files)[0]
        return self.version

    def get_ema_weights(self) -> dict[str, np.ndarray] | None:
        return self._call("get_ema_weights")[0]

    def local_param_numel(self) -> list[int]:
        return self._call("local_param_numel")

    def get_reference_weights(self) -> dict[str, np.ndarray] | None:
        return self._call("get_reference_weights")[0]

    def _call(self, method: str, *args, sharded: bool = False) -> list:
        """Every rank runs ``method``; a rank that died is a ``LearnerDied`` at once (not a hang in
        the collective the other ranks wait in)."""
        import ray

        try:
            return self.group.call_sharded(method, *args) if sharded else self.group.call(method, *args)
        except ray.exceptions.RayActorError as e:
            raise LearnerDied(describe_death(e, self.group, method)) from None

    def shutdown(self) -> None:
        self.group.shutdown()
