"""The same job on a two-node Ray cluster, submitted with `ray job submit` (docs/scaling.md).

Two raylets on this machine, both on 127.0.0.1 with their own CPUs and a label resource each:
    ray start --head --num-cpus=2 --resources='{"rlgen_head": 100}' ...
    ray start --address=127.0.0.1:<port> --num-cpus=2 --resources='{"rlgen_worker": 100}' ...
    ray job submit --address=http://127.0.0.1:<dashboard> -- python train_rl.py ... ray.address=auto \
        'resources.learner_resources={rlgen_head: 1}' 'resources.rollout_resources={rlgen_worker: 1}'
The learner must land on the head and the rollout and reward workers on the second node; the run
folder's placement.json is compared with the nodes Ray's state API reports.
"""
import json
import os
import shlex
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

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block ...` in a process group of its own (stopped by signalling the group:
    `ray stop` would stop every Ray cluster on the machine)."""
    # every port a raylet opens is chosen here: two nodes on one IP must not collide (nor with
    # other clusters on the machine, which the defaults such as 52365 would)
    ports = [f"--{k}={free_port()}" for k in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                               "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                                               "runtime-env-agent-port")]
    cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *ports, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop_node(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for(what: str, check, procs, timeout_s: float = 180):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
        try:
            if check():
                return
        except Exception:  # the dashboard is not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {timeout_s} s")


@pytest.fixture
def two_nodes():
    temp = tempfile.mkdtemp(prefix="rlgen_2n_", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    gcs, dash = free_port(), free_port()
    procs = [start_node(["--head", f"--port={gcs}", f"--temp-dir={temp}", "--num-cpus=2",
                         "--resources={\"rlgen_head\": 100}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"], env)]
    try:
        from ray.util.state import list_nodes

        url = f"http://127.0.0.1:{dash}"
        wait_for("head node start", lambda: len(list_nodes(address=url)) == 1, procs)
        procs.append(start_node([f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp}", "--num-cpus=2",
                                 "--resources={\"rlgen_worker\": 100}"], env))
        wait_for("second node joining", lambda: len([n for n in list_nodes(address=url) if n.state == "ALIVE"]) == 2,
                 procs)
        yield url, env
    finally:
        for p in reversed(procs):
            stop_node(p)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # two raylets + dashboard + a Ray job: 1-3 minutes on a busy 2-core machine
def test_job_submitted_to_two_nodes_spreads_roles(tmp_path, two_nodes):
    url, env = two_nodes
    policy = tiny_flow_policy(tmp_path / "policy")
    job = [sys.executable, "train_rl.py", "--config", "configs/rl/flow_grpo_shapes.yaml", "ray.address=auto",
           f"run.root={tmp_path}", "run.name=two_nodes", "run.progress=false", "run.tensorboard=false",
           f"policy.checkpoint={policy}", "rewards={'rewards.examples:brightness': 1.0}", "prompts.per_step=2",
           "prompts.group_size=2", "rollout.num_steps=3", "learner.micro_batch_size=2", "train.steps=2",
           "train.grid_every=0", "eval.benchmark=", "resources.rollout_threads=1", "resources.learner_threads=1",
           "resources.learner_resources={rlgen_head: 1}", "resources.rollout_resources={rlgen_worker: 1}",
           "resources.reward_resources={rlgen_worker: 1}"]
    entry = f"cd {shlex.quote(str(REPO))} && {shlex.join(job)}"
    out = subprocess.run([RAY, "job", "submit", f"--address={url}", "--", "bash", "-c", entry], env=env, capture_output=True,
                         text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    assert [r["step"] for r in read_metrics(tmp_path / "two_nodes")] == [0, 1, 2]

    from ray.util.state import list_nodes

    nodes = {n.node_id: n for n in list_nodes(address=url, detail=True)}
    head = [i for i, n in nodes.items() if n.resources_total.get("rlgen_head")]
    worker = [i for i, n in nodes.items() if n.resources_total.get("rlgen_worker")]
    assert len(head) == 1 and len(worker) == 1 and head != worker
    placed = json.loads((tmp_path / "two_nodes" / "placement.json").read_text())
    assert placed["learner"] == head
    assert placed["rollout"] == worker and placed["reward"] == worker
    assert placed["driver"] == head[0]  # a job's entrypoint runs on the head node
