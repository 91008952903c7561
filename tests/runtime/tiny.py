"""Tiny saved policies and step batches shared by the runtime tests (built in seconds, offline)."""
from __future__ import annotations

import torch


def save_tiny_lm(path, seed: int = 0, max_length: int = 32):
    """A 1-layer masked-diffusion LM over rlgen's character tokenizer, saved as a model folder."""
    from rlgen.data.tokenizer import build_tokenizer
    from rlgen.models.masked_lm import MaskedDiffusionLM

    torch.manual_seed(seed)
    model = MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                   max_length=max_length)
    model.save_pretrained(path)
    return model


def text_items(levels=("pm1", "pm2"), n: int = 6, seed: int = 0) -> list[dict]:
    """Arith prompt items of two prompt lengths (two buckets)."""
    from rlgen.data.text_tasks import generate_problems, get_task

    task = get_task("arith")
    problems = generate_problems("arith", n, seed, list(levels), split="train")
    return [{"prompt": task.format_prompt(p), "problem": p, "gen_length": task.gen_length(p)} for p in problems]


def text_rollout_batch(model, items: list[dict], group_size: int = 3, seed: int = 0):
    """A TextRollout with random rewards (every group mixed) and group advantages."""
    from rlgen.algos.advantages import group_advantages
    from rlgen.families.masked_lm import TextRolloutConfig, rollout_text

    rep = [it for it in items for _ in range(group_size)]
    gids = torch.tensor([i for i in range(len(items)) for _ in range(group_size)])
    batch = rollout_text(model, rep, gids, TextRolloutConfig(temperature=1.0), torch.Generator().manual_seed(seed))
    batch.rewards = torch.rand(len(rep), generator=torch.Generator().manual_seed(seed + 1)).round()
    batch.rewards[::group_size] = 1.0 - batch.rewards[1::group_size]  # every group mixed
    batch.advantages = group_advantages(batch.rewards, batch.group_ids)
    batch.global_size, batch.seed = len(batch), seed
    return batch


def text_pairs_batch(model, n: int = 6, seed: int = 0):
    """TextPairs of two prompt lengths: a correct answer against a wrong one."""
    from rlgen.batches import TextPairBucket, TextPairs
    from rlgen.data.tokenizer import encode

    import random

    items = text_items(n=n, seed=seed)
    tok, eos, rng = model.tokenizer, model.eos_id, random.Random(seed)
    buckets = {}
    for it in items:
        p = encode(tok, it["prompt"])
        w, l_ = ["".join(rng.choice("0123456789") for _ in range(it["gen_length"])) for _ in range(2)]
        buckets.setdefault(len(p), []).append((p, encode(tok, w) + [eos], encode(tok, l_) + [eos]))
    out, row = [], 0
    for _, rows in sorted(buckets.items()):
        out.append(TextPairBucket(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                                  torch.tensor([r[2] for r in rows]), torch.arange(row, row + len(rows))))
        row += len(rows)
    return TextPairs(out, global_size=row, seed=seed)
