"""The same job on an existing Ray cluster: `ray start --head` on 127.0.0.1, `ray.address=<it>`."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
    temp = tempfile.mkdtemp(prefix="rlgen_rh_", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
           "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_tiny_job_on_a_running_cluster(tmp_path, head_node):
    import train_rl

    policy = tiny_flow_policy(tmp_path / "policy")
    args = ["--config", "configs/rl/flow_grpo_shapes.yaml", f"ray.address={head_node}", f"run.root={tmp_path}",
            "run.name=cluster", "run.progress=false", "run.tensorboard=false", f"policy.checkpoint={policy}",
            "rewards={'rewards.examples:brightness': 1.0}", "prompts.per_iteration=2", "prompts.group_size=2",
            "rollout.num_steps=3", "learner.micro_batch_size=4", "train.iterations=1", "eval.benchmark=''"]
    assert train_rl.main(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "cluster")] == [0, 1]
