"""Calibrate TeaCache for a flow checkpoint: fit the polynomial that maps the relative L1 change of the
timestep-modulated input to that of the model output (the velocity), on sampled ODE trajectories.

    python -m rlgen.teacache calibrate --checkpoint rlgen/assets/flow_shapes_base --out teacache.json \
        [--prompts FILE] [--num-prompts 64] [--steps 10,20] [--degree 4] [--cfg 1.0] [--seed 0]

The JSON holds ``coefficients`` (highest degree first, as numpy.poly1d) plus how they were fitted; pass
the file as ``rollout.teacache.calibration=FILE`` (training) or ``--set teacache_calibration=FILE``
(``python -m rlgen.evaluate``). TeaCache: Liu et al. 2024, arXiv:2411.19108; see docs/teacache.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from rlgen.samplers.teacache import fit_polynomial, polyval

FORMAT = "rlgen_teacache"


def read_calibration(path: str | os.PathLike) -> list[float]:
    """The coefficients of a calibration file; a bad file is one line naming it."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"teacache calibration {p}: cannot read ({e})") from e
    coeffs = data.get("coefficients") if isinstance(data, dict) else None
    if data.get("format") != FORMAT or not isinstance(coeffs, list) or not coeffs \
            or not all(isinstance(c, (int, float)) for c in coeffs):
        raise ValueError(f"teacache calibration {p}: not a '{FORMAT}' file with a list of numeric 'coefficients'")
    return [float(c) for c in coeffs]


def step_changes(records: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample relative L1 changes between consecutive steps of one trajectory batch.

    records[i] = (indicator (r·B, …), velocity (B, …)) at step i; r > 1 when the model saw r rows per sample
    (CFG). Returns x, y of shape ((S−1)·B,): the indicator's and the velocity's change from step i−1 to i.
    """
    xs, ys = [], []
    for (ind0, v0), (ind1, v1) in zip(records, records[1:]):
        b = v0.shape[0]
        # (r·B, …) → (B, r·…): row j of every CFG branch belongs to sample j
        i0, i1 = (t.reshape(-1, b, *t.shape[1:]).transpose(0, 1).reshape(b, -1) for t in (ind0, ind1))
        xs.append((i1 - i0).abs().mean(1) / i0.abs().mean(1).clamp_min(1e-12))
        v0f, v1f = v0.reshape(b, -1), v1.reshape(b, -1)
        ys.append((v1f - v0f).abs().mean(1) / v0f.abs().mean(1).clamp_min(1e-12))
    return torch.cat(xs), torch.cat(ys)


def calibrate(policy, prompts: list[str], steps: list[int], degree: int = 4, cfg_scale: float = 1.0,
              seed: int = 0, batch_size: int = 32, progress: bool = True) -> dict:
    """Sample every prompt once per step count (Euler ODE, no cache) and fit the polynomial."""
    from tqdm.auto import tqdm

    from rlgen.models.teacache import record_steps
    from rlgen.samplers.flow import sample

    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    jobs = [(n, i) for n in steps for i in range(0, len(prompts), batch_size)]
    for n, i in tqdm(jobs, desc="teacache calibrate", disable=not progress):
        chunk = prompts[i:i + batch_size]
        fn, records = record_steps(policy, policy.velocity_fn(chunk, cfg_scale))
        noise = torch.randn((len(chunk), *policy.sample_shape), generator=gen).to(policy.device, policy.dtype)
        with torch.no_grad():
            sample(fn, noise, policy.sigmas(n), noise_level=0.0, keep_latents=False)
        x, y = step_changes(records)
        xs.append(x), ys.append(y)
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    coeffs = fit_polynomial(x, y, degree)
    pred = polyval(coeffs, x)
    r2 = 1 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-300))
    return {"format": FORMAT, "coefficients": coeffs, "degree": degree, "r2": round(r2, 4), "points": int(x.numel()),
            "x_range": [float(x.min()), float(x.max())], "steps": steps, "cfg_scale": cfg_scale,
            "prompts": len(prompts), "seed": seed}


def _prompts(args) -> list[str]:
    if args.prompts:
        lines = [s.strip() for s in args.prompts.read_text().splitlines()]
        out = [s for s in lines if s and not s.startswith("#")]
        if not out:
            raise ValueError(f"{args.prompts}: no prompts (one per line expected)")
        return out[:args.num_prompts]
    from rlgen.data.shapes import heldout_prompts

    items = heldout_prompts(max(1, args.num_prompts // 6 + 1))
    return [p for p, _ in items][:args.num_prompts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlgen.teacache", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="fit the TeaCache polynomial of a checkpoint")
    c.add_argument("--checkpoint", required=True, help="rlgen checkpoint / run folder or diffusers pipeline folder")
    c.add_argument("--out", type=Path, required=True, help="where to write the calibration JSON")
    c.add_argument("--prompts", type=Path, help="one prompt per line (default: the shapes held-out prompts)")
    c.add_argument("--num-prompts", type=int, default=64)
    c.add_argument("--steps", default="10,20", help="comma-separated step counts to sample with")
    c.add_argument("--degree", type=int, default=4)
    c.add_argument("--cfg", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--device", default="auto")
    c.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from rlgen.evaluate import model_folder
    from rlgen.models import ModelLoadError, load_model
    from rlgen.runtime.rundir import CheckpointError

    try:
        from rlgen.utils import resolve_device

        steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
        if not steps or min(steps) < 2:
            raise ValueError(f"--steps {args.steps!r}: need step counts >= 2")
        prompts = _prompts(args)
        policy = load_model(model_folder(args.checkpoint), device=str(resolve_device(args.device))).eval()
        result = calibrate(policy, prompts, steps, args.degree, args.cfg, args.seed, args.batch_size,
                           progress=not args.no_progress)
    except (OSError, ValueError, ModelLoadError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["checkpoint"] = str(args.checkpoint)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
