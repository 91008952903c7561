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
is what a tiny model learns in minutes (FEASIBILITY.md: 3–4 numbers from 1..10 and targets to 250
gave 3%; the earlier n3/n4 mix over 1..10 reached n4 0.145 after 24 min). Mixing n2 into training
slowed n3 down (configs/pretrain/mdm_countdown.yaml). The generation length fits any K-number
expression of ≤ D-digit numbers with minimal parentheses: K·D digits + (K−1) operators +
2·(K−2) parentheses, D = digits of the largest number (1 for generated problems; 2 or more for
problems from files).
"""
from __future__ import annotations

import random
import re

from rewards.text_verifiers import verify_countdown

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
