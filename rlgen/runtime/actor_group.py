"""``RayActorGroup``: N actors of one class in a placement group, called as one (OpenRLHF's pattern).

The driver talks to a group, never to single actors: ``call`` runs a method on every actor with
the same arguments, ``call_sharded`` gives actor i the i-th argument. Each actor gets one bundle of
the placement group, so a group's resources are reserved together (PACK: on as few nodes as
possible, so data-parallel ranks talk over the fastest links) and released together. Custom Ray
resources (``resources={"learner_node": 1}``) go into every bundle: a node started with
``ray start --resources='{"learner_node": 4}'`` is then the only place the group can go.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, Sequence

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlgen.runtime.cluster import check_feasible


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on this machine right now (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _remote_addr_and_port() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port("")


def get_all(refs: list) -> list:
    """``ray.get(refs)``, but raising as soon as any one fails: when one rank of a collective dies,
    the others wait for it forever, and a plain ``ray.get`` of the list would wait with them."""
    index = {ref: i for i, ref in enumerate(refs)}
    out, pending = [None] * len(refs), list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        out[index[done[0]]] = ray.get(done[0])  # this ref's error, if it failed, is raised here
    return out


class RayActorGroup:
    """``num_actors`` instances of ``actor_cls`` (a plain class), one per placement-group bundle.

    ``make_args(rank, master_addr, master_port) -> (args, kwargs)`` builds each actor's constructor
    arguments; ``master_addr``/``master_port`` is a rendezvous point on the node of bundle 0 (rank 0's
    node), for actors that form a torch.distributed group.
    """

    def __init__(self, actor_cls: type, num_actors: int, make_args: Callable[[int, str, int], tuple[tuple, dict]],
                 num_cpus: float = 1.0, num_gpus: float = 0.0, strategy: str = "PACK", name: str = "",
                 resources: dict[str, float] | None = None):
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        resources = dict(resources or {})
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
        check_feasible([bundle] * num_actors, f"{num_actors} {actor_cls.__name__} actor(s)")  # not a 120 s wait
        self.pg = placement_group([dict(bundle) for _ in range(num_actors)], strategy=strategy, name=name)
        try:
            ray.get(self.pg.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"cannot reserve {num_actors} × {bundle} ({strategy}) for {actor_cls.__name__}: "
                               f"the cluster has {ray.available_resources()} available") from None
        addr, port = self._rendezvous()
        remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(actor_cls)
        self.actors = []
        for rank in range(num_actors):
            args, kwargs = make_args(rank, addr, port)
            strategy_i = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            self.actors.append(remote_cls.options(scheduling_strategy=strategy_i).remote(*args, **kwargs))

    def _rendezvous(self) -> tuple[str, int]:
        """Address + free port on bundle 0's node: loopback when every bundle is on that one node."""
        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        one_node = len(set(nodes.values())) == 1
        if one_node and nodes[0] == ray.get_runtime_context().get_node_id():
            return "127.0.0.1", free_port()
        on_node0 = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        addr, port = ray.get(_remote_addr_and_port.options(scheduling_strategy=on_node0).remote())
        return ("127.0.0.1" if one_node else addr), port

    def __len__(self) -> int:
        return len(self.actors)

    def call_async(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """``method(*args, **kwargs)`` on every actor; results in rank order."""
        return get_all(self.call_async(method, *args, **kwargs))

    def call_sharded(self, method: str, shards: Sequence[Any], **kwargs) -> list[Any]:
        """Actor i runs ``method(shards[i], **kwargs)``; results in rank order."""
        if len(shards) != len(self.actors):
            raise ValueError(f"{len(shards)} shards for {len(self.actors)} actors")
        return get_all([getattr(a, method).remote(s, **kwargs) for a, s in zip(self.actors, shards)])

    def rank_of(self, actor_id: str | None) -> int | None:
        """The rank of the actor with this hex id (from a ``RayActorError``), if it is one of ours."""
        ids = [a._actor_id.hex() for a in self.actors]
        return ids.index(actor_id) if actor_id in ids else None

    def shutdown(self) -> None:
        """Kill the actors and free their reservation."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        remove_placement_group(self.pg)
