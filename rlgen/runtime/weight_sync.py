"""Weight sync, learner → rollout workers, and the version every rollout is checked against.

Only the parameters that train move: all of them under full fine-tuning, the LoRA adapter's
``lora_A``/``lora_B`` under LoRA (``FlowLearner.get_weights``). Two transports, one interface
(``publish`` after an update, ``send`` to workers, ``restore`` a restarted worker):

- ``ObjectStoreSync`` (default; CPU or GPU): rank 0's fp32 numpy arrays are put in Ray's object
  store once and every worker reads them zero-copy. The refs of the newest ``keep`` versions are
  kept, so a worker restarted mid-iteration can be brought back to the exact version its re-issued
  shard was sampled with (one version behind the learner in the async pipeline).
- ``CollectiveSync`` (``train.weight_sync=collective``): a torch.distributed process group of its
  own — learner rank 0 plus every rollout worker, NCCL when CUDA is available, gloo otherwise —
  and one broadcast per bucket of flattened parameters. Nothing passes through the driver or the
  object store. The group is separate from DeepSpeed's learner group (its own TCPStore), so
  neither sees the other's ranks.

Learner-side steps run through Ray's ``__ray_call__`` (a function called with the actor instance),
so the learner class only needs its usual ``policy``/``strategy``/``rank``/``version`` attributes.
"""
from __future__ import annotations

import ray
import torch

BUCKET_NUMEL = 2**25  # elements per broadcast (128 MB of fp32): bounds the extra memory on both sides


# ----------------------------------------------------------------------------------------------
# A process group outside the default one
# ----------------------------------------------------------------------------------------------
def new_group(addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0):
    """A standalone ProcessGroup (rank 0 hosts its TCPStore); does not touch the default group."""
    from rlgen.runtime import rendezvous  # loopback store and gloo device when addr is loopback

    return rendezvous.new_group(addr, port, rank, world_size, backend, timeout_s)


def broadcast_buckets(group, tensors: list[torch.Tensor], device: torch.device) -> None:
    """Broadcast ``tensors`` from rank 0 in place, a flat fp32 bucket at a time (rank 0's values
    are read; other ranks' are overwritten). All ranks pass tensors of the same shapes in order."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    i = 0
    while i < len(tensors):
        j, numel = i, 0
        while j < len(tensors) and (j == i or numel + tensors[j].numel() <= BUCKET_NUMEL):
            numel += tensors[j].numel()
            j += 1
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors[i:j]])  # (numel,)
        group.broadcast([flat], opts).wait()
        offset = 0
        with torch.no_grad():
            for t in tensors[i:j]:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        i = j


# ----------------------------------------------------------------------------------------------
# Learner side (run on Learner actors through __ray_call__)
# ----------------------------------------------------------------------------------------------
def _learner_address(learner) -> tuple[str, int]:
    from rlgen.runtime.rendezvous import node_address_and_port  # 127.0.0.1 on the embedded default

    return node_address_and_port()


def _learner_join(learner, addr: str, port: int, world_size: int, backend: str) -> list[tuple[str, list[int]]]:
    """Rank 0 joins the sync group as its rank 0; returns (name, shape) of what it will send."""
    from rlgen.runtime.engine import trainable_parameters

    learner._sync_group = new_group(addr, port, 0, world_size, backend)
    return [(n, list(p.shape)) for n, p in trainable_parameters(learner.policy)]


def _learner_broadcast(learner) -> int:
    """Every learner rank calls this (ZeRO-3's gather is collective); rank 0 broadcasts."""
    from rlgen.runtime.engine import trainable_parameters

    named = trainable_parameters(learner.policy)
    if learner.strategy.zero_stage == 3:  # each rank holds a shard: gather full copies on rank 0
        state = learner.strategy.gather_numpy(named)
        tensors = [torch.from_numpy(state[n]) for n, _ in named] if learner.rank == 0 else []
    else:
        tensors = [p.detach() for _, p in named]
    if learner.rank == 0:
        broadcast_buckets(learner._sync_group, [t.clone() for t in tensors], learner.strategy.device)
    return learner.version


def _learner_leave(learner) -> None:
    learner._sync_group = None


# ----------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------
class ObjectStoreSync:
    """numpy weights through the object store; ``keep`` newest versions stay restorable."""

    def __init__(self, keep: int = 2):
        self.keep, self.refs = keep, {}  # version → ObjectRef of {name: np.ndarray}

    def publish(self, learners) -> int:
        version, state = learners.get_weights()
        self.refs[version] = ray.put(state)
        for v in sorted(self.refs)[:-self.keep]:
            del self.refs[v]
        return version

    def send(self, workers: list, version: int) -> list:
        return [w.load_weights.remote(version, self.refs[version]) for w in workers]

    def restore(self, worker, version: int) -> int:
        """Bring a (restarted) worker to ``version``; version 0 is the base it starts from."""
        if version in self.refs:
            ray.get(worker.load_weights.remote(version, self.refs[version]))
        elif version != 0:
            raise RuntimeError(f"weights v{version} are no longer kept (newest kept: {sorted(self.refs)})")
        return version

    def close(self) -> None:
        self.refs.clear()


class CollectiveSync:
    """Broadcast from learner rank 0 to every rollout worker in a group of their own."""

    def __init__(self, learners, workers: list):
        self.learners, self.workers = learners, workers
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.version = 0
        self._build()

    def _build(self) -> None:
        rank0 = self.learners.group.actors[0]
        addr, port = ray.get(rank0.__ray_call__.remote(_learner_address))
        world = 1 + len(self.workers)
        specs_ref = rank0.__ray_call__.remote(_learner_join, addr, port, world, self.backend)
        joins = [w.join_weight_group.remote(addr, port, i + 1, world, self.backend) for i, w in enumerate(self.workers)]
        self.specs = ray.get(specs_ref)
        ray.get(joins)
        # check names and shapes now: a worker refusing mid-broadcast would leave rank 0 waiting
        ray.get([w.check_weight_specs.remote(self.specs) for w in self.workers])

    def publish(self, learners) -> int:
        self.version = learners.version
        return self.version

    def send(self, workers: list, version: int) -> list:
        """One broadcast to all workers at once (the group spans them all); the learners' refs
        come first so a caller waiting on all of them sees a learner error too."""
        refs = self.learners.group.call_async("__ray_call__", _learner_broadcast)
        return refs + [w.receive_weights.remote(version, self.specs) for w in workers]

    def restore(self, worker, version: int) -> int:
        """A worker died: the group lost a member. Rebuild it and broadcast the current weights to
        every worker (the restarted one holds the base); returns the version they now hold."""
        self.learners.group.call("__ray_call__", _learner_leave)
        ray.get([w.leave_weight_group.remote() for w in self.workers])
        self._build()
        ray.get(self.send(self.workers, self.version))
        return self.version

    def close(self) -> None:
        pass


def make_weight_sync(kind: str, learners, workers: list):
    if kind == "object_store":
        return ObjectStoreSync()
    if kind == "collective":
        return CollectiveSync(learners, workers)
    raise ValueError(f"train.weight_sync must be object_store or collective, got {kind!r}")
