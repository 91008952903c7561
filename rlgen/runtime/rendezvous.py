"""torch.distributed rendezvous that stays on 127.0.0.1 when every rank is on this machine.

Two things listen during a torch.distributed setup, and both default to every interface:

- the rendezvous ``TCPStore`` of rank 0: torch binds its server to all interfaces whatever host
  name it is given. Here rank 0 binds the socket itself (to the master address) and hands the
  listening descriptor to the store (``master_listen_fd``), so a loopback master address means a
  loopback-only store;
- gloo's own sockets (one listener per device, then one connection per pair of ranks): gloo binds
  the address its device was made for, by default whatever the host name resolves to (often the
  machine's network address). A loopback group gets a device on the loopback interface.

On the embedded default every Ray process also has ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``
naming the loopback interface (``rlgen.runtime.local_cluster``), which covers groups that libraries
build on their own (DeepSpeed's sub-groups, vLLM's); this module does not set them for the whole
process, because one process may also join a group that spans nodes.

"Local" means the caller chose a loopback master address, which it must do only when every rank
runs on one node (``RayActorGroup`` does when all its bundles are on one node; on the embedded
default Ray's node address, which the weight-sync group uses, is 127.0.0.1). A routable master address keeps
torch's defaults: other nodes must reach the store and the pairs, so on a cluster these ports are
exposed to the network (docs/reliability.md says how to protect them).
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket

GLOO_IFNAME = "GLOO_SOCKET_IFNAME"


def is_loopback(addr: str) -> bool:
    """True for 127.0.0.0/8, ::1, an IPv4-mapped loopback (``::ffff:127.0.0.1``) and "localhost"."""
    if addr == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
                return name
    except ImportError:  # psutil comes with ray[default]; without it assume Linux's name
        pass
    return "lo"


def _store(addr: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta):
    """Rank 0 serves, the others connect. A loopback master binds only that address."""
    import torch.distributed as dist

    if rank != 0 or not is_loopback(addr):
        return dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout)
    host = "127.0.0.1" if addr == "localhost" else addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world_size))
        # the store owns (and closes) the descriptor from here on
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=sock.detach(),
                             use_libuv=True)
    finally:
        sock.close()  # no-op after detach(); closes the socket if bind/listen failed


def init_process_group(master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
                       timeout_s: float = 1800.0) -> None:
    """torch.distributed's default group from an explicit store (DeepSpeed's ``init_distributed``
    then finds it initialised and only wraps it). With a loopback master its store and gloo
    sockets are on the loopback interface."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _store(master_addr, master_port, rank, world_size, timeout)
    with _gloo_interface(loopback_interface() if is_loopback(master_addr) else None):
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


@contextlib.contextmanager
def _gloo_interface(name: str | None):
    """``GLOO_SOCKET_IFNAME=name`` while the block runs (torch reads it when it builds a gloo group's
    device, inside ``init_process_group``); the previous value afterwards."""
    before = os.environ.get(GLOO_IFNAME)
    if name:
        os.environ[GLOO_IFNAME] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GLOO_IFNAME, None)
        else:
            os.environ[GLOO_IFNAME] = before


def new_group(addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0):
    """A standalone ProcessGroup outside the default one (rank 0 hosts its store); a loopback
    ``addr`` keeps its store and gloo sockets on loopback."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore("rlgen_sync", _store(addr, port, rank, world_size, timeout))
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    if not is_loopback(addr):
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def node_address_and_port() -> tuple[str, int]:
    """This node's address as Ray knows it (127.0.0.1 on the embedded default) and a free port on it."""
    import ray

    addr = ray.util.get_node_ip_address()
    return addr, free_port(addr)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bound, read, released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
