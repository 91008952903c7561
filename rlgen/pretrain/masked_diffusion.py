"""Masked-diffusion LM training (LLaDA, arXiv:2502.09992): pretraining and SFT.

    python -m rlgen.pretrain --config configs/pretrain/mdm_arith.yaml [key=value ...]

Forward process: draw t ~ U(ε, 1) per sequence and replace each maskable token by [MASK] with
probability t; the model predicts the originals. Loss (LLaDA Eq. 3 / Eq. 5):
``Σ_masked CE / t``, divided by the sequence length (pretraining: every token maskable) or by the
answer length (SFT: the prompt is never masked; the answer includes its [EOS] padding), averaged
over the batch. ``complementary`` adds for each sequence a second copy whose answer mask is the
complement of the first (ratio 1 − t), so every answer token is supervised exactly once per pair;
then t ~ U(ε, 1 − ε) so neither copy's 1/t weight explodes.

Batches never pad: sequences are bucketed by (prompt length, answer length) and each step draws
one bucket (probability ∝ its size). Every random draw of step s comes from a generator seeded by
(run.seed, s), so a resumed run repeats exactly what an uninterrupted one would have done.
Run folder (DESIGN.md; rlgen.pretrain.loop runs the task): config.yaml, metrics.jsonl, tb/,
samples/step_<N>.txt (greedy decodes of held-out problems), checkpoints/<step>/ (the model + tokenizer
evaluated, i.e. the EMA when on; trainer_state/ with the raw weights and optimizer), checkpoints/latest.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from rlgen.config import ConfigError, register_config
from rlgen.data.tokenizer import build_tokenizer, encode_batch
from rlgen.models import MODEL_META
from rlgen.models.masked_lm import MaskedDiffusionLM
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.registry import register_pretrainer
from rlgen.runtime.rundir import RunConfig, resolve_checkpoint
from rlgen.utils import resolve_device


@dataclass
class MDMDataConfig:
    task: str = "arith"              # a text task (rlgen/data/text_tasks.py) giving prompt/answer pairs
    levels: list[str] = field(default_factory=list)  # difficulty mix; empty = the task's default
    num_train: int = 100_000         # generated training problems (held-out ones are never drawn)
    text_file: str = ""              # pretraining on raw lines of this file instead of a task
    eval_n_per_level: int = 64       # held-out problems per level for the periodic eval


@dataclass
class MDMModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 64             # position embeddings: longest prompt + answer
    init_from: str = ""              # fine-tune an rlgen checkpoint/run folder instead of a fresh model


@dataclass
class MDMTrainConfig:
    objective: Literal["sft", "pretrain"] = "sft"  # sft: prompt never masked; pretrain: all tokens
    batch_size: int = 128
    max_steps: int = 5000            # length of the lr schedule
    stop_step: int = 0               # end the run here (0 = max_steps), schedule unchanged: stops a
                                     # base inside the accuracy window RL wants (docs/feasibility.md)
    lr: float = 2e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05       # the decay ends at lr × this
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    eps: float = 1e-3                # floor of the mask ratio t
    complementary: bool = False
    ema: float = 0.0                 # EMA decay of the weights (0 = off); checkpoints hold the EMA
    log_every: int = 10
    eval_every: int = 500            # greedy accuracy on held-out problems (0 = never)
    checkpoint_every: int = 500      # steps (0 = only at the end)
    checkpoint_every_minutes: float = 0.0  # also save when this much wall time has passed
    keep_checkpoints: int = 0        # keep the newest N numbered checkpoints (0 = all)
    eval_steps: int = 0              # decoding steps for the periodic eval (0 = one per token)
    eval_batch_size: int = 256


@register_config("mdm_pretrain")
@dataclass
class MDMPretrainConfig:
    kind: str = "mdm_pretrain"
    run: RunConfig = field(default_factory=RunConfig)
    data: MDMDataConfig = field(default_factory=MDMDataConfig)
    model: MDMModelConfig = field(default_factory=MDMModelConfig)
    train: MDMTrainConfig = field(default_factory=MDMTrainConfig)


# ----------------------------------------------------------------------------------------------
# Pure pieces: loss, masking, lr schedule
# ----------------------------------------------------------------------------------------------
def mdm_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
             loss_norm: torch.Tensor | float) -> torch.Tensor:
    """LLaDA's loss: mean over sequences of ``Σ_{masked i} CE(logits_i, target_i) / (t · norm)``.

    logits (B, L, V), targets (B, L) long, masked (B, L) bool, t (B,) mask ratios,
    loss_norm (B,) or a float: the sequence length (pretraining) or answer length (SFT).
    """
    B = targets.shape[0]
    weight = 1.0 / (t * torch.as_tensor(loss_norm, dtype=t.dtype, device=t.device))  # (B,)
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")  # (M,)
    rows = masked.nonzero()[:, 0]  # (M,) which sequence each masked token belongs to
    return (ce * weight[rows]).sum() / B


def draw_masks(seqs: torch.Tensor, prompt_len: int, eps: float, complementary: bool,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets, masked, t): targets (B', L) = seqs, doubled when complementary; masked (B', L)
    bool never covers the first ``prompt_len`` positions; t (B',) the ratio each row was drawn at."""
    B, L = seqs.shape
    hi = 1.0 - eps if complementary else 1.0
    t = eps + (hi - eps) * torch.rand(B, generator=generator)  # (B,)
    maskable = torch.arange(L) >= prompt_len  # (L,)
    masked = (torch.rand(B, L, generator=generator) < t[:, None]) & maskable  # (B, L)
    if complementary:
        return torch.cat([seqs, seqs]), torch.cat([masked, ~masked & maskable]), torch.cat([t, 1.0 - t])
    return seqs, masked, t


