"""The driver: one loop for every job, algorithm and model family.

    online  (algo.data = rollouts): prompts → rollouts (rollout group) → rewards (reward group) →
            advantages → learner update (DeepSpeed group) → weight sync → eval → checkpoint
    offline (algo.data = pairs):    pairs → learner update → eval → checkpoint

Set-up runs every check that can reject the job (config ranges, the base checkpoint and its model
family, prompt/pair/eval files, a resume into another job's folder) before the run folder is
touched. Every step appends one row to metrics.jsonl; checkpoints hold the policy (loadable on its
own), DeepSpeed's optimizer state and ``driver_state.json``. ``run.resume=auto`` continues from the
newest complete checkpoint; prompts, sampling seeds and every random draw of an update are functions
of (seed, step), so a resumed run repeats the uninterrupted one bit for bit.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from rlgen.runtime.job import JobConfig
from rlgen.runtime.learner import LearnerDied
from rlgen.runtime.rundir import (MetricsLogger, atomic_checkpoint, find_latest_checkpoint, prepare_run_dir,
                                  prune_checkpoints)
from rlgen.runtime.workers import eval_row


class JobFailed(RuntimeError):
    """The job cannot go on (a learner rank died): one line naming what failed and the newest
    complete checkpoint, which ``run.resume=auto`` continues from."""


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s update draws (the same on every learner rank)."""
    return seed * 1_000_003 + step - 1


