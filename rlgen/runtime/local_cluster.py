"""The embedded default's Ray cluster: every listener on 127.0.0.1, nothing outliving the driver.

Why more than ``ray.init(_node_ip_address="127.0.0.1")``:

- Ray replaces a loopback ``_node_ip_address`` by the machine's routable address
  (``ray._private.services.resolve_ip_for_localhost``, intentional since Ray PR #1556), so that
  argument alone changes nothing on Linux. Ray has one loopback-only mode, the single-machine mode
  it uses on macOS and Windows, chosen by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read into
  ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` when Ray is imported). In that mode the node
  address is 127.0.0.1 and every Ray process binds it: GCS, raylet, the API server (started even
  with the dashboard off) and its metrics port, the dashboard agent (HTTP job agent, gRPC, metrics),
  the runtime-env agent, the autoscaler monitor's metrics and each worker's gRPC server.
- gloo and NCCL pick their interface themselves (the host name's address or the first non-loopback
  interface); ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` in every Ray process's environment keep
  groups built by libraries (DeepSpeed's sub-groups, vLLM's) on loopback too.
- Ray's agents are children of the raylet, not of the driver. When the driver is SIGKILLed the GCS
  and raylet die with it, but the agents then retry reporting to the dead GCS for about a minute
  before they exit, the job agent still listening. A watchdog (this file run as a script, outside
  the driver's process group) holds the read end of a pipe from the driver; when the driver dies
  (any signal: the kernel closes the pipe) or its GCS is gone, it SIGKILLs every process of this
  cluster: those whose environment holds a marker variable they all inherit from the driver, or
  that have a file open in the cluster's session folder (where every Ray process logs). Processes
  of other clusters or users match neither.

None of this applies to an attached cluster (``ray.address`` set): see docs/reliability.md.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

MARKER = "RLGEN_LOCAL_RAY"          # value: a fresh id per local cluster
RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_watchdogs: list[subprocess.Popen] = []


def cluster_env() -> dict[str, str]:
    """Environment every process of the embedded default's cluster is started with."""
    from rlgen.runtime.rendezvous import loopback_interface

    lo = loopback_interface()
    return {RAY_SINGLE_MACHINE: "0", "GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo,
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), MARKER: uuid.uuid4().hex}


def start_local_ray(**init_kwargs) -> None:
    """``ray.init(**init_kwargs)`` for a new local cluster bound to loopback, with a watchdog.

    The driver's own environment is restored afterwards (Ray's processes keep what they were
    started with; a later ``ray.init(address=…)`` in this process is not affected), except
    ``RAY_AUTH_MODE``, which the driver needs while it is connected.
    """
    import ray
    import ray._private.ray_constants as ray_constants

    env = cluster_env()
    before = {k: os.environ.get(k) for k in env}
    was_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False  # already imported: the env var alone is read too late
    try:
        watchdog = _start_watchdog(env[MARKER])  # first: a driver killed during ray.init is covered too
        ray.init(_node_ip_address="127.0.0.1", **init_kwargs)
        _tell_session_dir(watchdog)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was_cluster
        for k, v in before.items():
            if k == "RAY_AUTH_MODE":
                continue
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_watchdog(marker: str) -> subprocess.Popen:
    for w in _watchdogs[:]:  # reap watchdogs of clusters that are gone
        if w.poll() is not None:
            _watchdogs.remove(w)
    env = {k: v for k, v in os.environ.items() if k != MARKER}  # never kill itself
    w = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), marker, str(os.getpid())],
                         stdin=subprocess.PIPE, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _watchdogs.append(w)  # keeps the pipe's write end open for the driver's lifetime
    return w


def _tell_session_dir(watchdog: subprocess.Popen) -> None:
    """Send the new cluster's session folder (every Ray process keeps its logs open in it)."""
    import ray

    node = ray._private.worker._global_node
    session = node.get_session_dir_path() if node is not None else ""
    if session:
        try:
            watchdog.stdin.write(os.path.abspath(session).encode() + b"\n")
            watchdog.stdin.flush()
        except OSError:  # the watchdog could not start (it needs psutil): Ray runs on without it
            pass


# ----------------------------------------------------------------------------------------------
# The watchdog (runs as ``python -I local_cluster.py MARKER``: stdlib and psutil only)
# ----------------------------------------------------------------------------------------------
def _is_member(p, marker: str, session: str) -> bool:
    """Whether process ``p`` belongs to the cluster: its environment block holds the marker (read
    raw: Ray's workers and agents overwrite the start of it with their process title) or it is a
    Ray program (this Python, or one of Ray's binaries) with a file open in the cluster's session
    folder (every Ray process logs there)."""
    try:
        with open(f"/proc/{p.pid}/environ", "rb") as f:
            if f"{MARKER}={marker}\0".encode() in f.read():
                return True
    except FileNotFoundError:  # not Linux (or gone): the parsed environment
        try:
            if p.environ().get(MARKER) == marker:
                return True
        except Exception:
            pass
    except OSError:  # another user's, or gone
        return False
    if session:  # only Ray's own programs: a `tail -f` on its log is not part of the cluster
        try:
            exe = p.exe()
            ray_program = exe == os.path.realpath(sys.executable) or f"{os.sep}ray{os.sep}" in exe
            return ray_program and any(f.path.startswith(session + os.sep) for f in p.open_files())
        except Exception:
            return False
    return False


def cluster_processes(marker: str, session: str = "", spare: tuple[int, ...] = ()) -> list:
    """This user's processes of the local cluster marked ``marker`` (session folder ``session``),
    except this one and the pids in ``spare`` (the driver, which keeps its Ray log open)."""
    import psutil

    skip = {os.getpid(), *spare}
    return [p for p in psutil.process_iter() if p.pid not in skip and _is_member(p, marker, session)]


def kill_cluster(marker: str, session: str = "", spare: tuple[int, ...] = ()) -> int:
    """SIGKILL every process of that cluster but ``spare``; returns how many there were."""
    import psutil

    procs = cluster_processes(marker, session, spare)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


def _watch(marker: str, driver: int, poll_s: float = 1.0) -> None:
    """Until the driver (stdin's writer) is gone, or the cluster's GCS was seen and is gone; then
    kill what is left of the cluster (never the driver: after ray.shutdown() it lives on)."""
    import select

    import psutil

    session, gcs, buf = "", None, b""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                break  # EOF: the driver exited or was killed
            buf += chunk
            session = buf.decode(errors="replace").splitlines()[0] if b"\n" in buf else session
        if session and gcs is None:  # Ray's GCS names the session folder on its command line
            gcs = next((p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "gcs_server"
                        and session in " ".join(p.info["cmdline"] or [])), None)
        elif gcs is not None and not gcs.is_running():
            break  # the cluster was shut down (ray.shutdown) or its GCS died
    kill_cluster(marker, session, spare=(driver,))


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
