"""python -m rlgen.pretrain --config configs/pretrain/<name>.yaml [key=value ...]

The config's ``kind`` picks the pretraining task registered for it (``@register_pretrainer`` beside
``@register_config`` in each module of rlgen/pretrain): flow_pretrain (flow matching, images),
mdm_pretrain (masked diffusion, text), clip_pretrain (a tiny CLIP for the clip_score reward),
classifier_pretrain (the image classifier behind verifier rewards and metrics), aesthetic_pretrain
(an aesthetic head on CLIP embeddings), ar_pretrain (an autoregressive teacher LM sharing the
masked-diffusion tokenizer, for vLLM). ``rlgen.pretrain.loop.run_pretraining`` runs every one.
"""
from __future__ import annotations

import argparse
import json
import sys

from rlgen.config import ConfigError, load_config
from rlgen.pretrain.loop import run_pretraining
from rlgen.registry import PRETRAINERS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlgen.pretrain")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value (dotted keys), e.g. train.max_steps=100")
    args = ap.parse_args(argv)
    kinds = PRETRAINERS.names()  # imports rlgen/pretrain's modules: their config kinds register too
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.kind not in kinds:
            raise ConfigError(f"{args.config}: kind '{cfg.kind}' is not a pretraining job (one of: {', '.join(kinds)})")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rlgen.runtime.rundir import CheckpointError

    try:
        ckpt = run_pretraining(cfg, PRETRAINERS.get(cfg.kind)(cfg))
    except (ConfigError, CheckpointError) as e:  # e.g. run.resume names nothing this job can continue
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (ckpt / "eval.json").is_file():  # the final evaluation of kinds that write one (CLIP, classifier …)
        result = json.loads((ckpt / "eval.json").read_text())
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    print(f"checkpoint: {ckpt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
