"""``code_tests``: run a completion's code against the row's tests in a limited subprocess.

Score: the fraction of the row's tests that pass (``partial=True``, the default) or 1.0 only when
all pass. The completion's code is the last fenced ```python block, else the whole text. It runs in a
fresh ``python -I`` process (never ``eval`` in the reward's own process) with:

- a wall-clock limit (``timeout_s``; the whole process group is killed) and a CPU-time limit;
- an address-space limit (``memory_mb``, ``RLIMIT_AS``) and a file-size limit; unbounded
  allocation ends in MemoryError or death at the limit;
- no network: a new network namespace when the kernel allows it (``unshare(CLONE_NEWNET)``: only a
  loopback device, down), and in any case Python's ``socket`` constructors raise;
- an empty temporary working directory and a minimal environment.

A program that loops, allocates without bound or crashes scores 0 and the run goes on. This guards
against runaway code, not against an adversary: for untrusted models use a real sandbox (e.g. a
remote grader through rewards/remote.py).

The ``tests`` column holds one string of test code (e.g. ``assert add(1, 2) == 3``, one test per
line) or a list of such strings. trl style: ``reward(completions, tests=[...])``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from rewards.base import RewardError
from rewards.math_answer import completion_text
from rlgen.registry import register_reward

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

# The child limits itself before it reads the untrusted code (a process cannot raise its own hard
# limits again), so no preexec_fn runs in a forked copy of this multi-threaded process. Then it
# blocks sockets, runs the code and each test, and reports a count tagged with a per-run nonce.
_HARNESS = r'''
import ctypes, json, os, resource, socket, sys
job_path, mem, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET: only a loopback device, down
except Exception:
    pass  # not permitted here: the socket block below still applies
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*a, **k):
    raise OSError("network access is disabled in code_tests")
socket.socket = socket.create_connection = socket.socketpair = socket.getaddrinfo = _no_network
with open(job_path) as f:
    job = json.load(f)
os.remove(job_path)
nonce, tests = job.pop("nonce"), job["tests"]
ns = {"__name__": "__main__"}
try:
    exec(compile(job["code"], "<completion>", "exec"), ns)
    passed = 0
    for t in tests:
        try:
            exec(compile(t, "<test>", "exec"), ns)
            passed += 1
        except BaseException:
            pass
except BaseException:
    passed = 0
sys.stdout.flush()
os.write(1, ("\n%s %d\n" % (nonce, passed)).encode())
os._exit(0)
'''


def extract_code(text: str) -> str:
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def split_tests(tests) -> list[str]:
    """A list of test snippets, or one string: one test per non-empty line (continuations kept)."""
    if isinstance(tests, (list, tuple)):
        return [str(t) for t in tests]
    lines, out = str(tests).splitlines(), []
    for line in lines:
        if not line.strip():
            continue
        if line[0].isspace() and out:  # an indented line continues the previous test
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def run_tests(code: str, tests: list[str], timeout_s: float = 5.0, memory_mb: int = 512) -> int:
    """Number of ``tests`` that pass after ``code`` runs, in a limited subprocess (0 on any failure)."""
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="rlgen_code_") as tmp:
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            json.dump({"code": code, "tests": tests, "nonce": nonce}, f)
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        cpu_s = max(1, int(timeout_s) + 1)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _HARNESS, job, str(memory_mb << 20), str(cpu_s)],
                                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # own group: killpg below
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return 0
    found = re.findall(rf"^{nonce} (\d+)$", out.decode(errors="replace")[-4096:], flags=re.MULTILINE)
    return int(found[-1]) if proc.returncode == 0 and found else 0


@register_reward("code_tests")
class CodeTests:
    """``code_tests``: fraction of the row's tests the completion's code passes (see module docstring)."""

    def __init__(self, tests_column: str = "tests", timeout_s: float = 5.0, memory_mb: int = 512,
                 partial: bool = True, workers: int = 4):
        if timeout_s <= 0 or memory_mb < 64 or workers < 1:
            raise ValueError(f"code_tests: need timeout_s > 0 ({timeout_s}), memory_mb ≥ 64 ({memory_mb}), "
                             f"workers ≥ 1 ({workers})")
        self.tests_column, self.timeout_s, self.memory_mb = tests_column, float(timeout_s), int(memory_mb)
        self.partial, self.workers = partial, workers
        self.required_columns = self.required_columns_for(tests_column)

    @staticmethod
    def required_columns_for(tests_column: str = "tests", **_) -> list:
        """The columns an instance built with these kwargs needs (checked before one is built)."""
        return [tests_column]

    def _score(self, completion, tests) -> float:
        cases = split_tests(tests)
        if not cases:
            return 0.0
        passed = run_tests(extract_code(completion_text(completion)), cases, self.timeout_s, self.memory_mb)
        return passed / len(cases) if self.partial else float(passed == len(cases))

    def __call__(self, completions, **columns) -> list[float]:
        if self.tests_column not in columns:
            raise RewardError(f"reward 'code_tests' needs column {self.tests_column!r}, which the data lacks "
                              f"(columns: {sorted(columns)})", reward="code_tests")
        tests = columns[self.tests_column]
        if len(tests) != len(completions):
            raise RewardError(f"reward 'code_tests': {len(tests)} tests for {len(completions)} completions",
                              reward="code_tests")
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._score, completions, tests))
