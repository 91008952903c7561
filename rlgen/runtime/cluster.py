"""Starting or attaching to a Ray cluster with safe defaults (127.0.0.1, no dashboard, no token)."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass


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

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("RAY_AUTH_MODE", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                                                           "RLGEN_FASHION_MNIST") if k in os.environ}}
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True, runtime_env=runtime_env)
        return True
    temp = cfg.temp_dir or tempfile.mkdtemp(prefix="rlgen_ray_", dir="/tmp" if os.path.isdir("/tmp") else None)
    kwargs = dict(num_cpus=math.ceil(max(cfg.num_cpus, min_cpus)), include_dashboard=cfg.dashboard, _temp_dir=temp,
                  dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=runtime_env,
                  _node_ip_address="127.0.0.1")
    if cfg.num_gpus >= 0:
        kwargs["num_gpus"] = cfg.num_gpus
    ray.init(**kwargs)
    return True
