"""TeaCache on the shapes base: forwards saved, time ratio and reward/accuracy, against the uncached sampler.

    python benchmarks/bench_teacache.py [--checkpoint rlgen/assets/flow_shapes_base] [--calibration FILE]
        [--thresholds 0.05 0.1 0.2 0.3] [--prompts-per-task 32] [--samples 2] [--rollout-prompts 64]
        [--group 8] [--threads 1] [--out runs/bench_teacache/result.json]

Two settings, each run once per threshold on the same start noise (paired with threshold 0 = off):
- ``eval``: the shapes benchmark's sampling (20 Euler ODE steps, CFG 1) on the held-out prompts, scored
  by the shapes verifier (accuracy = pass rate, as ``python -m rlgen.evaluate --benchmark shapes``).
- ``rollout``: the quickstart's Flow-GRPO-Fast rollout (10 steps, SDE on the first 3 only, ODE after:
  ``rollout.sde_window=3 sde_window_start=0``) through ``rlgen.families.flow.rollout_images``; reward is the
  verifier's pass rate and partial score. Its SDE log-probs must equal the uncached rollout's exactly.

Forwards are counted at the model's output layer (a hook on the UNet's ``conv_out``), not from TeaCache's
own counters. Times: wall seconds and this process's CPU seconds (steadier on a shared machine).
Without ``--calibration`` it first runs ``python -m rlgen.teacache calibrate``'s fit (64 prompts, 10 and
20 steps) and writes the file beside ``--out``. TeaCache: Liu et al. 2024, arXiv:2411.19108.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rlgen  # noqa: F401  (first: torchvision compatibility for the diffusers model classes)
from rlgen.data.shapes import heldout_prompts
from rlgen.eval.flow_common import FlowSampling, generate_images
from rlgen.eval.shapes import score_images
from rlgen.families.flow import ImageRolloutConfig, rollout_images
from rlgen.models import load_model
from rlgen.models.teacache import TeaCacheConfig
from rlgen.teacache import calibrate


def output_layer(policy) -> torch.nn.Module:
    """The module every full forward ends in (a skipped step never reaches it)."""
    net = getattr(policy, "transformer", None) or getattr(policy.backbone, "transformer", None)
    return net.proj_out if net is not None else policy.backbone.unet.conv_out


class Timed:
    """Counts forwards (output-layer calls) and measures wall and process CPU seconds of a block."""

    def __init__(self, policy):
        self.layer, self.forwards = output_layer(policy), 0

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.handle.remove()


def run_eval(policy, items, samples: int, steps: int, tc: TeaCacheConfig, seed: int) -> tuple[dict, list]:
    prompts = [p for p, _ in items for _ in range(samples)]
    tasks = [t for _, t in items for _ in range(samples)]
    sampling = FlowSampling(steps=steps, teacache=tc.threshold, teacache_calibration=tc.calibration)
    with Timed(policy) as t:
        images = generate_images(policy, prompts, sampling, seed, batch_size=64, progress=False)
    res = score_images(images, prompts, tasks)
    verdicts = _verdicts(images, prompts)
    return {"forwards": t.forwards, "wall_s": round(t.wall, 2), "cpu_s": round(t.cpu, 2),
            "accuracy": round(res["accuracy"], 4), "mean_score": round(res["mean_score"], 4),
            "per_task": {k: round(v, 3) for k, v in res["per_task"].items()}}, verdicts


def _verdicts(images, prompts) -> list[bool]:
    from rewards.shapes_verifier import verify

    return [bool(verify(img, p).passed) for img, p in zip(images, prompts)]


def run_rollout(policy, prompts: list[str], group: int, tc: TeaCacheConfig, seed: int) -> tuple:
    """(row, log_probs (N, 10), per-sample pass verdicts) of one Flow-GRPO-Fast rollout batch."""
    from rewards.shapes_verifier import verify

    expanded = [p for p in prompts for _ in range(group)]
    gids = torch.arange(len(prompts)).repeat_interleave(group)
    cfg = ImageRolloutConfig(num_steps=10, noise_level=0.7, sde_window=3, sde_window_start=0, teacache=tc)
    with Timed(policy) as t:
        out = rollout_images(policy, expanded, gids, cfg, torch.Generator().manual_seed(seed))
    v = [verify(img, p) for img, p in zip(out.images, expanded)]
    passed = [bool(x.passed) for x in v]
    return {"forwards": t.forwards, "wall_s": round(t.wall, 2), "cpu_s": round(t.cpu, 2),
            "pass_rate": round(sum(passed) / len(passed), 4),
            "mean_score": round(sum(x.score for x in v) / len(v), 4)}, out.log_probs, passed


def ratios(base: dict, row: dict) -> dict:
    return {"forwards_saved": round(1 - row["forwards"] / base["forwards"], 3),
            "forward_ratio": round(base["forwards"] / row["forwards"], 2),
            "wall_ratio": round(base["wall_s"] / row["wall_s"], 2), "cpu_ratio": round(base["cpu_s"] / row["cpu_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="rlgen/assets/flow_shapes_base")
    ap.add_argument("--calibration", default="")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--prompts-per-task", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--fewer-steps", type=int, nargs="*", default=[10, 14],
                    help="also evaluate uncached with these step counts (the plain way to spend fewer forwards)")
    ap.add_argument("--rollout-prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--settings", nargs="+", default=["eval", "rollout"], choices=["eval", "rollout"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_teacache/result.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_model(args.checkpoint).eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calib = args.calibration
    if not calib:
        calib_prompts = [p for p, _ in heldout_prompts(11, seed=777)][:64]  # not the eval's prompt list
        fit = calibrate(policy, calib_prompts, steps=[10, 20], degree=4, seed=args.seed + 1)
        calib = str(args.out.parent / "calibration.json")
        Path(calib).write_text(json.dumps(fit, indent=2) + "\n")
        print(f"calibrated: r2 {fit['r2']} on {fit['points']} points -> {calib}", flush=True)
    items = heldout_prompts(args.prompts_per_task)
    roll_prompts = [p for p, _ in heldout_prompts(args.rollout_prompts // 6 + 1, seed=4242)][:args.rollout_prompts]
    result = {"checkpoint": args.checkpoint, "calibration": calib, "threads": args.threads,
              "eval": {"n": len(items) * args.samples, "steps": args.eval_steps, "rows": []},
              "rollout": {"n": len(roll_prompts) * args.group, "steps": 10, "sde_steps": [0, 1, 2], "rows": []}}
    generate_images(policy, [p for p, _ in items[:8]], FlowSampling(steps=2), 0, 64, False)  # warm-up: lazy inits
    base_e = base_r = None
    for thr in [0.0] + list(args.thresholds):
        tc = TeaCacheConfig(thr, calibration=calib if thr > 0 else "")
        if "eval" in args.settings:
            e, ev = run_eval(policy, items, args.samples, args.eval_steps, tc, args.seed)
            if base_e is None:
                base_e, base_ev = e, ev
            e.update(threshold=thr, steps=args.eval_steps, **ratios(base_e, e),
                     flipped=sum(a != b for a, b in zip(ev, base_ev)))
            result["eval"]["rows"].append(e)
            print(json.dumps({"threshold": thr, "eval": e}), flush=True)
        if "rollout" in args.settings:
            r, lp, rv = run_rollout(policy, roll_prompts, args.group, tc, args.seed)
            if base_r is None:
                base_r, base_lp, base_rv = r, lp, rv
            r.update(threshold=thr, **ratios(base_r, r), flipped=sum(a != b for a, b in zip(rv, base_rv)),
                     sde_log_probs_identical=bool(torch.equal(lp, base_lp)))
            result["rollout"]["rows"].append(r)
            print(json.dumps({"threshold": thr, "rollout": r}), flush=True)
    for steps in args.fewer_steps if "eval" in args.settings else []:
        e, ev = run_eval(policy, items, args.samples, steps, TeaCacheConfig(0.0), args.seed)
        e.update(threshold=0.0, steps=steps, **ratios(base_e, e), flipped=sum(a != b for a, b in zip(ev, base_ev)))
        result["eval"]["rows"].append(e)
        print(json.dumps({"steps": steps, "eval": e}), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