class Trainer:
    def __init__(self, cfg: JobConfig):
        from rlgen.algos.base import get_algorithm

        self.cfg = cfg
        self.run_dir: Path = cfg.run.dir
        self.algo = get_algorithm(cfg.algo.name)(cfg.algo)
        self.online = self.algo.data == "rollouts"
        self.started_ray, self.learners, self.workers = False, None, None
        self.store, self.ship = None, False  # a URI run.root's RunStore; learners send checkpoint files
        self._inflight, self.eval_history, self.synced = None, [], 0

    # ------------------------------------------------------------------------------------------
    # set-up: every check first, then the actors, then the run folder
    # ------------------------------------------------------------------------------------------
    def _check(self) -> tuple[Path, Path | None]:
        """Every check that can refuse the job; an input error is a ConfigError (one line, exit 2)."""
        from rlgen.config import ConfigError
        from rlgen.data.pairs import PairFormatError
        from rlgen.models import ModelLoadError
        from rlgen.registry import RegistryError
        from rlgen.runtime.rundir import CheckpointError

        try:
            return self._check_inputs()
        except (ValueError, FileNotFoundError, PairFormatError, ModelLoadError, CheckpointError, RegistryError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from e

    def _check_inputs(self) -> tuple[Path, Path | None]:
        from rlgen.evaluate import check_options
        from rlgen.families import get_family
        from rlgen.runtime.setup import (base_checkpoint, check_eval_files, check_resume, check_teacher,
                                         policy_family, precision_note)

        from rlgen.runtime.storage import open_store

        c = self.cfg
        self.algo.check_job(c)
        self.store = open_store(c.run)  # a URI fsspec cannot open is refused here
        if note := precision_note(c):
            print(f"[rlgen] {note}")
        base = base_checkpoint(c.policy, c)
        family = policy_family(base, self.algo)
        check_teacher(self.algo, base)
        self.modality = get_family(family).modality
        if self.online:
            from rlgen.runtime.sources import PromptSource

            self.prompt_source = PromptSource(c.prompts, c.run.seed, self.modality)
            if c.prompts.source == "file" and {"shapes_verifier", "shapes_pass"} & set(c.rewards):
                from rlgen.eval.shapes import read_prompt_file

                read_prompt_file(c.prompts.file)  # the verifier's grammar: a bad line now, not after rollouts
        else:
            from rlgen.runtime.setup import load_pair_set

            self.pair_set = load_pair_set(c, base, self.modality)
        if c.eval.benchmark:
            check_options(c.eval.benchmark, c.eval.options)
            check_eval_files(c.eval)
        if self.store is not None and c.run.resume == "auto":
            self.store.pull()  # the staging folder ← the URI's files and newest complete checkpoint
        return base, check_resume(c, family)

    def _start(self, base: Path) -> None:
        from rlgen.runtime.cluster import check_feasible, init_ray, node_ids
        from rlgen.runtime.learner import LearnerGroup, LearnerSpec
        from rlgen.runtime.workers import Workers

        c, r, n = self.cfg, self.cfg.resources, self.cfg.learner.num_learners
        reward_workers = r.reward_workers if self.online else 0
        self.started_ray = init_ray(c.ray, r.rollout_workers * r.rollout_cpus + reward_workers * r.reward_cpus
                                    + n * r.learner_cpus)
        # Ray queues an impossible request forever; refuse it with the numbers instead (an input
        # error like any other: one line, exit 2, the run folder not yet touched).
        try:
            check_feasible([{"CPU": r.rollout_cpus, "GPU": r.rollout_gpus, **r.rollout_resources}] * r.rollout_workers
                           + [{"CPU": r.reward_cpus, "GPU": r.reward_gpus, **r.reward_resources}] * reward_workers
                           + [{"CPU": r.learner_cpus, "GPU": r.learner_gpus, **r.learner_resources}] * n,
                           "resources: rollout, reward and learner actors")
        except RuntimeError as e:
            from rlgen.config import ConfigError

            raise ConfigError(str(e)) from None
        self.workers = Workers(c, str(base), self.modality, self.online)
        spec = LearnerSpec(str(base), c.policy.load_options(), c.policy.lora, c.algo, c.optim, c.learner.zero_stage,
                           c.learner.zero3_persistence_threshold, c.learner.micro_batch_size,
                           c.policy.dtype == "bfloat16", c.policy.gradient_checkpointing, c.run.seed,
                           r.learner_threads or max(1, int(r.learner_cpus)), ema=c.train.ema)
        self.learners = LearnerGroup(spec, n, num_cpus=r.learner_cpus, num_gpus=r.learner_gpus,
                                     strategy=c.learner.placement_strategy, resources=dict(r.learner_resources))
        self.workers.start_sync(self.learners)
        self.placement = {"driver": ray.get_runtime_context().get_node_id(), **self.workers.placement(),
                          "learner": node_ids(self.learners.group.actors)}
        # learners on another node than the driver send their checkpoint files through Ray
        ship = os.environ.get("RLGEN_SHIP_CHECKPOINTS", "auto")
        self.ship = ship == "1" or (ship == "auto" and set(self.placement["learner"]) != {self.placement["driver"]})

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def _online_step(self, step: int, final: int) -> dict:
        """With ``train.async_rollouts`` the rollouts of ``step`` were launched during step − 1 (with
        the weights from before its update) and those of step + 1 are launched here, before the
        learners train on ``step``."""
        c, w = self.cfg, self.workers
        t_start = time.time()
        faults_before, w.faults_this_step = w.fault_count, 0
        launch, self._inflight = self._inflight or w.launch(step, self.prompt_source.sample(step)), None
        batch, t_roll, t_reward = w.collect(launch)
        t0 = time.time()
        w.finish_sync()  # async: the loads queued behind these rollouts have run by now
        t_sync = time.time() - t0
        if c.train.async_rollouts and step < final:
            self._inflight = w.launch(step + 1, self.prompt_source.sample(step + 1))  # overlaps the update
        staleness = self.learners.version - batch.weights_version  # updates since the behaviour policy
        rewards = batch.rewards
        self._save_train_samples(step, batch)
        batch = self.algo.advantages(batch)
        batch.seed = step_seed(c.run.seed, step)
        batch.global_size = batch.global_size or len(batch)
        t0 = time.time()
        learn = self.learners.train(batch.for_learner() if hasattr(batch, "for_learner") else batch)
        t_learn = time.time() - t0
        t0 = time.time()
        version = w.sync_weights(self.learners, wait=not c.train.async_rollouts)
        self.synced = version
        t_sync += time.time() - t0
        t_iter = time.time() - t_start
        valid = rewards[~torch.isnan(rewards)]
        return {"reward_mean": valid.mean().item() if len(valid) else float("nan"),
                "reward_std": valid.std().item() if len(valid) > 1 else 0.0,
                "reward_none": int(torch.isnan(rewards).sum()),
                **{f"reward/{k}": v[~torch.isnan(v)].mean().item() for k, v in batch.reward_components.items()},
                **learn, "frac_zero_adv": (batch.advantages == 0).float().mean().item(),
                "kept_frac": batch.global_size / max(len(batch), 1),
                "weights_version": version, "rollout_weights_version": batch.weights_version,
                "rollout_staleness": staleness, "worker_faults": w.fault_count - faults_before,
                "time_rollout": t_roll, "time_reward": t_reward, "time_learn": t_learn, "time_sync": t_sync,
                "time_iter": t_iter, "time_overhead": max(0.0, t_iter - t_roll - t_reward - t_learn - t_sync)}

    def _offline_step(self, step: int, final: int) -> dict:
        t0 = time.time()
        batch = self.pair_source.batch(step, step_seed(self.cfg.run.seed, step))
        learn = self.learners.train(batch)
        return {**learn, "epoch": self.pair_source.epoch, "lr": self.cfg.optim.lr, "time_learn": time.time() - t0}

    def _save_train_samples(self, step: int, batch) -> None:
        every = self.cfg.train.grid_every
        if not every or step % every:
            return
        from rlgen.viz import save_image_grid

        g = self.cfg.prompts.group_size
        if self.modality == "image":
            save_image_grid(batch.images[:64], self.run_dir / "samples" / f"train_{step:05d}.png", nrow=g,
                            captions=batch.prompts[:64], caption_every=g)
        else:
            lines = [f"{r:.3f}\t{p!r} -> {t!r}" for p, t, r in
                     zip(batch.prompts[:64], batch.completions[:64], batch.rewards[:64].tolist())]
            (self.run_dir / "samples" / f"train_{step:05d}.txt").write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------------
    # evaluation and checkpoints
    # ------------------------------------------------------------------------------------------
    def _eval_request(self, **change) -> dict:
        e = self.cfg.eval
        req = {"seed": e.seed, "samples_per_prompt": e.samples_per_prompt or None, "batch_size": e.batch_size,
               "options": dict(e.options), "return_samples": True,
               "prompts": Path(e.prompts) if e.prompts else None, "problems": Path(e.problems) if e.problems else None}
        req.update(change)
        return req

    def _evaluate(self, step: int, final: bool) -> dict:
        c, e = self.cfg, self.cfg.eval
        if not e.benchmark:
            return {}
        if not self.online and self.synced != self.learners.version:  # offline: worker 0 evaluates the learners' weights
            self.synced = self.workers.sync_weights(self.learners)
        # train.ema: worker 0 evaluates the learners' EMA, swapped in for these calls only
        ema = ray.put(self.learners.get_ema_weights()) if c.train.ema.enabled else None
        res = self.workers.evaluate(e.benchmark, self._eval_request(), ema)
        row = eval_row(res)
        if e.pass_k > 1 and (step == 0 or final):
            s = self.workers.evaluate(e.benchmark, self._eval_request(
                samples_per_prompt=e.pass_k, options={**e.options, "temperature": 1.0}, return_samples=False), ema)
            row.update({"eval/sampled_accuracy": s["accuracy"], f"eval/pass_at_{e.pass_k}": s[f"pass_at_{e.pass_k}"]})
        teacher = self.algo.teacher()
        if step == 0 and teacher is not None and teacher.eval_options is not None:
            t = self.workers.call_first("evaluate", e.benchmark, self._eval_request(
                options={**e.options, **teacher.eval_options}, return_samples=False), teacher.path)
            row["eval/teacher_accuracy"] = t["accuracy"]
            if t.get("hard_accuracy") is not None:
                row["eval/teacher_hard_accuracy"] = t["hard_accuracy"]
        self._write_eval_samples(step, res, row)
        self.eval_history.append({"step": step, **row})
        return row

    def _write_eval_samples(self, step: int, res: dict, row: dict) -> None:
        out = self.run_dir / "samples" / f"eval_{step:05d}"
        if "samples" in res:
            from rlgen.viz import save_image_grid

            s = res["samples"]
            save_image_grid(torch.from_numpy(np.array(s["images"])), out.with_suffix(".png"), nrow=s["nrow"],
                            captions=s["captions"])
        elif "examples" in res:
            lines = [f"step {step}: " + json.dumps({k: round(v, 4) for k, v in row.items()})]
            lines += [f"{'OK ' if x['reward'] == 1 else 'BAD'} {x['prompt']}{x['completion']}" for x in res["examples"]]
            out.with_suffix(".txt").write_text("\n".join(lines) + "\n")

    def _save(self, step: int) -> None:
        from rlgen.config import save_config

        with atomic_checkpoint(self.run_dir, step) as d:
            self.learners.save(str(d), ship=self.ship)
            save_config(self.cfg, d / "config.yaml")
            (d / "driver_state.json").write_text(json.dumps(
                {"step": step, "eval_history": self.eval_history, "seed": self.cfg.run.seed,
                 "algo": self.cfg.algo.name, "family": self.algo.family}))
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        if self.store is not None:  # the checkpoint, then `latest`, then what else changed
            self.store.push_checkpoint(step, self.cfg.train.keep_checkpoints)
            self.store.push_files()

    def _resume(self, ckpt: Path | None) -> int:
        if ckpt is None:
            return 0
        state = json.loads((ckpt / "driver_state.json").read_text())
        self.learners.load(str(ckpt), ship=self.ship)
        self.synced = self.workers.sync_weights(self.learners)
        self.eval_history = state.get("eval_history", [])
        print(f"[rlgen] resumed from {ckpt} (step {state['step']})")
        return int(state["step"])

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from rlgen.utils import seed_everything, set_threads

        c = self.cfg
        set_threads(c.run.num_threads)
        seed_everything(c.run.seed)
        base, resume = self._check()  # everything that can reject the job, before the folder is touched
        try:
            self._start(base)
            if not self.online:
                from rlgen.runtime.sources import PairSource

                self.pair_source = PairSource(self.workers.call_first("prepare_pairs", self.pair_set), c.pairs,
                                              c.run.seed)
            if self.store is not None and c.run.resume == "no":
                self.store.start_fresh()
            prepare_run_dir(c)
            (self.run_dir / "placement.json").write_text(json.dumps(self.placement, indent=1))
            start = self._resume(resume)
            return self._loop(start)
        except LearnerDied as e:
            last = find_latest_checkpoint(self.run_dir)
            last = self.store.describe(last) if self.store is not None else last
            raise JobFailed(f"{e}; newest complete checkpoint: {last or 'none'}"
                            f"{' (run.resume=auto continues from it)' if last else ''}") from None
        finally:
            self.shutdown()

    def _loop(self, start: int) -> dict:
        from rlgen.runtime.report import write_report

        c, t = self.cfg, self.cfg.train
        from rlgen.config import to_dict

        log = MetricsLogger(self.run_dir, c.run.tensorboard, resume_step=start if start > 0 else None,
                            wandb=c.run.wandb_settings(to_dict(c)))
        if start == 0:
            log.log(0, **self._evaluate(0, False))
            self._save(0)
        t0, step = time.time(), start
        bar = tqdm(range(start + 1, t.steps + 1), desc=c.algo.name, disable=not c.run.progress, initial=start,
                   total=t.steps)
        step_fn = self._online_step if self.online else self._offline_step
        for step in bar:
            row = step_fn(step, t.steps)
            last = step == t.steps or bool(t.max_minutes and time.time() - t0 > 60 * t.max_minutes)
            if (c.eval.every and step % c.eval.every == 0) or last:
                row.update(self._evaluate(step, last))
            if self.online or step % max(t.log_every, 1) == 0 or last or "eval/accuracy" in row:
                log.log(step, **row)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("reward_mean", "loss", "eval/accuracy") if k in row})
            if (t.save_every and step % t.save_every == 0) or last:
                self._save(step)
            if last:
                break
        log.close()
        report = write_report(self.run_dir, self.eval_history, title=f"{c.algo.name}: {c.run.name}")
        if self.store is not None:
            self.store.push_files()
            report = self.store.describe(report)
        return {"steps": step, "eval_history": self.eval_history, "report": str(report),
                "run_dir": self.store.uri if self.store is not None else str(self.run_dir)}

    def shutdown(self) -> None:
        for part in (self.learners, self.workers):
            if part is not None:
                try:
                    part.shutdown()
                except Exception:  # noqa: BLE001 — a dead cluster must not hide the job's own error
                    pass
        self.learners = self.workers = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
