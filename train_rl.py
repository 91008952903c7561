"""RL and preference training for rlgen generators.

    python train_rl.py --config configs/quickstart.yaml [key=value ...]
    python train_rl.py --config configs/rl/flow_grpo_shapes.yaml run.name=my_run ray.address=auto

The config's ``algo.name`` selects a registered algorithm (or a user's ``module.path:ClassName``),
which fixes the model family and whether the job learns from rollouts or from preference pairs;
every field can be overridden with dotted ``key=value`` pairs; an unknown key or a value out of
range is an error naming it and where it was set. ``ray.address`` empty starts a local Ray
cluster; ``auto`` or an address attaches to an existing one.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    import rlgen  # noqa: F401  (torchvision compatibility before anything else imports it)
    from rlgen.config import TRAIN_KIND, ConfigError, load_config

    ap = argparse.ArgumentParser(prog="train_rl.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML job config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=5")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.kind != TRAIN_KIND:
            raise ConfigError(f"{args.config}: kind '{cfg.kind}' is a pretraining job: run it with "
                              f"python -m rlgen.pretrain --config {args.config}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from rlgen.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from rlgen.runtime.trainer import JobFailed, Trainer

    try:
        result = Trainer(cfg).fit()
    except ConfigError as e:  # refused before anything started: one line, nothing on disk changed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:  # e.g. a learner rank died: what, and where to resume from
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "eval_history"}, indent=2))
    if result.get("eval_history"):
        first, last = result["eval_history"][0], result["eval_history"][-1]
        print(f"held-out accuracy: {first.get('eval/accuracy', float('nan')):.3f} (step {first['step']}) -> "
              f"{last.get('eval/accuracy', float('nan')):.3f} (step {last['step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
