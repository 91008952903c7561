"""report.md at the end of a run: curves (PNG), held-out accuracy before/after, sample grids, and the
teacher–student gap when the run distilled from a teacher. One report for every job."""
from __future__ import annotations

from pathlib import Path

from rlgen.runtime.rundir import read_metrics
from rlgen.viz import plot_curves

CURVES = {"reward_mean": "training reward (mean over rollouts)", "loss": "training loss",
          "kl": "KL to reference", "clip_frac": "fraction of clipped ratios", "distill_kl": "distillation KL",
          "implicit_acc": "implicit accuracy (pairs ranked right)", "reward_margin": "implicit reward margin",
          "eval/accuracy": "held-out accuracy"}
TIMING = ("time_rollout", "time_reward", "time_learn", "time_sync", "time_overhead", "time_iter")


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: Path, eval_history: list[dict], title: str = "") -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    lines = [f"# {title or run_dir.name}", ""]
    figs = run_dir / "report"
    for key, label in CURVES.items():
        xs, ys = _series(rows, key)
        if xs:
            name = key.replace("/", "_")
            plot_curves({label: (xs, ys)}, figs / f"{name}.png", title=label, xlabel="step")
            lines.append(f"![{label}](report/{name}.png)")
    lines.append("")
    if eval_history:
        lines += _eval_section(run_dir, eval_history, figs)
    lines += _timing_section(rows)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _eval_section(run_dir: Path, history: list[dict], figs: Path) -> list[str]:
    first, last = history[0], history[-1]
    keys = [k for k in first if k.startswith("eval/")]
    lines = ["## Held-out evaluation", "", f"| metric | step {first['step']} | step {last['step']} | change |",
             "|---|---|---|---|"]
    for k in keys:
        a, b = first.get(k), last.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            lines.append(f"| {k[5:]} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    lines.append("")
    per_task = sorted({k for h in history for k in h if k.startswith("eval/") and k not in
                       ("eval/accuracy", "eval/nfe_per_token", "eval/tokens_per_s", "eval/fd", "eval/mean_score")})
    series = {k[5:]: ([h["step"] for h in history if k in h], [h[k] for h in history if k in h]) for k in per_task}
    if len(history) > 1 and any(len(xs) > 1 for xs, _ in series.values()):
        plot_curves(series, figs / "eval_detail.png", title="held-out metrics", xlabel="step")
        lines += ["![held-out metrics](report/eval_detail.png)", ""]
    lines += _gap_section(first, last)
    for step in (first["step"], last["step"]):
        grid = run_dir / "samples" / f"eval_{step:05d}.png"
        if grid.exists():
            lines.append(f"Samples at step {step}:\n\n![step {step}](samples/{grid.name})\n")
    return lines


def _gap_section(first: dict, last: dict) -> list[str]:
    """How much of the teacher–student gap (held-out) the run closed, when a teacher was scored."""
    if "eval/teacher_accuracy" not in first or last is first:
        return []
    lines = ["## Teacher–student gap (held-out)", "",
             "| metric | student start | student end | teacher | gap closed |", "|---|---|---|---|---|"]
    for key, tkey in (("eval/accuracy", "eval/teacher_accuracy"), ("eval/hard_accuracy", "eval/teacher_hard_accuracy")):
        if key in first and key in last and tkey in first:
            s0, s1, t = first[key], last[key], first[tkey]
            closed = f"{(s1 - s0) / (t - s0):.0%}" if abs(t - s0) > 1e-9 else "n/a"
            lines.append(f"| {key[5:]} | {s0:.3f} | {s1:.3f} (step {last['step']}) | {t:.3f} | {closed} |")
    return lines + [""]


def _timing_section(rows: list[dict]) -> list[str]:
    timing = [k for k in TIMING if any(k in r for r in rows)]
    if not timing:
        return []
    vals = []
    for t in timing:
        xs = [r[t] for r in rows if isinstance(r.get(t), (int, float))]
        vals.append(f"{sum(xs) / len(xs):.2f}" if xs else "-")
    return ["## Mean time per step (s)", "", "| " + " | ".join(t[5:] for t in timing) + " |",
            "|" + "---|" * len(timing), "| " + " | ".join(vals) + " |"]
