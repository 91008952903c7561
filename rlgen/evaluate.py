"""Benchmarks on a checkpoint.

    python -m rlgen.evaluate --checkpoint DIR --benchmark NAME [--prompts FILE | --problems FILE]
        [--samples-per-prompt K] [--seed S] [--out FILE.json] [--set key=value ...] [--trust-remote-code]

DIR may be a checkpoint folder or a run folder (then its latest complete checkpoint), a diffusers
pipeline folder or a Hugging Face model folder. Benchmarks are registered functions
``fn(req: EvalRequest, policy) -> dict`` run on a loaded policy (the CLI loads DIR; an RL run's
rollout worker passes the policy it holds, so in-run numbers are the CLI's); the dict holds at least
``accuracy`` (overall, in [0, 1]), ``per_task`` (task type → accuracy), ``n`` (items scored) and the
sampling settings used. A benchmark's ``options`` attribute names the ``--set`` keys it accepts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlgen.models import ModelLoadError
from rlgen.registry import BENCHMARKS, RegistryError
from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint


@dataclass
class EvalRequest:
    checkpoint: Path | None = None       # what the CLI loads (None when the caller passes a policy)
    prompts: Path | None = None          # one prompt per line (image benchmarks)
    problems: Path | None = None         # JSONL problems (text benchmarks)
    samples_per_prompt: int | None = None  # None: the benchmark's default
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # benchmark-specific: steps, cfg, threshold …
    grid: Path | None = None             # where image benchmarks write a PNG grid of their samples
    return_samples: bool = False         # put a few samples in the result (an RL run draws its grids from them)
    trust_remote_code: bool = False      # only from the caller: never read from the checkpoint folder


def check_options(name: str, options: dict) -> None:
    """Refuse options the benchmark does not take (before anything runs)."""
    fn = BENCHMARKS.get(name)
    known = getattr(fn, "options", None)
    unknown = sorted(set(options) - set(known)) if known is not None else []
    if unknown:
        raise ValueError(f"benchmark '{name}': unknown option(s) {unknown}; known: {sorted(known)}")


def run_benchmark(name: str, req: EvalRequest, policy=None) -> dict:
    """Score ``policy`` (default: load ``req.checkpoint``) on benchmark ``name``."""
    fn = BENCHMARKS.get(name)
    check_options(name, req.options)
    t0 = time.time()
    if policy is None:
        getattr(fn, "prepare", lambda r: None)(req)  # a bad prompts/problems file fails before the model loads
        from rlgen.models import load_model
        from rlgen.utils import resolve_device

        policy = load_model(req.checkpoint, device=str(resolve_device(req.device)),
                            trust_remote_code=req.trust_remote_code).eval()
    result = fn(req, policy)
    for key in ("accuracy", "per_task", "n"):
        if key not in result:
            raise RuntimeError(f"benchmark '{name}' returned no '{key}' (got keys {sorted(result)})")
    result.setdefault("benchmark", name)
    result.setdefault("checkpoint", str(req.checkpoint))
    result.setdefault("seed", req.seed)
    result["eval_seconds"] = round(time.time() - t0, 2)
    return result


def model_folder(spec: str | os.PathLike) -> Path:
    """What ``--checkpoint`` names: a Hugging Face model or diffusers pipeline folder as it is, else an
    rlgen checkpoint (a run folder → its latest complete checkpoint)."""
    p = Path(spec)
    foreign = (p / "config.json").is_file() or (p / "model_index.json").is_file()
    if p.is_dir() and foreign and not (p / "rlgen_model.json").is_file() and not (p / "checkpoints").is_dir():
        return p
    return resolve_checkpoint(p)


def _parse_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlgen.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    ap.add_argument("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARKS.names())}")
    ap.add_argument("--prompts", type=Path, help="text file, one prompt per line (image benchmarks)")
    ap.add_argument("--problems", type=Path, help="JSONL problems file (text benchmarks)")
    ap.add_argument("--samples-per-prompt", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="benchmark option, e.g. --set steps=20 --set cfg=4.0 (repeatable)")
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model folder's own Python files (config.json auto_map) to run; only for folders "
                         "you trust (never read from the folder itself)")
    args = ap.parse_args(argv)
    for flag, p in (("--prompts", args.prompts), ("--problems", args.problems)):
        if p is not None and not p.is_file():
            print(f"error: {flag} file not found: {p}", file=sys.stderr)
            return 2
    try:
        ckpt = model_folder(args.checkpoint)
        req = EvalRequest(checkpoint=ckpt, prompts=args.prompts, problems=args.problems,
                          samples_per_prompt=args.samples_per_prompt, seed=args.seed, device=args.device,
                          batch_size=args.batch_size, progress=not args.no_progress,
                          options=_parse_options(args.options), trust_remote_code=args.trust_remote_code,
                          grid=args.out.with_suffix(".png") if args.out else None)
        result = run_benchmark(args.benchmark, req)
    except (CheckpointError, ModelLoadError, RegistryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
