"""What an algorithm is: a config dataclass, a loss on a typed batch, and the data it needs.

An algorithm is one file in rlgen/algos/ holding pure functions of tensors and one registered
:class:`Algorithm` subclass; the runtime looks it up from ``algo.name`` (a registered name, or a
user's ``module.path:ClassName``) and calls:

- on the driver, once per step: :meth:`Algorithm.advantages` (rewards → advantages; may drop rows
  that carry no signal), pure torch on the step's whole batch;
- on every learner rank: :meth:`Algorithm.setup` once (e.g. keep the teacher the runtime loaded),
  then :meth:`Algorithm.update` on the rank's shard of each step's batch.

``update`` trains through ``ctx.engine`` (the DeepSpeed engine on a learner rank, a plain torch
optimizer in unit tests): ``ctx.engine(...)`` is the trained forward (the family's train module),
``ctx.engine.backward(loss)`` accumulates, ``ctx.engine.step()`` updates the weights and returns
the global gradient norm. Each backward's loss must be its share of the *global* objective: a sum
over this rank's rows divided by ``batch.global_size`` (the engine undoes DeepSpeed's averaging
over ranks), so K ranks make exactly the update one rank makes. Randomness comes from
``batch.seed`` and each row's id (``rlgen.batches.row_generator``), never from global state.

No Ray, DeepSpeed or file I/O here: models (policy, reference, teacher) arrive in ``ctx``.
docs/algorithms.md walks through writing one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from rlgen.algos.advantages import group_advantages


@dataclass
class AlgoConfig:
    """Base of every algorithm's ``algo:`` section; ``name`` selects the algorithm."""

    name: str = ""


@dataclass
class TeacherSpec:
    """A frozen model the learner loads for the algorithm (on-policy distillation)."""

    path: str
    kind: str = "policy"            # policy: same family as the student (rlgen.models.load_model) | vllm
    eval_options: dict | None = None  # benchmark options to score the teacher with at step 0 (None = skip)


@dataclass
class LearnerContext:
    """What a learner rank hands ``Algorithm.update``."""

    policy: Any                     # the policy being trained (its parameters are the engine's)
    engine: Any                     # callable train module + backward(loss) + step() -> grad norm
    reference: Callable[[], contextlib.AbstractContextManager]  # `with ctx.reference() as ref:`
    teacher: Any = None             # what TeacherSpec asked for (a policy, or a vLLM scorer)
    rank: int = 0
    world_size: int = 1
    micro_batch_size: int = 0       # rows per forward/backward (0 = the whole shard or bucket)

    @property
    def device(self) -> torch.device:
        return self.policy.device


class Algorithm:
    """Subclass, set the class attributes, implement :meth:`update`; register with
    ``@register_algorithm("name")``."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""          # the model family it trains: "flow" | "masked_lm"
    data: ClassVar[str] = "rollouts"    # "rollouts" (online: prompts → samples → rewards) | "pairs" (offline)
    config: ClassVar[type] = AlgoConfig
    rollout_config: ClassVar[type | None] = None  # its own ``rollout:`` settings type (None: the family's)
    rollout_fields: ClassVar[tuple[str, ...]] = ()  # fields of the batch it reads (documentation + checks)
    min_group_size: ClassVar[int] = 2   # samples per prompt it needs (group-relative advantages need 2)

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg

    # -- what the runtime must provide -----------------------------------------------------------
    def uses_reference(self, lora: bool) -> bool:
        """Whether ``ctx.reference()`` is used (a frozen copy is kept only then, unless LoRA)."""
        return float(getattr(self.cfg, "kl_beta", 0.0) or 0.0) > 0

    def teacher(self) -> TeacherSpec | None:
        return None

    # -- driver side ----------------------------------------------------------------------------
    def check_job(self, job) -> None:
        """Refuse a job this algorithm cannot run, before anything starts (raise ValueError)."""

    def advantages(self, batch):
        """Group-relative advantages (GRPO); override to change or to drop rows."""
        batch.advantages = group_advantages(batch.rewards, batch.group_ids)
        return batch

    # -- learner side ---------------------------------------------------------------------------
    def setup(self, ctx: LearnerContext) -> None:
        pass

    def update(self, ctx: LearnerContext, batch) -> dict[str, float]:
        raise NotImplementedError


def register_algorithm(name: str):
    """Class decorator: ``algo.name: <name>`` in a config selects this algorithm."""
    from rlgen.registry import ALGORITHMS

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"register_algorithm({name!r}) needs an Algorithm subclass, got {cls!r}")
        cls.name = name
        ALGORITHMS.register(name, cls)
        return cls

    return deco


def get_algorithm(name: str) -> type[Algorithm]:
    """The class for ``algo.name`` (registered name, ``module.path:ClassName`` or an entry point)."""
    from rlgen.registry import ALGORITHMS

    cls = ALGORITHMS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(f"algo.name={name!r} names {cls!r}, not an rlgen.algos.base.Algorithm subclass")
    if not cls.family or cls.data not in ("rollouts", "pairs"):
        raise ValueError(f"algorithm {name!r}: set its class attributes family ('flow' | 'masked_lm') and data "
                         f"('rollouts' | 'pairs')")
    return cls


class Accumulator:
    """Sums of metrics over an update's backward passes, weighted; ``mean()`` at the end."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, float], weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
        self.weight += weight

    def mean(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}
