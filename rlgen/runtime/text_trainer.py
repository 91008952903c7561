"""Masked-diffusion GRPO job (``kind: mdm_grpo``): verifier-rewarded RL of a text masked-diffusion LM.

    python train_rl.py --config configs/rl/mdm_grpo_arith.yaml [key=value ...]

One iteration: draw ``problems.per_iteration`` training problems (a pure function of seed and
iteration, so a resumed run draws the same ones) → G rollouts each (rollouts/text.py) → verifier
rewards → group advantages, keeping only groups with mixed rewards → ``algo.inner_iterations``
gradient steps of rlgen.algos.mdm_grpo's loss, each on a fresh log-prob plan shared by policy,
old policy and reference. Held-out accuracy with the benchmark's own scoring (rlgen.eval.text),
at the start, every ``eval.every`` iterations and at the end.

Everything runs in the driver process, one after the other: for a sub-million-parameter model a
rollout batch takes milliseconds, less than shipping weights to a Ray actor would. The run folder
follows DESIGN.md (config.yaml, metrics.jsonl, checkpoints/0 = starting policy, report.md).
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlgen.algos.advantages import group_advantages
from rlgen.algos.mdm_grpo import MDMGRPOConfig, make_plan, mixed_groups, plan_logprobs, policy_loss
from rlgen.config import RunConfig, load_config, register_config, save_config
from rlgen.runtime.cluster import RayConfig
from rlgen.runtime.rundir import (MetricsLogger, atomic_checkpoint, find_latest_checkpoint, prepare_run_dir,
                                  prune_checkpoints, read_metrics, resolve_checkpoint)
from rollouts.text import TextRolloutConfig, text_rollout


@dataclass
class TextPolicyConfig:
    checkpoint: str = "rlgen/assets/mdm_arith_base"  # run folder or checkpoint folder
    # When ``checkpoint`` does not exist, pretrain it first with this config and use that run.
    pretrain_config: str = "configs/pretrain/mdm_arith.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)


@dataclass
class TextProblemsConfig:
    task: str = "arith"
    levels: list[str] = field(default_factory=list)  # [] = the task's default levels
    per_iteration: int = 16         # distinct problems per iteration
    group_size: int = 8             # samples per problem (G)


@dataclass
class TextOptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TextLoopConfig:
    iterations: int = 1000
    max_minutes: float = 0.0        # 0 = no wall budget; else stop (and save) after this many minutes
    save_every: int = 200
    keep_checkpoints: int = 3       # newest numbered checkpoints kept (checkpoints/0 always kept)


@dataclass
class TextEvalConfig:
    every: int = 100                # iterations between held-out evaluations (and at start and end)
    n_per_level: int = 200          # held-out problems per level (the benchmark's default set)
    pass_k: int = 8                 # at start and end also sample k per problem at temperature 1 (0 = off)
    seed: int = 1234


@register_config("mdm_grpo")
@dataclass
class MDMGRPOJobConfig:
    kind: str = "mdm_grpo"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="mdm_grpo", num_threads=1))
    ray: RayConfig = field(default_factory=RayConfig)  # used only when rollout.workers > 0
    policy: TextPolicyConfig = field(default_factory=TextPolicyConfig)
    problems: TextProblemsConfig = field(default_factory=TextProblemsConfig)
    rollout: TextRolloutConfig = field(default_factory=TextRolloutConfig)
    rewards: dict[str, float] = field(default_factory=dict)  # {} = {<task>_verifier: 1.0}
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    algo: MDMGRPOConfig = field(default_factory=MDMGRPOConfig)
    optim: TextOptimConfig = field(default_factory=TextOptimConfig)
    train: TextLoopConfig = field(default_factory=TextLoopConfig)
    eval: TextEvalConfig = field(default_factory=TextEvalConfig)


def load_policy(cfg: TextPolicyConfig, device):
    from rlgen.models import load_model

    p = Path(cfg.checkpoint)
    if not p.exists() and cfg.pretrain_config:
        from rlgen.pretrain.masked_diffusion import train as pretrain

        print(f"[rlgen] base model {p} not found: pretraining it with {cfg.pretrain_config}")
        p = pretrain(load_config(cfg.pretrain_config, list(cfg.pretrain_overrides)))
    return load_model(resolve_checkpoint(p), device=str(device))


class TextGRPOTrainer:
    JOB_TITLE = "masked-diffusion GRPO"

    def __init__(self, cfg: MDMGRPOJobConfig):
        from rewards.base import RewardMixer
        from rlgen.data.text_tasks import get_task
        from rlgen.utils import resolve_device, seed_everything, set_threads

        self.cfg = cfg
        set_threads(cfg.run.num_threads)
        seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg.run.device)
        self.task = get_task(cfg.problems.task)
        self.levels = list(cfg.problems.levels or self.task.levels)
        self.run_dir = prepare_run_dir(cfg)
        base = load_policy(cfg.policy, self.device)
        self.ref = copy.deepcopy(base).eval().requires_grad_(False) if getattr(cfg.algo, 'kl_beta', 0) > 0 else None
        resume = self._resume_source()
        self.policy = base if resume is None else load_policy(TextPolicyConfig(str(resume), ""), self.device)
        self.policy.eval()  # no dropout: old/new log-probs of one plan must agree before the update
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.start = 0
        if resume is not None:
            state = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=True)
            self.opt.load_state_dict(state["optimizer"])
            self.start = int(state["iteration"])
        self.rewards = RewardMixer({"rewards": dict(cfg.rewards or {f"{self.task.name}_verifier": 1.0}),
                                    "reward_kwargs": dict(cfg.reward_kwargs)})
        self.banned = (self.policy.mask_id, self.policy.pad_id)
        self.logger = MetricsLogger(self.run_dir, cfg.run.tensorboard,
                                    resume_step=self.start if resume is not None else None)
        self.workers, self.started_ray = [], False

    def _resume_source(self) -> Path | None:
        r = self.cfg.run.resume
        if r == "no":
            return None
        ckpt = find_latest_checkpoint(self.run_dir) if r == "auto" else resolve_checkpoint(r)
        return ckpt if ckpt is not None and (ckpt / "trainer_state.pt").is_file() else None

    # ------------------------------------------------------------------------------------------
    def _problems(self, it: int) -> list[dict]:
        from rlgen.data.text_tasks import generate_problems

        seed = random.Random(f"{self.cfg.run.seed}:{it}").randrange(2**31)
        return generate_problems(self.task.name, self.cfg.problems.per_iteration, seed, self.levels, split="train")

    # ------------------------------------------------------------------------------------------
    # rollouts: in this process, or sharded over TextRolloutWorker actors (rollout.workers > 0)
    # ------------------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        import ray

        from rlgen.runtime.cluster import check_feasible, init_ray
        from rollouts.text_worker import TextRolloutWorker

        r = self.cfg.rollout
        self.started_ray = init_ray(self.cfg.ray, r.workers * r.worker_cpus)
        check_feasible([{"CPU": r.worker_cpus, "GPU": r.worker_gpus}] * r.workers, "text rollout workers")
        actor = ray.remote(num_cpus=r.worker_cpus, num_gpus=r.worker_gpus)(TextRolloutWorker)
        path = str(find_latest_checkpoint(self.run_dir))  # checkpoint 0 or the resumed one: the driver's policy
        self.workers = [actor.remote(path, r, max(1, int(r.worker_cpus)), self.cfg.run.device)
                        for _ in range(r.workers)]
        self.version = self.start
        self._sync_workers()

    def _sync_workers(self) -> None:
        """The driver's weights → every worker (one object-store copy, read zero-copy as numpy)."""
        import ray

        from rlgen.runtime.batches import state_dict_to_numpy

        ref = ray.put(state_dict_to_numpy(dict(self.policy.named_parameters())))
        ray.get([w.load_weights.remote(self.version, ref) for w in self.workers])

    def _rollout(self, problems: list[dict], it: int, gen: torch.Generator) -> list:
        g = self.cfg.problems.group_size
        if not self.workers:
            return text_rollout(self.policy, problems, self.cfg.rollout, g, self._reward, gen)
        import ray

        from rlgen.data.text_tasks import get_task
        from rlgen.utils import derive_seed

        n = len(self.workers)
        shards = [list(range(i, len(problems), n)) for i in range(n)]
        refs = [w.generate.remote([problems[j] for j in idx], g, derive_seed(self.cfg.run.seed, it, i))
                for i, (w, idx) in enumerate(zip(self.workers, shards)) if idx]
        out = []
        for idx, (version, buckets) in zip(shards, ray.get(refs)):
            if version != self.version:
                raise RuntimeError(f"a text rollout worker sampled with weights v{version}, the policy is at "
                                   f"v{self.version}")
            for b in buckets:  # group ids index the shard: map them back to this iteration's problems
                b.group_ids = torch.tensor([idx[k] for k in b.group_ids.tolist()])
                probs = [problems[k] for k in b.group_ids.tolist()]
                prompts = [get_task(p["task"]).format_prompt(p) for p in probs]
                b.rewards = torch.as_tensor(self._reward(b.texts, prompts, probs), dtype=torch.float32)
                out.append(b)
        return out

    def _reward(self, texts, prompts, problems):
        return self.rewards(texts, prompts, problems=problems).total

    def _learn(self, batches, it: int) -> dict:
        """GRPO update on one iteration's rollouts; returns metrics."""
        a = self.cfg.algo
        kept = []
        for b in batches:
            adv = group_advantages(b.rewards, b.group_ids)  # (B,)
            keep = mixed_groups(b.rewards, b.group_ids) if a.skip_uniform_groups else torch.ones(len(b), dtype=torch.bool)
            if keep.any():
                kept.append((b.select(keep), adv[keep].float()))
        n_kept = sum(len(b) for b, _ in kept)
        m = {"kept_frac": n_kept / max(sum(len(b) for b in batches), 1)}
        if not kept:
            return m
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + it)
        dev = self.device
        plans, olds, refs = [], [], []
        with torch.no_grad():  # old policy = the policy before this iteration's first step
            for i in range(a.inner_iterations):
                ps = [make_plan(a, b.tokens, b.order, b.prompt_length, self.policy.mask_id, g) for b, _ in kept]
                ps = [type(p)(p.inputs.to(dev), p.view.to(dev), p.prompt_length) for p in ps]
                plans.append(ps)
                # step 0 runs before any update: its old log-probs are its own, detached (one forward saved)
                olds.append([None if i == 0 else plan_logprobs(self.policy, p, b.tokens.to(dev), self.banned)
                             for p, (b, _) in zip(ps, kept)])
                refs.append([plan_logprobs(self.ref, p, b.tokens.to(dev), self.banned) if self.ref is not None else None
                             for p, (b, _) in zip(ps, kept)])
        sums: dict[str, float] = {}
        for i in range(a.inner_iterations):
            self.opt.zero_grad(set_to_none=True)
            for p, (b, adv), old, ref in zip(plans[i], kept, olds[i], refs[i]):
                lp = plan_logprobs(self.policy, p, b.tokens.to(dev), self.banned)
                old = lp.detach() if old is None else old
                loss, lm = policy_loss(lp, old, adv.to(dev), p.token_mask, a.clip_range, ref, a.kl_beta, a.adv_clip_max)
                w = len(b) / n_kept
                (loss * w).backward()
                for k, v in {"loss": loss.item(), **lm}.items():
                    sums[k] = sums.get(k, 0.0) + v * w / a.inner_iterations
            gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip or 1e9)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gn) / a.inner_iterations
            self.opt.step()
        return {**m, **sums}

    # ------------------------------------------------------------------------------------------
    def evaluate(self, step: int, final: bool = False) -> dict:
        from rlgen.eval.text import benchmark_problems, score_problems

        e = self.cfg.eval
        problems = benchmark_problems(self.task.name, None, {"n_per_level": e.n_per_level})
        res = score_problems(self.policy, problems, {}, batch_size=256)
        row = {"step": step, "eval/accuracy": res["accuracy"], "eval/nfe_per_token": res["nfe_per_token"],
               **{f"eval/{k}": v for k, v in res["per_task"].items()}}
        if res["hard_accuracy"] is not None:
            row["eval/hard_accuracy"] = res["hard_accuracy"]
        if e.pass_k > 1 and (step == 0 or final):
            gen = torch.Generator(device=self.device).manual_seed(e.seed)
            s = score_problems(self.policy, problems, {"temperature": 1.0}, 256, e.pass_k, gen)
            row.update({"eval/sampled_accuracy": s["accuracy"], f"eval/pass_at_{e.pass_k}": s[f"pass_at_{e.pass_k}"]})
        lines = [f"step {step}: " + json.dumps({k: round(v, 4) for k, v in row.items() if k != "step"})]
        lines += [f"{'OK ' if x['reward'] == 1 else 'BAD'} {x['prompt']}{x['completion']}" for x in res["examples"]]
        (self.run_dir / "samples" / f"eval_{step:05d}.txt").write_text("\n".join(lines) + "\n")
        return row

    def save(self, step: int) -> None:
        with atomic_checkpoint(self.run_dir, step) as d:
            self.policy.save_pretrained(d)
            torch.save({"iteration": step, "optimizer": self.opt.state_dict()}, d / "trainer_state.pt")
            save_config(self.cfg, d / "config.yaml")
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.shutdown()  # a local Ray cluster started for rollout workers stops with the job

    def _fit(self) -> dict:
        from rlgen.runtime.report import write_report

        cfg, t = self.cfg, self.cfg.train
        history = [{k: r[k] for k in r if k == "step" or k.startswith("eval/")}
                   for r in read_metrics(self.run_dir) if "eval/accuracy" in r] if self.start else []
        if self.start == 0:
            self.save(0)
            history.append(self.evaluate(0))
            self.logger.log(0, **{k: v for k, v in history[-1].items() if k != "step"})
        if cfg.rollout.workers > 0:
            self._start_workers()
        gen = torch.Generator(device=self.device).manual_seed(cfg.run.seed + 7 * self.start)
        t0, it = time.time(), self.start
        for it in range(self.start + 1, t.iterations + 1):
            ti = time.perf_counter()
            batches = self._rollout(self._problems(it), it, gen)
            tr = time.perf_counter()
            m = self._learn(batches, it)
            ts = time.perf_counter()
            if self.workers:
                self.version = it
                self._sync_workers()
            rewards = torch.cat([b.rewards for b in batches])
            row = {"reward_mean": float(rewards.nanmean()), "reward_std": float(rewards[~rewards.isnan()].std()),
                   **m, "time_rollout": tr - ti, "time_learn": ts - tr, "time_sync": time.perf_counter() - ts,
                   "time_iter": time.perf_counter() - ti}
            out_of_time = t.max_minutes > 0 and (time.time() - t0) / 60 >= t.max_minutes
            last = it == t.iterations or out_of_time
            if it % cfg.eval.every == 0 or last:
                history.append(self.evaluate(it, final=last))
                row.update({k: v for k, v in history[-1].items() if k != "step"})
            self.logger.log(it, **row)
            if it % t.save_every == 0 or last:
                self.save(it)
            if out_of_time:
                break
        self.logger.close()
        self.rewards.close()
        report = write_report(self.run_dir, history, title=f"{cfg.run.name}: {self.JOB_TITLE} on {self.task.name}")
        _report_levels(self.run_dir, history, report)
        return {"run_dir": str(self.run_dir), "iterations": it, "report": str(report),
                "minutes": round((time.time() - t0) / 60, 2), "eval_history": history}


    def shutdown(self) -> None:
        import sys

        if self.started_ray and "ray" in sys.modules:
            import ray

            ray.shutdown()
        self.workers, self.started_ray = [], False


def _report_levels(run_dir: Path, history: list[dict], report: Path) -> None:
    """Append held-out accuracy per level (one PNG) to report.md."""
    from rlgen.viz import plot_curves

    keys = sorted({k for h in history for k in h if k.startswith("eval/") and k != "eval/nfe_per_token"})
    series = {k[5:]: ([h["step"] for h in history if k in h], [h[k] for h in history if k in h]) for k in keys}
    if not any(len(xs) for xs, _ in series.values()):
        return
    plot_curves(series, run_dir / "report" / "eval_levels.png", title="held-out accuracy (greedy unless noted)",
                xlabel="iteration")
    with open(report, "a") as fh:
        fh.write("\n## Held-out accuracy per level\n\n![per level](report/eval_levels.png)\n")
