"""python -m rlgen.pretrain --config configs/pretrain/<name>.yaml [key=value ...]

The config's ``kind`` picks the trainer: flow_pretrain (flow matching, images), mdm_pretrain
(masked diffusion, text), clip_pretrain (a tiny CLIP for the clip_score reward),
classifier_pretrain (the image classifier behind verifier rewards and metrics),
aesthetic_pretrain (an aesthetic head on CLIP embeddings, from preference pairs or ratings),
ar_pretrain (an autoregressive teacher LM sharing the masked-diffusion tokenizer, for vLLM).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rlgen.config import ConfigError, load_config

TRAINERS = {
    "flow_pretrain": "rlgen.pretrain.flow_matching:train",
    "mdm_pretrain": "rlgen.pretrain.masked_diffusion:train",
    "clip_pretrain": "rlgen.pretrain.clip:train",
    "classifier_pretrain": "rlgen.pretrain.classifier:train",
    "aesthetic_pretrain": "rlgen.pretrain.aesthetic:train",
    "ar_pretrain": "rlgen.pretrain.ar_lm:train",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlgen.pretrain")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value (dotted keys), e.g. train.max_steps=100")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.kind not in TRAINERS:
            raise ConfigError(f"{args.config}: kind '{cfg.kind}' is not a pretraining job "
                              f"(one of: {', '.join(TRAINERS)})")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_pretraining(cfg)
    return 0


def run_pretraining(cfg):
    """Run the pretraining job ``cfg`` (its ``kind`` picks the trainer); returns what the trainer returns."""
    mod, fn = TRAINERS[cfg.kind].split(":")
    return getattr(importlib.import_module(mod), fn)(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
