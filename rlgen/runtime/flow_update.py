"""One learner rank's Flow-GRPO update on an ``ImageRollout``: pure torch plus an ``engine``.

The engine is anything with DeepSpeed's training surface around a :class:`PolicyVelocity`:
``engine(prompts, x, sigma, cfg_scale)`` (the forward), ``backward(loss)`` (scales by
1/gradient_accumulation_steps), ``step()`` (updates the weights only at the accumulation boundary),
``gradient_accumulation_steps()`` and ``get_global_grad_norm()``. The learner actor passes a
DeepSpeed engine; tests and the single-process path pass :class:`TorchEngine`. The trained forward
must go through the engine: DeepSpeed does per-micro-step bookkeeping in ``engine.forward`` (ZeRO-3
overwrites instead of accumulating gradients without it).

An inner epoch shuffles the rank's samples and splits them into ``num_minibatches`` mini-batches,
one optimizer update each (PPO-style; 1 = one update per epoch). Every (micro-batch × train step)
pair of a mini-batch is one backward and the engine accumulates them all, so each update follows
the gradient of the mean per-step loss over the mini-batch's samples and the iteration's train
steps. Later mini-batches are scored by an already-moved policy, so the ratio and its clip matter
even in the first epoch. DeepSpeed's ``gradient_accumulation_steps`` must therefore equal
:func:`grad_accum_steps` (checked here), which is fixed by config.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from rlgen.algos.flow_grpo import FlowGRPOConfig, step_loss
from rlgen.algos.opd import image_step_loss
from rlgen.runtime.batches import ImageRollout
from rlgen.samplers.flow import sde_step

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the backbone's attention projections


@dataclass
class LearnerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # global grad-norm clip at each optimizer update (0 = off)
    micro_batch_size: int = 4           # samples per forward/backward on one rank
    num_inner_epochs: int = 1           # passes over each rollout batch (each reshuffles)
    num_minibatches: int = 1            # optimizer updates per pass: the rank's samples split this many ways
    timestep_fraction: float = 1.0      # train on this fraction of the SDE steps (same subset per iteration)
    zero_stage: int = 2                 # DeepSpeed ZeRO stage 0-3
    zero3_persistence_threshold: int = 100_000  # ZeRO-3 keeps parameters smaller than this whole on each rank
    num_learners: int = 1               # data-parallel learner ranks
    placement_strategy: str = "PACK"    # Ray placement-group strategy (PACK, SPREAD, STRICT_PACK …)
    bf16: bool = False                  # bf16 weights on CUDA; CPU always trains in fp32
    seed: int = 0
    lora_rank: int = 0                  # 0 = full fine-tuning; > 0 = LoRA on lora_targets of the backbone
    lora_alpha: float = 0.0             # 0 = lora_rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self):
        if min(self.micro_batch_size, self.num_inner_epochs, self.num_learners, self.num_minibatches) < 1:
            raise ValueError("micro_batch_size, num_inner_epochs, num_minibatches and num_learners must be >= 1")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")


# ----------------------------------------------------------------------------------------------
# Batch geometry: fixed by config, so DeepSpeed's accumulation count can be set up front
# ----------------------------------------------------------------------------------------------
def num_train_steps(num_sde_steps: int, timestep_fraction: float) -> int:
    """How many of an iteration's SDE steps are trained on (Flow-GRPO: int(S·fraction), at least 1)."""
    return max(1, min(num_sde_steps, int(num_sde_steps * timestep_fraction + 1e-9)))


def grad_accum_steps(cfg: LearnerConfig, batch_size: int, num_sde_steps: int) -> int:
    """Backwards per optimizer update on one rank: micro-batches per mini-batch × train steps.

    ``batch_size`` is the global samples per iteration (prompts × G), ``num_sde_steps`` the
    stochastic steps per trajectory (rollout num_steps, or its sde_window).
    """
    per_rank, rem = divmod(batch_size, cfg.num_learners)
    if rem or per_rank % cfg.micro_batch_size or per_rank == 0:
        raise ValueError(f"a batch of {batch_size} samples must split into {cfg.num_learners} learner shards "
                         f"of a multiple of micro_batch_size={cfg.micro_batch_size} samples")
    micro = per_rank // cfg.micro_batch_size
    if micro % cfg.num_minibatches:
        raise ValueError(f"{micro} micro-batches of {cfg.micro_batch_size} per learner do not split into "
                         f"num_minibatches={cfg.num_minibatches} equal mini-batches")
    return micro // cfg.num_minibatches * num_train_steps(num_sde_steps, cfg.timestep_fraction)


def choose_train_steps(sde_mask: torch.Tensor, timestep_fraction: float, generator: torch.Generator) -> list[int]:
    """Sorted step indices to train on: a random subset of the SDE steps (one per iteration)."""
    sde = torch.nonzero(sde_mask.cpu()).flatten()  # (S_sde,)
    if len(sde) == 0:
        raise ValueError("the rollout has no SDE steps (sde_mask is all False): nothing to train on")
    k = num_train_steps(len(sde), timestep_fraction)
    pick = torch.randperm(len(sde), generator=generator)[:k]
    return sorted(sde[pick].tolist())


