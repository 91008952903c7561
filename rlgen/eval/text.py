"""Text benchmarks: greedy (or sampled) decoding of held-out problems, scored by exact verifiers.

    python -m rlgen.evaluate --checkpoint runs/mdm_arith_base --benchmark arith \
        [--problems FILE.jsonl] [--set steps=4 --set threshold=0.9 --set n_per_level=200]

One benchmark per task (``arith``, ``countdown``, ``sudoku``). Problems come from ``--problems``
(JSONL, every line of this task) or the built-in held-out set: ``n_per_level`` distinct problems
per default level of the task, drawn from the held-out split (see rlgen/data/text_tasks.py: a
problem is held out by the hash of its key, so training never sees one) with the fixed seed
``set_seed`` (option, default 0) — the same set for every checkpoint. ``--seed`` seeds sampling
only (temperature > 0).

Decoding options (``--set key=value``), defaults in brackets: ``gen_length`` [the task's fixed
answer width], ``block_length`` [gen_length: one block], ``steps`` [gen_length: one token per
step; clipped to gen_length and rounded down to a multiple of the number of blocks],
``threshold`` [none; e.g. 0.9 = confidence-threshold parallel decoding], ``temperature`` [0],
``remasking`` [low_confidence], ``cfg_scale`` [0], ``cache`` [automatic: the exact block cache for
block-causal models, none otherwise; ``prefix`` / ``dual`` = Fast-dLLM's approximate key/value
caches, rlgen/samplers/kv_cache.py].

Result: ``accuracy`` (all samples), ``per_task`` (level → accuracy), ``hard_accuracy`` (the task's
harder levels, e.g. arith pm3), ``n``, the settings, ``nfe_per_token`` (forward passes a
row took per answer token; 1.0 = one token per step) and ``tokens_per_s`` (answer tokens decoded
per second of decoding, batched at ``--batch-size``), ``pass_at_k`` when samples_per_prompt > 1.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from tqdm import tqdm

from rlgen.data.text_tasks import generate_problems, get_task, level_of, load_problems, TASKS
from rlgen.data.tokenizer import decode_completion, encode_batch
from rlgen.registry import register_benchmark
from rlgen.samplers.masked import generate

DECODE_DEFAULTS = {"gen_length": None, "block_length": None, "steps": None, "threshold": None,
                   "temperature": 0.0, "remasking": "low_confidence", "cfg_scale": 0.0, "cache": None}
SET_DEFAULTS = {"n_per_level": 200, "levels": None, "set_seed": 0}


def _group_settings(gen_length: int, s: dict) -> tuple[int, int, int]:
    """(gen_length, block_length, steps) for one group, from the user's settings ``s``."""
    g = int(s["gen_length"] or gen_length)
    bl = min(int(s["block_length"] or g), g)
    if g % bl:
        raise ValueError(f"block_length {bl} does not divide gen_length {g}")
    blocks = g // bl
    steps = min(int(s["steps"] or g), g)
    return g, bl, max(blocks, steps - steps % blocks)


def decode_problems(model, problems: list[dict], settings: dict | None = None, batch_size: int = 64,
                    generator: torch.Generator | None = None, progress: bool = False) -> tuple[list[str], dict]:
    """Decode every problem; returns (completion texts in input order, speed statistics).

    Problems are grouped by (prompt length, answer width) so each batch is padding-free.
    """
    s = {**DECODE_DEFAULTS, **(settings or {})}
    tok = model.tokenizer
    prompts = [get_task(p["task"]).format_prompt(p) for p in problems]
    ids = encode_batch(tok, prompts)
    groups = defaultdict(list)
    for i, p in enumerate(problems):
        groups[(len(ids[i]), get_task(p["task"]).gen_length(p))].append(i)
    texts: list[str] = [""] * len(problems)
    row_steps = row_tokens = 0
    seconds = 0.0
    bar = tqdm(total=len(problems), desc="decode", disable=not progress, leave=False)
    for (_, width), idx in sorted(groups.items()):
        g, bl, steps = _group_settings(width, s)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            prompt = torch.tensor([ids[i] for i in chunk], device=model.device)  # (b, P)
            t0 = time.perf_counter()
            answer, steps_taken = _decode(model, prompt, g, bl, steps, s, generator)
            seconds += time.perf_counter() - t0
            for i, row in zip(chunk, answer.tolist()):
                texts[i] = decode_completion(tok, row)
            row_steps += steps_taken if steps_taken is not None else 0
            row_tokens += len(chunk) * g
            bar.update(len(chunk))
    bar.close()
    stats = {"nfe_per_token": round(row_steps / max(row_tokens, 1), 4) if row_steps else None,
             "tokens_per_s": round(row_tokens / max(seconds, 1e-9), 1)}
    return texts, stats


