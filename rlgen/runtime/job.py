"""The training job config (``train_rl.py``): one vocabulary for every algorithm and model family.

    python train_rl.py --config configs/rl/flow_grpo_shapes.yaml [key=value ...]

Sections: ``run`` (folder, seed, resume), ``ray``, ``resources`` (actors per role), ``policy`` (the
starting model, LoRA, load options), ``algo`` (``algo.name`` picks a registered algorithm and
the type of the rest of the section), ``prompts`` (online jobs: what rollouts are conditioned on),
``pairs`` (offline jobs: preference pairs), ``rollout`` (the family's sampler settings),
``rewards`` (name → weight) with ``reward_kwargs``/``reward_nan``/``reward_timeout_s``,
``learner`` (DeepSpeed ranks), ``optim`` (AdamW), ``train`` (the loop), ``eval`` (a registered
benchmark, with the options ``python -m rlgen.evaluate --set`` takes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlgen.algos.base import AlgoConfig
from rlgen.config import FieldError, check_choice, check_range, register_config
from rlgen.runtime.rundir import RunConfig
from rlgen.data.text_dataset import TextDatasetConfig
from rlgen.families import LoraSpec
from rlgen.models.hf_lm import ConventionOptions
from rlgen.runtime.cluster import RayConfig
from rlgen.runtime.ema import EmaConfig
from rlgen.runtime.engine import OptimConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PolicyConfig:
    checkpoint: str = ""               # rlgen checkpoint/run folder, diffusers pipeline folder, HF model folder
    # Only when set: a missing ``checkpoint`` is pretrained first with this config (and cached there);
    # otherwise a missing checkpoint is an error naming the path.
    pretrain_config: str = ""
    pretrain_overrides: list[str] = field(default_factory=list)
    trust_remote_code: bool = False    # let a Hugging Face folder's own Python code run (never read from files)
    mask_token_id: int | None = None   # masked LMs: the [MASK] id when neither tokenizer nor config names it
    dtype: str = "float32"             # learner/rollout compute dtype on CUDA (CPU always computes in float32)
    gradient_checkpointing: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    # masked LMs: the model's conventions (attention, shift_logits, block_size, attention_mask_format;
    # unset = detected from the folder), rlgen.models.hf_lm.ConventionOptions
    lm: ConventionOptions = field(default_factory=ConventionOptions)
    options: dict[str, Any] = field(default_factory=dict)  # the family's own load options

    def __post_init__(self):
        check_choice(self, "dtype", DTYPES)

    def load_options(self) -> dict:
        """What ``rlgen.models.load_model`` gets besides the path and device: every process that loads
        the policy (rollout workers, learners, teachers, evaluation, pair preparation) loads it alike."""
        opts = {**self.options, **self.lm.given()}
        if self.trust_remote_code:
            opts["trust_remote_code"] = True
        if self.mask_token_id is not None:
            opts["mask_token_id"] = self.mask_token_id
        if self.dtype != "float32":  # loaded in it on GPUs (no float32 copy first); float32 on CPUs
            opts.update(dtype=self.dtype, float32_on_cpu=True)
        return opts


@dataclass
class PromptsConfig:
    """Online jobs: where each step's prompts come from (a pure function of seed and step)."""

    source: str = "shapes"            # shapes | fashion_mnist | file | dataset | a text task (arith, countdown, sudoku)
    file: str = ""                    # source=file: one prompt per line
    tasks: list[str] = field(default_factory=list)  # shapes task types / text task levels; [] = the default mix
    per_step: int = 8                 # distinct prompts per step
    group_size: int = 8               # samples per prompt (G)
    exclude_unseen: bool = False      # source=shapes: never draw the captions of the benchmark's
    #                                   prompt_set=unseen (rlgen.data.shapes_heldout)
    # source=dataset: a text dataset (JSONL/parquet/datasets folder/Hub id) whose other columns reach
    # the rewards as keyword arguments (rlgen.data.text_dataset.TextDatasetConfig)
    dataset: TextDatasetConfig = field(default_factory=TextDatasetConfig)

    def __post_init__(self):
        check_range(self, "per_step", lo=1)
        check_range(self, "group_size", lo=1)
        if self.source == "dataset" and not self.dataset.path:
            raise FieldError("dataset.path", "is required when prompts.source=dataset (a JSONL/parquet file, a "
                                             "datasets folder or a Hub id)")
        if self.exclude_unseen and self.source != "shapes":
            raise FieldError("exclude_unseen", f"holds out shapes captions; prompts.source is {self.source!r}")
        if self.source != "dataset" and self.dataset.path:
            raise FieldError("source", f"must be 'dataset' when prompts.dataset.path is set, got {self.source!r}")


