"""Exact verifiers on hand-made cases, and both reward calling conventions (rlgen and trl)."""
import builtins

import pytest

from rewards import text_verifiers as tv
from rlgen.registry import REWARDS

ARITH = {"task": "arith", "expression": "47+85"}            # 132
CD = {"task": "countdown", "numbers": [3, 7, 25, 50], "target": 125}


@pytest.mark.parametrize("text,score", [
    ("231", 1.0), ("2310", 1.0),       # reversed 132, extra zero padding allowed
    ("231[EOS][EOS]", 1.0), (" 231 ", 1.0),
    ("132", 0.0),                      # natural order is wrong in this format
    ("230", 0.0), ("", 0.0), ("2x1", 0.0),
])
def test_arith_exact(text, score):
    assert tv.verify_arith(ARITH, text) == score


def test_arith_negative_and_partial():
    neg = {"task": "arith", "expression": "12-47"}  # -35 → "53-"
    assert tv.verify_arith(neg, "53-") == 1.0
    assert tv.verify_arith(neg, "530") == 0.0
    assert tv.verify_arith(ARITH, "201", partial=True) == pytest.approx(0.9 * 2 / 3)  # slots 0 and 2 right
    assert tv.verify_arith(ARITH, "231", partial=True) == 1.0


@pytest.mark.parametrize("text", ["50*3-25", "(50*3)-25", " 50 * 3 - 25 ", "3*50-25", "((50))*3-25"])
def test_countdown_accepts_valid(text):
    assert tv.verify_countdown(CD, text) == 1.0


@pytest.mark.parametrize("text,why", [
    ("50*3-25-0", "0 not given"),
    ("25*5", "5 not given"),
    ("50+50+25", "50 used twice"),
    ("50*3-7", "wrong value"),
    ("(7-7)", "7 used twice"),
    ("25/(7-7)", "7 twice anyway"),
    ("50*(3", "unbalanced"),
    ("50*3)-25", "unbalanced"),
    ("-25+150", "unary minus"),
    ("50 3", "missing operator"),
    ("", "empty"),
    ("50**3", "double operator"),
    ("__import__('os')", "not arithmetic"),
    ("050*3-25", "leading zero"),
    ("(" * 9 + "50" + ")" * 9 + "*3-25", "too deep"),
])
def test_countdown_rejects(text, why):
    assert tv.verify_countdown(CD, text) == 0.0, why


def test_countdown_division_by_zero_and_exact_fractions():
    pr = {"task": "countdown", "numbers": [4, 4, 2, 8], "target": 3}
    with pytest.raises(tv.ExpressionError, match="division by zero"):
        tv.evaluate_countdown("8/(4-4)")
    assert tv.verify_countdown(pr, "8/(4-4)+2") == 0.0
    assert tv.verify_countdown(pr, "8*2/4/4*...") == 0.0
    assert tv.verify_countdown({"task": "countdown", "numbers": [1, 3, 3], "target": 1}, "1/3*3") == 1.0  # exactly 1


def test_countdown_never_evaluates_python(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("eval/exec must not be called")
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    with pytest.raises(tv.ExpressionError):
        tv.evaluate_countdown("__import__('os').system('true')")
    assert tv.verify_countdown(CD, "(50*3)-25") == 1.0


def test_countdown_partial_credit():
    assert tv.verify_countdown(CD, "50*3", partial=True) == pytest.approx(0.1 + 0.4 * (1 - 25 / 125))
    assert tv.verify_countdown(CD, "50*50", partial=True) == 0.0  # 50 used twice: no credit
    assert tv.verify_countdown(CD, "50*3-25", partial=True) == 1.0


def test_sudoku():
    pr = {"task": "sudoku", "puzzle": "1.3..4.2.1.3.3.."}
    sol = "1234341221434321"
    assert tv.verify_sudoku(pr, sol) == 1.0
    assert tv.verify_sudoku(pr, sol[:-1]) == 0.0                     # too short
    assert tv.verify_sudoku(pr, "2" + sol[1:]) == 0.0                # breaks a given
    swapped = "1234341221434312"                                     # last row 4,3,1,2: columns break
    assert tv.verify_sudoku(pr, swapped) == 0.0
    assert 0 < tv.verify_sudoku(pr, swapped, partial=True) < 0.9


def test_rewards_rlgen_convention():
    fn = REWARDS.get("arith_verifier")
    assert fn(["231", "132"], ["47+85=", "47+85="], problems=[ARITH, ARITH]) == [1.0, 0.0]
    mixed = REWARDS.get("text_verifier")
    assert mixed(["231", "50*3-25"], ["", ""], problems=[ARITH, CD]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="task 'countdown' at index 1"):
        fn(["231", "1"], ["", ""], problems=[ARITH, CD])
    with pytest.raises(ValueError, match="2 completions but 1 problems"):
        fn(["231", "1"], ["", ""], problems=[ARITH])


def test_rewards_trl_convention():
    fn = REWARDS.get("countdown_verifier")
    # trl: keyword prompts/completions plus the dataset's columns, plus bookkeeping kwargs
    out = fn(prompts=["3,7,25,50:125=", "3,7,25,50:125="], completions=["50*3-25", "50+50"],
             numbers=[[3, 7, 25, 50]] * 2, target=[125, 125], completion_ids=[[1], [2]], trainer_state=None)
    assert out == [1.0, 0.0]
    assert fn.__name__ == "countdown_verifier"
    # a problems column works too, and conversational completions
    chat = [[{"role": "assistant", "content": "50*3-25"}]]
    assert fn(prompts=["p"], completions=chat, problems=[CD]) == [1.0]
    assert REWARDS.get("text_verifier")(prompts=["p"], completions=["231"], task=["arith"], expression=["47+85"]) == [1.0]
    with pytest.raises(ValueError, match="missing"):
        fn(prompts=["p"], completions=["1"], numbers=[[1]])
