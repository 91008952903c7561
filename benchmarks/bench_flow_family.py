"""Rollout cost and rollout reward of the Flow-GRPO family's samplers on the shapes base (no training).

    python benchmarks/bench_flow_family.py [--prompts-per-task 4] [--group 4] [--repeats 3]

Each variant is ``rollout_images`` with the quickstart's rollout settings (10 steps, SDE on the first
3, noise 0.7) plus its own options; variants run interleaved (A, B, C, A, B, C, ...) so a shared
machine's load drift hits them alike, and the median time per rollout is reported. Reward: the
quickstart's ``shapes_pass + 0.5·shapes_verifier`` on held-out prompts, the same seed for every
variant. The learner's work does not change between variants with the same window (it trains the
window's steps only), so the rollout ratio bounds what a sampler saves per iteration.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "fixed window, Euler tail (the quickstart)": {},
    "MixGRPO-Flash tail: DPM-Solver++(2M) on 3 steps": {"ode_solver": "dpm2", "post_window_steps": 3},
    "Euler on the same 3-step tail": {"post_window_steps": 3},
    "DPM-Solver++(2M) on the full 7-step tail": {"ode_solver": "dpm2"},
    "CPS steps in the window": {"sde_kind": "cps"},
    "DanceGRPO steps (eta 0.3) + shared group noise": {"sde_kind": "dance", "noise_level": 0.3,
                                                        "shared_group_noise": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="rlgen/assets/flow_shapes_base")
    ap.add_argument("--prompts-per-task", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    import rlgen  # noqa: F401
    from rewards.shapes_verifier import shapes_pass, shapes_verifier
    from rlgen.data.shapes import heldout_prompts
    from rlgen.families.flow import ImageRolloutConfig, rollout_images
    from rlgen.models import load_model

    torch.set_num_threads(args.threads)
    policy = load_model(args.checkpoint).eval()
    prompts = [p for p, _ in heldout_prompts(args.prompts_per_task)]
    rep = [p for p in prompts for _ in range(args.group)]
    gids = torch.arange(len(prompts)).repeat_interleave(args.group)
    base = dict(num_steps=10, noise_level=0.7, sde_window=3, sde_window_start=0)
    times = {name: [] for name in VARIANTS}
    rewards, steps = {}, {}
    rollout_images(policy, rep[:4], gids[:4], ImageRolloutConfig(**base), torch.Generator().manual_seed(0))  # warm-up
    for r in range(args.repeats):
        for name, kw in VARIANTS.items():
            cfg = ImageRolloutConfig(**{**base, **kw})
            t0 = time.perf_counter()
            ro = rollout_images(policy, rep, gids, cfg, torch.Generator().manual_seed(r))
            times[name].append(time.perf_counter() - t0)
            score = (torch.tensor(shapes_pass(ro.images, rep)) + 0.5 * torch.tensor(shapes_verifier(ro.images, rep)))
            rewards.setdefault(name, []).append(float(score.mean()))
            steps[name] = (ro.num_steps, int(ro.sde_mask.sum()))
    ref = statistics.median(times[next(iter(VARIANTS))])
    print(f"{len(rep)} samples per rollout ({len(prompts)} held-out prompts x {args.group}), "
          f"{args.repeats} interleaved repeats, {args.threads} thread(s)")
    print(f"{'variant':50s} {'steps':>5s} {'SDE':>3s} {'median s':>8s} {'ratio':>5s} {'reward':>6s}")
    for name in VARIANTS:
        med = statistics.median(times[name])
        print(f"{name:50s} {steps[name][0]:5d} {steps[name][1]:3d} {med:8.2f} {med / ref:5.2f} "
              f"{statistics.mean(rewards[name]):6.3f}")


if __name__ == "__main__":
    main()
