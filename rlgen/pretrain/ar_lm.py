"""Autoregressive teacher LMs for on-policy distillation of masked-diffusion students.

    python -m rlgen.pretrain --config configs/pretrain/ar_arith.yaml

A Hugging Face ``LlamaForCausalLM`` (tiny config) trained by teacher forcing on a text task's
prompt/answer pairs, with rlgen's character tokenizer: the SAME token ids as the masked-diffusion
models, so vLLM can score a masked-diffusion student's answers (``algo.teacher_kind: vllm``).
Each checkpoint is a plain HF folder (config.json, model.safetensors, tokenizer files): what vLLM
and ``AutoModelForCausalLM`` load (plus rlgen.pretrain.loop's trainer_state/ for ``run.resume``).
Data and lr schedule are the masked-diffusion trainer's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rlgen.config import register_config
from rlgen.runtime.rundir import RunConfig
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.pretrain.masked_diffusion import MDMDataConfig, build_buckets, lr_at, sample_batch
from rlgen.registry import register_pretrainer
from rlgen.utils import resolve_device


@dataclass
class ARModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4               # head size hidden/heads must be one vLLM's CPU attention supports (32, 64, …)
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_length: int = 32


@dataclass
class ARTrainConfig:
    objective: str = "sft"           # sft: loss on answer tokens only; pretrain: on every next token
    batch_size: int = 128
    max_steps: int = 2000            # length of the lr schedule (and the run)
    lr: float = 2e-3
    schedule: str = "cosine"         # cosine | linear | constant (rlgen.pretrain.masked_diffusion.lr_at)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 500            # greedy held-out accuracy (0 = only at the end)
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.objective not in ("sft", "pretrain"):
            raise ValueError(f"train.objective must be sft or pretrain, got {self.objective!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.schedule must be cosine, linear or constant, got {self.schedule!r}")


@register_config("ar_pretrain")
@dataclass
class ARPretrainConfig:
    kind: str = "ar_pretrain"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="ar_lm", num_threads=1))
    data: MDMDataConfig = field(default_factory=MDMDataConfig)
    model: ARModelConfig = field(default_factory=ARModelConfig)
    train: ARTrainConfig = field(default_factory=ARTrainConfig)


def answer_loss(logits: torch.Tensor, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens only: position t predicts token t+1.

    logits (B, L, V), seqs (B, L); the prompt (first ``prompt_len`` tokens) is context, not target
    (``prompt_len`` 0, raw text: every token after the first is a target).
    """
    start = max(prompt_len, 1)
    pred = logits[:, start - 1:-1]  # (B, L - start, V) predictions of tokens start..L-1
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), seqs[:, start:].reshape(-1))


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_ids: torch.Tensor, width: int) -> list[str]:
    """Greedy left-to-right answers of ``width`` tokens (special tokens other than [EOS] never chosen)."""
    from rlgen.data.tokenizer import decode_completion

    x = prompt_ids  # (B, P)
    banned = torch.tensor([tokenizer.pad_token_id, tokenizer.mask_token_id], device=x.device)
    for _ in range(width):
        logits = model(x).logits[:, -1].float().index_fill(-1, banned, float("-inf"))  # (B, V)
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
    return [decode_completion(tokenizer, r) for r in x[:, prompt_ids.shape[1]:].tolist()]


def evaluate(model, tokenizer, problems: list[dict]) -> dict:
    """Greedy accuracy overall and per level on ``problems`` (the same verifiers as the student's)."""
    from collections import defaultdict

    from rlgen.data.text_tasks import get_task, level_of
    from rlgen.data.tokenizer import encode_batch

    model.eval()
    groups = defaultdict(list)
    for p in problems:  # one batch per (prompt length, answer width): no padding
        task = get_task(p["task"])
        groups[(len(task.format_prompt(p)), task.gen_length(p))].append(p)
    by_level = defaultdict(list)
    for (_, width), ps in groups.items():
        ids = torch.tensor(encode_batch(tokenizer, [get_task(p["task"]).format_prompt(p) for p in ps]),
                           device=model.device)
        for p, text in zip(ps, greedy_answers(model, tokenizer, ids, width)):
            by_level[level_of(p)].append(get_task(p["task"]).check(p, text))
    model.train()
    flat = [r for v in by_level.values() for r in v]
    return {"accuracy": sum(flat) / len(flat), **{lv: sum(v) / len(v) for lv, v in sorted(by_level.items())}}


def build_model(cfg: ARPretrainConfig, tokenizer, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                       max_position_embeddings=m.max_length, tie_word_embeddings=False,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(conf).to(device)


@register_pretrainer("ar_pretrain")
class ARTask:
    """A tiny Llama, AdamW and the masked-diffusion trainer's buckets; one teacher-forcing update per step."""

    def __init__(self, cfg: ARPretrainConfig):
        self.cfg = cfg

    def plan(self) -> LoopPlan:
        t = self.cfg.train
        return LoopPlan(last_step=t.max_steps, log_every=t.log_every, eval_every=t.eval_every,
                        checkpoint_every=t.checkpoint_every, label=self.cfg.run.name)

    def init(self, resume: Path | None) -> None:
        from rlgen.data.text_tasks import TASKS, generate_problems
        from rlgen.data.tokenizer import build_tokenizer

        cfg, t = self.cfg, self.cfg.train
        self.device = resolve_device(cfg.run.device)
        self.tok = build_tokenizer()
        self.model = build_model(cfg, self.tok, self.device)
        self.buckets = build_buckets(cfg, self.tok, cfg.model.max_length)  # reads cfg.data, run.seed, train.objective
        levels = cfg.data.levels or list(TASKS[cfg.data.task].levels)
        self.heldout = generate_problems(cfg.data.task, cfg.data.eval_n_per_level * len(levels), 0, levels,
                                         split="heldout")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.98))
        self.gen = torch.Generator().manual_seed(cfg.run.seed)

    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        lr = lr_at(step, t)
        for group in self.opt.param_groups:
            group["lr"] = lr
        seqs, P = sample_batch(self.buckets, t.batch_size, self.gen)
        seqs = seqs.to(self.device)  # (B, L)
        loss = answer_loss(self.model(seqs).logits, seqs, P)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        return {"loss": loss.item(), "lr": lr}

    def evaluate(self, step: int) -> dict:
        row = {f"eval_{k}": v for k, v in evaluate(self.model, self.tok, self.heldout).items()}
        print(f"step {step}: held-out accuracy {row['eval_accuracy']:.3f}", flush=True)
        return row

    def save(self, d: Path) -> dict:
        self.model.save_pretrained(d, safe_serialization=True)  # a plain HF folder: vLLM / AutoModel load it
        self.tok.save_pretrained(d)
        save_weights(self.model, d)
        save_torch_state(task_state_path(d, "optimizer.pt"), {"optimizer": self.opt.state_dict(),
                                                              "gen": self.gen.get_state()})
        return {}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.model, d)
        extra = load_torch_state(task_state_path(d, "optimizer.pt"))
        self.opt.load_state_dict(extra["optimizer"])
        self.gen.set_state(extra["gen"])


def train(cfg: ARPretrainConfig) -> Path:
    """Run (or resume) an AR teacher job; returns the run folder."""
    run_pretraining(cfg, ARTask(cfg))
    return cfg.run.dir
