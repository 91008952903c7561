"""report.md at the end of a run: curves (PNG), held-out accuracy before/after, sample grids."""
from __future__ import annotations

from pathlib import Path

from rlgen.runtime.rundir import read_metrics
from rlgen.viz import plot_curves


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: Path, eval_history: list[dict], title: str = "") -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    lines = [f"# {title or run_dir.name}", ""]
    figs = run_dir / "report"
    curves = {"reward_mean": "training reward (mean over rollouts)", "kl": "KL to reference",
              "clip_frac": "fraction of clipped ratios", "eval/accuracy": "held-out accuracy"}
    for key, label in curves.items():
        xs, ys = _series(rows, key)
        if len(xs) >= 1:
            name = key.replace("/", "_")
            plot_curves({label: (xs, ys)}, figs / f"{name}.png", title=label, xlabel="iteration")
            lines.append(f"![{label}](report/{name}.png)")
    lines.append("")
    if eval_history:
        first, last = eval_history[0], eval_history[-1]
        keys = [k for k in first if k.startswith("eval/")]
        lines += ["## Held-out evaluation", "", f"| metric | step {first['step']} | step {last['step']} | change |",
                  "|---|---|---|---|"]
        for k in keys:
            a, b = first.get(k), last.get(k)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                lines.append(f"| {k[5:]} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
        lines.append("")
        for step in (first["step"], last["step"]):
            grid = run_dir / "samples" / f"eval_{step:05d}.png"
            if grid.exists():
                lines.append(f"Samples at step {step}:\n\n![step {step}](samples/{grid.name})\n")
    timing = [k for k in ("time_rollout", "time_reward", "time_learn", "time_sync", "time_overhead", "time_iter")
              if any(k in r for r in rows)]
    if timing:
        lines += ["## Mean time per iteration (s)", "", "| " + " | ".join(t[5:] for t in timing) + " |",
                  "|" + "---|" * len(timing)]
        vals = []
        for t in timing:
            xs = [r[t] for r in rows if isinstance(r.get(t), (int, float))]
            vals.append(f"{sum(xs) / len(xs):.2f}" if xs else "-")
        lines.append("| " + " | ".join(vals) + " |")
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
