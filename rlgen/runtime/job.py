"""The RL job config: one typed dataclass per role, set from YAML and key=value overrides.

    python train_rl.py --config configs/rl/flow_grpo_shapes.yaml [key=value ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlgen.algos.flow_grpo import FlowGRPOConfig
from rlgen.config import RunConfig, register_config
from rlgen.runtime.cluster import RayConfig
from rlgen.runtime.evaluator import EvalConfig
from rlgen.runtime.flow_update import LearnerConfig
from rlgen.runtime.prompts import PromptsConfig
from rollouts.image import ImageRolloutConfig


@dataclass
class PolicyConfig:
    checkpoint: str = "rlgen/assets/flow_shapes_base"  # base model; run folder or checkpoint folder
    # When ``checkpoint`` does not exist, pretrain it first with this config (then cache it there).
    pretrain_config: str = "configs/pretrain/flow_shapes.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)


@dataclass
class ResourcesConfig:
    rollout_workers: int = 1
    rollout_cpus: float = 1.0
    rollout_gpus: float = 0.0
    reward_workers: int = 1
    reward_cpus: float = 0.5
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    # torch threads per actor; 0 = its CPU count. The synchronous pipeline runs rollouts and
    # learning one after the other, so on a small machine both roles may use every core.
    rollout_threads: int = 0
    learner_threads: int = 0
    # Custom Ray resources each actor of a role asks for, e.g. {rlgen_rollout_node: 0.01}: only
    # nodes started with `ray start --resources='{"rlgen_rollout_node": 1}'` can host that role,
    # which is how roles are spread over (or kept on) chosen nodes (docs/scaling.md).
    rollout_resources: dict[str, float] = field(default_factory=dict)
    reward_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainLoopConfig:
    iterations: int = 50
    save_every: int = 10
    keep_checkpoints: int = 3       # newest numbered checkpoints kept (checkpoints/0 always kept)
    max_minutes: float = 0.0        # 0 = no wall budget; else stop (and save) after this many minutes
    grid_every: int = 10            # sample grid of the training rollouts every N iterations
    # One-step off-policy pipeline: iteration k+1's rollouts are sampled (with the weights from
    # before update k) while the learners train on iteration k; the PPO ratio is taken against the
    # behaviour log-probs stored in the rollout, so the loss stays correct (docs/scaling.md).
    async_rollouts: bool = False
    # How weights reach the rollout workers: numpy through the object store (one copy, zero-copy
    # reads), or a broadcast in a torch.distributed group of learner rank 0 and the rollout
    # workers (NCCL on CUDA, gloo on CPU).
    weight_sync: Literal["object_store", "collective"] = "object_store"


@register_config("flow_grpo")
@dataclass
class FlowGRPOJobConfig:
    kind: str = "flow_grpo"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="flow_grpo"))
    ray: RayConfig = field(default_factory=RayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: ImageRolloutConfig = field(default_factory=ImageRolloutConfig)
    # DESIGN.md's form: ``rewards: {shapes_verifier: 1.0, clip_score: 0.5}`` (name → weight)
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes_verifier": 1.0})
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → constructor kwargs
    reward_nan: str = "error"       # error | drop: what a NaN/inf score does
    reward_timeout_s: float = 300.0  # per reward call (0 = none)
    algo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def rewards_config(self):
        from rewards.base import RewardsConfig

        return RewardsConfig(rewards=dict(self.rewards), reward_kwargs=dict(self.reward_kwargs), nan=self.reward_nan,
                             timeout_s=self.reward_timeout_s)
