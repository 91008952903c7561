"""Starting or attaching to a Ray cluster. A local one (the embedded default) is bound to 127.0.0.1
with no dashboard and no token (``rlgen.runtime.local_cluster``); an attached one keeps its own
authentication.

``check_feasible`` turns a request the cluster can never satisfy (more GPUs or CPUs than it has)
into an error naming the config keys, where Ray itself would wait forever for the resources.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

from rlgen.runtime.local_cluster import start_local_ray


@dataclass
class RayConfig:
    address: str = ""          # "" = start a local cluster (the embedded default); "auto" or "ray://…"/"IP:port"
    num_cpus: float = 0        # local cluster only; 0 = enough logical CPUs for every role
    num_gpus: int = -1         # local cluster only; -1 = detect
    dashboard: bool = False    # local cluster only; binds 127.0.0.1 when on
    temp_dir: str = ""         # local cluster only; "" = a short folder under the system temp dir


def init_ray(cfg: RayConfig, min_cpus: float) -> bool:
    """Start or attach; returns True when this call connected (the caller then disconnects with
    ``ray.shutdown()``, which also stops a local cluster it started; an attached cluster keeps running)."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                                                           "RLGEN_FASHION_MNIST") if k in os.environ}}
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True, runtime_env=runtime_env)
        return True
    temp = cfg.temp_dir or tempfile.mkdtemp(prefix="rlgen_ray_", dir="/tmp" if os.path.isdir("/tmp") else None)
    kwargs = dict(num_cpus=math.ceil(max(cfg.num_cpus, min_cpus)), include_dashboard=cfg.dashboard, _temp_dir=temp,
                  dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=runtime_env)
    if cfg.num_gpus >= 0:
        kwargs["num_gpus"] = cfg.num_gpus
    start_local_ray(**kwargs)  # loopback only, token auth off, a watchdog for a killed driver
    return True


def check_feasible(bundles: list[dict[str, float]], what: str) -> None:
    """Raise if ``bundles`` (one resource dict per actor) cannot fit the cluster's *total* resources.

    Ray queues an infeasible request silently (an actor or placement group that never starts);
    this checks each bundle against the largest node and the sum against the whole cluster. A
    cluster that autoscales may grow later, so only a local cluster's totals are final; an attached
    cluster is checked against what it has now.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    for key in sorted({k for b in bundles for k in b}):
        need = sum(b.get(key, 0) for b in bundles)
        per = max((b.get(key, 0) for b in bundles), default=0)
        biggest = max((n.get(key, 0) for n in nodes), default=0)
        if need > total.get(key, 0) + 1e-9 or per > biggest + 1e-9:
            fix = (f"set ray.num_{key.lower()}s / attach a bigger cluster with ray.address" if key in ("CPU", "GPU")
                   else f"start a node with `ray start --resources='{{\"{key}\": N}}'` (custom resources in "
                        f"resources.*_resources pin a role to such nodes)")
            raise RuntimeError(f"{what}: asks for {need:g} {key} in all ({len(bundles)} × {per:g}), but the Ray "
                               f"cluster has {total.get(key, 0):g} {key} (largest node {biggest:g}); lower the "
                               f"request or {fix}")


def _node_id(_actor) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def node_ids(actors: list) -> list[str]:
    """The Ray node id each actor runs on (asked through Ray's ``__ray_call__``: any actor class)."""
    import ray

    return ray.get([a.__ray_call__.remote(_node_id) for a in actors])
