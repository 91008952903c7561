"""Build preference pairs from a model and a reward, or check a pairs file.

    python -m rlgen.pairs build --checkpoint rlgen/assets/flow_shapes_base --reward shapes_verifier \
        --prompts shapes:256 --samples-per-prompt 8 --out runs/pairs_shapes
    python -m rlgen.pairs build --checkpoint runs/mdm_arith_base --reward arith_verifier \
        --prompts arith:512 --samples-per-prompt 8 --temperature 1.0 --out runs/pairs_arith
    python -m rlgen.pairs check runs/pairs_shapes/pairs.jsonl [--on-error skip]

``build`` samples K completions per prompt from the checkpoint (a flow image model or a
masked-diffusion LM), scores them with the rewards (``NAME`` or ``NAME=WEIGHT``; weights sum the
scores), and writes, per prompt, the best against the worst sample (``--strategy best_worst``) or
every pair whose score gap exceeds ``--margin`` (``--strategy ranked``), in the format of
``rlgen.data.pairs``: ``OUT/pairs.jsonl``, ``OUT/images/*.png`` and a PNG contact sheet of the first
pairs (``OUT/contact_sheet.png``: chosen left, rejected right) for images, ``OUT/build.json``
(settings and statistics). ``--prompts`` is a file (images: one prompt per line; text: a JSONL
problems file) or ``SOURCE:N`` to draw N prompts: ``shapes:N`` from the shapes grammar, or
``<task>:N`` training-split problems of a text task (never held-out ones).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rlgen.data.pairs import PAIRS_FILE, load_pairs, pair_record, write_image, write_pairs


def select_pairs(scores: torch.Tensor, strategy: str = "best_worst", margin: float = 0.0) -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) index triples from scores (P, K); NaN = unscored.

    ``best_worst``: per prompt the highest against the lowest score, if they differ by more than
    ``margin`` (ties go to the lower index). ``ranked``: every (i, j) with s_i − s_j > margin.
    """
    if strategy not in ("best_worst", "ranked"):
        raise ValueError(f"strategy must be best_worst or ranked, got {strategy!r}")
    out = []
    for p, row in enumerate(scores.tolist()):
        valid = [(s, k) for k, s in enumerate(row) if s == s]  # drop NaN
        if len(valid) < 2:
            continue
        if strategy == "best_worst":
            best = max(valid, key=lambda t: (t[0], -t[1]))
            worst = min(valid, key=lambda t: (t[0], t[1]))
            if best[0] - worst[0] > margin:
                out.append((p, best[1], worst[1]))
        else:
            out += [(p, i, j) for si, i in valid for sj, j in valid if si - sj > margin]
    return out


