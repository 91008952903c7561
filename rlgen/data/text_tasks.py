"""Text tasks for masked-diffusion LMs: problems, prompts, reference answers, held-out split.

A *problem* is a plain dict with ``task`` and that task's fields (what a JSONL problems file holds,
one per line)::

    {"task": "arith", "expression": "047+085"}
    {"task": "countdown", "numbers": [3, 7, 9], "target": 30}
    {"task": "sudoku", "puzzle": "1.3..4.2.1.3.3.."}

Optional keys: ``level`` (difficulty name; derived from the problem when absent) and ``solution``
(a reference answer). Each task (rlgen/data/arith.py, countdown.py, sudoku.py) offers
``format_prompt(problem)``, ``reference_answer(problem)`` (for SFT), ``gen_length(problem)`` (fixed
answer width in tokens), ``check(problem, completion_text, partial=False) -> float`` and
``sample(rng, level)``.

Held-out split: a problem is held out when the SHA-1 of ``"<task>:<key>"`` is 0 mod 10 (the key
ignores operand order where that changes nothing, e.g. ``12+34`` ≡ ``34+12``). Training data skips
held-out problems and the built-in evaluation set draws only held-out ones, so the two are disjoint
whatever seeds they use (evaluation additionally uses its own seed stream, ``EVAL_SEED_BASE``).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rlgen.data.arith import ArithTask
from rlgen.data.countdown import CountdownTask
from rlgen.data.sudoku import SudokuTask
from rlgen.data.tokenizer import encode_batch
from rlgen.registry import register_dataset

TASKS = {t.name: t for t in (ArithTask(), CountdownTask(), SudokuTask())}
HELDOUT_MOD = 10
MAX_PROBLEM_CHARS = 10_000  # a problems file's line; the built-in tasks' problems are under 200
EVAL_SEED_BASE = 1_000_003  # built-in eval sets use random.Random(EVAL_SEED_BASE + seed)


class ProblemError(ValueError):
    """A malformed problem; the message names the file and line when it came from one."""


def get_task(name: str):
    if name not in TASKS:
        raise ProblemError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def validate_problem(problem, where: str = "problem") -> dict:
    """Check ``task`` and the task's field types; raise ProblemError naming ``where``."""
    if not isinstance(problem, dict):
        raise ProblemError(f"{where}: expected a JSON object, got {type(problem).__name__}")
    if "task" not in problem:
        raise ProblemError(f"{where}: missing 'task' (one of: {', '.join(sorted(TASKS))})")
    try:
        task = get_task(problem["task"])
    except ProblemError as e:
        raise ProblemError(f"{where}: {e}") from None
    for field, tp in task.fields.items():
        if field not in problem:
            raise ProblemError(f"{where}: {task.name} problem is missing field '{field}'")
        value = problem[field]
        if not isinstance(value, tp) or isinstance(value, bool):
            raise ProblemError(f"{where}: field '{field}' must be a {tp.__name__}, got {value!r}")
    if not isinstance(problem.get("level", ""), str):
        raise ProblemError(f"{where}: field 'level' must be a string, got {problem['level']!r}")
    try:
        task.validate(problem)
    except (ValueError, TypeError) as e:
        raise ProblemError(f"{where}: {e}") from None
    return problem


def load_problems(path: str | Path) -> list[dict]:
    """Read a JSONL problems file; blank lines are skipped, anything malformed names its line."""
    p = Path(path)
    if not p.is_file():
        raise ProblemError(f"problems file not found: {p}")
    from rlgen.utils import TextFileError, read_text_file

    try:
        text = read_text_file(p)
    except TextFileError as e:
        raise ProblemError(str(e)) from None
    problems = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_PROBLEM_CHARS:  # never echo a huge line into an error
            raise ProblemError(f"{p}:{lineno}: a line of {len(line)} characters (a problem has at most "
                               f"{MAX_PROBLEM_CHARS})")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProblemError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
        problems.append(validate_problem(obj, f"{p}:{lineno}"))
    if not problems:
        raise ProblemError(f"{p}: no problems")
    return problems


