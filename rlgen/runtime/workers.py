"""The rollout and reward groups, driven as groups, and what survives their faults.

``Workers`` starts N ``RolloutWorker`` actors (rollouts/worker.py: any model family) and M
``RewardWorker`` actors (rewards/worker.py), shards each step's prompts over the rollout workers,
scores each shard on a reward worker as soon as it arrives, and syncs the learners' weights to the
rollout workers after each update (rlgen/runtime/weight_sync.py).

Faults: rollout and reward actors are created with ``max_restarts``, so Ray brings a dead worker
back; the driver notices the lost call (``RayActorError``) or a rollout sampled with weights other
than the ones its shard was meant for (a restarted worker holds the base), waits for the worker,
gives it those exact weights and re-issues the shard with the same seed — the batch is exactly
what an undisturbed worker would have produced. A reward worker that dies while scoring is asked
again. More than ``MAX_RETRIES`` faults per worker in one step stop the job with the last error.
"""
from __future__ import annotations

import time

import numpy as np
import ray
import torch

from rlgen.utils import derive_seed

MAX_RETRIES = 3  # re-issues of one lost call before the step fails


class StaleWeights(RuntimeError):
    """A rollout came from weights other than the ones its shard was meant for: its worker was restarted."""


class Workers:
    def __init__(self, cfg, policy_path: str, modality: str, online: bool):
        from rewards.worker import make_reward_worker
        from rollouts.worker import RolloutWorker

        c, r = cfg, cfg.resources
        self.cfg, self.modality = cfg, modality
        self.weights_version = 0  # what the rollout workers hold once the weights last sent have landed
        self._sync_refs: list = []
        self.fault_count = self.faults_this_step = 0
        threads = r.rollout_threads or max(1, int(r.rollout_cpus))
        actor = ray.remote(num_cpus=r.rollout_cpus, num_gpus=r.rollout_gpus, max_restarts=2,
                           resources=dict(r.rollout_resources) or None)(RolloutWorker)
        lora = c.policy.lora if c.policy.lora.enabled else None
        self.rollout_workers = [actor.remote(str(policy_path), c.policy.load_options(), c.rollout, lora, threads,
                                             c.run.device, i, c.policy.dtype) for i in range(r.rollout_workers)]
        self.reward_workers = [make_reward_worker(c.rewards_config(), num_cpus=r.reward_cpus, num_gpus=r.reward_gpus,
                                                  max_restarts=2, resources=dict(r.reward_resources) or None)
                               for _ in range(r.reward_workers if online else 0)]
        ray.get([w.get_version.remote() for w in self.rollout_workers])  # fail fast if a worker cannot start

    def start_sync(self, learners) -> None:
        from rlgen.runtime.weight_sync import make_weight_sync

        self.sync = make_weight_sync(self.cfg.train.weight_sync, learners, self.rollout_workers)

    def placement(self) -> dict:
        from rlgen.runtime.cluster import node_ids

        return {"rollout": node_ids(self.rollout_workers), "reward": node_ids(self.reward_workers)}

    # ------------------------------------------------------------------------------------------
    # rollouts and rewards
    # ------------------------------------------------------------------------------------------
    def launch(self, step: int, items: list[dict]) -> dict:
        """Shard a step's prompt items across workers (round-robin) and start sampling.

        Each shard remembers the weights version its worker will hold when it runs: the last one
        sent, since a worker runs calls in submission order and the load was submitted first.
        """
        g, n_w = self.cfg.prompts.group_size, len(self.rollout_workers)
        jobs, pending = {}, {}
        for w in range(n_w):
            idxs = list(range(w, len(items), n_w))
            if not idxs:
                continue
            rep = [items[i] for i in idxs for _ in range(g)]
            gids = torch.tensor([i for i in idxs for _ in range(g)])
            jobs[w] = [(rep, gids, derive_seed(self.cfg.run.seed, step, w), step), self.weights_version]
            pending[self.rollout_workers[w].generate.remote(*jobs[w][0])] = w
        return {"step": step, "jobs": jobs, "pending": pending}

    def collect(self, launch: dict):
        """Gather a launched step's shards, scoring each as soon as it arrives; (batch, t_roll, t_reward)."""
        from rlgen.batches import TextRollout

        jobs, pending = launch["jobs"], launch["pending"]
        results, scores, t_roll, t0 = {}, {}, 0.0, time.time()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            w = pending.pop(done[0])
            args, want = jobs[w]
            try:
                ro = ray.get(done[0])
                if ro.weights_version != want:
                    raise StaleWeights(f"rollout worker {w} sampled with weights v{ro.weights_version}, its shard "
                                       f"was meant for v{want}")
            except (ray.exceptions.RayActorError, StaleWeights) as e:
                jobs[w][1] = self._recover_rollout_worker(w, e, want)
                pending[self.rollout_workers[w].generate.remote(*args)] = w
                continue
            t_roll = time.time() - t0
            results[w] = ro
            scores[w] = self._score(w, ro)
        t1 = time.time()
        order = sorted(results)
        mixed = [self._get_score(w, scores[w], results[w]) for w in order]
        if self.modality == "image":  # extra images a rollout had scored (G²RPO's branches) stay on it
            mixed = [results[w].keep_scores(m) for w, m in zip(order, mixed)]
        t_reward = time.time() - t1
        parts = [results[w] for w in order]
        batch = (type(parts[0]) if self.modality == "image" else TextRollout).cat(parts)
        batch.rewards = torch.cat([m.total for m in mixed]).float()
        batch.reward_components = {k: torch.cat([m.components[k] for m in mixed]).float() for k in mixed[0].components}
        return batch, t_roll, t_reward

    def _reward_worker(self, w: int):
        return self.reward_workers[w % len(self.reward_workers)]

    def _score(self, w: int, ro):
        if self.modality == "image":
            images, prompts = ro.reward_inputs()
            return self._reward_worker(w).score.remote(images.numpy(), prompts, {})
        return self._reward_worker(w).score.remote(ro.completions, ro.prompts, dict(ro.meta))

    def _get_score(self, w: int, ref, ro):
        def recover(err):
            self._note_fault(f"reward worker {w % len(self.reward_workers)} died while scoring ({type(err).__name__})")
            self._wait_alive(self._reward_worker(w), "ping")

        return get_with_retries(ref, lambda: self._score(w, ro), recover)

    # ------------------------------------------------------------------------------------------
    # worker faults: Ray restarts a dead actor (max_restarts); the driver re-issues the lost work
    # ------------------------------------------------------------------------------------------
    def _recover_rollout_worker(self, w: int, err: Exception, version: int | None = None) -> int:
        """Wait for a restarted worker and give it weights ``version`` (default: the newest sent);
        returns the version it now holds."""
        self.faults_this_step += 1
        if self.faults_this_step > MAX_RETRIES * max(1, len(self.rollout_workers)):
            raise RuntimeError(f"rollout workers keep failing ({self.faults_this_step} faults this step); "
                               f"last: {err}") from err
        self._note_fault(f"rollout worker {w}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        worker = self.rollout_workers[w]
        self._wait_alive(worker, "get_version")
        # a restarted worker holds the base weights (version 0)
        return self.sync.restore(worker, self.weights_version if version is None else version)

    @staticmethod
    def _wait_alive(actor, method: str, timeout_s: float = 120.0) -> None:
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

    # ------------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------------
    def sync_weights(self, learners, wait: bool = True) -> int:
        """Learner weights → every rollout worker. ``wait=False`` (async pipeline): the loads queue
        behind the next step's rollouts, already running on the workers; ``finish_sync`` collects them."""
        version = self.sync.publish(learners)
        self.weights_version = version
        self._sync_refs = self.sync.send(self.rollout_workers, version)
        if wait:
            self.finish_sync()
        return version

    def finish_sync(self) -> None:
        refs, self._sync_refs = self._sync_refs, []
        if not refs:
            return
        n, recovered = len(self.rollout_workers), False
        for w, ref in enumerate(refs[-n:]):  # the workers' loads come last
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._recover_rollout_worker(w, e)
                recovered = True
        for ref in refs[:-n]:  # a broadcast's learner side: it fails when a receiver died
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError:
                if not recovered:  # else the group was rebuilt and the weights re-sent
                    raise

    # ------------------------------------------------------------------------------------------
    def call_first(self, method: str, *args):
        """``method(*args)`` on rollout worker 0, surviving its restart (evaluation, pair preparation)."""
        def call():
            return getattr(self.rollout_workers[0], method).remote(*args)

        return get_with_retries(call(), call, lambda err: self._recover_rollout_worker(0, err))

    def evaluate(self, benchmark: str, request: dict, weights=None) -> dict:
        """Rollout worker 0 runs ``benchmark`` on its policy, or, given ``weights`` (an object ref of
        ``{name: np.ndarray}``, e.g. the learners' EMA), on its policy with those weights swapped in
        for this call only: its own come back before any later call (the next rollout) runs."""
        if weights is None:
            return self.call_first("evaluate", benchmark, request)
        from rlgen.runtime.ema import evaluate_with_weights

        return self.call_first("__ray_call__", evaluate_with_weights, weights, benchmark, request)

    def shutdown(self) -> None:
        for a in self.rollout_workers + self.reward_workers:
            ray.kill(a)
        self.rollout_workers, self.reward_workers = [], []


def get_with_retries(ref, reissue, recover):
    """``ray.get(ref)``; when its actor died, ``recover(err)`` and get ``reissue()`` instead, at most
    MAX_RETRIES times."""
    for attempt in range(MAX_RETRIES + 1):
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if attempt == MAX_RETRIES:
                raise
            recover(err)
            ref = reissue()


def eval_row(result: dict) -> dict:
    """The metrics of a benchmark result as ``eval/…`` keys (accuracy, per task, numeric extras)."""
    row = {"eval/accuracy": result["accuracy"], **{f"eval/{t}": v for t, v in result["per_task"].items()}}
    skip = {"accuracy", "per_task", "n", "seed", "eval_seconds", "real_n", "prompts", "classifier_test_accuracy",
            "steps", "cfg", "noise_level", "shift", "samples_per_prompt", "batch_size"}  # settings, not metrics
    for k, v in result.items():
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            row[f"eval/{k}"] = float(v)
    return row
