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


SHIPPED_REWARD = '''"""Exists only in the job's working_dir: a worker that can import it got the shipped code."""


def score(samples, prompts, **meta):
    import torch

    x = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(samples)
    return x.float().flatten(1).mean(1).tolist()
'''


def shipped_copy(dst: Path, policy_src: Path) -> Path:
    """The code a job ships as its runtime_env working_dir: this checkout's code and configs (not its
    model assets), a tiny policy and a reward module that exist nowhere else."""
    def skip(folder, names):
        assets = Path(folder) == REPO / "rlgen" / "assets"  # the shipped models: not needed here
        return {n for n in names if n == "__pycache__" or n.endswith(".pyc") or (assets and n != "README.md")}

    for part in ("rlgen", "rewards", "rollouts", "configs"):
        shutil.copytree(REPO / part, dst / part, ignore=skip)
    shutil.copy(REPO / "train_rl.py", dst / "train_rl.py")
    shutil.copytree(policy_src, dst / "tiny_policy")
    (dst / "shipped_reward.py").write_text(SHIPPED_REWARD)
    return dst


@pytest.mark.slow  # two raylets, two Ray jobs (the second resumes the first): 3-6 minutes on a busy machine
def test_job_shipped_as_working_dir_without_a_shared_run_folder(tmp_path, two_nodes):
    """`ray job submit --working-dir` from a directory that is neither the nodes' nor the code's:
    every actor runs the shipped code (a reward module and a policy found only there), the learner
    sits on the second node and sends its checkpoint files to the driver through Ray, and the run
    folder lives on an fsspec URI (``local://``, the upload path) from which a second job resumes
    with an empty staging folder, as on a fresh machine."""
    url, env = two_nodes
    src = shipped_copy(tmp_path / "src", tiny_flow_policy(tmp_path / "policy"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staging, remote = tmp_path / "staging", tmp_path / "bucket"
    runtime_env = {"env_vars": {"RLGEN_STAGING_DIR": str(staging), "OMP_NUM_THREADS": "1"}}
    job = ["python", "train_rl.py", "--config", "configs/rl/flow_grpo_shapes.yaml", "ray.address=auto",
           f"run.root=local://{remote}", "run.name=shipped", "run.progress=false", "run.tensorboard=false",
           "policy.checkpoint=tiny_policy", "rewards={'shipped_reward:score': 1.0}", "prompts.per_step=2",
           "prompts.group_size=2", "rollout.num_steps=3", "learner.micro_batch_size=2", "train.grid_every=0",
           "train.save_every=1", "eval.benchmark=", "resources.rollout_threads=1", "resources.learner_threads=1",
           "resources.learner_resources={rlgen_worker: 1}", "resources.rollout_resources={rlgen_head: 1}",
           "resources.reward_resources={rlgen_worker: 1}"]

    def submit(*extra: str) -> None:
        for _ in range(5):  # a busy head may not have its job agent up yet: the job is then not created
            out = subprocess.run([RAY, "job", "submit", f"--address={url}", f"--working-dir={src}",
                                  f"--runtime-env-json={json.dumps(runtime_env)}", "--", *job, *extra], cwd=elsewhere,
                                 env=env, capture_output=True, text=True, timeout=900)
            log = out.stdout + out.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(10)
        assert out.returncode == 0 and "succeeded" in log, log[-4000:]

    submit("train.steps=2")
    run = remote / "shipped"
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    assert (run / "checkpoints" / "latest").read_text() == "2" and os.listdir(run / "checkpoints" / "2" / "deepspeed")
    placed = json.loads((run / "placement.json").read_text())
    assert placed["learner"] != [placed["driver"]]  # the learner's files came through Ray

    shutil.rmtree(staging)  # the second job starts from the URI alone
    submit("train.steps=3", "run.resume=auto")
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "3" and (run / "report.md").is_file()
