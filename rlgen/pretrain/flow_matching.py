"""Flow-matching pretraining of a text-conditioned ``FlowPolicy`` on captioned images.

    python -m rlgen.pretrain --config configs/pretrain/flow_shapes.yaml [key=value ...]

Loss (DESIGN.md, "Flow time"): ``mean ‖v_θ(x_σ, σ, c) − (ε − x_data)‖²`` with
``x_σ = (1−σ)·x_data + σ·ε``, σ from a configurable density, and the prompt replaced by "" with
probability ``prompt_dropout`` so the same model also gives the unconditional velocity for CFG.
AdamW, linear warm-up then cosine to ``min_lr_ratio``, gradient clipping, an EMA of the weights.

Checkpoints (``checkpoints/<step>/``, written by rlgen.pretrain.loop) are model folders of the
*EMA* policy (``load_model`` reads them) plus ``trainer_state/``: raw weights (safetensors),
optimizer + σ/ε generator (torch.save, loaded with ``weights_only=True``) and in ``state.json`` the
EMA step and data position, so that ``run.resume=auto`` continues bit-for-bit on CPU.

Data: a dataset module with a ``make_batch(rng, batch_size, **options)`` function (shapes) renders
fresh batches on the fly; any other registered dataset (items ``dict(image, prompt, …)``) is read
through a DataLoader over seeded per-epoch permutations (position = step, so resuming is exact).
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from rlgen.config import register_config
from rlgen.runtime.rundir import RunConfig
from rlgen.models.flow import FlowModelConfig, FlowPolicy
from rlgen.models.prompt_encoder import PromptEmbeds, words_of
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.registry import DATASETS, register_pretrainer
from rlgen.utils import resolve_device
from rlgen.viz import save_image_grid


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class FlowDataConfig:
    dataset: str = "shapes"             # a DATASETS name (or module.path:Class)
    options: dict[str, Any] = field(default_factory=dict)  # kwargs for make_batch / the dataset class
    on_the_fly: bool = True             # use the dataset module's make_batch when it has one
    num_workers: int = 0                # DataLoader workers (datasets read from items only)
    vocab_prompts: int = 4096           # prompts drawn to collect the tokenizer vocabulary


@dataclass
class FlowTrainConfig:
    batch_size: int = 64
    max_steps: int = 1000
    max_minutes: float = 0.0            # wall budget over the whole run (resumes included); 0 = none
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05          # cosine floor, as a fraction of lr
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.999            # diffusers EMAModel: decay warms up as (1+s)/(10+s) to this
    sigma_density: str = "logit_normal"  # uniform | logit_normal
    sigma_mean: float = 0.0             # logit-normal location
    sigma_std: float = 1.0              # logit-normal scale
    prompt_dropout: float = 0.1         # probability of training on "" (CFG's unconditional prompt)
    bf16: bool = False                  # bf16 autocast (CUDA only; ignored on CPU)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        if self.sigma_density not in SIGMA_DENSITIES:
            raise ValueError(f"train.sigma_density '{self.sigma_density}' is unknown; one of {sorted(SIGMA_DENSITIES)}")


@dataclass
class FlowSampleConfig:
    every: int = 500                    # sample grid every N steps (and always at the end)
    prompts: list[str] = field(default_factory=list)  # fixed prompts; empty = num_prompts from the data
    num_prompts: int = 16
    per_prompt: int = 2
    num_steps: int = 20
    cfg_scale: float = 1.0
    shift: float = 1.0
    seed: int = 1234


@register_config("flow_pretrain")
@dataclass
class FlowPretrainConfig:
    kind: str = "flow_pretrain"
    run: RunConfig = field(default_factory=RunConfig)
    data: FlowDataConfig = field(default_factory=FlowDataConfig)
    model: FlowModelConfig = field(default_factory=FlowModelConfig)
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    sample: FlowSampleConfig = field(default_factory=FlowSampleConfig)


# ----------------------------------------------------------------------------------------------
# Pure pieces: σ densities, prompt dropout, the loss, the learning-rate schedule
# ----------------------------------------------------------------------------------------------
def _uniform(n: int, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def _logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    # SD3's density: logit(σ) ~ N(mean, std²), which concentrates training on mid noise levels.
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


SIGMA_DENSITIES: dict[str, Callable] = {"uniform": _uniform, "logit_normal": _logit_normal}


def sample_sigmas(n: int, density: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) float32 noise levels in [0, 1] drawn from ``density`` (on the generator's device: CPU)."""
    if density not in SIGMA_DENSITIES:
        raise ValueError(f"unknown sigma density '{density}'; one of {sorted(SIGMA_DENSITIES)}")
    return SIGMA_DENSITIES[density](n, mean, std, generator)