@dataclass
class PairBuildConfig:
    """Used only when ``pairs.path`` does not exist: build it from the policy (python -m rlgen.pairs)."""

    rewards: dict[str, float] = field(default_factory=dict)  # empty = never build
    prompts: str = ""               # file, or SOURCE:N (shapes:256, arith:512)
    samples_per_prompt: int = 8
    strategy: str = "best_worst"    # best_worst | ranked
    margin: float = 0.0
    num_steps: int = 20             # images: sampling steps
    cfg: float = 1.0                # images: guidance
    noise_level: float = 0.0        # images: 0 = ODE
    temperature: float = 1.0        # text: sampling temperature
    seed: int = 0


@dataclass
class PairsConfig:
    """Offline jobs: the preference pairs (rlgen/data/pairs.py)."""

    path: str = ""                  # pairs.jsonl / .parquet, or a folder holding pairs.jsonl
    on_error: str = "strict"        # strict: stop at the first malformed row | skip: drop and count
    image_root: str = ""            # images named by the pairs file live here ("" = the pairs file's folder)
    per_step: int = 16              # pairs per optimizer update
    batch: int = 16                 # pairs that are ordered together (one prompt length for text)
    build: PairBuildConfig = field(default_factory=PairBuildConfig)

    def __post_init__(self):
        check_choice(self, "on_error", ("strict", "skip"))
        check_range(self, "per_step", lo=1)
        check_range(self, "batch", lo=1)
        if self.per_step % self.batch:
            raise FieldError("per_step", f"({self.per_step}) must be a multiple of pairs.batch ({self.batch})")


@dataclass
class ResourcesConfig:
    rollout_workers: int = 1
    rollout_cpus: float = 1.0
    rollout_gpus: float = 0.0
    reward_workers: int = 1
    reward_cpus: float = 0.5
    reward_gpus: float = 0.0          # a reward model on the GPU (PickScore, HPSv2: reward_kwargs {name: {device: cuda}})
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    # torch threads per actor; 0 = its CPU count. The synchronous pipeline runs rollouts and
    # learning one after the other, so on a small machine both roles may use every core.
    rollout_threads: int = 0
    learner_threads: int = 0
    # Custom Ray resources each actor of a role asks for, e.g. {rlgen_rollout_node: 0.01}: only
    # nodes started with `ray start --resources='{"rlgen_rollout_node": 1}'` can host that role.
    rollout_resources: dict[str, float] = field(default_factory=dict)
    reward_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("rollout_workers", "reward_workers"):
            check_range(self, name, lo=1)
        for name in ("rollout_cpus", "reward_cpus", "learner_cpus", "rollout_gpus", "reward_gpus", "learner_gpus",
                     "rollout_threads", "learner_threads"):
            check_range(self, name, lo=0)


@dataclass
class LearnerConfig:
    num_learners: int = 1               # data-parallel DeepSpeed ranks
    zero_stage: int = 2                 # ZeRO stage 0-3
    zero3_persistence_threshold: int = 100_000  # ZeRO-3 keeps parameters smaller than this whole on each rank
    micro_batch_size: int = 0           # rows per forward/backward on one rank; 0 = a whole shard (or bucket)
    placement_strategy: str = "PACK"    # Ray placement-group strategy (PACK, SPREAD, STRICT_PACK …)

    def __post_init__(self):
        check_range(self, "num_learners", lo=1)
        check_choice(self, "zero_stage", (0, 1, 2, 3))
        check_range(self, "micro_batch_size", lo=0)
        check_choice(self, "placement_strategy", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class TrainConfig:
    """The loop: one step = one batch of rollouts (or pairs) and the algorithm's update on it."""

    steps: int = 50
    save_every: int = 10           # 0 = only at the end
    keep_checkpoints: int = 3      # newest numbered checkpoints kept (checkpoints/0 always kept)
    max_minutes: float = 0.0       # 0 = no wall budget; else stop (eval, save) after this many minutes
    grid_every: int = 10           # image jobs: a grid of the training rollouts every N steps (0 = never)
    log_every: int = 1             # offline jobs: metrics every N steps
    # One-step off-policy pipeline: step k+1's rollouts are sampled (with the weights from before
    # update k) while the learners train on step k (docs/scaling.md).
    async_rollouts: bool = False
    # How weights reach the rollout workers: numpy through the object store, or a broadcast in a
    # torch.distributed group of learner rank 0 and the rollout workers (NCCL on CUDA, gloo on CPU).
    weight_sync: Literal["object_store", "collective"] = "object_store"
    # An EMA of the trainable weights (Flow-GRPO's SD3 recipes: decay 0.9, every 8): evaluation and
    # the checkpoints' policy folders use it; training and rollouts use the raw policy (rlgen/runtime/ema.py).
    ema: EmaConfig = field(default_factory=EmaConfig)

    def __post_init__(self):
        check_range(self, "steps", lo=1)
        for name in ("save_every", "keep_checkpoints", "grid_every", "log_every"):
            check_range(self, name, lo=0)
        check_range(self, "max_minutes", lo=0)


@dataclass
class EvalConfig:
    """Held-out evaluation with a registered benchmark (the same code as ``python -m rlgen.evaluate``)."""

    benchmark: str = ""            # shapes | fashion_mnist | arith | countdown | sudoku | "" (none)
    every: int = 10                # steps between evaluations; always at the start and end; 0 = only those
    seed: int = 1234
    samples_per_prompt: int = 0    # 0 = the benchmark's default
    pass_k: int = 0                # text: at start and end also sample k per problem at temperature 1
    prompts: str = ""              # a prompts file (image benchmarks; "" = the built-in held-out set)
    problems: str = ""             # a problems file (text benchmarks)
    batch_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)  # the benchmark's --set options (steps, cfg …)

    def __post_init__(self):
        for name in ("every", "samples_per_prompt", "pass_k"):
            check_range(self, name, lo=0)
        check_range(self, "batch_size", lo=1)


