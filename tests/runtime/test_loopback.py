"""Nothing listens beyond loopback on the embedded default, and a killed driver leaves no Ray process.

Each test lists the sockets the run's processes actually hold (psutil: the driver, its
descendants, and every process with its command line or an open file in the run's Ray temp
folder — Ray's agents and workers are children of the raylet and rename themselves) and requires
every listening TCP socket and every unconnected UDP socket to be bound to a loopback address.
Nothing here connects to a non-loopback address.
"""
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
ray = pytest.importorskip("ray")
# the helpers below run inside actors, where this test module is not importable: ship them by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (an IPv6 socket bound to IPv4 loopback)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def run_processes(temp_dir: str, driver: int | None = None) -> list[psutil.Process]:
    """The driver, its descendants, and every process whose command line or open files point into
    ``temp_dir`` (a folder only this run uses)."""
    found = {}
    if driver is not None:
        root = psutil.Process(driver)
        for p in [root, *root.children(recursive=True)]:
            found[p.pid] = p
    for p in psutil.process_iter():
        try:
            if temp_dir in " ".join(p.cmdline()) or any(f.path.startswith(temp_dir) for f in p.open_files()):
                found[p.pid] = p
        except psutil.Error:
            continue
    return [p for p in found.values() if _alive(p)]


