"""Rewards for the text tasks (arith, countdown, sudoku): registered wrappers of their verifiers.

The verifiers themselves live with their tasks, in rlgen/data/arith.py, countdown.py and
sudoku.py (``verify_<task>(problem, text, partial=False)`` → 1.0 / 0.0, or the documented partial
credit < 1 with ``partial``), so task definitions never import this package. This module registers
``<task>_verifier`` (exact), ``<task>_partial`` (partial credit) and the task-dispatching
``text_verifier`` / ``text_partial``, in both calling conventions: rlgen's
``(samples, prompts, problems=[...])`` and trl's ``(prompts=..., completions=..., **columns)``.

The verifier functions are re-exported here under their old names for existing callers.
"""
from __future__ import annotations

from rlgen.data.arith import (arith_value, arith_width, format_arith_answer, parse_arith,  # noqa: F401
                              read_arith_answer, verify_arith)
from rlgen.data.completion import clean_completion  # noqa: F401
from rlgen.data.countdown import (MAX_DEPTH, MAX_EXPR_CHARS, ExpressionError, evaluate_countdown,  # noqa: F401
                                  verify_countdown)
from rlgen.data.sudoku import sudoku_units, verify_sudoku  # noqa: F401
from rlgen.registry import register_reward

# ----------------------------------------------------------------------------------------------
# Rewards: (samples, prompts, **meta) and trl's (prompts=..., completions=..., **columns)
# ----------------------------------------------------------------------------------------------
VERIFIERS = {"arith": verify_arith, "countdown": verify_countdown, "sudoku": verify_sudoku}


def _completion_text(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):  # trl conversational format
        return str(c[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(c).__name__}")


def _problems_from_meta(task_name: str | None, n: int, meta: dict) -> list[dict]:
    """``problems=[...]`` (rlgen), or a trl dataset's ``problem`` column, or its field columns."""
    if meta.get("problems") is not None:
        return list(meta["problems"])
    if meta.get("problem") is not None:
        return list(meta["problem"])
    from rlgen.data.text_tasks import get_task  # lazy: it pulls torch and the tokenizer

    tasks = meta.get("task") or [task_name] * n
    out = []
    for i, name in enumerate(tasks):
        if name is None:
            raise ValueError("text_verifier needs problems=[...] or a 'task' column")
        fields = get_task(name).fields
        missing = [f for f in fields if f not in meta]
        if missing:
            raise ValueError(f"{name} reward: give problems=[...] or the dataset columns {list(fields)}; "
                             f"missing {missing}")
        out.append({"task": name, **{f: meta[f][i] for f in fields}})
    return out


def score_completions(task_name: str | None, samples=None, prompts=None, *, partial: bool = False,
                      completions=None, **meta) -> list[float]:
    """Score completion texts against their problems; ``task_name=None`` dispatches on problem['task'].

    ``meta`` carries ``problems`` (rlgen) or a trl dataset's columns (``problem``, or ``task`` and
    the task's fields); other keys (trl's ``completion_ids``, ``trainer_state`` …) are ignored.
    """
    task = task_name
    items = samples if samples is not None else completions
    if items is None:
        raise ValueError("no completions given (pass samples positionally or completions=...)")
    texts = [_completion_text(c) for c in items]
    problems = _problems_from_meta(task_name, len(texts), meta)
    if len(problems) != len(texts):
        raise ValueError(f"{len(texts)} completions but {len(problems)} problems")
    scores = []
    for i, (problem, text) in enumerate(zip(problems, texts)):
        name = problem.get("task", task)
        if task is not None and name != task:
            raise ValueError(f"{task}_verifier got a problem of task {name!r} at index {i}")
        if name not in VERIFIERS:
            raise ValueError(f"problem {i}: unknown task {name!r} (known: {sorted(VERIFIERS)})")
        scores.append(VERIFIERS[name](problem, text, partial=partial))
    return scores


def _register(name: str, task: str | None, partial: bool) -> None:
    def reward(samples=None, prompts=None, *, completions=None, **meta) -> list[float]:
        return score_completions(task, samples, prompts, partial=partial, completions=completions, **meta)

    reward.__name__ = name  # trl logs rewards under the function's name
    reward.__doc__ = f"{'Partial-credit' if partial else 'Exact (1/0)'} reward for {task or 'any text'} task."
    register_reward(name)(reward)
    globals()[name] = reward


for _task in VERIFIERS:
    _register(f"{_task}_verifier", _task, partial=False)
    _register(f"{_task}_partial", _task, partial=True)
_register("text_verifier", None, partial=False)
_register("text_partial", None, partial=True)
