"""sudoku: fill a 4×4 sudoku (digits 1-4; every row, column and 2×2 box holds each once).

Problem  {"task": "sudoku", "puzzle": "1.3..4.2.1.3.3.."}   16 cells row by row, '.' = blank
Prompt   "1.3..4.2.1.3.3..="
Answer   "1234341221434321"   the whole solved grid (16 digits, fixed width: no padding)

A masked-diffusion LM fits this task well: it can fill the cells it is sure of first, in any
order. Generation: one of the 288 valid grids uniformly, then blanks are removed one at a time in random
order, keeping only removals that leave the solution unique (checked against all 288 grids at
once), until the level's blank count.
Levels ``bK`` = K blanks (uniquely solvable 4×4 puzzles have at most 12 blanks):
default training mix b4, b6, b8, b10; harder: b8 + b10. Puzzles from files need not be unique —
the verifier accepts any valid completion that keeps the givens.

Verifier (``verify_sudoku``; the ``sudoku_verifier`` / ``sudoku_partial`` rewards wrap it): the full
solved grid as n² digits, row by row; it must keep every given and make every row, column and
box a permutation of 1..n.
"""
from __future__ import annotations

import math
import random
import re

import numpy as np

from rlgen.data.completion import clean_completion

# ----------------------------------------------------------------------------------------------
# The verifier: every row, column and box a permutation of 1..n
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
# The task
# ----------------------------------------------------------------------------------------------
_LEVEL = re.compile(r"b(\d+)")
N = 4
_UNITS = sudoku_units(N)
_PEERS = [sorted({j for u in _UNITS if i in u for j in u} - {i}) for i in range(N * N)]


def _all_grids() -> list[list[int]]:
    """Every valid 4×4 grid (there are 288), by backtracking from the empty grid."""
    grids, cells = [], [0] * (N * N)

    def fill(i: int) -> None:
        if i == N * N:
            grids.append(list(cells))
            return
        for d in range(1, N + 1):
            if all(cells[j] != d for j in _PEERS[i]):
                cells[i] = d
                fill(i + 1)
        cells[i] = 0

    fill(0)
    return grids


GRIDS = np.array(_all_grids(), dtype=np.int8)  # (288, 16)


def solutions(cells) -> np.ndarray:
    """All grids that agree with the givens of ``cells`` (0 = blank): (S, 16)."""
    c = np.asarray(cells, dtype=np.int8)
    return GRIDS[np.all((GRIDS == c) | (c == 0), axis=1)]


class SudokuTask:
    name = "sudoku"
    fields = {"puzzle": str}
    levels = ("b4", "b6", "b8", "b10")
    hard_levels = ("b8", "b10")

    def validate(self, problem: dict) -> None:
        p = problem["puzzle"]
        if len(p) != N * N or any(ch not in ".1234" for ch in p):
            raise ValueError(f"'puzzle' must be 16 characters from '.1234', got {p!r}")

    def level_of(self, problem: dict) -> str:
        return f"b{problem['puzzle'].count('.')}"

    def sample(self, rng: random.Random, level: str) -> dict:
        m = _LEVEL.fullmatch(level)
        if m is None or not 1 <= int(m.group(1)) <= 12:
            raise ValueError(f"sudoku level {level!r}: expected bK with K blanks in 1..12 (e.g. b8)")
        blanks = int(m.group(1))
        while True:
            solution = [int(x) for x in GRIDS[rng.randrange(len(GRIDS))]]
            cells = list(solution)
            removed = 0
            for i in rng.sample(range(N * N), N * N):
                if removed == blanks:
                    break
                cells[i] = 0
                if len(solutions(cells)) == 1:
                    removed += 1
                else:
                    cells[i] = solution[i]
            if removed == blanks:
                return {"task": self.name, "puzzle": "".join(str(c) if c else "." for c in cells),
                        "level": level, "solution": "".join(map(str, solution))}

    def key(self, problem: dict) -> str:
        return problem["puzzle"]

    def format_prompt(self, problem: dict) -> str:
        return problem["puzzle"] + "="

    def reference_answer(self, problem: dict) -> str:
        if "solution" in problem:
            return problem["solution"]
        found = solutions([int(c) if c != "." else 0 for c in problem["puzzle"]])
        if len(found) == 0:
            raise ValueError(f"sudoku puzzle {problem['puzzle']!r} has no solution")
        return "".join(map(str, found[0]))

    def gen_length(self, problem: dict) -> int:
        return len(problem["puzzle"])

    def check(self, problem: dict, text: str, partial: bool = False) -> float:
        return verify_sudoku(problem, text, partial=partial)