def _decode(model, prompt, g: int, bl: int, steps: int, s: dict, generator):
    """(answer ids (b, g), forward passes summed over rows or None): rlgen's masked sampler for a
    masked-diffusion policy, or the model's own sampler (``generate_answers``: DiffusionGemma)."""
    if getattr(model, "family", None) != "masked_lm":
        return model.generate_answers(prompt, g, generator=generator, temperature=s["temperature"]), None
    from rlgen.algos.mdm_grpo import banned_ids

    out = generate(model, prompt, gen_length=g, steps=steps, block_length=getattr(model, "block_size", None) or bl,
                   temperature=s["temperature"], remasking=s["remasking"], threshold=s["threshold"],
                   cfg_scale=s["cfg_scale"], mask_id=model.mask_id, generator=generator, eos_id=model.eos_id,
                   forbidden_ids=banned_ids(model), cache=s["cache"])
    return out.answer, int(out.steps_taken.sum())


def score_problems(model, problems: list[dict], settings: dict | None = None, batch_size: int = 64,
                   samples_per_prompt: int = 1, generator=None, progress: bool = False,
                   n_examples: int = 8) -> dict:
    """Accuracy overall and per level (+ the hard levels) of ``problems``; shared by the trainer."""
    if not problems:
        raise ValueError("no problems to score")
    task = get_task(problems[0]["task"])
    expanded = [p for p in problems for _ in range(samples_per_prompt)]
    texts, stats = decode_problems(model, expanded, settings, batch_size, generator, progress)
    rewards = [get_task(p["task"]).check(p, t) for p, t in zip(expanded, texts)]
    by_level = defaultdict(list)
    for p, r in zip(expanded, rewards):
        by_level[level_of(p)].append(r)
    hard = [r for lv in task.hard_levels for r in by_level.get(lv, [])]
    result = {"accuracy": sum(rewards) / len(rewards),
              "per_task": {lv: sum(v) / len(v) for lv, v in sorted(by_level.items())},
              "hard_accuracy": sum(hard) / len(hard) if hard else None,
              "hard_levels": list(task.hard_levels),
              "n": len(rewards), **stats,
              "examples": [{"prompt": task.format_prompt(p), "completion": t, "reward": r}
                           for p, t, r in list(zip(expanded, texts, rewards))[:n_examples]]}
    if samples_per_prompt > 1:
        per_prompt = [rewards[i:i + samples_per_prompt] for i in range(0, len(rewards), samples_per_prompt)]
        result[f"pass_at_{samples_per_prompt}"] = sum(max(r) for r in per_prompt) / len(per_prompt)
    return result


def benchmark_problems(task: str, problems_path=None, options: dict | None = None) -> list[dict]:
    """The problems a benchmark scores: a JSONL file (all of ``task``) or the built-in held-out set."""
    o = {**SET_DEFAULTS, **(options or {})}
    if problems_path is not None:
        problems = load_problems(problems_path)
        for i, p in enumerate(problems):
            if p["task"] != task:
                raise ValueError(f"{problems_path}: problem {i + 1} is a {p['task']!r} problem; "
                                 f"the {task} benchmark scores only {task} problems")
        return problems
    levels = o["levels"]
    if isinstance(levels, str):
        levels = [lv.strip() for lv in levels.split(",") if lv.strip()]
    levels = levels or list(get_task(task).levels)
    return generate_problems(task, int(o["n_per_level"]) * len(levels), int(o["set_seed"]), levels,
                             split="heldout")


def _benchmark(task: str):
    def prepare(req) -> list[dict]:
        return benchmark_problems(task, req.problems, req.options)

    def run(req, model) -> dict:
        problems = prepare(req)
        if getattr(model, "family", None) != "masked_lm" and not hasattr(model, "generate_answers"):
            raise ValueError(f"the {task} benchmark scores text diffusion models; this checkpoint holds a "
                             f"{type(model).__name__}")
        settings = {**DECODE_DEFAULTS, **{k: v for k, v in req.options.items() if k in DECODE_DEFAULTS}}
        gen = torch.Generator(device=model.device).manual_seed(req.seed)
        k = req.samples_per_prompt or 1
        result = score_problems(model, problems, settings, req.batch_size, k, gen, req.progress)
        result["settings"] = {**settings, "samples_per_prompt": k, "batch_size": req.batch_size,
                              "problems": str(req.problems) if req.problems else "builtin-heldout"}
        result["task"] = task
        return result

    run.__name__ = f"{task}_benchmark"
    run.options = {*DECODE_DEFAULTS, *SET_DEFAULTS}
    run.prepare = prepare
    return run


for _task in TASKS:
    register_benchmark(_task)(_benchmark(_task))
