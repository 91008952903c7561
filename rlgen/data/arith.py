"""arith: multi-digit +, −, × with fixed-width, reversed answers.

Problem  {"task": "arith", "expression": "047+085"}   (operands as written; zero-padding kept)
Prompt   "047+085="
Answer   "2310"   = 132 zero-padded to 4 slots, least significant digit first

Why reversed: a model that writes the least significant digit first has every carry it needs
already on the page; measured on this machine (docs/feasibility.md), a 0.8M-parameter masked-diffusion
LM learns 2-digit ± in minutes this way and not at all with natural order. Fixed widths (operands
zero-padded to the level's digit count, answers to ``arith_width``) keep every example of a level
the same length, so batches carry no padding. The sign of a subtraction sits in the last slot
("0" or "-"), so ``12-47`` → ``"53-"``; the generator itself only writes a ≥ b.

Levels (difficulty = digit count; generated problems carry their level, a file's problems get
pmW / mulNxM read off the expression as written):
    pmN     a ± b, both N-digit (zero-padded), answer N+1 slots    e.g. pm2, pm3
    pmN@W   the same numbers written W digits wide                 e.g. pm1@2: "07+05=" -> "210"
    mulNxM  a × b, a N-digit, b M-digit, answer N+M slots          e.g. mul1x1, mul2x1
Default training mix and benchmark: pm1@2 + pm2 (one layout, so the model learns one procedure);
the benchmark's harder difficulty is pm2. Measured here (d=128 × 4, batch 128): levels with
different layouts learn nearly independently and slowly — in a pm2/pm3 mix pm2 was still at 5%
after 3,500 steps, while pm2 alone reached 83% at 1,500 and the pm1@2 + pm2 mix passed 31% (pm2)
at 1,000 steps. pm1@2 has only ~155 distinct problems (~16 held out), so its accuracy is coarse.

Verifier (``verify_arith``; the ``arith_verifier`` / ``arith_partial`` rewards wrap it): the answer
is read back as reversed digits with an optional trailing '-', any zero-padding, and compared with
the exact value; partial credit is 0.9 × the fraction of slots matching the reference answer.
"""
from __future__ import annotations

import random
import re

from rlgen.data.completion import clean_completion

_LEVEL = re.compile(r"pm(\d)(?:@(\d))?|mul(\d)x(\d)")


# ----------------------------------------------------------------------------------------------
# The verifier: exact integer arithmetic on the reversed answer
# ----------------------------------------------------------------------------------------------
_ARITH = re.compile(r"(\d{1,9})([+\-*])(\d{1,9})")
_ARITH_ANSWER = re.compile(r"(\d+)(-?)")
MAX_ANSWER_DIGITS = 20  # operands have at most 9 digits, so every value has at most 18


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
    digits = m.group(1)[::-1].lstrip("0") or "0"
    if len(digits) > MAX_ANSWER_DIGITS:  # no arith value is this long; int() refuses over 4300 digits
        return None
    value = int(digits)
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
# The task
# ----------------------------------------------------------------------------------------------
class ArithTask:
    name = "arith"
    fields = {"expression": str}
    levels = ("pm1@2", "pm2")
    hard_levels = ("pm2",)

    def validate(self, problem: dict) -> None:
        parse_arith(problem["expression"])  # ValueError with the expression in the message

    def level_of(self, problem: dict) -> str:
        a, op, b = parse_arith(problem["expression"])
        return f"mul{len(a)}x{len(b)}" if op == "*" else f"pm{max(len(a), len(b))}"

    def sample(self, rng: random.Random, level: str) -> dict:
        m = _LEVEL.fullmatch(level)
        if m is None:
            raise ValueError(f"arith level {level!r}: expected pmN, pmN@W or mulNxM (e.g. pm2, pm2@3, mul2x1)")
        if m.group(1):
            n = int(m.group(1))
            w = max(n, int(m.group(2) or 0))  # written width: "pm2@3" writes 2-digit operands as "047"
            a, b = rng.randrange(10**n), rng.randrange(10**n)
            op = rng.choice("+-")
            if op == "-" and a < b:  # non-negative differences only, as in the measured recipe
                a, b = b, a
            expr = f"{a:0{w}d}{op}{b:0{w}d}"
        else:
            n, k = int(m.group(3)), int(m.group(4))
            expr = f"{rng.randrange(10**n):0{n}d}*{rng.randrange(10**k):0{k}d}"
        return {"task": self.name, "expression": expr, "level": level}

    def key(self, problem: dict) -> str:
        # + and × commute: "12+34" and "34+12" share a key, so the held-out split keeps both out.
        a, op, b = parse_arith(problem["expression"])
        if op in "+*" and b < a:
            a, b = b, a
        return f"{a}{op}{b}"

    def format_prompt(self, problem: dict) -> str:
        return problem["expression"] + "="

    def reference_answer(self, problem: dict) -> str:
        return format_arith_answer(problem["expression"])

    def gen_length(self, problem: dict) -> int:
        return arith_width(problem["expression"])

    def check(self, problem: dict, text: str, partial: bool = False) -> float:
        return verify_arith(problem, text, partial=partial)