# ----------------------------------------------------------------------------------------------
# Prompts and samples
# ----------------------------------------------------------------------------------------------
def read_prompts(spec: str, text: bool, seed: int) -> list:
    """Image prompts (str) or text problems (dict) from a file or ``SOURCE:N``."""
    p = Path(spec)
    if p.is_file():
        if text:
            from rlgen.data.text_tasks import load_problems

            return load_problems(p)
        from rlgen.utils import read_text_file

        lines = [ln.strip() for ln in read_text_file(p).splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        if not prompts:
            raise ValueError(f"{p}: no prompts")
        return prompts
    source, _, n = spec.partition(":")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--prompts {spec!r}: not a file, and not SOURCE:N (e.g. shapes:256, arith:512)")
    if text:
        from rlgen.data.text_tasks import generate_problems

        return generate_problems(source, int(n), seed, split="train")
    if source != "shapes":
        raise ValueError(f"--prompts {spec!r}: image prompts come from a file or shapes:N")
    from rlgen.data.shapes import sample_prompt

    rng = np.random.default_rng([seed, 17])
    return [sample_prompt(rng, None)[0] for _ in range(int(n))]


def _sample_images(policy, prompts: list[str], k: int, args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed)
    expanded = [p for p in prompts for _ in range(k)]
    return policy.generate(expanded, num_steps=args.num_steps, cfg_scale=args.cfg, noise_level=args.noise_level,
                           generator=gen, batch_size=args.batch_size, progress=args.progress).cpu()


def _sample_texts(model, problems: list[dict], k: int, args) -> list[str]:
    from rlgen.eval.text import decode_problems

    expanded = [p for p in problems for _ in range(k)]
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    texts, _ = decode_problems(model, expanded, {"temperature": args.temperature}, args.batch_size, gen,
                               args.progress)
    return texts


def _parse_rewards(specs: list[str]) -> dict[str, float]:
    out = {}
    for s in specs:
        name, _, w = s.partition("=")
        out[name] = float(w) if w else 1.0
    return out


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------
def build(args) -> dict:
    """Sample, score, select and write; returns the statistics also written to build.json."""
    from rewards.base import RewardMixer
    from rlgen.models import load_model
    from rlgen.utils import resolve_device, set_threads

    set_threads(args.threads)
    # load options of the policy (a pipeline's resolution …), as train_rl.py's policy.options give them
    options = dict(getattr(args, "options", None) or {})
    if getattr(args, "resolution", None):
        options["resolution"] = args.resolution
    if getattr(args, "dtype", None):
        options["dtype"] = getattr(torch, args.dtype)
    model = load_model(args.checkpoint, device=str(resolve_device(args.device)), **options).eval()
    text = getattr(model, "family", None) != "flow"  # rlgen's pixel models and diffusers pipelines sample images
    items = read_prompts(args.prompts, text, args.seed)
    k = args.samples_per_prompt
    if k < 2:
        raise ValueError(f"--samples-per-prompt must be >= 2 to form pairs, got {k}")
    weights = _parse_rewards(args.reward)  # constructor kwargs (a reward model's device …): train_rl's reward_kwargs
    kwargs = {k: v for k, v in (getattr(args, "reward_kwargs", None) or {}).items() if k in weights}
    mixer = RewardMixer({"rewards": weights, "reward_kwargs": kwargs})
    if text:
        from rlgen.data.text_tasks import get_task

        samples = _sample_texts(model, items, k, args)
        prompts = [get_task(p["task"]).format_prompt(p) for p in items]
        expanded = [p for p in items for _ in range(k)]
        scores = mixer(samples, [p for p in prompts for _ in range(k)], problems=expanded).total
    else:
        prompts = items
        samples = _sample_images(model, prompts, k, args)
        scores = mixer(samples, [p for p in prompts for _ in range(k)]).total
    scores = scores.reshape(len(prompts), k)  # (P, K)
    if text:  # identical completions make no pair: keep one score per distinct text
        for p in range(len(prompts)):
            seen = set()
            for j in range(k):
                t = samples[p * k + j]
                if t in seen:
                    scores[p, j] = float("nan")
                seen.add(t)
    triples = select_pairs(scores, args.strategy, args.margin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, seen = [], set()
    for p, i, j in triples:
        meta = {"sample_ids": [i, j]}
        if text:
            problem = items[p]
            meta.update(problem=problem, gen_length=get_task(problem["task"]).gen_length(problem))
            chosen, rejected = samples[p * k + i], samples[p * k + j]
            if (prompts[p], chosen, rejected) in seen:  # a repeated problem drew the same pair again
                continue
            seen.add((prompts[p], chosen, rejected))
        else:
            chosen, rejected = f"images/{p:06d}_{i}.png", f"images/{p:06d}_{j}.png"
            for idx, rel in ((i, chosen), (j, rejected)):
                if not (out / rel).exists():
                    write_image(samples[p * k + idx], out / rel)
        records.append(pair_record(prompts[p], chosen, rejected, float(scores[p, i]), float(scores[p, j]), meta))
    path = write_pairs(out / PAIRS_FILE, records)
    valid = scores[torch.isfinite(scores)]
    stats = {"checkpoint": str(args.checkpoint), "rewards": _parse_rewards(args.reward), "prompts": len(prompts),
             "samples_per_prompt": k, "strategy": args.strategy, "margin": args.margin, "pairs": len(records),
             "mean_score": valid.mean().item() if len(valid) else None,
             "mean_chosen_score": float(np.mean([r["chosen_score"] for r in records])) if records else None,
             "mean_rejected_score": float(np.mean([r["rejected_score"] for r in records])) if records else None,
             "modality": "text" if text else "image", "seed": args.seed, "file": str(path)}
    if text:
        stats.update(temperature=args.temperature)
    else:
        stats.update(num_steps=args.num_steps, cfg=args.cfg, noise_level=args.noise_level)
        if records:
            stats["contact_sheet"] = str(contact_sheet(out, records[:args.sheet_pairs]))
    (out / "build.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def contact_sheet(out: Path, records: list[dict]) -> Path:
    """PNG of pairs, one per row: chosen (left) and rejected (right), captioned with their scores."""
    from rlgen.data.pairs import read_image
    from rlgen.viz import save_image_grid

    images, captions = [], []
    for r in records:
        images += [read_image(out / r["chosen"]), read_image(out / r["rejected"])]
        captions += [f"W {r['chosen_score']:.2f} {r['prompt']}", f"L {r['rejected_score']:.2f}"]
    return save_image_grid(torch.stack(images), out / "contact_sheet.png", nrow=2, captions=captions, scale=4)


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import rlgen  # noqa: F401  (torchvision compatibility before anything else imports it)

    ap = argparse.ArgumentParser(prog="python -m rlgen.pairs", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="sample a model, score, write best-vs-worst pairs")
    b.add_argument("--checkpoint", required=True, help="model folder or run folder (its latest checkpoint)")
    b.add_argument("--reward", nargs="+", required=True, help="reward NAME or NAME=WEIGHT (several are summed)")
    b.add_argument("--prompts", required=True, help="prompts/problems file, or SOURCE:N (shapes:256, arith:512)")
    b.add_argument("--samples-per-prompt", type=int, default=8)
    b.add_argument("--out", required=True)
    b.add_argument("--strategy", choices=["best_worst", "ranked"], default="best_worst")
    b.add_argument("--margin", type=float, default=0.0, help="minimum score gap of a pair")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--num-steps", type=int, default=20, help="images: ODE/SDE steps")
    b.add_argument("--cfg", type=float, default=1.0, help="images: guidance scale")
    b.add_argument("--noise-level", type=float, default=0.0, help="images: 0 = ODE from random noise")
    b.add_argument("--temperature", type=float, default=1.0, help="text: sampling temperature")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--sheet-pairs", type=int, default=16, help="pairs shown on the contact sheet")
    b.add_argument("--device", default="auto")
    b.add_argument("--resolution", type=int, default=None, help="pipelines: image side in pixels")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights and compute")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    b.add_argument("--progress", action="store_true")
    c = sub.add_parser("check", help="validate a pairs file and print what would be trained on")
    c.add_argument("file")
    c.add_argument("--on-error", choices=["strict", "skip"], default="strict")
    c.add_argument("--image-size", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            print(json.dumps(build(args), indent=2))
        else:
            pairs = load_pairs(args.file, on_error=args.on_error, image_size=args.image_size)
            print(pairs.summary())
            for e in pairs.errors:
                print(f"  skipped: {e}")
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
