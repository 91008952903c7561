"""RL and preference training for rlgen generators.

    python train_rl.py --config configs/quickstart.yaml [key=value ...]
    python train_rl.py --config configs/rl/flow_grpo_shapes.yaml run.name=my_run ray.address=auto

The config's ``kind`` selects the job (flow_grpo, …); every field can be overridden with dotted
``key=value`` pairs; an unknown key is an error naming it. ``ray.address`` empty starts a local Ray
cluster; ``auto`` or an address attaches to an existing one.
"""
from __future__ import annotations

import argparse
import json
import sys

JOBS = {
    "flow_grpo": "rlgen.runtime.trainer:Trainer",
    "mdm_grpo": "rlgen.runtime.text_trainer:TextGRPOTrainer",
    "diffusion_dpo": "rlgen.runtime.preference:PreferenceTrainer",
    "vrpo": "rlgen.runtime.preference:PreferenceTrainer",
    "flow_opd": "rlgen.runtime.opd:FlowOPDTrainer",
    "mdm_opd": "rlgen.runtime.opd:TextOPDTrainer",
}


def main(argv: list[str] | None = None) -> int:
    import rlgen  # noqa: F401  (torchvision compatibility before anything else imports it)
    from rlgen.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="train_rl.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML job config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.iterations=5")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.kind not in JOBS:
            raise ConfigError(f"{args.config}: kind '{cfg.kind}' is not an RL/preference job "
                              f"(one of: {', '.join(JOBS)}); pretraining runs with python -m rlgen.pretrain")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from rlgen.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    import importlib

    mod, cls = JOBS[cfg.kind].split(":")
    result = getattr(importlib.import_module(mod), cls)(cfg).fit()
    print(json.dumps({k: v for k, v in result.items() if k != "eval_history"}, indent=2))
    if result.get("eval_history"):
        first, last = result["eval_history"][0], result["eval_history"][-1]
        print(f"held-out accuracy: {first.get('eval/accuracy', float('nan')):.3f} (step {first['step']}) -> "
              f"{last.get('eval/accuracy', float('nan')):.3f} (step {last['step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
