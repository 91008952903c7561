"""Task definitions and their verifiers live in rlgen/data; rlgen.data never imports rewards/.

Run in a fresh interpreter where any import of the ``rewards`` package fails: every rlgen.data
module must still import, the text tasks must still verify answers, and ``rewards`` must be absent
from sys.modules afterwards.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, json, pkgutil, sys

class BlockRewards:
    def find_spec(self, name, path=None, target=None):
        if name == "rewards" or name.startswith("rewards."):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, BlockRewards())
import rlgen.data
mods = sorted(m.name for m in pkgutil.iter_modules(rlgen.data.__path__, "rlgen.data."))
for m in mods:
    importlib.import_module(m)
from rlgen.data.text_tasks import get_task
scores = [get_task("arith").check({"task": "arith", "expression": "47+85"}, "231"),
          get_task("countdown").check({"task": "countdown", "numbers": [3, 7, 9], "target": 30}, "3*7+9"),
          get_task("sudoku").check({"task": "sudoku", "puzzle": "1.3..4.2.1.3.3.."}, "1234341221434321"),
          get_task("arith").check({"task": "arith", "expression": "47+85"}, "132")]
print(json.dumps({"modules": mods, "scores": scores,
                  "rewards_loaded": sorted(m for m in sys.modules if m == "rewards" or m.startswith("rewards."))}))
"""


def test_rlgen_data_imports_without_the_rewards_package():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"rlgen.data.arith", "rlgen.data.countdown", "rlgen.data.sudoku", "rlgen.data.text_tasks"} <= set(res["modules"])
    assert res["rewards_loaded"] == []
    # 47+85 = 132, written reversed "231" (natural order "132" is wrong); 3·7+9 = 30; the grid
    # keeps every given and each row, column and box holds 1..4
    assert res["scores"] == [1.0, 1.0, 1.0, 0.0]
