"""Look at what a model makes: one PNG per prompt plus a captioned grid.

    python -m rlgen.sample --checkpoint DIR --prompts FILE --out DIR [--num-steps N] [--cfg W] [--seed S]

``DIR`` is anything ``rlgen.models.load_model`` accepts: an rlgen flow checkpoint or run folder, a
diffusers pipeline folder (SD3/SD3.5, FLUX.1), a post-trained pipeline checkpoint, or a Hub id.
``FILE`` holds one prompt per line (blank lines and lines starting with # are skipped). Without
--num-steps / --cfg the model's own defaults are used (a pipeline's: those of its ``__call__``).
Writes ``OUT/000_<prompt>.png``…, ``OUT/grid.png`` and ``OUT/samples.json`` (files, prompts, settings).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--prompts file not found: {path}")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "prompt"


def generate_images(model, prompts: list[str], num_steps: int | None, cfg: float | None, seed: int,
                    batch_size: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] from any flow policy (rlgen's pixel models or a diffusers pipeline)."""
    kw = {"generator": torch.Generator().manual_seed(seed), "batch_size": batch_size}
    if num_steps is not None:
        kw["num_steps"] = num_steps
    if cfg is not None:
        kw["cfg_scale"] = cfg
    with torch.no_grad():
        images = model.generate(prompts, **kw)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlgen.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint/run folder, pipeline folder or Hub id")
    ap.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--num-steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (FLUX.1-dev: the embedded guidance)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--resolution", type=int, default=None, help="pipelines: image side in pixels")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    from rlgen.models import ModelLoadError, load_model
    from rlgen.utils import resolve_device
    from rlgen.viz import save_image_grid, to_uint8

    try:
        prompts = read_prompts(args.prompts)
        opts = {"resolution": args.resolution} if args.resolution else {}
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = load_model(args.checkpoint, device=str(resolve_device(args.device)), dtype=dtype, **opts).eval()
        if not hasattr(model, "generate") or not hasattr(model, "sample_shape"):
            raise ValueError(f"{args.checkpoint}: {type(model).__name__} is not an image (flow) model")
        images = generate_images(model, prompts, args.num_steps, args.cfg, args.seed, args.batch_size)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from PIL import Image

    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (arr, prompt) in enumerate(zip(to_uint8(images), prompts)):
        name = f"{i:03d}_{_slug(prompt)}.png"
        Image.fromarray(arr).save(args.out / name)
        files.append({"file": name, "prompt": prompt})
    side = images.shape[-1]
    save_image_grid(images, args.out / "grid.png", nrow=min(8, len(prompts)), captions=prompts,
                    scale=max(1, 128 // side))
    meta = {"checkpoint": str(args.checkpoint), "num_steps": args.num_steps, "cfg": args.cfg, "seed": args.seed,
            "samples": files}
    (args.out / "samples.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(files)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
