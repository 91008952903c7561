"""Where a step's data comes from: prompts for online jobs, preference pairs for offline jobs.

Both are pure functions of (seed, step): a resumed run draws exactly what the uninterrupted run
would have drawn, with no sampler state to checkpoint.

A prompt item is a dict ``{"prompt": <text the policy is conditioned on>, ...}``; text items also
carry ``gen_length`` (the answer width) and their task's ``problem``, or (``prompts.source: dataset``)
the dataset row's other columns and, under a chat template, the ``messages`` the rollout worker
renders with the policy's tokenizer; every key but ``prompt``, ``gen_length`` and ``messages``
reaches the rewards as a keyword argument (a list aligned with the samples, trl's convention for
dataset columns).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from rlgen.batches import ImagePairs, TextPairBucket, TextPairs

IMAGE_SOURCES = ("shapes", "fashion_mnist", "file")


class PromptSource:
    """``prompts:`` of an online job → ``per_step`` items per step. Checks its settings on creation."""

    def __init__(self, cfg, seed: int, modality: str):
        self.cfg, self.seed, self.modality = cfg, seed, modality
        self._lines: list[str] = []
        self._epoch, self._perm = None, None  # source=dataset: the epoch whose row permutation is held
        text_source = cfg.source not in IMAGE_SOURCES
        if text_source != (modality == "text") and cfg.source != "file":
            kind = "a text task" if text_source else "an image prompt source"
            raise ValueError(f"prompts.source={cfg.source!r} is {kind}, but the policy is a {modality} model")
        if cfg.source == "file":
            self._lines = _read_lines(Path(cfg.file), "prompts.file")
        elif cfg.source == "dataset":
            from rlgen.data.text_dataset import load_text_dataset

            # chat prompts stay messages here: rollout workers render them with the policy's tokenizer
            self.dataset = load_text_dataset(cfg.dataset, render_chat=False)
        elif cfg.source == "shapes":
            from rlgen.data.shapes import TASK_TYPES

            bad = [t for t in cfg.tasks if t not in TASK_TYPES]
            if bad:
                raise ValueError(f"prompts.tasks: unknown shapes task types {bad}; valid: {list(TASK_TYPES)}")
        elif text_source:
            from rlgen.data.text_tasks import TASKS, get_task

            if cfg.source not in TASKS:
                raise ValueError(f"prompts.source={cfg.source!r} is unknown: one of {list(IMAGE_SOURCES)} or a text "
                                 f"task {sorted(TASKS)}")
            self.task = get_task(cfg.source)
            self.levels = list(cfg.tasks or self.task.levels)
            self.sample(1)  # an unknown level fails here, not after the first rollouts

    def sample(self, step: int) -> list[dict]:
        """``per_step`` items for this step (distinct where the source allows)."""
        n = self.cfg.per_step
        if self.cfg.source == "dataset":
            return [{**self.dataset.items[i], "gen_length": self.dataset.gen_length} for i in self._dataset_rows(step)]
        if self.modality == "text" and self.cfg.source != "file":
            from rlgen.data.text_tasks import generate_problems

            seed = random.Random(f"{self.seed}:{step}").randrange(2**31)
            problems = generate_problems(self.task.name, n, seed, self.levels, split="train")
            return [{"prompt": self.task.format_prompt(p), "problem": p, "gen_length": self.task.gen_length(p)}
                    for p in problems]
        rng = np.random.default_rng([self.seed, step, 7])
        if self.cfg.source == "file":
            idx = rng.choice(len(self._lines), size=n, replace=n > len(self._lines))
            return [{"prompt": self._lines[i]} for i in idx]
        if self.cfg.source == "fashion_mnist":
            from rlgen.data.fashion_mnist import PROMPTS

            idx = rng.choice(len(PROMPTS), size=n, replace=n > len(PROMPTS))
            return [{"prompt": PROMPTS[i]} for i in idx]
        from rlgen.data.shapes import sample_prompt
        from rlgen.data.shapes_heldout import is_unseen

        tasks, items = self.cfg.tasks or [None], []
        while len(items) < n:
            prompt = sample_prompt(rng, tasks[int(rng.integers(len(tasks)))])[0]
            if not (self.cfg.exclude_unseen and is_unseen(prompt)):  # redraw: still a function of (seed, step)
                items.append({"prompt": prompt})
        return items

    def _dataset_rows(self, step: int) -> list[int]:
        """Step k's rows: items (k − 1)·n … k·n − 1 of endless epochs, each a permutation of the rows
        drawn from (seed, epoch): every row once per epoch, and a pure function of (seed, step)."""
        n, size = self.cfg.per_step, len(self.dataset)
        out = []
        for k in range((step - 1) * n, step * n):
            epoch = k // size
            if self._epoch != epoch:  # one permutation held at a time
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch, 13]).permutation(size)
            out.append(int(self._perm[k % size]))
        return out


def _read_lines(p: Path, key: str) -> list[str]:
    if not p.is_file():
        raise FileNotFoundError(f"{key} not found: {p}")
    from rlgen.utils import read_text_file

    text = read_text_file(p)  # a binary or non-UTF-8 file: one line naming the file and line
    lines = []
    for n, ln in enumerate(text.splitlines(), 1):
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        if len(ln) > 2000:
            raise ValueError(f"{p}:{n}: a prompt of {len(ln)} characters (at most 2000)")
        lines.append(ln)
    if not lines:
        raise ValueError(f"{p}: no prompts")
    return lines


# ----------------------------------------------------------------------------------------------
# Offline: pairs
# ----------------------------------------------------------------------------------------------
class PairOrder:
    """Endless ordered batches of pairs: epoch e shuffles each bucket (pairs of one prompt length)
    with seed (seed, e), cuts it into batches of ``size`` (dropping each bucket's remainder) and
    shuffles the batches."""

    def __init__(self, bucket_ids: list[int], size: int, seed: int):
        self.buckets: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_ids):
            self.buckets.setdefault(b, []).append(i)
        self.size, self.seed, self._cache = size, seed, {}
        if not any(len(v) >= size for v in self.buckets.values()):
            raise ValueError(f"no group of same-shape pairs holds pairs.batch={size} pairs "
                             f"(groups: {sorted(len(v) for v in self.buckets.values())})")

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e, 11])
            mbs = []
            for _, idx in sorted(self.buckets.items()):
                perm = [idx[i] for i in rng.permutation(len(idx))]
                mbs += [perm[s:s + self.size] for s in range(0, len(perm) - self.size + 1, self.size)]
            self._cache = {e: [mbs[i] for i in rng.permutation(len(mbs))]}
        return self._cache[e]

    def take(self, start: int, count: int) -> tuple[list[list[int]], int]:
        """Batches [start, start + count) of the endless stream, and the epoch of the last."""
        per_epoch = len(self.epoch(0))
        out = [self.epoch(k // per_epoch)[k % per_epoch] for k in range(start, start + count)]
        return out, (start + count - 1) // per_epoch


class PairSource:
    """Prepared pairs (``Family.prepare_pairs`` on a rollout worker) → one batch per step."""

    def __init__(self, prepared: dict, cfg, seed: int):
        self.data, self.cfg, self.seed = prepared, cfg, seed
        self.per_step = cfg.per_step // cfg.batch
        self.order = PairOrder(prepared["bucket_ids"], cfg.batch, seed)

    def batch(self, step: int, step_seed: int):
        groups, epoch = self.order.take((step - 1) * self.per_step, self.per_step)
        self.epoch = epoch
        d = self.data
        if d["modality"] == "image":
            idx = torch.tensor([i for g in groups for i in g])
            return ImagePairs([d["prompts"][i] for i in idx.tolist()], d["chosen"][idx], d["rejected"][idx],
                              torch.arange(len(idx)), seed=step_seed)
        buckets, row = [], 0
        for g in groups:  # one ordered batch = one prompt length: a bucket of its own
            pad = d["eos_id"]
            width = max(len(d["chosen_ids"][i]) for i in g)
            fill = lambda ids: torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # noqa: E731
            buckets.append(TextPairBucket(torch.tensor([d["prompt_ids"][i] for i in g]),
                                          fill([d["chosen_ids"][i] for i in g]), fill([d["rejected_ids"][i] for i in g]),
                                          torch.arange(row, row + len(g))))
            row += len(g)
        return TextPairs(buckets, seed=step_seed)


# ----------------------------------------------------------------------------------------------
# Checks before anything starts (text datasets)
# ----------------------------------------------------------------------------------------------
def reward_columns(name: str, kwargs: dict) -> list:
    """The dataset columns reward ``name`` (built with ``kwargs``) needs, without building it: a
    function's required keyword parameters (``rewards.base.columns_needed``); a class's
    ``required_columns_for(**kwargs)`` or class attribute ``required_columns`` (a class may hold a
    model: it is built once, on the reward workers)."""
    import functools
    import inspect

    from rewards.base import columns_needed
    from rlgen.registry import REWARDS

    obj = REWARDS.get(name)
    if inspect.isclass(obj):
        declared = getattr(obj, "required_columns_for", None)
        return list(declared(**kwargs)) if declared else list(getattr(obj, "required_columns", ()))
    return columns_needed(functools.partial(obj, **kwargs) if kwargs else obj)


def check_text_prompts(job, policy_folder: Path | None) -> None:
    """``prompts.source: dataset``: every reward finds its columns, and a chat template the policy's
    tokenizer lacks is refused (both one line naming what is missing), before the run folder is touched."""
    c = job.prompts
    if c.source != "dataset":
        return
    from rlgen.data.text_dataset import apply_chat_template, check_columns, load_text_dataset

    ds = load_text_dataset(c.dataset, render_chat=False)
    check_columns({name: reward_columns(name, job.reward_kwargs.get(name, {})) for name in job.rewards}, ds)
    if c.dataset.chat_template and policy_folder is not None:
        from rlgen.models.hf_lm import check_remote_code, load_hf_tokenizer

        check_remote_code(policy_folder, job.policy.trust_remote_code)
        tok = load_hf_tokenizer(policy_folder, job.policy.trust_remote_code)
        apply_chat_template(tok, ds.messages[0])  # no template: the one-line refusal
