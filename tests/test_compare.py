"""rlgen.compare: the before/after guard on hand-made metrics files."""
import json

import pytest

from rlgen.compare import compare, guard, moving_average


def write_run(d, evals, rewards):
    d.mkdir()
    rows = [{"step": s, "reward_mean": r} for s, r in rewards]
    rows += [{"step": s, "eval/accuracy": a, "eval/fd": fd, "eval/diversity": dv} for s, a, fd, dv in evals]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in sorted(rows, key=lambda r: r["step"])) + "\n")


def test_guard_bounds_are_relative_to_the_first_evaluation():
    g = guard({"eval/accuracy": 0.6, "eval/fd": 10.0, "eval/diversity": 2.0},
              {"eval/accuracy": 0.8, "eval/fd": 10.9, "eval/diversity": 1.5}, 1.1, 0.7)
    assert g["accuracy_up"] and g["fd_ok"] and g["div_ok"]
    assert g["fd_ratio"] == pytest.approx(1.09) and g["div_ratio"] == pytest.approx(0.75)
    g = guard({"eval/accuracy": 0.6, "eval/fd": 10.0, "eval/diversity": 2.0},
              {"eval/accuracy": 0.5, "eval/fd": 11.5, "eval/diversity": 1.3}, 1.1, 0.7)
    assert not g["accuracy_up"] and not g["fd_ok"] and not g["div_ok"]


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_compare_writes_figure_table_and_json(tmp_path):
    write_run(tmp_path / "kl", [(0, 0.6, 10.0, 2.0), (10, 0.7, 10.5, 1.9)], [(1, 0.5), (2, 0.6)])
    write_run(tmp_path / "nokl", [(0, 0.6, 10.0, 2.0), (10, 0.9, 14.0, 1.0)], [(1, 0.5), (2, 0.9)])
    res = compare([tmp_path / "kl", tmp_path / "nokl"], tmp_path / "out")
    assert res["kl"]["fd_ok"] and res["kl"]["div_ok"]
    assert not res["nokl"]["fd_ok"] and not res["nokl"]["div_ok"] and res["nokl"]["last_step"] == 10
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    assert "| nokl | 0 → 10 | 0.600 → 0.900 |" in (tmp_path / "out" / "compare.md").read_text()


def test_a_run_without_evaluations_is_a_clear_error(tmp_path):
    write_run(tmp_path / "r", [], [(1, 0.5)])
    with pytest.raises(ValueError, match="no held-out evaluation"):
        compare([tmp_path / "r"], tmp_path / "out")


def test_side_by_side_places_grids_next_to_each_other(tmp_path):
    from PIL import Image

    from rlgen.compare import side_by_side

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    Image.new("RGB", (20, 50), "blue").save(tmp_path / "b.png")
    out = side_by_side({"base": tmp_path / "a.png", "rl": tmp_path / "b.png"}, tmp_path / "g.png", scale=1.0)
    im = Image.open(out)
    assert im.size == (40 + 8 + 20, 18 + 50)   # widths + one gap; label strip + tallest grid
    assert im.getpixel((10, 18 + 5)) == (255, 0, 0) and im.getpixel((48 + 5, 18 + 40)) == (0, 0, 255)