def title(p: psutil.Process) -> str:
    """"ray::Actor" for Ray's renamed workers, else the program and the base names of its first arguments."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    return " ".join([p.name(), *(os.path.basename(c) for c in cmd[1:4])])


def listeners(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process title, bound address, port) of every listening TCP / unconnected UDP socket."""
    out = []
    for p in procs:
        try:
            name = title(p)
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    out.append((name, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return out


def assert_all_loopback(found: list[tuple[str, str, int]], must_include: list[str]) -> None:
    assert found, "no listening socket found at all: the scan is not seeing the run's processes"
    titles = " | ".join(t for t, _, _ in found)
    for needle in must_include:  # the scan reaches each kind of process the run starts
        assert needle in titles, f"no listener of {needle!r} among {sorted(set(t for t, _, _ in found))}"
    exposed = sorted({(t, ip, port) for t, ip, port in found if not _loopback(ip)})
    assert not exposed, f"listening beyond loopback: {exposed}"


# ----------------------------------------------------------------------------------------------
# torch rendezvous (no Ray): loopback store, loopback gloo pairs
# ----------------------------------------------------------------------------------------------
def _network_interface() -> str | None:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback for a in addrs):
            return name
    return None


def _rank(rank: int, port: int, kind: str, queue) -> None:
    import torch
    import torch.distributed as dist

    from rlgen.runtime import rendezvous

    if kind == "default":
        rendezvous.init_process_group("127.0.0.1", port, rank, 2, "gloo", timeout_s=60)
        t = torch.full((3,), float(rank + 1))
        dist.all_reduce(t)
    else:
        group = rendezvous.new_group("127.0.0.1", port, rank, 2, "gloo", timeout_s=60)
        t = torch.full((3,), float(rank + 1))
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        group.broadcast([t], opts).wait()
    queue.put((rank, t.tolist(), listeners([psutil.Process()])))
    time.sleep(1.0)  # keep the sockets open until the other rank has looked too


@pytest.mark.parametrize("kind", ["default", "new_group"])
def test_rendezvous_store_and_gloo_bind_loopback(monkeypatch, kind):
    import multiprocessing as mp

    from rlgen.runtime.rendezvous import free_port

    iface = _network_interface()
    if iface is None:
        pytest.skip("no network interface besides loopback: nothing to tell apart")
    # what a user (or a multi-node setup) may have exported: gloo would bind that interface
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", iface)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, kind, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    want = [3.0] * 3 if kind == "default" else [1.0] * 3  # all_reduce sums; broadcast copies rank 0
    assert [t for _, t, _ in got] == [want, want]
    found = [x for _, _, ls in got for x in ls]
    assert_all_loopback(found, must_include=[])


# ----------------------------------------------------------------------------------------------
# the embedded default's Ray cluster
# ----------------------------------------------------------------------------------------------
def _gloo_pair(actor, rank: int, port: int) -> float:
    """Runs in an actor: join a 2-rank gloo group through rlgen's rendezvous, all-reduce once."""
    import torch

    from rlgen.runtime.rendezvous import new_group

    actor._group = new_group("127.0.0.1", port, rank, 2, "gloo", timeout_s=60)
    t = torch.ones(1)
    actor._group.allreduce([t]).wait()
    return float(t)


class Idle:
    pass


def test_embedded_default_ray_listens_only_on_loopback():
    from rlgen.runtime.cluster import RayConfig, init_ray
    from rlgen.runtime.rendezvous import free_port

    temp = tempfile.mkdtemp(prefix="rlgen_lo_", dir="/tmp")
    assert init_ray(RayConfig(num_cpus=2, num_gpus=0, temp_dir=temp), 2)
    try:
        actors = [ray.remote(num_cpus=0.5)(Idle).remote() for _ in range(2)]
        port = free_port()
        assert ray.get([a.__ray_call__.remote(_gloo_pair, r, port) for r, a in enumerate(actors)]) == [2.0, 2.0]
        # dashboard.py (Ray's API server) is checked when it is up; with several clusters on one machine
        # it may still be looking for a free port when the scan runs
        must = ["gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Idle"]
        deadline = time.time() + 60  # on a loaded machine Ray's head processes open their ports late
        while True:
            found = listeners(run_processes(temp, os.getpid()))
            titles = " | ".join(t for t, _, _ in found)
            if all(m in titles for m in must) or time.time() > deadline:
                break
            time.sleep(1)
        assert_all_loopback(found, must_include=must)
        assert ray.util.get_node_ip_address() == "127.0.0.1"  # what actors use for rendezvous addresses
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_embedded_default_job_actors_listen_only_on_loopback(tmp_path):
    """What a Flow-GRPO run starts: 2 DeepSpeed learner ranks (ZeRO-2), collective weight sync to 2
    rollout workers, a reward worker; one update and one sync have run when the sockets are listed."""
    import numpy as np

    from rewards.worker import make_reward_worker
    from rlgen.algos.flow_grpo import FlowGRPOConfig
    from rlgen.data.shapes import make_batch
    from rlgen.families import LoraSpec
    from rlgen.families.flow import ImageRolloutConfig
    from rlgen.runtime.cluster import RayConfig, init_ray
    from rlgen.runtime.engine import OptimConfig
    from rlgen.runtime.learner import LearnerGroup, LearnerSpec
    from rlgen.runtime.weight_sync import make_weight_sync
    from rollouts.worker import RolloutWorker
    from tests_helpers import tiny_flow_policy

    policy = str(tiny_flow_policy(tmp_path / "policy"))
    temp = tempfile.mkdtemp(prefix="rlgen_lo_", dir="/tmp")
    assert init_ray(RayConfig(num_cpus=3, num_gpus=0, temp_dir=temp), 3)
    try:
        spec = LearnerSpec(policy, {}, LoraSpec(), FlowGRPOConfig(kl_beta=0.0), OptimConfig(), zero_stage=2,
                           micro_batch_size=2)
        learners = LearnerGroup(spec, 2, num_cpus=0.5)
        worker = ray.remote(num_cpus=0.5)(RolloutWorker)
        workers = [worker.remote(policy, {}, ImageRolloutConfig(num_steps=2), None, 1, "cpu", i) for i in range(2)]
        reward = make_reward_worker({"rewards": {"shapes_verifier": 1.0}}, num_cpus=0.5)
        images, prompts, _ = make_batch(np.random.default_rng(0), 2)
        assert ray.get(reward.score.remote(images.numpy(), prompts, None), timeout=300).total.shape == (2,)
        sync = make_weight_sync("collective", learners, workers)
        ray.get(sync.send(workers, sync.publish(learners)), timeout=300)
        learners.save(str(tmp_path / "ckpt"))  # a collective over the learners' gloo group
        found = listeners(run_processes(temp, os.getpid()))
        assert_all_loopback(found, must_include=["gcs_server", "raylet", "ray::DashboardAgent", "ray::Learner",
                                                 "ray::RolloutWorker", "ray::RewardWorker"])
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------
# a SIGKILLed driver leaves nothing behind
# ----------------------------------------------------------------------------------------------
DRIVER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from rlgen.runtime.cluster import RayConfig, init_ray
import ray
init_ray(RayConfig(num_cpus=1, num_gpus=0, temp_dir={temp!r}), 1)
@ray.remote(num_cpus=0.5)
class Worker:
    def pid(self):
        return os.getpid()
w = Worker.remote()
print("READY", ray.get(w.pid.remote()), flush=True)
time.sleep(600)
"""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie has exited
    except psutil.Error:
        return False


def test_sigkilled_driver_leaves_no_ray_process():
    temp = tempfile.mkdtemp(prefix="rlgen_kill_", dir="/tmp")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), temp=temp)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = driver.stdout.readline()
        assert line.startswith("READY"), line
        procs = run_processes(temp, driver.pid)
        titles = " | ".join(title(p) for p in procs)
        for needle in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Worker",
                       "local_cluster.py"):  # the run's processes, the watchdog included, are seen
            assert needle in titles, titles
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        deadline, left = time.time() + 30, procs
        while left and time.time() < deadline:
            time.sleep(0.5)
            left = [p for p in procs if _alive(p)] + run_processes(temp)
        # Ray alone leaves its two agents (and the job agent's port) for about a minute
        assert not left, [" ".join(p.cmdline())[:60] for p in left]
    finally:
        if driver.poll() is None:
            driver.kill()
