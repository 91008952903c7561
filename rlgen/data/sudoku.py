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
"""
from __future__ import annotations

import random
import re

import numpy as np

from rewards.text_verifiers import sudoku_units, verify_sudoku

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

