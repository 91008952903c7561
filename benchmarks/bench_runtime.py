"""The one runtime's cost, side by side in one run: a job's step time on the Ray/DeepSpeed runtime
(rollout worker, reward worker, DeepSpeed learner, weight sync) vs the same step done in this
process (the family's rollout, the reward mixer, the algorithm's advantages and update on a plain
torch AdamW) — what the text jobs did before they moved onto the runtime.

    python benchmarks/bench_runtime.py --config configs/rl/mdm_grpo_arith.yaml --steps 40
    python benchmarks/bench_runtime.py --config configs/quickstart.yaml --steps 6

Prints the median step time of each and their ratio, and the runtime's own overhead (the part of a
step that is neither rollout, reward, learning nor weight sync) as a fraction of the step. The
first steps of each side are skipped (warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlgen  # noqa: E402,F401  (torchvision compatibility first)


def in_process(cfg, steps: int) -> list[float]:
    """The job's steps without Ray or DeepSpeed, timed one by one."""
    import torch

    from rewards.base import RewardMixer
    from rlgen.algos.base import get_algorithm
    from rlgen.families import family_of
    from rlgen.models import load_model
    from rlgen.runtime.engine import TorchEngine
    from rlgen.runtime.setup import base_checkpoint
    from rlgen.runtime.sources import PromptSource
    from rlgen.runtime.trainer import step_seed

    policy = load_model(base_checkpoint(cfg.policy), **cfg.policy.load_options())
    family = family_of(policy)
    if cfg.policy.lora.enabled:
        family.add_lora(policy, cfg.policy.lora)
    algo = get_algorithm(cfg.algo.name)(cfg.algo)
    ref = None if cfg.policy.lora.enabled or not algo.uses_reference(False) else \
        load_model(base_checkpoint(cfg.policy), **cfg.policy.load_options()).requires_grad_(False).eval()
    engine = TorchEngine(family.train_module(policy), cfg.optim)
    import contextlib

    from rlgen.algos.base import LearnerContext

    def reference():
        return family.adapters_disabled(policy) if cfg.policy.lora.enabled else contextlib.nullcontext(ref)

    ctx = LearnerContext(policy, engine, reference, None, 0, 1, cfg.learner.micro_batch_size)
    source = PromptSource(cfg.prompts, cfg.run.seed, family.modality)
    mixer = RewardMixer(cfg.rewards_config())
    g, times = cfg.prompts.group_size, []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        items = source.sample(step)
        rep = [it for it in items for _ in range(g)]
        gids = torch.tensor([i for i in range(len(items)) for _ in range(g)])
        with torch.no_grad():
            policy.eval()
            batch = family.rollout(policy, rep, gids, cfg.rollout, torch.Generator().manual_seed(step))
        samples = batch.images if family.modality == "image" else batch.completions
        batch.rewards = mixer(samples, batch.prompts, **getattr(batch, "meta", {})).total.float()
        batch = algo.advantages(batch)
        batch.seed, batch.global_size = step_seed(cfg.run.seed, step), batch.global_size or len(batch)
        algo.update(ctx, batch)
        times.append(time.perf_counter() - t0)
    return times


def on_runtime(cfg) -> list[dict]:
    from rlgen.runtime.rundir import read_metrics
    from rlgen.runtime.trainer import Trainer

    Trainer(cfg).fit()
    return [r for r in read_metrics(cfg.run.dir) if r.get("step", 0) > 0 and "time_iter" in r]


def main(argv=None) -> dict:
    from rlgen.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/rl/mdm_grpo_arith.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench_runtime_")
    over = [f"run.root={root}", "run.name=bench", "run.progress=false", "run.tensorboard=false", "eval.benchmark=",
            f"train.steps={args.steps}", "train.max_minutes=0", "train.save_every=0", "train.grid_every=0",
            "resources.rollout_threads=1", "resources.learner_threads=1", "run.num_threads=1", *args.overrides]
    cfg = load_config(args.config, over)
    import torch

    torch.set_num_threads(1)
    t_local = in_process(cfg, args.steps)[args.warmup:]
    rows = on_runtime(cfg)[args.warmup:]
    t_ray = [r["time_iter"] for r in rows]
    overhead = sum(r["time_overhead"] for r in rows) / sum(t_ray)
    out = {"config": args.config, "steps_timed": len(t_ray), "in_process_s": round(statistics.median(t_local), 4),
           "runtime_s": round(statistics.median(t_ray), 4),
           "ratio": round(statistics.median(t_ray) / statistics.median(t_local), 3),
           "runtime_split_s": {k: round(statistics.median(r[k] for r in rows), 4)
                               for k in ("time_rollout", "time_reward", "time_learn", "time_sync", "time_overhead")},
           "runtime_overhead_fraction": round(overhead, 4)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