# ----------------------------------------------------------------------------------------------
# What the engine wraps, and a DeepSpeed-shaped engine for one process
# ----------------------------------------------------------------------------------------------
class PolicyVelocity(nn.Module):
    """The module an engine wraps: its forward is the policy's (CFG-combined) velocity.

    ``forward(prompts (b,), x (b, C, H, W), sigma (b,), cfg_scale) -> v (b, C, H, W)``; prompts are
    encoded inside, so the text encoder trains too. Parameters are the policy's own (``policy.*``).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, prompts, x: torch.Tensor, sigma: torch.Tensor, cfg_scale: float = 1.0) -> torch.Tensor:
        return self.policy.velocity_fn(prompts, cfg_scale)(x, sigma)


class TorchEngine:
    """``backward``/``step`` with DeepSpeed's accumulation semantics, on a plain torch optimizer.

    ``backward(loss)`` back-propagates ``loss / gas``; every ``gas``-th ``step()`` clips the global
    grad norm, steps the optimizer and zeroes the gradients.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, gradient_accumulation_steps: int,
                 grad_clip: float = 0.0):
        self.module, self.optimizer = module, optimizer
        self.gas, self.grad_clip = int(gradient_accumulation_steps), grad_clip
        self.micro_steps, self.global_steps = 0, 0
        self._grad_norm: float | None = None

    @classmethod
    def adamw(cls, policy: nn.Module, cfg: LearnerConfig, gradient_accumulation_steps: int) -> "TorchEngine":
        """AdamW on the policy's trainable parameters, as the DeepSpeed config sets it up."""
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        return cls(PolicyVelocity(policy), opt, gradient_accumulation_steps, cfg.grad_clip)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.gas:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm


# ----------------------------------------------------------------------------------------------
# LoRA on the backbone (peft through diffusers' adapter API)
# ----------------------------------------------------------------------------------------------
def _diffusers_model(policy: nn.Module) -> nn.Module:
    """The diffusers model inside the policy's backbone (UNet2DConditionModel, SD3Transformer…)."""
    for child in policy.backbone.children():
        if hasattr(child, "add_adapter"):
            return child
    raise TypeError(f"{type(policy.backbone).__name__} holds no diffusers model with add_adapter()")


def apply_lora(policy: nn.Module, rank: int, alpha: float = 0.0, targets: list[str] | None = None) -> nn.Module:
    """Freeze the policy and add a trainable LoRA adapter ("default") to the backbone's ``targets``.

    peft initialises B = 0, so the adapted model starts equal to the base. Rollout workers call
    this too, so that the learner's adapter weights (``get_weights``) load by name.
    """
    from peft import LoraConfig

    policy.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets or LORA_TARGETS),
                      init_lora_weights=True)
    _diffusers_model(policy).add_adapter(lora)
    for name, p in policy.named_parameters():
        p.requires_grad_("lora_" in name)
    return policy


@contextlib.contextmanager
def adapters_disabled(policy: nn.Module):
    """The base model (the reference when training LoRA) for the duration of the block."""
    model = _diffusers_model(policy)
    model.disable_adapters()
    try:
        yield policy
    finally:
        model.enable_adapters()  # peft's set_adapter also restores requires_grad on the adapter