def drop_prompts(prompts: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each prompt by "" with probability p (classifier-free guidance training)."""
    drop = (torch.rand(len(prompts), generator=generator) < p).tolist()
    return ["" if d else t for t, d in zip(prompts, drop)]


def flow_matching_loss(model: Callable, x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       emb: PromptEmbeds) -> torch.Tensor:
    """``mean((model(x_σ, σ, emb) − (ε − x))²)`` with ``x_σ = (1−σ)·x + σ·ε``; x, noise (B, C, H, W)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    x_sigma = (1 - s) * x + s * noise
    v = model(x_sigma, sigma, emb)  # (B, C, H, W)
    return F.mse_loss(v.float(), (noise - x).float())


@contextlib.contextmanager
def ema_weights(ema, module: torch.nn.Module):
    """The module holds the EMA weights inside the block and its raw weights again after."""
    params = list(module.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        yield module
    finally:
        ema.restore(params)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine to base·min_ratio."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Data sources: next(batch_size) -> (images (B, C, H, W) in [-1, 1], prompts)
# ----------------------------------------------------------------------------------------------
class OnTheFlySource:
    """Fresh batches from a ``make_batch(rng, batch_size, **options)`` function (cheap renders)."""

    def __init__(self, make_batch: Callable, options: dict, seed: int):
        self.make_batch, self.options = make_batch, options
        self.rng = np.random.default_rng(seed)

    def next(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        images, prompts, *_ = self.make_batch(self.rng, batch_size, **self.options)
        return images, list(prompts)

    def prompts(self, n: int, seed: int) -> list[str]:
        return list(self.make_batch(np.random.default_rng(seed), n, **self.options)[1])

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class _EpochBatches(torch.utils.data.Sampler):
    """Endless index batches: epoch e is a permutation seeded by (seed, e); starts at batch ``start``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n < batch_size:
            raise ValueError(f"dataset has {n} items, fewer than train.batch_size {batch_size}")
        self.n, self.bs, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self):
        per_epoch, b, perm, perm_epoch = self.n // self.bs, self.start, None, -1
        while True:
            epoch, k = divmod(b, per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
                perm_epoch = epoch
            yield perm[k * self.bs:(k + 1) * self.bs].tolist()
            b += 1


class DatasetSource:
    """Batches of a map-style dataset whose items are dicts with 'image' and 'prompt'."""

    def __init__(self, dataset, seed: int, num_workers: int):
        self.dataset, self.seed, self.num_workers = dataset, seed, num_workers
        self._it, self._bs, self._pos = None, None, 0

    def next(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        if self._it is None or self._bs != batch_size:
            sampler = _EpochBatches(len(self.dataset), batch_size, self.seed, self._pos)
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers)
            self._it, self._bs = iter(loader), batch_size
        batch = next(self._it)
        self._pos += 1
        return batch["image"], list(batch["prompt"])

    def prompts(self, n: int, seed: int) -> list[str]:
        idx = np.random.default_rng(seed).integers(len(self.dataset), size=n)
        return [self.dataset[int(i)]["prompt"] for i in idx]

    def state(self) -> dict:
        return {"batches": self._pos}

    def load_state(self, state: dict) -> None:
        self._pos, self._it = int(state["batches"]), None


def make_source(cfg: FlowDataConfig, seed: int):
    obj = DATASETS.get(cfg.dataset)
    make_batch = getattr(sys.modules.get(getattr(obj, "__module__", ""), None), "make_batch", None)
    if cfg.on_the_fly and callable(make_batch):
        return OnTheFlySource(make_batch, dict(cfg.options), seed)
    try:
        dataset = obj(**cfg.options)
    except TypeError as e:
        raise ValueError(f"data.options {cfg.options} do not fit dataset '{cfg.dataset}': {e}") from e
    return DatasetSource(dataset, seed, cfg.num_workers)


# ----------------------------------------------------------------------------------------------
# The task run by rlgen.pretrain.loop
# ----------------------------------------------------------------------------------------------
@register_pretrainer("flow_pretrain")
class FlowMatchingTask:
    """A FlowPolicy, its EMA, AdamW and a data source; one flow-matching update per ``train_step``."""

    def __init__(self, cfg: FlowPretrainConfig):
        self.cfg = cfg

    def plan(self) -> LoopPlan:
        t = self.cfg.train
        return LoopPlan(last_step=t.max_steps, log_every=1, eval_every=self.cfg.sample.every,
                        checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                        max_minutes=t.max_minutes, label="flow pretrain")

    def init(self, resume: Path | None) -> None:
        from diffusers.training_utils import EMAModel  # heavy import: only when training

        cfg, t = self.cfg, self.cfg.train
        self.device = resolve_device(cfg.run.device)
        self.source = make_source(cfg.data, cfg.run.seed)
        # All training randomness (σ, ε, prompt dropout) comes from this CPU generator: it is
        # saved in checkpoints, and CPU draws give the same numbers on any device.
        self.gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        if resume is None:
            torch.manual_seed(cfg.run.seed)
            if not cfg.model.vocab:  # filled in place, so config.yaml records the vocabulary used
                cfg.model.vocab = words_of(self.source.prompts(cfg.data.vocab_prompts, cfg.run.seed + 2))
            self.policy = FlowPolicy.build(cfg.model).to(self.device)
        else:
            self.policy = FlowPolicy.from_pretrained(resume, device=self.device)  # EMA weights
            cfg.model.vocab = self.policy.config.vocab
        self.policy.train()  # one mode for fresh and resumed runs (from_pretrained returns eval mode)
        params = list(self.policy.parameters())
        self.ema = EMAModel(params, decay=t.ema_decay, foreach=True)
        self.opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        s = cfg.sample
        self.sample_prompts = list(s.prompts) or self.source.prompts(s.num_prompts, s.seed)

    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        images, prompts = self.source.next(t.batch_size)
        if tuple(images.shape[1:]) != self.policy.sample_shape:
            raise ValueError(f"data '{self.cfg.data.dataset}' gives images {tuple(images.shape[1:])} but the model "
                             f"expects {self.policy.sample_shape}: set model.in_channels / model.image_size")
        x = images.to(self.device)  # (B, C, H, W) in [-1, 1]
        noise = torch.randn(x.shape, generator=self.gen).to(self.device)
        sigma = sample_sigmas(len(x), t.sigma_density, t.sigma_mean, t.sigma_std, self.gen).to(self.device)
        prompts = drop_prompts(prompts, t.prompt_dropout, self.gen)
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        bf16 = t.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(self.policy, x, noise, sigma, self.policy.encode_prompts(prompts))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), t.grad_clip)
        self.opt.step()
        self.ema.step(self.policy.parameters())
        return {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item()}

    def evaluate(self, step: int) -> dict:
        """A sample grid of the EMA model: samples/step_<N>.png."""
        s = self.cfg.sample
        prompts = [p for p in self.sample_prompts for _ in range(s.per_prompt)]
        with ema_weights(self.ema, self.policy) as ema_policy:
            images = ema_policy.generate(prompts, s.num_steps, s.cfg_scale, shift=s.shift,
                                         generator=torch.Generator().manual_seed(s.seed))
        save_image_grid(images, self.cfg.run.dir / "samples" / f"step_{step}.png", nrow=8, captions=prompts)
        return {}

    def save(self, d: Path) -> dict:
        with ema_weights(self.ema, self.policy) as ema_policy:
            ema_policy.save_pretrained(d)  # the published model
        save_weights(self.policy, d)       # the raw weights the optimizer updates
        save_torch_state(task_state_path(d, "optimizer.pt"), {"optimizer": self.opt.state_dict(),
                                                              "torch_rng": self.gen.get_state()})
        return {"ema_step": self.ema.optimization_step, "data": self.source.state()}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.policy, d)
        extra = load_torch_state(task_state_path(d, "optimizer.pt"))
        self.opt.load_state_dict(extra["optimizer"])
        self.gen.set_state(extra["torch_rng"])
        self.ema.optimization_step = state["ema_step"]
        self.source.load_state(state["data"])


def train(cfg: FlowPretrainConfig) -> Path:
    """Run (or resume) a flow-matching pretraining job; returns the final checkpoint folder."""
    return run_pretraining(cfg, FlowMatchingTask(cfg))
