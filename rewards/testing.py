"""Fault injection for rehearsing worker failures (used by tests/runtime/test_faults.py).

``FaultInjector`` scores images like ``brightness`` (texts by their fraction of digits) and, on chosen calls, SIGKILLs the job's rollout
workers or its own reward worker process — the faults a preempted or OOM-killed actor produces.
Calls are counted in a file under ``marker_dir`` so the count survives the reward worker's restart.

    rewards: {'rewards.testing:FaultInjector': 1.0}
    reward_kwargs: {'rewards.testing:FaultInjector': {marker_dir: /tmp/faults, kill_rollout_at: [2]}}
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from rewards.examples import brightness


def _ray_siblings(title_prefix: str) -> list[int]:
    """Pids of this Ray node's worker processes whose title starts with ``title_prefix`` (the
    raylet is every worker's parent, so other clusters on the machine are left alone)."""
    me, pids = os.getppid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and cmd.startswith(title_prefix):
            pids.append(int(entry))
    return pids


class FaultInjector:
    def __init__(self, marker_dir: str, kill_rollout_at: list[int] = (), kill_self_at: list[int] = ()):
        self.dir = Path(marker_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kill_rollout_at, self.kill_self_at = set(kill_rollout_at), set(kill_self_at)

    def _bump(self) -> int:
        f = self.dir / "calls"
        n = int(f.read_text()) + 1 if f.exists() else 1
        f.write_text(str(n))
        return n

    def _once(self, what: str, n: int) -> bool:
        marker = self.dir / f"{what}-{n}"
        if marker.exists():
            return False
        marker.write_text("")
        return True

    def __call__(self, samples, prompts, **meta):
        n = self._bump()
        if n in self.kill_rollout_at and self._once("rollout", n):
            pids = _ray_siblings("ray::RolloutWorker")
            (self.dir / f"killed-rollout-{n}").write_text(" ".join(map(str, pids)))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        if n in self.kill_self_at and self._once("self", n):
            os.kill(os.getpid(), signal.SIGKILL)
        if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], str):
            return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in samples]
        return brightness(samples, prompts)
