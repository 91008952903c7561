"""VRPO against naive ELBO-DPO, seeds × arms, one training run at a time; held-out accuracy table.

    python scripts/vrpo_vs_naive.py --name cd_b1 --seeds 0 1 2 -- \
        policy.checkpoint=rlgen/assets/mdm_countdown_base pairs.path=runs/pairs_cd/pairs.jsonl \
        eval.benchmark=countdown algo.beta=1.0 algo.n_samples=2 train.steps=200 eval.every=50

Every run is ``python train_rl.py --config configs/dpo/vrpo_arith.yaml run.name=<name>_<arm>_s<seed>
run.seed=<seed> <arm overrides> <your overrides>``; the two arms differ ONLY in the estimator:

  vrpo   algo.allocation=optimal algo.antithetic=true   (stratified timesteps, draws shared by
                                                         policy and reference)
  naive  algo.allocation=naive   algo.antithetic=false  (i.i.d. draws, separate per model)

(same budget ``algo.n_samples``, same pairs, same pair order and policy draws per seed). A finished
run (its metrics.jsonl has the last step's evaluation) is read, not rerun. Prints, per arm, the
held-out accuracy at every evaluation for each seed, mean ± spread (max − min over seeds), the
training-batch means of the logged score-variance estimates (``score_var_naive`` /
``score_var_antithetic``, from the policy being trained), and writes it all to
``runs/<name>_sweep.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"vrpo": ["algo.allocation=optimal", "algo.antithetic=true"],
        "naive": ["algo.allocation=naive", "algo.antithetic=false"]}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarise(rows: list[dict]) -> dict:
    """Held-out accuracy per evaluated step, and means of the training metrics over all steps."""
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    train = [r for r in rows if "loss" in r]

    def mean(key, part=train):
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else None

    late = train[len(train) // 2:]
    return {"eval": evals, "implicit_acc": mean("implicit_acc"), "chosen_reward_late": mean("chosen_reward", late),
            "rejected_reward_late": mean("rejected_reward", late),
            "score_var_naive": mean("score_var_naive"), "score_var_antithetic": mean("score_var_antithetic"),
            "score_var_naive_late": mean("score_var_naive", late),
            "score_var_antithetic_late": mean("score_var_antithetic", late)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="run-name prefix")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--config", default="configs/dpo/vrpo_arith.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = ap.parse_args(argv)
    steps = next((int(o.split("=", 1)[1]) for o in args.overrides if o.startswith("train.steps=")), None)
    results: dict = {"overrides": args.overrides, "runs": {}}
    for seed in args.seeds:  # seed-major: a partial sweep still has both arms of its seeds
        for arm in args.arms:
            name = f"{args.name}_{arm}_s{seed}"
            run_dir = Path("runs") / name
            cmd = [sys.executable, "train_rl.py", "--config", args.config, f"run.name={name}", f"run.seed={seed}",
                   *ARMS[arm], *args.overrides]
            done = summarise(read_metrics(run_dir))["eval"]
            if steps is None or steps not in done:
                print(f"[sweep] {name}: {' '.join(cmd[1:])}", flush=True)
                t0 = time.time()
                with open(Path("runs") / f"{name}.log", "w") as log:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc:
                    raise SystemExit(f"[sweep] {name} failed (exit {rc}); see runs/{name}.log")
                print(f"[sweep] {name}: done in {time.time() - t0:.0f} s", flush=True)
            s = summarise(read_metrics(run_dir))
            s["command"] = " ".join(cmd[1:])
            results["runs"][name] = {"arm": arm, "seed": seed, **s}
            print(f"[sweep] {name}: held-out {s['eval']}", flush=True)
    print_table(results, args)
    out = Path("runs") / f"{args.name}_sweep.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"[sweep] wrote {out}")
    return results


def print_table(results: dict, args) -> None:
    runs = results["runs"].values()
    steps = sorted({st for r in runs for st in r["eval"]})
    print("\nheld-out accuracy (per seed; mean, spread = max − min)")
    print("arm    step " + " ".join(f"{'s' + str(s):>7}" for s in args.seeds) + "    mean  spread")
    summary = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        for st in steps:
            accs = [r["eval"].get(st) for r in mine]
            accs = [a for a in accs if a is not None]
            if not accs:
                continue
            m, spread = sum(accs) / len(accs), max(accs) - min(accs)
            summary[(arm, st)] = (m, spread)
            print(f"{arm:<6} {st:>4} " + " ".join(f"{a:7.3f}" for a in accs) + f"  {m:6.3f}  {spread:6.3f}")
        for key in ("score_var_naive", "score_var_antithetic", "implicit_acc", "chosen_reward_late",
                    "rejected_reward_late"):
            vals = [r[key] for r in mine if r.get(key) is not None]
            if vals:
                print(f"{arm:<6} mean {key}: {sum(vals) / len(vals):.4g}")
    results["summary"] = {f"{a}@{s}": v for (a, s), v in summary.items()}


if __name__ == "__main__":
    main()
