"""Exact verifiers for the text tasks (arith, countdown, sudoku) and the rewards built on them.

A completion is the decoded answer text (``rlgen.data.tokenizer.decode_completion`` cuts it at
[EOS]); stray "[EOS]"/"[PAD]"/"[MASK]" strings are removed here too, so raw decodes work.
Formats (see rlgen/data/arith.py, countdown.py, sudoku.py for the prompts):

- arith: ``"a+b"``, ``"a-b"``, ``"a*b"`` (operands as written, zero-padding kept). The answer is
  the result's digits, least significant first, zero-padded to a fixed width: ``+`` and ``-`` →
  max(len a, len b) + 1 slots, the last slot being the carry for ``+`` and the sign for ``-``
  ("0", or "-" when negative); ``*`` → len a + len b. ``"47+85"`` = 132 → ``"231"``;
  ``"12-47"`` = -35 → ``"53-"``; ``"23*8"`` = 184 → ``"481"``.
- countdown: an infix expression over + - * / and parentheses using each given number at most
  once, equal to the target. Parsed by recursive descent (no ``eval``), evaluated exactly with
  Fractions; unary minus, division by zero, numbers with leading zeros and over-long input fail.
- sudoku: the full solved grid as n² digits, row by row; it must keep every given and make every
  row, column and box a permutation of 1..n.

Each ``verify_*(problem, text, partial=False)`` returns 1.0 / 0.0; with ``partial`` a wrong answer
earns the documented partial credit (for RL shaping), always < 1.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction

from rlgen.registry import register_reward

_SPECIAL = re.compile(r"\[(PAD|MASK)\]")


def clean_completion(text: str) -> str:
    """Cut at the first "[EOS]", drop "[PAD]"/"[MASK]" strings, strip surrounding whitespace."""
    return _SPECIAL.sub("", text.split("[EOS]", 1)[0]).strip()


# ----------------------------------------------------------------------------------------------
# arith
# ----------------------------------------------------------------------------------------------
_ARITH = re.compile(r"(\d{1,9})([+\-*])(\d{1,9})")
_ARITH_ANSWER = re.compile(r"(\d+)(-?)")


def parse_arith(expression: str) -> tuple[str, str, str]:
    m = _ARITH.fullmatch(expression)
    if m is None:
        raise ValueError(f"arith expression {expression!r} is not <digits><+|-|*><digits>")
    return m.group(1), m.group(2), m.group(3)


def arith_value(expression: str) -> int:
    a, op, b = parse_arith(expression)
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def arith_width(expression: str) -> int:
    a, op, b = parse_arith(expression)
    return len(a) + len(b) if op == "*" else max(len(a), len(b)) + 1


def format_arith_answer(expression: str) -> str:
    """The reversed, zero-padded answer the model is trained to write."""
    value, width = arith_value(expression), arith_width(expression)
    if parse_arith(expression)[1] == "-":  # width-1 digits, then the sign slot
        return str(abs(value)).zfill(width - 1)[::-1] + ("-" if value < 0 else "0")
    return str(value).zfill(width)[::-1]


def read_arith_answer(text: str) -> int | None:
    """Reversed digits (any zero-padding) with an optional trailing '-' → int; None if malformed."""
    m = _ARITH_ANSWER.fullmatch(text)
    if m is None:
        return None
    value = int(m.group(1)[::-1])
    return -value if m.group(2) else value


def verify_arith(problem: dict, text: str, partial: bool = False) -> float:
    """1 if the reversed answer has the right value; partial: fraction of slots matching."""
    text = clean_completion(text)
    if read_arith_answer(text) == arith_value(problem["expression"]):
        return 1.0
    if not partial:
        return 0.0
    ref = format_arith_answer(problem["expression"])
    return 0.9 * sum(a == b for a, b in zip(text, ref)) / len(ref)


# ----------------------------------------------------------------------------------------------
# countdown
# ----------------------------------------------------------------------------------------------
class ExpressionError(ValueError):
    """The completion is not a well-formed countdown expression."""


_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
MAX_EXPR_CHARS = 64
MAX_DEPTH = 8


def _tokenize(text: str) -> list[str]:
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(f"unexpected character {text[pos:].lstrip()[:1]!r} at {pos}")
        tok = m.group(1) or m.group(2)
        if m.group(1) and (len(tok) > 6 or (len(tok) > 1 and tok[0] == "0")):
            raise ExpressionError(f"bad number {tok!r} (leading zero or too long)")
        tokens.append(tok)
        pos = m.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := NUMBER | '(' expr ')'. Values are Fractions; every number read is recorded."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            value = value + self.term(depth) if self.take() == "+" else value - self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.take()
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"expected a number or '(', got {tok!r}")


def evaluate_countdown(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the numbers it uses; ExpressionError if bad."""
    parser = _Parser(_tokenize(text))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return value, parser.numbers


def verify_countdown(problem: dict, text: str, partial: bool = False) -> float:
    """1 if the expression uses the given numbers at most once each and equals the target.

    partial: a well-formed expression over allowed numbers that misses the target earns
    0.1 + 0.4·max(0, 1 − |value − target| / target) (so ∈ [0.1, 0.5)); anything else 0.
    """
    try:
        value, used = evaluate_countdown(clean_completion(text))
    except ExpressionError:
        return 0.0
    if Counter(used) - Counter(problem["numbers"]):  # a number not given, or used too often
        return 0.0
    target = problem["target"]
    if value == target:
        return 1.0
    if not partial:
        return 0.0
    return 0.1 + 0.4 * max(0.0, 1.0 - float(abs(value - target)) / max(abs(target), 1))


# ----------------------------------------------------------------------------------------------
# sudoku
# ----------------------------------------------------------------------------------------------
def sudoku_units(n: int) -> list[list[int]]:
    """Cell indices of every row, column and box of an n×n grid (n a perfect square)."""
    b = math.isqrt(n)
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(br * b + r) * n + bc * b + c for r in range(b) for c in range(b)]
             for br in range(b) for bc in range(b)]
    return rows + cols + boxes


def verify_sudoku(problem: dict, text: str, partial: bool = False) -> float:
    """1 if ``text`` is a full valid grid keeping every given ('.' in the puzzle is a blank).

    partial: a grid of the right shape that keeps the givens earns 0.9 × (fraction of rows,
    columns and boxes that are permutations of 1..n), so 1.0 only when fully valid.
    """
    puzzle = problem["puzzle"]
    n = math.isqrt(len(puzzle))
    grid = clean_completion(text)
    digits = "".join(str(d) for d in range(1, n + 1))
    if len(grid) != len(puzzle) or any(ch not in digits for ch in grid):
        return 0.0
    if any(p != "." and p != g for p, g in zip(puzzle, grid)):
        return 0.0
    units = sudoku_units(n)
    good = sum(sorted(grid[i] for i in unit) == list(digits) for unit in units)
    if good == len(units):
        return 1.0
    return 0.9 * good / len(units) if partial else 0.0


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
    from rlgen.data.text_tasks import get_task  # lazy: rlgen.data imports this module

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
