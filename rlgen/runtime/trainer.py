"""The driver: one loop on the Ray driver, the same for every on-policy image algorithm.

    prompts → rollouts (RolloutWorkers) → rewards (RewardWorkers) → advantages → learner update
    (DeepSpeed LearnerGroup) → weight sync → held-out eval → checkpoint

Every iteration appends one row to metrics.jsonl; checkpoints hold the policy (loadable on its
own), DeepSpeed's optimizer state and ``driver_state.json``. ``run.resume=auto`` continues from the
newest complete checkpoint; prompts and sampling seeds are functions of (seed, iteration), so a
resumed run draws what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from rlgen.algos.advantages import group_advantages
from rlgen.runtime.job import FlowGRPOJobConfig
from rlgen.runtime.rundir import (MetricsLogger, atomic_checkpoint, find_latest_checkpoint, prepare_run_dir,
                                  prune_checkpoints, resolve_checkpoint)
from rlgen.utils import derive_seed


MAX_RETRIES = 3  # re-issues of one lost call before the iteration fails


class _StaleWeights(RuntimeError):
    """A rollout came from weights older than the learner's: its worker was restarted."""


class Trainer:
    def __init__(self, cfg: FlowGRPOJobConfig):
        self.cfg = cfg
        self.run_dir: Path = cfg.run.dir
        self.started_ray = False
        self.weights_version = 0  # what the rollout workers hold once the weights last sent have landed
        self._sync_refs: list = []  # async pipeline: weight loads still queued behind in-flight rollouts
        self._inflight: dict | None = None  # async pipeline: the next iteration's rollouts, already launched
        self.fault_count = self.faults_this_iter = 0

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def _base_checkpoint(self) -> Path:
        """The starting policy; pretrained here first if the configured checkpoint is missing."""
        p = Path(self.cfg.policy.checkpoint)
        if not p.exists():
            from rlgen.config import load_config
            from rlgen.pretrain.flow_matching import train as pretrain

            print(f"[rlgen] base model {p} not found: pretraining it with {self.cfg.policy.pretrain_config}")
            pcfg = load_config(self.cfg.policy.pretrain_config,
                               [f"run.root={p.parent}", f"run.name={p.name}", "run.resume=auto",
                                *self.cfg.policy.pretrain_overrides])
            pretrain(pcfg)
        return resolve_checkpoint(p)

    def _check_prompts_parse(self) -> None:
        """A prompts file scored by the shapes verifier must be in its grammar: say so now, with the
        line, rather than as a reward error after the first rollouts."""
        c = self.cfg
        if c.prompts.source == "file" and any(n in ("shapes_verifier", "shapes_pass") for n in c.rewards):
            from rlgen.eval.shapes import read_prompt_file

            read_prompt_file(c.prompts.file)

    def _start_actors(self, policy_path: Path) -> None:
        from rewards.worker import make_reward_worker
        from rlgen.runtime.cluster import check_feasible, init_ray, node_ids
        from rlgen.runtime.learner import LearnerGroup
        from rlgen.runtime.weight_sync import make_weight_sync
        from rollouts.worker import RolloutWorker

        c, r = self.cfg, self.cfg.resources
        need = r.rollout_workers * r.rollout_cpus + r.reward_workers * r.reward_cpus + \
            c.learner.num_learners * r.learner_cpus
        self.started_ray = init_ray(c.ray, need)
        # Ray queues an impossible request forever; refuse it with the numbers instead.
        check_feasible([{"CPU": r.rollout_cpus, "GPU": r.rollout_gpus, **r.rollout_resources}] * r.rollout_workers
                       + [{"CPU": r.reward_cpus, **r.reward_resources}] * r.reward_workers
                       + [{"CPU": r.learner_cpus, "GPU": r.learner_gpus, **r.learner_resources}]
                       * c.learner.num_learners, "rollout, reward and learner actors")
        threads = r.rollout_threads or max(1, int(r.rollout_cpus))
        actor = ray.remote(num_cpus=r.rollout_cpus, num_gpus=r.rollout_gpus, max_restarts=2,
                           resources=dict(r.rollout_resources) or None)(RolloutWorker)
        lora = dict(lora_rank=c.learner.lora_rank, lora_alpha=c.learner.lora_alpha,
                    lora_targets=list(c.learner.lora_targets))
        self.rollout_workers = [actor.remote(str(policy_path), c.rollout, threads, c.run.device, i, **lora)
                                for i in range(r.rollout_workers)]
        self.reward_workers = [make_reward_worker(c.rewards_config(), num_cpus=r.reward_cpus, max_restarts=2,
                                                  resources=dict(r.reward_resources) or None)
                               for _ in range(r.reward_workers)]
        ro = c.rollout
        sde_steps = ro.sde_window if 0 < ro.sde_window < ro.num_steps else ro.num_steps
        self.learners = LearnerGroup(str(policy_path), c.learner, c.algo,
                                     batch_size=c.prompts.per_iteration * c.prompts.group_size,
                                     num_sde_steps=sde_steps, num_cpus=r.learner_cpus, num_gpus=r.learner_gpus,
                                     num_threads=r.learner_threads, resources=dict(r.learner_resources))
        ray.get([w.get_version.remote() for w in self.rollout_workers])  # fail fast if a worker cannot start
        self.sync = make_weight_sync(c.train.weight_sync, self.learners, self.rollout_workers)
        # which node each actor landed on (placement.json in the run folder)
        self.placement = {"driver": ray.get_runtime_context().get_node_id(), "rollout": node_ids(self.rollout_workers),
                          "reward": node_ids(self.reward_workers), "learner": node_ids(self.learners.group.actors)}

    # ------------------------------------------------------------------------------------------
    # one iteration
    # ------------------------------------------------------------------------------------------
    def _launch_rollouts(self, it: int) -> dict:
        """Shard iteration ``it``'s prompt groups across workers (round-robin) and start sampling.

        Each shard remembers the weights version its worker will hold when it runs: the last one
        sent, since a worker runs calls in submission order and the load was submitted first.
        """
        c = self.cfg
        prompts = self.prompt_source.sample(it)
        g, n_w = c.prompts.group_size, len(self.rollout_workers)
        jobs, pending = {}, {}
        for w_idx in range(n_w):
            idxs = list(range(w_idx, len(prompts), n_w))
            if not idxs:
                continue
            ps = [prompts[i] for i in idxs for _ in range(g)]
            gids = torch.tensor([i for i in idxs for _ in range(g)])
            jobs[w_idx] = [(ps, gids, derive_seed(c.run.seed, it, w_idx)), self.weights_version]
            pending[self.rollout_workers[w_idx].generate.remote(*jobs[w_idx][0])] = w_idx
        return {"it": it, "jobs": jobs, "pending": pending}

    def _collect(self, launch: dict):
        """Gather a launched iteration's shards; score each one as soon as it arrives.

        A shard whose worker died (Ray restarts it: ``max_restarts``) or came back with weights
        other than the ones it was meant to use is re-issued with the same seed after the worker is
        given those weights, so the batch is exactly what an undisturbed worker would have
        produced. The same holds for a reward worker that dies while scoring.
        """
        from rlgen.runtime.batches import ImageRollout

        jobs, pending = launch["jobs"], launch["pending"]
        results, scores, t_roll, t0 = {}, {}, 0.0, time.time()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            w_idx = pending.pop(done[0])
            args, want = jobs[w_idx]
            try:
                ro = ray.get(done[0])
                if ro.weights_version != want:
                    raise _StaleWeights(f"rollout worker {w_idx} sampled with weights v{ro.weights_version}, "
                                        f"its shard was meant for v{want}")
            except (ray.exceptions.RayActorError, _StaleWeights) as e:
                jobs[w_idx][1] = self._recover_rollout_worker(w_idx, e, want)
                pending[self.rollout_workers[w_idx].generate.remote(*args)] = w_idx
                continue
            t_roll = time.time() - t0
            results[w_idx] = ro
            scores[w_idx] = self._score(w_idx, ro)
        t1 = time.time()
        order = sorted(results)
        mixed = [self._get_score(w_idx, scores[w_idx], results[w_idx]) for w_idx in order]
        t_reward = time.time() - t1
        batch = ImageRollout.cat([results[w_idx] for w_idx in order])
        batch.rewards = torch.cat([m.total for m in mixed]).float()
        batch.reward_components = {k: torch.cat([m.components[k] for m in mixed]).float() for k in mixed[0].components}
        return batch, t_roll, t_reward

    # ------------------------------------------------------------------------------------------
    # worker faults: Ray restarts a dead actor (max_restarts); the driver re-issues the lost call
    # ------------------------------------------------------------------------------------------
    def _reward_worker(self, w_idx: int):
        return self.reward_workers[w_idx % len(self.reward_workers)]

    def _score(self, w_idx: int, ro):
        return self._reward_worker(w_idx).score.remote(ro.samples.numpy(), ro.prompts, {})

    def _get_score(self, w_idx: int, ref, ro):
        def recover(err):
            self._note_fault(f"reward worker {w_idx % len(self.reward_workers)} died while scoring "
                             f"({type(err).__name__})")
            self._wait_alive(self._reward_worker(w_idx), "ping")

        return self._get_with_retries(ref, lambda: self._score(w_idx, ro), recover)

    @staticmethod
    def _get_with_retries(ref, reissue, recover):
        """``ray.get(ref)``; when its actor died, ``recover(err)`` and get ``reissue()`` instead, at
        most MAX_RETRIES times."""
        for attempt in range(MAX_RETRIES + 1):
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if attempt == MAX_RETRIES:
                    raise
                recover(err)
                ref = reissue()

    def _recover_rollout_worker(self, w_idx: int, err: Exception, version: int | None = None) -> int:
        """Wait for a restarted worker and give it weights ``version`` (default: the newest sent);
        returns the version it now holds."""
        self.faults_this_iter += 1
        if self.faults_this_iter > MAX_RETRIES * max(1, len(self.rollout_workers)):
            raise RuntimeError(f"rollout workers keep failing ({self.faults_this_iter} faults this iteration); "
                               f"last: {err}") from err
        self._note_fault(f"rollout worker {w_idx}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        worker = self.rollout_workers[w_idx]
        self._wait_alive(worker, "get_version")
        # a restarted worker holds the base weights (version 0)
        return self.sync.restore(worker, self.weights_version if version is None else version)

    def _wait_alive(self, actor, method: str, timeout_s: float = 120.0) -> None:
        """Block until a restarting actor answers (Ray queues calls until the restart finishes)."""
        deadline = time.time() + timeout_s
        while True:
            try:
                ray.get(getattr(actor, method).remote(), timeout=30)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def _note_fault(self, msg: str) -> None:
        self.fault_count += 1
        print(f"[rlgen] worker fault, re-issuing the lost work: {msg}", flush=True)

    def _iteration(self, it: int, final: int) -> dict:
        """One iteration. With ``train.async_rollouts`` the rollouts of ``it`` were launched during
        iteration ``it - 1`` (sampled with the weights from before its update) and those of
        ``it + 1`` are launched here, before the learners train on ``it``."""
        c = self.cfg
        t_start = time.time()
        faults_before, self.faults_this_iter = self.fault_count, 0
        launch, self._inflight = self._inflight or self._launch_rollouts(it), None
        assert launch["it"] == it, (launch["it"], it)
        batch, t_roll, t_reward = self._collect(launch)
        t0 = time.time()
        self._finish_sync()  # async: the loads queued behind these rollouts have run by now
        t_sync = time.time() - t0
        if c.train.async_rollouts and it < final:
            self._inflight = self._launch_rollouts(it + 1)  # overlaps the update below
        staleness = self.learners.version - batch.weights_version  # updates since the behaviour policy
        batch.advantages = group_advantages(batch.rewards, batch.group_ids, c.algo.adv_eps, c.algo.global_std)
        t0 = time.time()
        learn = self.learners.train(batch)
        t_learn = time.time() - t0
        t0 = time.time()
        version = self._sync_weights(wait=not c.train.async_rollouts)
        t_sync += time.time() - t0
        t_iter = time.time() - t_start
        r = batch.rewards[~torch.isnan(batch.rewards)]
        row = {"reward_mean": r.mean().item() if len(r) else float("nan"),
               "reward_std": r.std().item() if len(r) > 1 else 0.0,
               "reward_none": int(torch.isnan(batch.rewards).sum()),
               **{f"reward/{k}": v[~torch.isnan(v)].mean().item() for k, v in batch.reward_components.items()},
               **{k: v for k, v in learn.items()},
               "frac_zero_adv": (batch.advantages == 0).float().mean().item(),
               "weights_version": version, "rollout_weights_version": batch.weights_version,
               "rollout_staleness": staleness,
               "worker_faults": self.fault_count - faults_before,
               "time_rollout": t_roll, "time_reward": t_reward, "time_learn": t_learn, "time_sync": t_sync,
               "time_iter": t_iter,
               "time_overhead": max(0.0, t_iter - t_roll - t_reward - t_learn - t_sync)}
        if c.train.grid_every and it % c.train.grid_every == 0:
            from rlgen.viz import save_image_grid

            save_image_grid(batch.samples[:64], self.run_dir / "samples" / f"train_{it:05d}.png",
                            nrow=c.prompts.group_size, captions=batch.prompts[:64], caption_every=c.prompts.group_size)
        return row

    def _sync_weights(self, wait: bool = True) -> int:
        """The learner's trainable weights → every rollout worker (``self.sync``: object store or a
        broadcast group). ``wait=False`` (async pipeline): the loads queue behind the next
        iteration's rollouts, already running on the workers; ``_finish_sync`` collects them."""
        version = self.sync.publish(self.learners)
        self.weights_version = version
        self._sync_refs = self.sync.send(self.rollout_workers, version)
        if wait:
            self._finish_sync()
        return version

    def _finish_sync(self) -> None:
        refs, self._sync_refs = self._sync_refs, []
        if not refs:
            return
        n, recovered = len(self.rollout_workers), False
        for w_idx, ref in enumerate(refs[-n:]):  # the workers' loads come last
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._recover_rollout_worker(w_idx, e)
                recovered = True
        for ref in refs[:-n]:  # a broadcast's learner side: it fails when a receiver died
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError:
                if not recovered:  # else the group was rebuilt and the weights re-sent
                    raise

    # ------------------------------------------------------------------------------------------
    # evaluation and checkpoints
    # ------------------------------------------------------------------------------------------
    def _evaluate(self, it: int) -> dict:
        if self.evaluator is None:
            return {}
        e = self.cfg.eval
        def call():
            return self.rollout_workers[0].generate_eval.remote(self.evaluator.prompts, e.num_steps, e.cfg_scale,
                                                                e.seed)

        out = self._get_with_retries(call(), call, lambda err: self._recover_rollout_worker(0, err))
        images = torch.from_numpy(np.array(out))  # copy: object-store arrays are read-only
        res = self.evaluator.score(images)
        from rlgen.viz import save_image_grid

        k = e.samples_per_prompt
        idx = list(range(0, len(images), k))[:64]
        save_image_grid(images[idx], self.run_dir / "samples" / f"eval_{it:05d}.png", nrow=8,
                        captions=[self.evaluator.prompts[i] for i in idx])
        out = {"eval/accuracy": res["accuracy"], **{f"eval/{t}": v for t, v in res["per_task"].items()}}
        for key in ("fd", "diversity", "mean_score"):
            if key in res:
                out[f"eval/{key}"] = res[key]
        self.eval_history.append({"step": it, **out})
        return out

    def _save(self, it: int) -> None:
        with atomic_checkpoint(self.run_dir, it) as d:
            self.learners.save(str(d))
            (d / "driver_state.json").write_text(json.dumps(
                {"iteration": it, "eval_history": self.eval_history, "seed": self.cfg.run.seed}))
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)

    def _resume(self) -> int:
        mode = self.cfg.run.resume
        if mode == "no":
            return 0
        ckpt = find_latest_checkpoint(self.run_dir) if mode == "auto" else resolve_checkpoint(mode)
        if ckpt is None:
            return 0
        state = json.loads((ckpt / "driver_state.json").read_text())
        self.learners.load(str(ckpt))
        self._sync_weights()
        self.eval_history = state.get("eval_history", [])
        print(f"[rlgen] resumed from {ckpt} (iteration {state['iteration']})")
        return int(state["iteration"])

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from rlgen.runtime.evaluator import ImageEvaluator
        from rlgen.runtime.prompts import PromptSource
        from rlgen.runtime.report import write_report
        from rlgen.utils import seed_everything

        c = self.cfg
        seed_everything(c.run.seed)
        # Everything that can reject the config runs before the run folder is touched.
        self.prompt_source = PromptSource(c.prompts, c.run.seed)
        self._check_prompts_parse()
        self.evaluator = ImageEvaluator(c.eval) if c.eval.benchmark else None
        base = self._base_checkpoint()
        self.eval_history: list[dict] = []
        try:
            self._start_actors(base)  # refuses impossible resource requests, before the folder is written
            prepare_run_dir(c)
            (self.run_dir / "placement.json").write_text(json.dumps(self.placement, indent=1))
            start = self._resume()
            log = MetricsLogger(self.run_dir, c.run.tensorboard, resume_step=start if start > 0 else None)
            if start == 0:
                log.log(0, **self._evaluate(0))
                self._save(0)
            t0 = time.time()
            bar = tqdm(range(start + 1, c.train.iterations + 1), desc="flow_grpo", disable=not c.run.progress,
                       initial=start, total=c.train.iterations)
            it = start
            for it in bar:
                row = self._iteration(it, c.train.iterations)
                last = it == c.train.iterations or (c.train.max_minutes and time.time() - t0 > 60 * c.train.max_minutes)
                if (c.eval.every and it % c.eval.every == 0) or last:
                    row.update(self._evaluate(it))
                log.log(it, **row)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row.get('kl', 0):.2e}",
                                clip=f"{row.get('clip_frac', 0):.2f}")
                if it % c.train.save_every == 0 or last:
                    self._save(it)
                if last:
                    break
            log.close()
            report = write_report(self.run_dir, self.eval_history, title=f"{c.kind}: {c.run.name}")
            return {"iterations": it, "eval_history": self.eval_history, "report": str(report)}
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if getattr(self, "learners", None) is not None:
            self.learners.shutdown()
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
