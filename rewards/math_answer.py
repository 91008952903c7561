"""``math_answer``: 1.0 when a completion's final answer equals the reference answer, else 0.0.

The final answer is read, in this order, from the last ``\\boxed{...}`` (LaTeX, nested braces
allowed), the text after the last ``####`` (GSM8K's convention), the text after "answer is", or the
last number in the text. The reference comes from the row's ``solution`` or ``answer`` column (or
``answer_column=``) and is read the same way, so a GSM8K solution ("… #### 72") works as is.
Numbers compare by value (``1,234`` = ``1234.0``; ``\\frac{3}{4}`` = ``3/4`` = ``0.75``, within
``tolerance``); anything else compares as text, ignoring case, spaces, ``$`` and a final period.

trl style: ``reward(completions, **columns)``; completions may be text or conversational turns
(``[{"role": "assistant", "content": ...}]``).
"""
from __future__ import annotations

import re
from fractions import Fraction

from rewards.base import RewardError
from rlgen.registry import register_reward

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def completion_text(completion) -> str:
    """Text of a completion: a string, or the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), balancing nested braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution text (see the module docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for marker in ("####", "answer is"):
        k = text.lower().rfind(marker)
        if k >= 0:
            tail = text[k + len(marker):].strip().lstrip(":").strip()
            if tail:
                numbers = _NUMBER.findall(tail.split("\n")[0])
                return numbers[0] if numbers else tail.split("\n")[0].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(answer: str) -> Fraction | None:
    s = _FRAC.sub(r"(\1)/(\2)", answer)
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).rstrip(".").replace("(", "").replace(")", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def reference_answer(gold) -> str:
    """The reference: the whole value when it is already an answer (``72``, ``\\frac{1}{3}``), else
    what ``extract_answer`` reads from a worked solution ("… #### 72")."""
    text = str(gold).strip()
    worked = last_boxed(text) is not None or "####" in text or "answer is" in text.lower()
    if as_number(text) is not None or not worked:
        return text
    return extract_answer(text) or text


def answers_match(pred: str | None, gold: str | None, tolerance: float = 1e-6) -> bool:
    if pred is None or gold is None:
        return False
    a, b = as_number(pred), as_number(gold)
    if a is not None and b is not None:
        return abs(float(a - b)) <= tolerance * max(1.0, abs(float(b)))
    norm = lambda s: re.sub(r"[\s$]", "", s).rstrip(".").lower()  # noqa: E731
    return norm(pred) == norm(gold)


@register_reward("math_answer")
class MathAnswer:
    """``math_answer``: exact final-answer match against the ``solution``/``answer`` column."""

    def __init__(self, answer_column: str | None = None, tolerance: float = 1e-6):
        self.answer_column, self.tolerance = answer_column, float(tolerance)
        self.required_columns = self.required_columns_for(answer_column)

    @staticmethod
    def required_columns_for(answer_column: str | None = None, **_) -> list:
        """The columns an instance built with these kwargs needs (checked before one is built)."""
        return [answer_column] if answer_column else [("solution", "answer")]

    def __call__(self, completions, **columns) -> list[float]:
        name = self.answer_column or next((c for c in ("solution", "answer") if c in columns), None)
        if name is None or name not in columns:
            wanted = repr(self.answer_column) if self.answer_column else "'solution' or 'answer'"
            raise RewardError(f"reward 'math_answer' needs column {wanted}, which the data lacks "
                              f"(columns: {sorted(columns)})", reward="math_answer")
        golds = columns[name]
        if len(golds) != len(completions):
            raise RewardError(f"reward 'math_answer': {len(golds)} {name!r} values for {len(completions)} "
                              f"completions", reward="math_answer")
        return [float(answers_match(extract_answer(completion_text(c)), reference_answer(g), self.tolerance))
                for c, g in zip(completions, golds)]
