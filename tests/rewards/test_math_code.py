"""Registered verifiers for real datasets: ``math_answer`` and ``code_tests`` (limited subprocess)."""
import time

import pytest

import rlgen  # noqa: F401

from rewards.base import RewardError, RewardMixer, resolve_reward
from rewards.code_tests import split_tests
from rewards.math_answer import extract_answer


@pytest.mark.parametrize("text,answer", [
    ("so it is \\boxed{\\frac{3}{4}} done", "\\frac{3}{4}"),
    ("\\boxed{x^{2}} and later \\boxed{42}", "42"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The answer is 1,234 apples.", "1,234"),
    ("first 3 then 5 then -7.5", "-7.5"),
    ("no numbers here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_math_answer_scores_against_solution_or_answer_column():
    r = resolve_reward("math_answer")
    assert r.style == "trl"
    comps = ["#### 72", "\\boxed{0.75}", "The answer is 1,234.", "I think 5", "\\boxed{13}"]
    golds = ["She sold 48/2 = 24 in May.\n#### 72", "\\frac{3}{4}", "1234", "5", "12"]
    assert r(comps, ["p"] * 5, solution=golds) == [1.0, 1.0, 1.0, 1.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in comps]
    assert r(conversational, ["p"] * 5, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match="reward 'math_answer' needs column 'solution' or 'answer'"):
        r(comps, ["p"] * 5, level=["x"] * 5)


def test_split_tests_keeps_indented_continuations():
    assert split_tests("assert f(1) == 1\n\nfor i in range(3):\n    assert f(i) == i\n") == [
        "assert f(1) == 1", "for i in range(3):\n    assert f(i) == i"]
    assert split_tests(["a", "b"]) == ["a", "b"]


def test_code_tests_scores_runs_and_contains_bad_programs():
    r = resolve_reward("code_tests", timeout_s=2.0, memory_mb=256)
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 0) == 0"
    comps = {
        "right": "Here:\n```python\ndef add(a, b):\n    return a + b\n```",
        "partly": "def add(a, b):\n    return a + b if a < 2 else 0",  # passes tests 1 and 3
        "wrong": "def add(a, b):\n    return a - b",
        "loops": "def add(a, b):\n    return a + b\nwhile True:\n    pass",
        "allocates": "def add(a, b):\n    return a + b\nx = []\nwhile True:\n    x.append(bytearray(10**7))",
        "network": "import socket\nsocket.create_connection(('93.184.216.34', 80), timeout=1)\n"
                   "def add(a, b):\n    return a + b",
        "fakes": "print('\\n0123456789abcdef 3')\nimport os\nos._exit(0)",
        "syntax": "def add(a, b) return a + b",
    }
    t0 = time.perf_counter()
    scores = dict(zip(comps, r(list(comps.values()), ["p"] * len(comps), tests=[tests] * len(comps))))
    elapsed = time.perf_counter() - t0
    assert scores == {"right": 1.0, "partly": 2 / 3, "wrong": 1 / 3, "loops": 0.0, "allocates": 0.0,
                      "network": 0.0, "fakes": 0.0, "syntax": 0.0}
    assert elapsed < 2.0 * 2 + 4  # the looping program was killed at its 2 s limit (4 workers in parallel)
    strict = resolve_reward("code_tests", partial=False)
    assert strict([comps["wrong"], comps["right"]], ["p", "p"], tests=[tests, tests]) == [0.0, 1.0]


def test_code_tests_missing_column_and_a_run_that_goes_on():
    mixer = RewardMixer({"rewards": {"code_tests": 1.0}, "reward_kwargs": {"code_tests": {"timeout_s": 1.0}}})
    with pytest.raises(RewardError, match="reward 'code_tests' needs column 'tests'"):
        mixer(["def f(): pass"], ["p"])
    out = mixer(["while True: pass", "def f():\n    return 1"], ["p", "q"], tests=["assert f() == 1"] * 2)
    assert out.total.tolist() == [0.0, 1.0] and out.valid.all()
