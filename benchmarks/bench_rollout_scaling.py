"""Rollout throughput of 1 vs 2 RolloutWorkers (1 torch thread each), side by side in one run.

    python benchmarks/bench_rollout_scaling.py --config configs/quickstart.yaml --repeats 4

One iteration's batch (the config's prompts × group size, its rollout settings and base policy) is
sampled by one worker, then split in two shards sampled by two workers at once, then by one worker
with 2 threads; the three alternate ``--repeats`` times so slow phases of a shared machine hit all.
Each call also reports the worker's CPU seconds: CPU / wall is the share of a core it really got,
and samples per CPU-second is the work rate per core: when it holds steady from 1 to 2 workers,
the speed-up is bounded by the cores the machine gave (other processes), not by the workers. Ratios only: timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_generate(worker, prompts, group_ids, seed, threads):
    """Run on a RolloutWorker (via __ray_call__): (samples, wall s, CPU s of the process)."""
    import torch

    torch.set_num_threads(threads)
    c0, w0 = time.process_time(), time.time()
    ro = worker.generate(prompts, group_ids, seed)
    return len(ro), time.time() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import ray
    import torch

    import rlgen  # noqa: F401
    from rlgen.config import load_config
    from rlgen.runtime.cluster import RayConfig, init_ray
    from rlgen.runtime.rundir import resolve_checkpoint
    from rlgen.runtime.sources import PromptSource
    from rollouts.worker import RolloutWorker

    cfg = load_config(args.config, args.overrides)
    init_ray(RayConfig(temp_dir=tempfile.mkdtemp(prefix="rlgen_bs_", dir="/tmp")), 2)
    policy = str(resolve_checkpoint(cfg.policy.checkpoint))
    lora = cfg.policy.lora if cfg.policy.lora.enabled else None
    actor = ray.remote(num_cpus=1)(RolloutWorker)
    workers = [actor.remote(policy, cfg.policy.load_options(), cfg.rollout, lora, 1, "cpu", i) for i in range(2)]
    prompts = PromptSource(cfg.prompts, cfg.run.seed, "image").sample(1)
    g = cfg.prompts.group_size
    full = ([p for p in prompts for _ in range(g)], torch.tensor([i for i in range(len(prompts)) for _ in range(g)]))
    half = [([p for j, p in enumerate(prompts) if j % 2 == k for _ in range(g)],
             torch.tensor([j for j in range(len(prompts)) if j % 2 == k for _ in range(g)])) for k in range(2)]

    def one(threads):
        return ray.get(workers[0].__ray_call__.remote(timed_generate, *full, 1, threads))

    def two():
        w0 = time.time()
        out = ray.get([w.__ray_call__.remote(timed_generate, *half[k], 1, 1) for k, w in enumerate(workers)])
        return sum(o[0] for o in out), time.time() - w0, sum(o[2] for o in out)

    ray.get([w.__ray_call__.remote(timed_generate, *half[0], 0, 1) for w in workers])  # warm-up
    print(f"batch: {len(full[0])} samples x {cfg.rollout.num_steps} steps; load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    res = {"1 worker, 1 thread": [], "2 workers, 1 thread each": [], "1 worker, 2 threads": []}
    for _ in range(args.repeats):
        for name, fn in (("1 worker, 1 thread", lambda: one(1)), ("2 workers, 1 thread each", two),
                         ("1 worker, 2 threads", lambda: one(2))):
            n, wall, cpu = fn()
            res[name].append((n / wall, cpu / wall, n / cpu))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    base = [r[0] for r in res["1 worker, 1 thread"]]
    for name, rs in res.items():
        ratios = [r[0] / b for r, b in zip(rs, base)]  # against the same repeat's 1-worker run
        print(f"  {name:26s} {statistics.median(r[0] for r in rs):6.2f} samples/s, x{statistics.median(ratios):.2f} "
              f"(per repeat {', '.join(f'{x:.2f}' for x in ratios)}), cores used "
              f"{statistics.median(r[1] for r in rs):.2f}, {statistics.median(r[2] for r in rs):.2f} samples/CPU-s")
    ray.shutdown()


if __name__ == "__main__":
    main()