def lr_at(step: int, cfg: MDMTrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine/linear decay to ``lr·min_lr_ratio`` at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


# ----------------------------------------------------------------------------------------------
# Data: padding-free buckets of equal-length sequences
# ----------------------------------------------------------------------------------------------
@dataclass
class Bucket:
    seqs: torch.Tensor   # (N, P + A) long
    prompt_len: int      # P (0 for raw text)


def build_buckets(cfg: MDMPretrainConfig, tokenizer, max_length: int | None = None) -> list[Bucket]:
    """Training sequences grouped by shape; ``max_length`` (default model.max_length) bounds them."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    if cfg.data.text_file:
        lines = [ln for ln in Path(cfg.data.text_file).read_text().splitlines() if ln.strip()]
        if not lines:
            raise ConfigError(f"data.text_file {cfg.data.text_file}: no non-empty lines")
        for ids in encode_batch(tokenizer, lines):
            groups.setdefault((0, len(ids)), []).append(torch.tensor(ids + [tokenizer.eos_token_id]))
    else:
        from rlgen.registry import DATASETS

        ds = DATASETS.get(cfg.data.task)(tokenizer, size=cfg.data.num_train, seed=cfg.run.seed,
                                         levels=cfg.data.levels or None)
        for item in ds:
            p, a = item.prompt_ids, item.answer_ids
            groups.setdefault((len(p), len(a)), []).append(torch.cat([p, a]))
    pretrain = cfg.train.objective == "pretrain"
    buckets = [Bucket(torch.stack(v), 0 if pretrain else P) for (P, _), v in sorted(groups.items())]
    longest = max(b.seqs.shape[1] for b in buckets)
    max_length = max_length or cfg.model.max_length
    if longest > max_length:
        raise ConfigError(f"model max_length {max_length} < longest training sequence {longest} "
                          f"(set model.max_length)")
    return buckets


def sample_batch(buckets: list[Bucket], batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    sizes = torch.tensor([len(b.seqs) for b in buckets], dtype=torch.float)
    b = buckets[int(torch.multinomial(sizes, 1, generator=g))]
    idx = torch.randint(len(b.seqs), (batch_size,), generator=g)
    return b.seqs[idx], b.prompt_len  # (B, L), P


# ----------------------------------------------------------------------------------------------
# The task run by rlgen.pretrain.loop
# ----------------------------------------------------------------------------------------------
def _build_model(cfg: MDMPretrainConfig, resume: Path | None, device) -> MaskedDiffusionLM:
    """Resume > ``model.init_from`` (an rlgen checkpoint/run folder, or a plain local HF folder) > fresh."""
    init = Path(cfg.model.init_from) if cfg.model.init_from else None
    if resume is not None:
        model = MaskedDiffusionLM.from_pretrained(resume, device=device)  # the published (EMA) weights
    elif init is not None and (init / "config.json").is_file() and not (init / MODEL_META).is_file():
        model = MaskedDiffusionLM.from_hf(init, device=device)
    elif init is not None:
        model = MaskedDiffusionLM.from_pretrained(resolve_checkpoint(init), device=device)
    else:
        m = cfg.model
        model = MaskedDiffusionLM.tiny(build_tokenizer(), m.hidden_size, m.num_layers, m.num_heads,
                                       m.intermediate_size, m.max_length).to(device)
    return model.train()


@register_pretrainer("mdm_pretrain")
class MDMTask:
    """Model, EMA copy, optimizer and padding-free buckets; one LLaDA update per ``train_step``."""

    def __init__(self, cfg: MDMPretrainConfig):
        self.cfg = cfg

    def plan(self) -> LoopPlan:
        t = self.cfg.train
        return LoopPlan(last_step=min(t.stop_step or t.max_steps, t.max_steps), log_every=t.log_every,
                        eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                        checkpoint_every_minutes=t.checkpoint_every_minutes, keep_checkpoints=t.keep_checkpoints,
                        label=self.cfg.run.name)

    def init(self, resume: Path | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = resolve_device(cfg.run.device)
        self.model = _build_model(cfg, resume, self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        # the EMA starts as the model: on resume that is the published (EMA) copy, raw weights load next
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if t.ema > 0 else None
        self.buckets = build_buckets(cfg, self.model.tokenizer, self.model.max_length)
        self.problems = _eval_problems(cfg)

    @property
    def eval_model(self) -> MaskedDiffusionLM:
        return self.ema if self.ema is not None else self.model

    def train_step(self, step: int) -> dict:
        """One optimizer update (index ``step``, 0-based); every draw comes from a (seed, step) generator."""
        cfg, model = self.cfg.train, self.model
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step)
        seqs, P = sample_batch(self.buckets, cfg.batch_size, g)  # (B, L)
        targets, masked, t = draw_masks(seqs, P, cfg.eps, cfg.complementary, g)  # (B', L) ×2, (B',)
        targets, masked, t = targets.to(self.device), masked.to(self.device), t.to(self.device)
        logits = model(targets.masked_fill(masked, model.mask_id))  # (B', L, V)
        loss = mdm_loss(logits, targets, masked, t, float(targets.shape[1] - P))
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e9)
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1.0 - cfg.ema)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "mask_frac": masked.float().mean().item()}

    def evaluate(self, step: int) -> dict:
        """Greedy accuracy on the held-out problems; writes samples/step_<N>.txt."""
        if not self.problems:
            return {}
        from rlgen.eval.text import score_problems

        cfg = self.cfg.train
        res = score_problems(self.eval_model.eval(), self.problems, {"steps": cfg.eval_steps or None},
                             batch_size=cfg.eval_batch_size, n_examples=24)
        self.model.train()
        lines = [f"step {step}  accuracy {res['accuracy']:.3f}  per level "
                 + "  ".join(f"{k} {v:.3f}" for k, v in res["per_task"].items()), ""]
        lines += [f"{'OK ' if ex['reward'] == 1 else 'BAD'} {ex['prompt']}{ex['completion']}" for ex in res["examples"]]
        (self.cfg.run.dir / "samples" / f"step_{step}.txt").write_text("\n".join(lines) + "\n")
        print(f"step {step}: eval accuracy {res['accuracy']:.3f}", flush=True)
        out = {"eval_accuracy": res["accuracy"], "eval_nfe_per_token": res["nfe_per_token"]}
        if res["hard_accuracy"] is not None:
            out["eval_hard_accuracy"] = res["hard_accuracy"]
        out.update({f"eval_{k}": v for k, v in res["per_task"].items()})
        return out

    def save(self, d: Path) -> dict:
        self.eval_model.save_pretrained(d)  # the EMA weights when EMA is on: what gets evaluated
        save_weights(self.model, d)         # the raw weights the optimizer updates
        save_torch_state(task_state_path(d, "optimizer.pt"), {"optimizer": self.opt.state_dict()})
        return {}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.model, d)
        self.opt.load_state_dict(load_torch_state(task_state_path(d, "optimizer.pt"))["optimizer"])


def _eval_problems(cfg: MDMPretrainConfig) -> list[dict]:
    from rlgen.data.text_tasks import TASKS, generate_problems

    if cfg.data.text_file or cfg.train.eval_every <= 0 or cfg.data.task not in TASKS:
        return []
    levels = cfg.data.levels or list(TASKS[cfg.data.task].levels)
    return generate_problems(cfg.data.task, cfg.data.eval_n_per_level * len(levels), 0, levels, split="heldout")


def train(cfg: MDMPretrainConfig) -> Path:
    """Run (or resume) training; returns the run folder."""
    run_pretraining(cfg, MDMTask(cfg))
    return cfg.run.dir
