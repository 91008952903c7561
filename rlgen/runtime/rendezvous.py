"""Where torch.distributed groups of rlgen's actors meet (placeholder until the loopback-only
rendezvous lands: see docs/reliability.md)."""
from __future__ import annotations


def distributed_env(master_addr: str, master_port: int, rank: int, world_size: int) -> dict[str, str]:
    """Environment for ``init_distributed`` of one rank (one process per actor: local rank 0)."""
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"}