def merge_lora(policy: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and remove it (for a plain, loadable model folder)."""
    model = _diffusers_model(policy)
    model.fuse_lora()
    model.unload_lora()
    return policy


# ----------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------
def _check_batch(batch: ImageRollout, cfg: LearnerConfig) -> None:
    if batch.advantages is None:
        raise ValueError("the rollout has no advantages: compute them (group_advantages) before training")
    if not torch.isfinite(batch.advantages).all():
        raise ValueError("the rollout's advantages contain NaN/inf (NaN rewards must map to advantage 0)")
    if len(batch) % cfg.micro_batch_size:
        raise ValueError(f"{len(batch)} samples on this rank do not split into micro-batches of {cfg.micro_batch_size}")
    if batch.noise_level <= 0:
        raise ValueError(f"the rollout was sampled with noise_level={batch.noise_level}: ODE steps have no log-prob")


def _reference(policy: nn.Module, ref_policy: nn.Module | None, cfg: LearnerConfig):
    """Context yielding the model whose steps the KL is measured against."""
    if cfg.lora_rank > 0:
        return adapters_disabled(policy)
    if ref_policy is None:
        raise ValueError("kl_beta > 0 needs a reference policy (or lora_rank > 0, whose base is the reference)")
    return contextlib.nullcontext(ref_policy)


def _micro_batch_step(policy, ref_policy, mb: ImageRollout, j: int, algo: FlowGRPOConfig, cfg: LearnerConfig,
                      engine, teacher: nn.Module | None = None) -> dict:
    """Loss of train step j (σ_j → σ_{j+1}) on one micro-batch; backward + engine step.

    With a ``teacher`` (on-policy distillation, ``algo`` a FlowOPDConfig) the loss is
    ``rlgen.algos.opd.image_step_loss``: KL between the policy's and the teacher's step from x.
    """
    dev = policy.device
    dtype = next(p for p in policy.parameters()).dtype
    x = mb.latents[:, j].to(dev)  # (b, C, H, W) fp32: the stored state before the step
    x_next = mb.latents[:, j + 1].to(dev)  # (b, C, H, W): the sampled state it is scored on
    sigma = mb.sigmas[j].to(dev).expand(len(mb))  # (b,) the sampler fed the model exactly this
    s, s_next = float(mb.sigmas[j]), float(mb.sigmas[j + 1])
    ref_mean = None
    if algo.kl_beta > 0:  # before the policy's forward, so nothing runs between its forward and backward
        with torch.no_grad(), _reference(policy, ref_policy, cfg) as ref:
            v_ref = ref.velocity_fn(mb.prompts, mb.cfg_scale)(x.to(dtype).contiguous(), sigma)
            ref_mean = sde_step(x, v_ref, s, s_next, mb.noise_level, prev_sample=x_next).mean
    teacher_mean = None
    if teacher is not None:
        with torch.no_grad():
            v_t = teacher.velocity_fn(mb.prompts, algo.teacher_cfg_scale)(x.to(dtype).contiguous(), sigma)
            teacher_mean = sde_step(x, v_t, s, s_next, mb.noise_level, prev_sample=x_next).mean
    # Prompts are re-encoded per step: each backward frees the graph, the text encoder included.
    v = engine(mb.prompts, x.to(dtype).contiguous(), sigma, mb.cfg_scale)  # (b, C, H, W)
    out = sde_step(x, v, s, s_next, mb.noise_level, prev_sample=x_next)
    old_lp, adv = mb.log_probs[:, j].to(dev), mb.advantages.to(dev).float()
    if teacher is None:
        loss, metrics = step_loss(out.log_prob, old_lp, adv, out.mean, ref_mean, out.std, x[0].numel(), algo)
    else:
        loss, metrics = image_step_loss(out.log_prob, old_lp, adv, out.mean, teacher_mean, ref_mean, out.std,
                                        x[0].numel(), algo)
    engine.backward(loss)
    engine.step()
    return metrics


def flow_grpo_update(policy: nn.Module, ref_policy: nn.Module | None, batch: ImageRollout, algo: FlowGRPOConfig,
                     cfg: LearnerConfig, engine, generator: torch.Generator, teacher: nn.Module | None = None) -> dict:
    """Train ``policy`` on this rank's share of a rollout: ``num_inner_epochs × num_minibatches`` updates.

    ``generator`` first draws the iteration's train steps (seed it the same on every rank, so all
    ranks train the same steps), then one shuffle per inner epoch. The reference is ``ref_policy``,
    or the adapter-disabled base when ``cfg.lora_rank > 0``; it is only run when ``algo.kl_beta > 0``.
    ``teacher`` (frozen) turns the loss into on-policy distillation toward it (rlgen.algos.opd).
    Returns metrics averaged over all (micro-batch, step) losses, and grad_norm over the updates.
    """
    _check_batch(batch, cfg)
    if getattr(engine.module, "policy", None) is not policy:
        raise ValueError("the engine must wrap PolicyVelocity(policy) of the policy being trained")
    steps = choose_train_steps(batch.sde_mask, cfg.timestep_fraction, generator)
    n_micro = len(batch) // cfg.micro_batch_size
    expected = n_micro // cfg.num_minibatches * len(steps)
    if engine.gradient_accumulation_steps() != expected or n_micro % cfg.num_minibatches:
        raise ValueError(f"engine accumulates {engine.gradient_accumulation_steps()} backwards per update, but this "
                         f"batch gives {expected} ({len(batch)} samples / micro-batch {cfg.micro_batch_size} / "
                         f"{cfg.num_minibatches} mini-batches × {len(steps)} train steps): the batch does not "
                         f"match the configured geometry")
    sums, n_losses, grad_norms = defaultdict(float), 0, []
    policy.train()
    for _ in range(cfg.num_inner_epochs):
        order = torch.randperm(len(batch), generator=generator)  # (B,) this epoch's sample order
        for m in range(n_micro):
            start = m * cfg.micro_batch_size
            mb = batch.select(order[start:start + cfg.micro_batch_size])
            for j in steps:
                for k, v in _micro_batch_step(policy, ref_policy, mb, j, algo, cfg, engine, teacher).items():
                    sums[k] += v
                n_losses += 1
            if (m + 1) % (n_micro // cfg.num_minibatches) == 0:  # the engine just stepped the optimizer
                norm = engine.get_global_grad_norm()
                grad_norms.append(float("nan") if norm is None else float(norm))
    metrics = {k: v / n_losses for k, v in sums.items()}
    metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), num_train_steps=len(steps), samples=len(batch))
    return metrics
