"""Where an RL iteration's time goes, and what timestep subsampling + denoising reduction buy.

    # time split of an iteration (rollout / reward / learn / sync / Ray overhead)
    python benchmarks/bench_rl_iteration.py --config configs/quickstart.yaml --iterations 6
    # time-to-target training reward: the config's recipe vs training every step of 20-step rollouts
    python benchmarks/bench_rl_iteration.py --config configs/quickstart.yaml --compare --iterations 30
    # synchronous vs the one-step off-policy pipeline (train.async_rollouts; 1 thread per role, so
    # the overlapping roles share the 2 cores): time to the sync run's final training reward. The
    # overrides go to both runs; these make sync use 1 thread per role as well (docs/scaling.md)
    python benchmarks/bench_rl_iteration.py --config configs/quickstart.yaml --async-compare --iterations 20 \
        resources.rollout_threads=1 resources.learner_threads=1 [--async-first]
    # another recipe against the config's: time to the config's final training reward, e.g. MixGRPO's
    # sliding window + DPM-Solver++ tail vs the fixed-window recipe (docs/flow_grpo.md)
    python benchmarks/bench_rl_iteration.py --config configs/rl/flow_grpo_shapes.yaml \
        --against configs/rl/mixgrpo_shapes.yaml --iterations 40

Each run is a real train_rl.py job (local Ray, same seed); numbers come from its metrics.jsonl.
Ratios only: timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("time_rollout", "time_reward", "time_learn", "time_sync", "time_overhead")


def run(config: str, name: str, root: str, iterations: int, extra: list[str]) -> list[dict]:
    import train_rl
    from rlgen.runtime.rundir import read_metrics

    args = ["--config", config, f"run.name={name}", f"run.root={root}", f"train.steps={iterations}",
            "train.max_minutes=0", "run.resume=no", *extra]
    if train_rl.main(args) != 0:
        raise SystemExit(f"run {name} failed")
    return [r for r in read_metrics(Path(root) / name) if r["step"] > 0]


def split(rows: list[dict]) -> None:
    rows = rows[1:] if len(rows) > 2 else rows  # the first iteration pays one-off warm-up
    total = sum(r["time_iter"] for r in rows)
    print(f"\niterations measured: {len(rows)}  mean iteration: {total / len(rows):.2f} s")
    for p in PARTS:
        t = sum(r.get(p, 0.0) for r in rows)
        print(f"  {p[5:]:9s} {t / len(rows):7.2f} s  {100 * t / total:5.1f} %")


def time_to_target(rows: list[dict], target: float, window: int = 3) -> float | None:
    """Wall seconds until the moving average of the training reward first reaches ``target``."""
    elapsed, hist = 0.0, []
    for r in rows:
        elapsed += r["time_iter"]
        hist.append(r["reward_mean"])
        if len(hist) >= window and sum(hist[-window:]) / window >= target:
            return elapsed
    return None


def moving(rows: list[dict], window: int = 3) -> list[float]:
    r = [x["reward_mean"] for x in rows]
    return [sum(r[max(0, i - window + 1):i + 1]) / len(r[max(0, i - window + 1):i + 1]) for i in range(len(r))]


def async_compare(args) -> None:
    """Same seed, same iterations: sync as configured vs async with one thread per role."""
    one = ["resources.rollout_threads=1", "resources.learner_threads=1"]
    order = ("async", "sync") if args.async_first else ("sync", "async")  # to see drift in the machine's load
    extra = {"sync": args.overrides, "async": ["train.async_rollouts=true", *one, *args.overrides]}
    runs = {name: run(args.config, name, args.root, args.iterations, extra[name]) for name in order}
    target = moving(runs["sync"])[-1]  # the sync run's final training reward (3-iteration mean)
    print(f"\ntarget: the sync run's final training reward {target:.3f} (mean of its last 3 iterations)")
    per = {}
    for name, rows in runs.items():
        split(rows)
        per[name] = sum(r["time_iter"] for r in rows[1:]) / max(1, len(rows) - 1)
        t = time_to_target(rows, target)
        acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        print(f"  {name}: {per[name]:.2f} s/iteration, time to target {'not reached' if t is None else f'{t:.0f} s'}, "
              f"final 3-iteration reward {moving(rows)[-1]:.3f}"
              f"{f', held-out accuracy {acc[-1]:.3f}' if acc else ''}")
    print(f"  iteration time ratio (async / sync): {per['async'] / per['sync']:.2f}")


def against(args) -> None:
    """The config's recipe ("base") vs ``--against``'s ("other"), same seed and iterations; target: the
    base run's final training reward (mean of its last 3 iterations)."""
    extra = ["eval.every=0", *args.overrides]
    runs = {"base": run(args.config, "base", args.root, args.iterations, extra),
            "other": run(args.against, "other", args.root, args.iterations, extra)}
    target = moving(runs["base"])[-1]
    print(f"\ntarget: the base run's final training reward {target:.3f} (mean of its last 3 iterations)")
    per, hit = {}, {}
    for name, rows in runs.items():
        split(rows)
        per[name] = sum(r["time_iter"] for r in rows[1:]) / max(1, len(rows) - 1)
        hit[name] = time_to_target(rows, target)
        steps = next((i + 1 for i, m in enumerate(moving(rows)) if i >= 2 and m >= target), None)
        acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        print(f"  {name} ({args.config if name == 'base' else args.against}): {per[name]:.2f} s/iteration, "
              f"rollout {sum(r['time_rollout'] for r in rows[1:]) / max(1, len(rows) - 1):.2f} s, "
              f"learn {sum(r['time_learn'] for r in rows[1:]) / max(1, len(rows) - 1):.2f} s; time to target "
              f"{'not reached' if hit[name] is None else f'{hit[name]:.0f} s ({steps} iterations)'}"
              f"{f', held-out accuracy {acc[-1]:.3f}' if acc else ''}")
        print("    training reward (3-iteration mean):", " ".join(f"{m:.3f}" for m in moving(rows)))
    print(f"  iteration time ratio (other / base): {per['other'] / per['base']:.2f}")
    if hit["base"] and hit["other"]:
        print(f"  time-to-target ratio (other / base): {hit['other'] / hit['base']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--root", default="runs/bench")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--async-compare", action="store_true")
    ap.add_argument("--async-first", action="store_true", help="with --async-compare: run the async job first")
    ap.add_argument("--against", help="another config to race against --config (time to its final reward)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.async_compare:
        async_compare(args)
        return
    if args.against:
        against(args)
        return
    if not args.compare:
        split(run(args.config, "split", args.root, args.iterations, ["eval.every=0", *args.overrides]))
        return
    # fast: the config's own recipe (denoising reduction + an SDE window / timestep subsampling);
    # full: every step of a full-length (eval-length) rollout is stochastic and trained.
    fast = run(args.config, "fast", args.root, args.iterations, ["eval.every=0", *args.overrides])
    full = run(args.config, "full", args.root, args.iterations,
               ["rollout.num_steps=20", "rollout.sde_window=0", "learner.timestep_fraction=1.0", "eval.every=0",
                *args.overrides])
    best = min(max(r["reward_mean"] for r in fast), max(r["reward_mean"] for r in full))
    start = (fast[0]["reward_mean"] + full[0]["reward_mean"]) / 2
    target = start + 0.8 * (best - start)
    tf, tu = time_to_target(fast, target), time_to_target(full, target)
    print(f"\ntarget training reward {target:.3f} (start {start:.3f}, best common {best:.3f})")
    for name, rows, t in (("fast", fast, tf), ("full", full, tu)):
        per = sum(r["time_iter"] for r in rows) / len(rows)
        acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]  # the job evaluates its last iteration
        held = f", held-out accuracy after {len(rows)} iterations {acc[-1]:.3f}" if acc else ""
        print(f"  {name}: {per:.2f} s/iteration, time to target: {'not reached' if t is None else f'{t:.0f} s'}"
              f"{held}")
    print(f"  iteration cost ratio (full / fast): "
          f"{sum(r['time_iter'] for r in full) / len(full) / (sum(r['time_iter'] for r in fast) / len(fast)):.2f}x")
    if tf and tu:
        print(f"  speed-up (full / fast time to target): {tu / tf:.2f}x")


if __name__ == "__main__":
    main()
