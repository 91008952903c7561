"""Accuracy of a text checkpoint on training-split problems vs the held-out set: a memorisation check.

    python scripts/split_accuracy.py --checkpoint rlgen/assets/mdm_countdown_base --task countdown \
        [--level n3] [--n-train 400] [--n-heldout 200] [--threshold 0.9|none]

For each split: greedy accuracy (one token per step, as the benchmark) and sampled accuracy / pass@8
at temperature 1 (``--threshold``: confidence-threshold decoding, as a job's rollouts). Training
problems are drawn with ``generate_problems(..., split="train")`` (what an RL job's prompt source
draws, seed 0), held-out ones are the benchmark's set (fewer when the level has fewer). A base that
scores much higher on training problems has memorised them: RL on those prompts then rewards recall.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    import rlgen  # noqa: F401
    from rlgen.data.text_tasks import generate_problems
    from rlgen.eval.text import score_problems
    from rlgen.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--level", default=None, help="one level (default: the task's default levels)")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--threshold", default="0.9", help="sampled decoding's confidence threshold, or 'none' "
                                                        "(one token per step)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(a.checkpoint, device="cpu").eval()
    levels = [a.level] if a.level else None
    threshold = None if a.threshold.lower() == "none" else float(a.threshold)
    sampled_settings = {"temperature": 1.0, "threshold": threshold}
    for split, n in (("train", a.n_train), ("heldout", a.n_heldout)):
        problems = generate_problems(a.task, n, 0, levels, split=split)
        greedy = score_problems(model, problems, progress=True)
        sampled = score_problems(model, problems, sampled_settings, samples_per_prompt=8,
                                 generator=torch.Generator().manual_seed(0), progress=True)
        print(f"{split:8s} n={len(problems)}  greedy {greedy['accuracy']:.3f}  sampled {sampled['accuracy']:.3f}  "
              f"pass@8 {sampled['pass_at_8']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