def save_problems(path: str | Path, problems: Sequence[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(pr) + "\n" for pr in problems))


def level_of(problem: dict) -> str:
    return problem.get("level") or get_task(problem["task"]).level_of(problem)


def is_heldout(problem: dict) -> bool:
    key = f"{problem['task']}:{get_task(problem['task']).key(problem)}"
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % HELDOUT_MOD == 0


def generate_problems(task: str, n: int, seed: int, levels: Sequence[str] | None = None,
                      split: str = "train") -> list[dict]:
    """``n`` problems spread evenly over ``levels`` (task default if empty), from ``seed``.

    A level may be listed more than once to weight it: ``["n2", "n3", "n3", "n3"]`` gives n3 three
    quarters of the training problems (and of the training steps, which draw buckets by size).

    ``split="train"`` skips held-out problems (repeats allowed); ``split="heldout"`` keeps only
    held-out ones, distinct, drawn from the evaluation seed stream (fewer if a level runs out).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    t = get_task(task)
    levels = list(levels or t.levels)
    heldout = split == "heldout"
    rng = random.Random(EVAL_SEED_BASE + seed if heldout else seed)
    out = []
    seen_by_level: dict[str, set[str]] = {}  # a level listed twice (to weight it in training)
    for i, level in enumerate(levels):       # shares its held-out keys: no problem scored twice
        want = n // len(levels) + (i < n % len(levels))
        seen, tries = seen_by_level.setdefault(level, set()), 0
        while want > 0 and tries < 200 * want + 2000:
            tries += 1
            pr = t.sample(rng, level)
            if is_heldout(pr) != heldout:
                continue
            if heldout:
                k = t.key(pr)
                if k in seen:
                    continue
                seen.add(k)
            out.append(pr)
            want -= 1
    return out


# ----------------------------------------------------------------------------------------------
# SFT datasets: problem → (prompt ids, answer ids)
# ----------------------------------------------------------------------------------------------
@dataclass
class SFTItem:
    prompt_ids: torch.Tensor   # (P,) long
    answer_ids: torch.Tensor   # (A,) long: reference answer + [EOS] up to the task's gen_length
    problem: dict


def encode_examples(tokenizer, problems: Sequence[dict]) -> list[SFTItem]:
    """Problems → SFT items (batched through the tokenizer: ~10× faster than one by one)."""
    prompts, answers, widths = [], [], []
    for pr in problems:
        task = get_task(pr["task"])
        answer, width = task.reference_answer(pr), task.gen_length(pr)
        if len(answer) > width:
            raise ProblemError(f"reference answer {answer!r} is longer than gen_length {width} for {pr}")
        prompts.append(task.format_prompt(pr))
        answers.append(answer)
        widths.append(width)
    eos = tokenizer.eos_token_id
    p_ids, a_ids = encode_batch(tokenizer, prompts), encode_batch(tokenizer, answers)
    return [SFTItem(torch.tensor(p), torch.tensor(a + [eos] * (w - len(a))), pr)
            for p, a, w, pr in zip(p_ids, a_ids, widths, problems)]


class TaskDataset(torch.utils.data.Dataset):
    """Generated problems of one task as SFT items (tokenized once, up front)."""

    def __init__(self, task: str, tokenizer, size: int = 100_000, seed: int = 0,
                 levels: Sequence[str] | None = None, split: str = "train"):
        self.task = task
        self.problems = generate_problems(task, size, seed, levels, split)
        self.items = encode_examples(tokenizer, self.problems)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> SFTItem:
        return self.items[i]

    @property
    def prompts(self) -> list[str]:
        return [get_task(p["task"]).format_prompt(p) for p in self.problems]


def _dataset_factory(task: str):
    def make(tokenizer, size: int = 100_000, seed: int = 0, levels=None, split: str = "train"):
        return TaskDataset(task, tokenizer, size=size, seed=seed, levels=levels, split=split)

    make.__name__ = f"{task}_dataset"
    return make


for _name in TASKS:
    register_dataset(_name)(_dataset_factory(_name))
