"""Text tasks: formats worked out by hand, problems files, the held-out split, SFT items."""
import json

import pytest

from rlgen.data.text_tasks import (ProblemError, TaskDataset, generate_problems, get_task, is_heldout, level_of,
                                   load_problems)
from rlgen.data.tokenizer import build_tokenizer, decode_completion
from rlgen.registry import DATASETS


@pytest.mark.parametrize("expr,prompt,answer", [
    ("47+85", "47+85=", "231"),        # 132 → "132" reversed
    ("047+085", "047+085=", "2310"),   # 4 slots for 3-digit operands
    ("93-07", "93-07=", "680"),        # 86, sign slot "0"
    ("12-47", "12-47=", "53-"),        # -35, sign slot "-"
    ("23*8", "23*8=", "481"),          # 184
    ("07*5", "07*5=", "530"),          # 35 in 3 slots
])
def test_arith_format(expr, prompt, answer):
    task, pr = get_task("arith"), {"task": "arith", "expression": expr}
    assert task.format_prompt(pr) == prompt
    assert task.reference_answer(pr) == answer
    assert task.gen_length(pr) == len(answer)


def test_arith_levels_from_expression():
    assert level_of({"task": "arith", "expression": "047+085"}) == "pm3"
    assert level_of({"task": "arith", "expression": "23*8"}) == "mul2x1"


def test_countdown_generation_is_solvable_and_fits():
    task = get_task("countdown")
    for pr in generate_problems("countdown", 60, seed=3, levels=["n3", "n4"]):
        ans = task.reference_answer(pr)
        assert task.check(pr, ans) == 1.0, pr
        assert len(ans) <= task.gen_length(pr)
        assert 1 <= pr["target"] <= 100


@pytest.mark.parametrize("numbers,width", [
    ([7, 3], 3),             # "7*3": 2 digits + 1 operator
    ([3, 7, 9], 7),          # "(7-3)*9": 3 digits + 2 operators + 1 pair of parentheses
    ([3, 7, 25, 50], 15),    # 2-digit numbers (a problems file): 8 digits + 3 operators + 2 pairs
])
def test_countdown_width_by_hand(numbers, width):
    assert get_task("countdown").gen_length({"task": "countdown", "numbers": numbers, "target": 1}) == width


def test_countdown_levels_are_single_digit_n2_easy_n3_hard():
    task = get_task("countdown")
    assert task.levels == ("n3",) and task.hard_levels == ("n3",)
    for pr in generate_problems("countdown", 200, seed=5, levels=["n2", "n3"]):
        assert all(1 <= x <= 9 for x in pr["numbers"]) and level_of(pr) == f"n{len(pr['numbers'])}"
        ans = task.reference_answer(pr)
        assert task.check(pr, ans) == 1.0 and len(ans) <= task.gen_length(pr) == {"n2": 3, "n3": 7}[pr["level"]]


def test_sudoku_generation_unique_and_correct():
    task = get_task("sudoku")
    for pr in generate_problems("sudoku", 12, seed=1, levels=["b6", "b10"]):
        assert pr["puzzle"].count(".") == int(pr["level"][1:])
        assert task.check(pr, pr["solution"]) == 1.0
        assert task.reference_answer({"task": "sudoku", "puzzle": pr["puzzle"]}) == pr["solution"]


def test_heldout_split_is_disjoint_and_deterministic():
    train = generate_problems("arith", 300, seed=0, levels=["pm2"])
    held = generate_problems("arith", 100, seed=0, levels=["pm2"], split="heldout")
    assert not any(is_heldout(p) for p in train)
    assert all(is_heldout(p) for p in held)
    keys = lambda ps: {get_task("arith").key(p) for p in ps}  # noqa: E731
    assert not keys(train) & keys(held)
    assert len(keys(held)) == 100  # distinct
    assert held == generate_problems("arith", 100, seed=0, levels=["pm2"], split="heldout")
    # "12+34" and "34+12" share a key, so they fall on the same side of the split
    assert is_heldout({"task": "arith", "expression": "12+34"}) == is_heldout({"task": "arith", "expression": "34+12"})


def test_a_level_listed_twice_weights_training_but_is_scored_once():
    train = generate_problems("countdown", 400, seed=0, levels=["n2", "n3", "n3", "n3"])
    assert sum(p["level"] == "n3" for p in train) == 300
    held = generate_problems("countdown", 40, seed=0, levels=["n3", "n3"], split="heldout")
    keys = [get_task("countdown").key(p) for p in held]
    assert len(keys) == 40 and len(set(keys)) == 40
    assert held[:20] == generate_problems("countdown", 20, seed=0, levels=["n3"], split="heldout")


def _write(tmp_path, lines):
    p = tmp_path / "problems.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_problems_ok(tmp_path):
    p = _write(tmp_path, ['{"task": "countdown", "numbers": [3, 7, 25, 50], "target": 125}', "",
                          '{"task": "arith", "expression": "123*45"}', '{"task": "sudoku", "puzzle": "1.3..4.2.1.3.3.."}'])
    probs = load_problems(p)
    assert [x["task"] for x in probs] == ["countdown", "arith", "sudoku"]


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "invalid JSON"),
    ('{"task": "poetry"}', "unknown task 'poetry'"),
    ('{"expression": "1+2"}', "missing 'task'"),
    ('{"task": "countdown", "numbers": [1, 2]}', "missing field 'target'"),
    ('{"task": "countdown", "numbers": [1, 2], "target": "7"}', "'target' must be a int"),
    ('{"task": "arith", "expression": "1/2"}', "not <digits>"),
    ('{"task": "sudoku", "puzzle": "12"}', "16 characters"),
    ('[1, 2]', "expected a JSON object"),
])
def test_load_problems_errors_name_file_and_line(tmp_path, bad, needle):
    p = _write(tmp_path, ['{"task": "arith", "expression": "1+2"}', "", bad])
    with pytest.raises(ProblemError) as e:
        load_problems(p)
    assert f"{p}:3:" in str(e.value) and needle in str(e.value)


def test_registered_dataset_gives_padding_free_sft_items():
    tok = build_tokenizer()
    ds = DATASETS.get("countdown")(tok, size=20, seed=0, levels=["n3"])
    assert isinstance(ds, TaskDataset) and len(ds) == 20
    item = ds[0]
    task = get_task("countdown")
    assert len(item.answer_ids) == task.gen_length(item.problem)
    assert tok.decode(item.prompt_ids.tolist()) == task.format_prompt(item.problem)
    assert decode_completion(tok, item.answer_ids.tolist()) == item.problem["solution"]
    assert json.loads(json.dumps(item.problem)) == item.problem  # problems stay plain JSON
