"""Text rollouts for masked-diffusion GRPO: G completions per problem with ``generate``, scored.

``text_rollout(model, problems, cfg, group_size, reward_fn, generator)`` expands every problem G
times, decodes each (prompt length, answer width) bucket as one padding-free batch, and returns one
:class:`TextRolloutBatch` per bucket (CPU tensors; the decoding order is kept because the
``trajectory`` log-prob estimator replays it). Pure function of its inputs: it runs in the driver
process here, and the same call works inside a RolloutWorker actor.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from rlgen.data.text_tasks import get_task
from rlgen.data.tokenizer import decode_completion, encode_batch
from rlgen.samplers.masked import generate


@dataclass
class TextRolloutConfig:
    temperature: float = 1.0        # > 0: the G samples of a group must differ
    steps: int = 0                  # 0 = the answer width (one token per step)
    block_length: int = 0           # 0 = the whole answer is one block
    threshold: float | None = None  # confidence-threshold parallel decoding
    remasking: str = "low_confidence"
    batch_size: int = 256           # rows per generate call
    # 0 = decode in the driver process (a sub-million-parameter model decodes a batch in
    # milliseconds, less than a weight sync costs); N = N TextRolloutWorker Ray actors, problems
    # sharded across them, weights synced after every update (for models big enough to need it).
    workers: int = 0
    worker_cpus: float = 1.0        # Ray CPUs (and torch threads) per rollout worker
    worker_gpus: float = 0.0


@dataclass
class TextRolloutBatch:
    """One bucket of rollouts: every row has the same prompt length P and answer width G."""

    tokens: torch.Tensor          # (B, P + G) long, prompt included
    order: torch.Tensor           # (B, G) long: decoding step of each answer token, −1 = eos fill
    token_logprobs: torch.Tensor  # (B, G) float: sampler's log p of each token at temperature 1
    rewards: torch.Tensor         # (B,) float, NaN = unscored
    group_ids: torch.Tensor       # (B,) long: rows of one problem share an id
    prompt_length: int
    texts: list[str]

    def select(self, rows: torch.Tensor) -> "TextRolloutBatch":
        idx = rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows
        return TextRolloutBatch(self.tokens[idx], self.order[idx], self.token_logprobs[idx], self.rewards[idx],
                                self.group_ids[idx], self.prompt_length, [self.texts[i] for i in idx.tolist()])

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _settings(cfg: TextRolloutConfig, width: int) -> tuple[int, int]:
    bl = min(cfg.block_length or width, width)
    if width % bl:
        bl = width  # a block size that does not divide this task's width: one block
    blocks = width // bl
    steps = min(cfg.steps or width, width)
    return bl, max(blocks, steps - steps % blocks)


@torch.no_grad()
def text_rollout(model, problems: list[dict], cfg: TextRolloutConfig, group_size: int,
                 reward_fn: Callable, generator: torch.Generator | None = None) -> list[TextRolloutBatch]:
    """``reward_fn(texts, prompts, problems=...) -> (B,) tensor`` (e.g. a RewardMixer's total)."""
    tok = model.tokenizer
    prompts = [get_task(p["task"]).format_prompt(p) for p in problems]
    ids = encode_batch(tok, prompts)
    buckets = defaultdict(list)  # (P, G) → [(problem index, sample index)]
    for i, p in enumerate(problems):
        for _ in range(group_size):
            buckets[(len(ids[i]), get_task(p["task"]).gen_length(p))].append(i)
    out = []
    was_training = model.training
    model.eval()
    for (P, width), rows in sorted(buckets.items()):
        bl, steps = _settings(cfg, width)
        parts = []
        for s in range(0, len(rows), cfg.batch_size):
            chunk = rows[s:s + cfg.batch_size]
            prompt = torch.tensor([ids[i] for i in chunk], device=model.device)  # (b, P)
            parts.append(generate(model, prompt, gen_length=width, steps=steps, block_length=bl,
                                  temperature=cfg.temperature, remasking=cfg.remasking, threshold=cfg.threshold,
                                  mask_id=model.mask_id, generator=generator, eos_id=model.eos_id,
                                  forbidden_ids=(model.pad_id, model.mask_id)))
        tokens = torch.cat([o.tokens for o in parts]).cpu()
        texts = [decode_completion(tok, r) for r in tokens[:, P:].tolist()]
        probs = [problems[i] for i in rows]
        rewards = torch.as_tensor(reward_fn(texts, [prompts[i] for i in rows], problems=probs), dtype=torch.float32)
        out.append(TextRolloutBatch(tokens, torch.cat([o.order for o in parts]).cpu(),
                                    torch.cat([o.token_logprobs for o in parts]).cpu(), rewards,
                                    torch.tensor(rows), P, texts))
    model.train(was_training)
    return out
