"""A learner rank's death (SIGKILL of a ``ray::Learner`` process mid-run) ends the job with one line
naming the rank and what it was doing, promptly (the surviving rank waits in a collective for the
dead one forever; the driver must not wait with it), and leaves the newest checkpoint intact:
``run.resume=auto`` continues from it."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from rlgen.runtime.rundir import find_latest_checkpoint, read_metrics
from tests.runtime.test_driver_crash import args, kill_cluster
from tests_helpers import tiny_flow_policy

REPO = Path(__file__).resolve().parents[2]


def learner_processes(driver_pid: int) -> list[psutil.Process]:
    """The ``ray::Learner`` worker processes this driver's local cluster started."""
    out = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::Learner"):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow  # one Ray job killed mid-run (~1 min) and its resume (~1 min)
def test_sigkilled_learner_ends_the_run_in_one_line_and_the_checkpoint_resumes(tmp_path):
    models = {"flow": tiny_flow_policy(tmp_path / "tiny"), "lm": None}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ray_tmp = tempfile.mkdtemp(prefix="rld_")
    two_ranks = ["learner.num_learners=2", "learner.micro_batch_size=2", "ray.num_cpus=4"]
    try:
        cmd = [sys.executable, "train_rl.py", *args(tmp_path, models, "run", "flow_grpo", ray_tmp, steps=50), *two_ranks]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while (find_latest_checkpoint(tmp_path / "run") or Path("-1")).name not in ("2", "3", "4"):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        victims = learner_processes(proc.pid)
        assert len(victims) == 2
        victims[1].send_signal(signal.SIGKILL)  # one rank: the other is left waiting in a collective
        t0 = time.time()
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the driver hung after a learner rank died")
        took = time.time() - t0
    finally:
        kill_cluster(ray_tmp)

    try:
        last_line = err.strip().splitlines()[-1]
        assert proc.returncode == 1, err[-3000:]
        m = re.fullmatch(r"error: learner rank \d \(Learner actor, pid (\d+)\) died during (\w+)\(\): .+; newest "
                         r"complete checkpoint: (\S+) \(run\.resume=auto continues from it\)", last_line)
        assert m, last_line
        print(f"{last_line}  [driver exited {took:.1f} s after the SIGKILL]")
        assert int(m.group(1)) == victims[1].pid and m.group(2) in ("train", "get_weights", "save")
        last = find_latest_checkpoint(tmp_path / "run")
        assert Path(m.group(3)) == last and took < 60
        ckpts = tmp_path / "run" / "checkpoints"
        assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())  # a save cut short left nothing

        import train_rl

        step = int(last.name)
        resumed = args(tmp_path, models, "run", "flow_grpo", ray_tmp, steps=step + 1, resume="auto")
        assert train_rl.main([*resumed, *two_ranks]) == 0
        assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(step + 2))
    finally:
        kill_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
