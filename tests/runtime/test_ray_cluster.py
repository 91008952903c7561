"""The same job on an existing Ray cluster: `ray start --head` on 127.0.0.1, `ray.address=<it>`."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlgen.runtime.rundir import read_metrics
from tests_helpers import tiny_flow_policy

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A head node of its own: `ray start --head --block` in a new process group, stopped by
    signalling that group. (`ray stop` would kill every Ray cluster on the machine, a user's too.)"""
    temp = tempfile.mkdtemp(prefix="rlgen_rh_", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp}", "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the GCS port to accept connections
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("ray head node did not start within 120 s")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_tiny_job_on_a_running_cluster(tmp_path, head_node):
    import train_rl

    policy = tiny_flow_policy(tmp_path / "policy")
    args = ["--config", "configs/rl/flow_grpo_shapes.yaml", f"ray.address={head_node}", f"run.root={tmp_path}",
            "run.name=cluster", "run.progress=false", "run.tensorboard=false", f"policy.checkpoint={policy}",
            "rewards={'rewards.examples:brightness': 1.0}", "prompts.per_step=2", "prompts.group_size=2",
            "rollout.num_steps=3", "learner.micro_batch_size=2", "train.steps=1", "eval.benchmark=''"]
    assert train_rl.main(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "cluster")] == [0, 1]
