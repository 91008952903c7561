"""countdown: combine the given numbers with + − × ÷ to hit a target, each number at most once.

Problem  {"task": "countdown", "numbers": [3, 7, 9], "target": 30}
Prompt   "3,7,9:30="
Answer   "(7-3)*9" padded with [EOS] to ``gen_length`` (any expression the verifier accepts counts)

Generation picks the numbers first, then builds the target from them: it combines random pairs
with random operations (only positive integer intermediate results: ``a − b`` needs a > b, ``a ÷ b``
exact) until one value is left, and keeps it if it lies in the level's target range. The reference
solution is that construction, written with the fewest parentheses and, for + and ×, the larger
operand first — one canonical spelling per construction is easier for a tiny model to learn.

Levels ``nK``: K numbers drawn uniformly from 1..9 with repeats, every number used, target 1..100
(about 2,100 distinct n3 problems, a tenth of them held out). The default level, and the harder
one, is n3; n2 (3-token answers, 138 distinct problems) is an easier level to ask for by name;
n4..n6 can still be sampled. Single-digit numbers and three of them keep answers short (n3: 7 tokens), which
is what a tiny model learns in minutes (docs/feasibility.md: 3–4 numbers from 1..10 and targets to 250
gave 3%; the earlier n3/n4 mix over 1..10 reached n4 0.145 after 24 min). Mixing n2 into training
slowed n3 down (configs/pretrain/mdm_countdown.yaml). The generation length fits any K-number
expression of ≤ D-digit numbers with minimal parentheses: K·D digits + (K−1) operators +
2·(K−2) parentheses, D = digits of the largest number (1 for generated problems; 2 or more for
problems from files).

Verifier (``verify_countdown``; the ``countdown_verifier`` / ``countdown_partial`` rewards wrap it):
an infix expression over + - * / and parentheses using each given number at most once, equal to
the target. Parsed by recursive descent (no ``eval``), evaluated exactly with Fractions; unary
minus, division by zero, numbers with leading zeros and over-long input fail.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from rlgen.data.completion import clean_completion

_LEVEL = re.compile(r"n(\d)")
NUMBER_RANGE = (1, 9)  # single digits: short, fixed-width answers per level
TARGET_RANGE = (1, 100)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _render(node) -> str:
    """node = int | (op, left, right); parentheses only where precedence requires them."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    ls, rs = _render(left), _render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and (_PREC[right[0]] < _PREC[op] or
                                       (_PREC[right[0]] == _PREC[op] and op in "-/")):
        rs = f"({rs})"
    return f"{ls}{op}{rs}"


def _combine(rng: random.Random, a: tuple[int, object], b: tuple[int, object]):
    """One random operation on two (value, node) pairs; None when it would leave the integers."""
    (va, na), (vb, nb) = (a, b) if a[0] >= b[0] else (b, a)  # larger value first
    op = rng.choice("+-*/")
    if op == "+":
        return va + vb, ("+", na, nb)
    if op == "*":
        return va * vb, ("*", na, nb)
    if op == "-":
        return (va - vb, ("-", na, nb)) if va > vb else None
    return (va // vb, ("/", na, nb)) if vb > 0 and va % vb == 0 else None


def build_target(rng: random.Random, numbers: list[int], target_range=TARGET_RANGE, tries: int = 200):
    """(target, reference expression) using every number once, or None if no try landed in range."""
    for _ in range(tries):
        pool = [(v, v) for v in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            merged = _combine(rng, pool[i], pool[j])
            if merged is None:
                break
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [merged]
        if len(pool) == 1 and target_range[0] <= pool[0][0] <= target_range[1]:
            return pool[0][0], _render(pool[0][1])
    return None


# ----------------------------------------------------------------------------------------------
# The verifier: a recursive-descent parser (no eval) and exact Fractions
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
# The task
# ----------------------------------------------------------------------------------------------
class CountdownTask:
    name = "countdown"
    fields = {"numbers": list, "target": int}
    levels = ("n3",)
    hard_levels = ("n3",)

    def validate(self, problem: dict) -> None:
        nums = problem["numbers"]
        if not 2 <= len(nums) <= 6 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 10**6
                                              for x in nums):
            raise ValueError(f"'numbers' must be 2-6 integers in [0, 1e6), got {nums!r}")

    def level_of(self, problem: dict) -> str:
        return f"n{len(problem['numbers'])}"

    def sample(self, rng: random.Random, level: str) -> dict:
        m = _LEVEL.fullmatch(level)
        if m is None or not 2 <= int(m.group(1)) <= 6:
            raise ValueError(f"countdown level {level!r}: expected nK with K in 2..6 (e.g. n3)")
        while True:
            numbers = [rng.randint(*NUMBER_RANGE) for _ in range(int(m.group(1)))]
            built = build_target(rng, numbers)
            if built is not None:
                return {"task": self.name, "numbers": numbers, "target": built[0], "level": level,
                        "solution": built[1]}

    def key(self, problem: dict) -> str:
        return ",".join(map(str, sorted(problem["numbers"]))) + f":{problem['target']}"

    def format_prompt(self, problem: dict) -> str:
        return ",".join(map(str, problem["numbers"])) + f":{problem['target']}="

    def reference_answer(self, problem: dict) -> str:
        if "solution" in problem:
            return problem["solution"]
        raise ValueError(f"countdown problem {problem!r} has no 'solution' (only generated problems carry one)")

    def gen_length(self, problem: dict) -> int:
        k = len(problem["numbers"])
        d = max(len(str(x)) for x in problem["numbers"])
        return k * d + (k - 1) + 2 * max(0, k - 2)

    def check(self, problem: dict, text: str, partial: bool = False) -> float:
        return verify_countdown(problem, text, partial=partial)
