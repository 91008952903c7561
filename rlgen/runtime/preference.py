"""Offline preference training: Diffusion-DPO (flow images) and VRPO (masked-diffusion text).

    python train_rl.py --config configs/dpo/diffusion_dpo_shapes.yaml [key=value ...]
    python train_rl.py --config configs/dpo/vrpo_arith.yaml [key=value ...]

No rollouts: pairs (rlgen/data/pairs.py; built first with ``pairs.build`` when the file is
missing) → learner updates → held-out eval → checkpoints. The run folder, metrics.jsonl,
checkpoints (``checkpoints/0`` = the starting policy; each one a loadable model folder + optimizer
state + ``driver_state.json``), ``run.resume=auto`` and report.md are those of the RL jobs.

The learner runs IN THIS PROCESS (one rank): DeepSpeed through the RL learner's
``DeepSpeedStrategy`` (``train.engine=deepspeed``, ZeRO 0-2) or a plain AdamW ``TorchEngine``
(``train.engine=torch``). Offline DPO has no rollout workers to overlap with, so Ray actors would
add start-up cost and nothing else on one machine; data-parallel ranks (num_learners > 1) are not
implemented for preference jobs.

Batches: each step is ``train.pairs_per_step`` pairs in micro-batches of
``learner.micro_batch_size``; the pair order is a per-epoch permutation seeded by (seed, epoch)
and each step's noise/mask draws are seeded by (seed, step), so a resumed run repeats exactly what
an uninterrupted one would have done.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rlgen.algos.diffusion_dpo import DiffusionDPOConfig
from rlgen.algos.vrpo import VRPOConfig
from rlgen.config import RunConfig, register_config
from rlgen.runtime.evaluator import EvalConfig
from rlgen.runtime.flow_update import LearnerConfig
from rlgen.utils import derive_seed


@dataclass
class PairBuildConfig:
    """Used only when ``pairs.path`` does not exist: build it from the policy (python -m rlgen.pairs)."""
    rewards: dict[str, float] = field(default_factory=dict)  # empty = never build
    prompts: str = ""               # file, or SOURCE:N (shapes:256, arith:512)
    samples_per_prompt: int = 8
    strategy: str = "best_worst"    # best_worst | ranked
    margin: float = 0.0
    num_steps: int = 20             # images: sampling steps
    cfg: float = 1.0                # images: guidance
    noise_level: float = 0.0        # images: 0 = ODE
    temperature: float = 1.0        # text: sampling temperature
    seed: int = 0


@dataclass
class PairsConfig:
    path: str = ""                  # pairs.jsonl / .parquet, or a folder holding pairs.jsonl
    on_error: str = "strict"        # strict: stop at the first malformed row | skip: drop and count
    build: PairBuildConfig = field(default_factory=PairBuildConfig)


@dataclass
class PreferencePolicyConfig:
    checkpoint: str = "rlgen/assets/flow_shapes_base"  # starting policy and reference (run or model folder)


@dataclass
class PreferenceTrainConfig:
    steps: int = 200                # optimizer updates
    pairs_per_step: int = 16        # pairs per update (a multiple of learner.micro_batch_size)
    engine: str = "deepspeed"       # deepspeed (in-process, one rank) | torch (AdamW TorchEngine)
    save_every: int = 50
    keep_checkpoints: int = 3       # newest numbered checkpoints kept (checkpoints/0 always kept)
    max_minutes: float = 0.0        # 0 = no wall budget; else stop (eval, save) after this long
    log_every: int = 1


@dataclass
class TextEvalConfig:
    benchmark: str = "arith"        # a text task benchmark (arith | countdown | sudoku) | "" = none
    every: int = 50
    n_per_level: int = 64           # held-out problems per level (the benchmark's fixed set)
    set_seed: int = 0
    steps: int = 0                  # decoding steps (0 = one token per step)
    batch_size: int = 256


@register_config("diffusion_dpo")
@dataclass
class DiffusionDPOJobConfig:
    kind: str = "diffusion_dpo"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="diffusion_dpo"))
    policy: PreferencePolicyConfig = field(default_factory=PreferencePolicyConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    algo: DiffusionDPOConfig = field(default_factory=DiffusionDPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    modality = "image"


@register_config("vrpo")
@dataclass
class VRPOJobConfig:
    kind: str = "vrpo"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="vrpo"))
    policy: PreferencePolicyConfig = field(default_factory=lambda: PreferencePolicyConfig("rlgen/assets/mdm_arith_base"))
    pairs: PairsConfig = field(default_factory=PairsConfig)
    algo: VRPOConfig = field(default_factory=VRPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    eval: TextEvalConfig = field(default_factory=TextEvalConfig)
    modality = "text"


class MicroBatchOrder:
    """Endless micro-batches: epoch e shuffles each bucket with seed (seed, e), cuts it into
    micro-batches (dropping each bucket's remainder) and shuffles the micro-batches."""

    def __init__(self, bucket_ids: list[int], micro: int, seed: int):
        self.buckets: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_ids):
            self.buckets.setdefault(b, []).append(i)
        self.micro, self.seed, self._cache = micro, seed, {}
        if not any(len(v) >= micro for v in self.buckets.values()):
            raise ValueError(f"no group of same-shape pairs holds learner.micro_batch_size={micro} pairs "
                             f"(groups: {sorted(len(v) for v in self.buckets.values())})")

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e, 11])
            mbs = []
            for _, idx in sorted(self.buckets.items()):
                perm = [idx[i] for i in rng.permutation(len(idx))]
                mbs += [perm[s:s + self.micro] for s in range(0, len(perm) - self.micro + 1, self.micro)]
            self._cache = {e: [mbs[i] for i in rng.permutation(len(mbs))]}
        return self._cache[e]

    def take(self, start: int, count: int) -> tuple[list[list[int]], int]:
        """Micro-batches [start, start + count) of the endless stream, and the epoch of the last."""
        per_epoch = len(self.epoch(0))
        out = [self.epoch(k // per_epoch)[k % per_epoch] for k in range(start, start + count)]
        return out, (start + count - 1) // per_epoch


class PreferenceTrainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir: Path = cfg.run.dir

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def _pairs_path(self) -> Path:
        c = self.cfg.pairs
        if not c.path:
            raise ValueError("pairs.path is empty: give a pairs file (python -m rlgen.pairs build …)")
        p = Path(c.path)
        if p.exists():
            return p
        if not c.build.rewards:
            raise FileNotFoundError(f"pairs file {p} not found (set pairs.build.rewards to build it here)")
        import argparse

        from rlgen.pairs import build

        b = c.build
        out = p.parent if p.suffix else p
        print(f"[rlgen] pairs {p} not found: building them from {self.cfg.policy.checkpoint}")
        build(argparse.Namespace(
            checkpoint=self.cfg.policy.checkpoint, reward=[f"{k}={v}" for k, v in b.rewards.items()],
            prompts=b.prompts, samples_per_prompt=b.samples_per_prompt, out=str(out), strategy=b.strategy,
            margin=b.margin, seed=b.seed, num_steps=b.num_steps, cfg=b.cfg, noise_level=b.noise_level,
            temperature=b.temperature, batch_size=64, sheet_pairs=16, device=self.cfg.run.device,
            threads=self.cfg.run.num_threads, progress=self.cfg.run.progress))
        return p

    def _load_model(self, path):
        from rlgen.models import load_model
        from rlgen.utils import resolve_device

        return load_model(path, device=str(resolve_device(self.cfg.run.device)))

    def _setup(self, start_from: Path | None) -> None:
        from rlgen.data.pairs import load_pairs
        from rlgen.runtime.preference_update import MODALITIES, make_engine, prepare_policy, reference_context
        from rlgen.runtime.rundir import resolve_checkpoint

        c = self.cfg
        if c.learner.num_learners != 1:
            raise ValueError("preference jobs train in one in-process rank: learner.num_learners must be 1")
        if c.learner.zero_stage == 3:
            raise ValueError("learner.zero_stage=3 partitions nothing on one rank; use 0-2 for preference jobs")
        mb = c.learner.micro_batch_size
        if c.train.pairs_per_step % mb:
            raise ValueError(f"train.pairs_per_step={c.train.pairs_per_step} is not a multiple of "
                             f"learner.micro_batch_size={mb}")
        self.gas = c.train.pairs_per_step // mb
        self.base = resolve_checkpoint(c.policy.checkpoint)
        base = self._load_model(self.base)
        image = getattr(base, "sample_shape", None)
        pairs = load_pairs(self._pairs_path(), c.modality, c.pairs.on_error,
                           image_size=image[-1] if image else None)
        print(f"[rlgen] {pairs.summary()}")
        for e in pairs.errors[:5]:
            print(f"[rlgen]   skipped: {e}")
        self.pairs_info = {"pairs": len(pairs), "pairs_skipped": sum(pairs.skipped.values())}
        # The reference is always the base; a resumed policy starts from its checkpoint.
        self.policy = prepare_policy(base, c.learner, c.modality)
        self.reference = reference_context(self.policy, c.learner)
        if start_from is not None:
            self._load_weights(start_from)
        self.data = MODALITIES[c.modality].load(pairs, self.policy, c.algo)
        self.order = MicroBatchOrder(self.data.bucket_ids(), mb, c.run.seed)
        self.engine, self.strategy = make_engine(self.data.wrap(self.policy), c.learner, self.gas, c.train.engine)

    def _load_weights(self, ckpt: Path) -> None:
        src = self._load_model(ckpt)
        if self.cfg.learner.lora_rank > 0:  # the checkpoint holds merged weights: keep the adapter's own
            raise ValueError("resuming a LoRA preference run is not supported (checkpoints hold merged weights)")
        self.policy.load_state_dict(src.state_dict())

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def _step(self, step: int) -> dict:
        c = self.cfg
        gen = torch.Generator().manual_seed(derive_seed(c.run.seed, step))
        mbs, epoch = self.order.take((step - 1) * self.gas, self.gas)
        t0 = time.time()
        self.policy.train()
        sums: dict[str, float] = {}
        for idx in mbs:
            loss, metrics = self.data.micro_loss(self.engine, self.policy, self.reference, idx, gen)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / len(mbs)
        norm = self.engine.get_global_grad_norm()
        return {**sums, "grad_norm": float("nan") if norm is None else float(norm), "epoch": epoch,
                "lr": c.learner.lr, "time_learn": time.time() - t0}

    # ------------------------------------------------------------------------------------------
    # evaluation and checkpoints
    # ------------------------------------------------------------------------------------------
    def _evaluate(self, step: int) -> dict:
        e = self.cfg.eval
        if not e.benchmark:
            return {}
        self.policy.eval()
        res = self._evaluate_images(step) if self.cfg.modality == "image" else self._evaluate_text(step)
        out = {"eval/accuracy": res["accuracy"], **{f"eval/{t}": v for t, v in res["per_task"].items()}}
        for key in ("mean_score", "hard_accuracy"):
            if res.get(key) is not None:
                out[f"eval/{key}"] = res[key]
        self.eval_history.append({"step": step, **out})
        return out

    def _evaluate_images(self, step: int) -> dict:
        from rlgen.runtime.evaluator import ImageEvaluator
        from rlgen.viz import save_image_grid

        e = self.cfg.eval
        ev = ImageEvaluator(e)
        with torch.no_grad():  # as RolloutWorker.generate_eval: deterministic ODE samples from e.seed
            images = self.policy.generate(ev.prompts, num_steps=e.num_steps, cfg_scale=e.cfg_scale, noise_level=0.0,
                                          generator=torch.Generator().manual_seed(e.seed)).float().cpu()
        idx = list(range(0, len(images), e.samples_per_prompt))[:64]
        save_image_grid(images[idx], self.run_dir / "samples" / f"eval_{step:05d}.png", nrow=8,
                        captions=[ev.prompts[i] for i in idx])
        return ev.score(images)

    def _evaluate_text(self, step: int) -> dict:
        from rlgen.eval.text import benchmark_problems, score_problems

        e = self.cfg.eval
        problems = benchmark_problems(e.benchmark, None, {"n_per_level": e.n_per_level, "set_seed": e.set_seed})
        with torch.no_grad():
            res = score_problems(self.policy, problems, {"steps": e.steps or None}, e.batch_size)
        lines = [f"{x['prompt']} -> {x['completion']!r} reward {x['reward']}" for x in res["examples"]]
        (self.run_dir / "samples" / f"eval_{step:05d}.txt").write_text("\n".join(lines) + "\n")
        return res

    def _save(self, step: int) -> None:
        from rlgen.runtime.flow_update import merge_lora
        from rlgen.runtime.rundir import atomic_checkpoint, prune_checkpoints

        with atomic_checkpoint(self.run_dir, step) as d:
            policy = self.policy
            if self.cfg.learner.lora_rank > 0:  # a plain loadable model: the adapter merged into a copy
                import copy

                policy = merge_lora(copy.deepcopy(policy))
            policy.save_pretrained(d)
            if self.strategy is not None:
                self.strategy.save(self.engine, d, {"step": step})
            else:
                torch.save(self.engine.optimizer.state_dict(), d / "optimizer.pt")
            (d / "driver_state.json").write_text(json.dumps(
                {"step": step, "eval_history": self.eval_history, "seed": self.cfg.run.seed, **self.pairs_info}))
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)

    def _resume_source(self) -> Path | None:
        from rlgen.runtime.rundir import find_latest_checkpoint, resolve_checkpoint

        mode = self.cfg.run.resume
        if mode == "no":
            return None
        return find_latest_checkpoint(self.run_dir) if mode == "auto" else resolve_checkpoint(mode)

    def _resume(self, ckpt: Path | None) -> int:
        if ckpt is None:
            return 0
        state = json.loads((ckpt / "driver_state.json").read_text())
        if self.strategy is not None:
            self.strategy.load(self.engine, ckpt)
        else:
            self.engine.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.eval_history = state.get("eval_history", [])
        print(f"[rlgen] resumed from {ckpt} (step {state['step']})")
        return int(state["step"])

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from rlgen.runtime.report import write_report
        from rlgen.runtime.rundir import MetricsLogger, prepare_run_dir
        from rlgen.utils import seed_everything, set_threads

        c = self.cfg
        set_threads(c.run.num_threads)
        seed_everything(c.run.seed)
        prepare_run_dir(c)
        self.eval_history: list[dict] = []
        ckpt = self._resume_source()
        self._setup(ckpt)
        start = self._resume(ckpt)
        log = MetricsLogger(self.run_dir, c.run.tensorboard, resume_step=start if start > 0 else None)
        if start == 0:
            log.log(0, **self._evaluate(0), **self.pairs_info)
            self._save(0)
        t0, step = time.time(), start
        bar = tqdm(range(start + 1, c.train.steps + 1), desc=c.kind, disable=not c.run.progress, initial=start,
                   total=c.train.steps)
        for step in bar:
            row = self._step(step)
            last = step == c.train.steps or bool(c.train.max_minutes and time.time() - t0 > 60 * c.train.max_minutes)
            if (c.eval.every and step % c.eval.every == 0) or last:
                row.update(self._evaluate(step))
            if step % c.train.log_every == 0 or last or "eval/accuracy" in row:
                log.log(step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['implicit_acc']:.2f}")
            if step % c.train.save_every == 0 or last:
                self._save(step)
            if last:
                break
        log.close()
        report = write_report(self.run_dir, self.eval_history, title=f"{c.kind}: {c.run.name}")
        _append_preference_curves(report, self.run_dir)
        return {"steps": step, "eval_history": self.eval_history, "report": str(report), **self.pairs_info}


def _append_preference_curves(report: Path, run_dir: Path) -> None:
    """report.md's shared sections plot RL curves; add the preference ones (loss, implicit accuracy)."""
    from rlgen.runtime.rundir import read_metrics
    from rlgen.viz import plot_curves

    rows = [r for r in read_metrics(run_dir) if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return
    lines = ["", "## Preference training", ""]
    for key, label in (("loss", "DPO loss"), ("implicit_acc", "implicit accuracy (pairs ranked right)"),
                       ("reward_margin", "implicit reward margin")):
        xs = [r["step"] for r in rows if isinstance(r.get(key), (int, float))]
        ys = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if xs:
            plot_curves({label: (xs, ys)}, run_dir / "report" / f"{key}.png", title=label, xlabel="step")
            lines.append(f"![{label}](report/{key}.png)")
    with open(report, "a") as f:
        f.write("\n".join(lines) + "\n")