@register_config("train")
@dataclass
class JobConfig:
    kind: str = "train"
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    rollout: Any = None            # the family's rollout config (ImageRolloutConfig | TextRolloutConfig)
    # DESIGN.md's form: ``rewards: {shapes_verifier: 1.0, clip_score: 0.5}`` (name → weight)
    rewards: dict[str, float] = field(default_factory=dict)
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → constructor kwargs
    reward_nan: str = "error"      # error | drop: what a NaN/inf or None score does
    reward_timeout_s: float = 300.0  # per reward call (0 = none)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @staticmethod
    def __config_types__(data: dict) -> dict:
        """``algo``'s dataclass from ``algo.name``; ``rollout``'s from the algorithm's model family."""
        from rlgen.algos.base import get_algorithm
        from rlgen.families import get_family

        name = (data.get("algo") or {}).get("name") if isinstance(data.get("algo"), dict) else None
        if not name:
            raise ValueError("algo.name is required (a registered algorithm: flow_grpo, mdm_grpo, diffusion_dpo, "
                             "vrpo, flow_opd, mdm_opd, reinforce; or module.path:ClassName)")
        algo = get_algorithm(name)
        return {"algo": algo.config, "rollout": algo.rollout_config or get_family(algo.family).rollout_config}

    def __post_init__(self):
        from rlgen.algos.base import get_algorithm
        from rlgen.families import get_family

        if not self.algo.name:
            raise FieldError("algo.name", "is required (algo.name=flow_grpo, mdm_grpo, …)")
        algo = get_algorithm(self.algo.name)
        if self.rollout is None:
            self.rollout = (algo.rollout_config or get_family(algo.family).rollout_config)()
        check_choice(self, "reward_nan", ("error", "drop"))
        check_range(self, "reward_timeout_s", lo=0)
        if self.train.ema.enabled and self.learner.zero_stage == 3:  # rank 0 averages the full parameters it holds
            raise FieldError("train.ema.decay", f"an EMA ({self.train.ema.decay}) needs the full parameters on learner "
                                                f"rank 0: not with learner.zero_stage=3 (use 0-2)")
        if not self.policy.checkpoint:
            raise FieldError("policy.checkpoint", "is empty: name the starting model (a folder or Hub id)")
        if algo.data == "rollouts":
            if not self.rewards:
                raise FieldError("rewards", "is empty: name at least one reward (rewards={name: weight})")
            if self.prompts.group_size < algo.min_group_size:
                raise FieldError("prompts.group_size", f"must be >= {algo.min_group_size} for {self.algo.name} "
                                                      f"(group-relative advantages of a single sample are all 0), "
                                                      f"got {self.prompts.group_size}")
        elif not self.pairs.path:
            raise FieldError("pairs.path", f"is empty: {self.algo.name} learns from a pairs file (pairs.jsonl)")

    def rewards_config(self):
        from rewards.base import RewardsConfig

        return RewardsConfig(rewards=dict(self.rewards), reward_kwargs=dict(self.reward_kwargs), nan=self.reward_nan,
                             timeout_s=self.reward_timeout_s)
