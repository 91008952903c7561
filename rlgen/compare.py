"""Side-by-side curves and a before/after table for several RL runs (e.g. with and without KL).

    python -m rlgen.compare runs/flow_grpo_fashion_kl runs/flow_grpo_fashion_nokl runs/flow_grpo_fashion_clip \
        --out runs/fashion_compare

Reads each run's ``metrics.jsonl`` and writes ``OUT/compare.png`` (one panel per metric, one line
per run; the training reward, ``--reward-key``, is smoothed over 5 iterations because 8 prompts per
iteration make it noisy), ``OUT/compare.md`` (first vs last evaluation of every run) and ``OUT/compare.json``. The
quality guard asks, for each run, whether the last evaluation keeps FD within ``--fd-max-ratio``
of the first (the base) and diversity at least ``--div-min-ratio`` of it: a reward can rise while
the samples drift away from the data or collapse onto a few modes, and these two numbers catch it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rlgen.runtime.rundir import read_metrics

PANELS = {"eval/accuracy": "held-out class accuracy", "eval/fd": "FD to the test split (lower is better)",
          "eval/diversity": "within-class diversity"}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points (the first points average what exists)."""
    return [sum(ys[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ys))]


def guard(first: dict, last: dict, fd_max_ratio: float, div_min_ratio: float) -> dict:
    """Before/after of one run: the accuracy change and whether FD and diversity stay in bounds."""
    out = {"accuracy_first": first.get("eval/accuracy"), "accuracy_last": last.get("eval/accuracy")}
    fd0, fd1 = first.get("eval/fd"), last.get("eval/fd")
    dv0, dv1 = first.get("eval/diversity"), last.get("eval/diversity")
    if fd0 is not None and fd1 is not None and fd0 > 0:
        out.update(fd_first=fd0, fd_last=fd1, fd_ratio=fd1 / fd0, fd_ok=fd1 <= fd_max_ratio * fd0)
    if dv0 is not None and dv1 is not None and dv0 > 0:
        out.update(div_first=dv0, div_last=dv1, div_ratio=dv1 / dv0, div_ok=dv1 >= div_min_ratio * dv0)
    if out["accuracy_first"] is not None and out["accuracy_last"] is not None:
        out["accuracy_up"] = out["accuracy_last"] > out["accuracy_first"]
    return out


def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]


def plot(runs: dict[str, list[dict]], path: Path, smooth: int = 5, reward_key: str = "reward_mean") -> Path:
    """One panel per metric, one line per run. ``reward_key`` picks the training-reward panel's series:
    with mixed rewards, a shared component (e.g. reward/fashion_classifier) compares runs on one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {reward_key: f"training {reward_key.replace('reward/', 'reward: ')} ({smooth}-iteration mean)", **PANELS}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=110)
    for ax, (key, title) in zip(axes, panels.items()):
        for label, rows in runs.items():
            xs, ys = series(rows, key)
            if key == reward_key:
                ys = moving_average(ys, smooth)
            ax.plot(xs, ys, marker="" if key == reward_key else "o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def table(results: dict[str, dict], fd_max_ratio: float, div_min_ratio: float) -> list[str]:
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    ok = lambda v: "–" if v is None else ("yes" if v else "**no**")  # noqa: E731
    lines = [f"| run | iterations | accuracy first → last | FD first → last (ratio; ≤ {fd_max_ratio:g}×?) | "
             f"diversity first → last (ratio; ≥ {div_min_ratio:g}×?) |", "|---|---|---|---|---|"]
    for label, g in results.items():
        lines.append(f"| {label} | {g['first_step']} → {g['last_step']} | {f(g['accuracy_first'])} → "
                     f"{f(g['accuracy_last'])} | {f(g.get('fd_first'))} → {f(g.get('fd_last'))} "
                     f"({f(g.get('fd_ratio'))}; {ok(g.get('fd_ok'))}) | {f(g.get('div_first'))} → "
                     f"{f(g.get('div_last'))} ({f(g.get('div_ratio'))}; {ok(g.get('div_ok'))}) |")
    return lines


def compare(run_dirs: list[Path], out: Path, labels: list[str] | None = None, fd_max_ratio: float = 1.1,
            div_min_ratio: float = 0.7, reward_key: str = "reward_mean") -> dict:
    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"--labels gives {len(labels)} names for {len(run_dirs)} runs")
    runs, results = {}, {}
    for label, d in zip(labels, run_dirs):
        rows = read_metrics(Path(d))
        evals = _evals(rows)
        if not evals:
            raise ValueError(f"{d}: no held-out evaluation in metrics.jsonl (eval.benchmark set? run finished?)")
        runs[label] = rows
        results[label] = {"run": str(d), "first_step": evals[0]["step"], "last_step": evals[-1]["step"],
                          **guard(evals[0], evals[-1], fd_max_ratio, div_min_ratio)}
    out = Path(out)
    fig = plot(runs, out / "compare.png", reward_key=reward_key)
    md = ["# Runs side by side", "", f"![curves]({fig.name})", "",
          *table(results, fd_max_ratio, div_min_ratio), ""]
    for label, d in zip(labels, run_dirs):
        grids = sorted((Path(d) / "samples").glob("eval_*.png"))
        if len(grids) >= 2:
            md += [f"{label}: first and last held-out samples", "",
                   f"![first]({os.path.relpath(grids[0], out)}) ![last]({os.path.relpath(grids[-1], out)})", ""]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def side_by_side(grids: dict[str, Path], out: Path, scale: float = 0.5) -> Path:
    """Sample grids (e.g. ``python -m rlgen.evaluate --out X.json`` writes X.png) next to each other,
    each under its label: before/after pictures at a glance."""
    from PIL import Image, ImageDraw

    ims = {k: Image.open(v).convert("RGB") for k, v in grids.items()}
    ims = {k: im.resize((round(im.width * scale), round(im.height * scale))) for k, im in ims.items()}
    pad, top = 8, 18
    w = sum(im.width for im in ims.values()) + pad * (len(ims) - 1)
    canvas = Image.new("RGB", (w, top + max(im.height for im in ims.values())), "white")
    x, draw = 0, ImageDraw.Draw(canvas)
    for label, im in ims.items():
        canvas.paste(im, (x, top))
        draw.text((x + 4, 3), label, fill="black")
        x += im.width + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlgen.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    ap.add_argument("--out", type=Path, required=True, help="folder for compare.png, compare.md, compare.json")
    ap.add_argument("--labels", nargs="+", help="one name per run (default: folder names)")
    ap.add_argument("--reward-key", default="reward_mean",
                    help="metrics.jsonl key of the reward panel, e.g. reward/fashion_classifier")
    ap.add_argument("--fd-max-ratio", type=float, default=1.1)
    ap.add_argument("--div-min-ratio", type=float, default=0.7)
    ap.add_argument("--grids", nargs="+", default=[], metavar="LABEL=PNG",
                    help="sample grids to put side by side in OUT/grids.png (e.g. base=base.png kl=kl.png)")
    args = ap.parse_args(argv)
    bad = [g for g in args.grids if "=" not in g or not Path(g.split("=", 1)[1]).is_file()]
    if bad:
        print(f"error: --grids needs LABEL=PNG with existing files, got {bad}")
        return 2
    try:
        results = compare(args.runs, args.out, args.labels, args.fd_max_ratio, args.div_min_ratio, args.reward_key)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print("\n".join(table(results, args.fd_max_ratio, args.div_min_ratio)))
    if args.grids:
        print(side_by_side({g.split("=", 1)[0]: Path(g.split("=", 1)[1]) for g in args.grids}, args.out / "grids.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
