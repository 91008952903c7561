"""The one pretraining loop: run folder, resume, progress, metrics, evaluation, checkpoints, budget.

Every pretraining kind (flow matching, masked diffusion, CLIP, classifier, aesthetic head,
autoregressive LM) is a small *task* object that knows its model, data and update; this module
does everything around it, the same way for all of them::

    run_pretraining(cfg, task) -> Path   # the final checkpoint folder

A task provides (duck-typed; see ``PretrainTask``):

``plan() -> LoopPlan``
    how many updates, and how often to log / evaluate / checkpoint (read off its own config keys,
    so the shipped YAML files keep their words: ``max_steps``, ``epochs``, ``steps`` …).
``init(resume: Path | None) -> None``
    build model, optimizer and data; with ``resume`` (a checkpoint folder) also restore its state
    (``task.load``). Called before the run folder is prepared, so a task may fill config fields
    (e.g. the flow model's vocabulary) that ``config.yaml`` then records.
``train_step(step: int) -> dict``
    one optimizer update; ``step`` is the 0-based update index (updates done so far). Returns
    scalars, averaged over the logging window into metrics.jsonl.
``evaluate(step: int) -> dict`` (optional)
    held-out metrics / samples; scalars go into that step's metrics row.
``save(d: Path) -> dict``
    write the published model into checkpoint folder ``d`` (loadable on its own) and the task's
    trainer state into ``d / "trainer_state"`` (already created); returns JSON-able task state.
``load(d: Path, state: dict) -> None``
    restore what ``save`` wrote (``state`` is what it returned).
``report() -> dict | None`` (optional)
    the final result, written as ``eval.json`` into the last checkpoint.

Checkpoint layout (DESIGN.md, Conventions → Runs), the same for every kind::

    checkpoints/<step>/            the published model (task.save), config.yaml, [eval.json]
    checkpoints/<step>/trainer_state/
        state.json                 step, wall time so far, that step's metrics row, the logging
                                   window not yet logged, task state
        rng.pt                     global torch / CUDA / numpy / random RNG states
        model.safetensors, optimizer.pt …   the task's own (tensors: safetensors; the rest
                                   torch.save, read back with ``weights_only=True``)

All of it is written into a temp folder and renamed (``atomic_checkpoint``), so ``run.resume=auto``
after a crash at any point restarts from the newest complete checkpoint and, on CPU, continues
bit-for-bit as if never interrupted.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rlgen.config import save_config
from rlgen.runtime.rundir import (CheckpointError, MetricsLogger, atomic_checkpoint, find_latest_checkpoint,
                                  prepare_run_dir, prune_checkpoints, resolve_checkpoint)
from rlgen.utils import seed_everything, set_threads

STATE_DIR = "trainer_state"


@dataclass
class LoopPlan:
    """When the loop does what; steps count completed updates (1 = after the first)."""

    last_step: int                      # train until this many updates are done
    log_every: int = 1                  # a metrics row every N steps (window means), and at the end
    eval_every: int = 0                 # task.evaluate every N steps (0 = never), and at the end
    checkpoint_every: int = 0           # every N steps (0 = only at the end), and at the end
    checkpoint_every_minutes: float = 0.0  # also when this much wall time passed since the last one
    keep_checkpoints: int = 0           # keep the newest N numbered checkpoints (0 = all)
    max_minutes: float = 0.0            # wall budget over the whole run, resumes included (0 = none)
    label: str = "pretrain"             # progress bar / messages


class PretrainTask(Protocol):
    """What ``run_pretraining`` calls, in this order: init → load (when resuming) → plan → then
    train_step / evaluate / save per step. ``evaluate(step) -> dict`` and ``report() -> dict | None``
    are optional (see the module docstring)."""

    def init(self, resume: Path | None) -> None: ...
    def load(self, d: Path, state: dict) -> None: ...
    def plan(self) -> LoopPlan: ...
    def train_step(self, step: int) -> dict: ...
    def save(self, d: Path) -> dict: ...


# ----------------------------------------------------------------------------------------------
# Trainer-state files: helpers the tasks share
# ----------------------------------------------------------------------------------------------
def save_torch_state(path: Path, obj: dict) -> None:
    """Optimizer / scheduler / generator states: tensors and plain Python only (weights_only loads)."""
    torch.save(obj, path)


def load_torch_state(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing (is this a checkpoint written by rlgen.pretrain?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(module: torch.nn.Module, d: Path, name: str = "model.safetensors") -> None:
    """A module's raw weights into ``d/trainer_state/<name>`` (safetensors; shared tensors kept once)."""
    from safetensors.torch import save_model

    save_model(module, str(task_state_path(d, name)))


def load_weights(module: torch.nn.Module, d: Path, name: str = "model.safetensors") -> None:
    from safetensors.torch import load_model

    path = task_state_path(d, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (is this a checkpoint written by rlgen.pretrain?)")
    load_model(module, str(path), device=str(next(module.parameters()).device))


def task_state_path(d: Path, name: str) -> Path:
    """Where a task keeps file ``name`` of its trainer state inside checkpoint folder ``d``."""
    return Path(d) / STATE_DIR / name


def _rng_state() -> dict:
    np_state = np.random.get_state()  # ('MT19937', (624,) uint32 keys, pos, has_gauss, cached_gaussian)
    keys = torch.from_numpy(np_state[1].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], keys, *np_state[2:]],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def resume_source(cfg) -> Path | None:
    """The checkpoint ``run.resume`` names: none (``no``), this run's newest (``auto``), or a path."""
    mode, run_dir = str(cfg.run.resume), cfg.run.dir
    if mode == "no":
        return None
    if mode == "auto":
        _check_same_kind(run_dir, cfg.kind)
    ckpt = (find_latest_checkpoint(run_dir) if run_dir.exists() else None) if mode == "auto" \
        else resolve_checkpoint(mode)
    if ckpt is not None and not (ckpt / STATE_DIR / "state.json").is_file():
        raise CheckpointError(f"run.resume={mode}: {ckpt} has no {STATE_DIR}/state.json (not a pretraining "
                              f"checkpoint, or one from an older rlgen); resume from another or set run.resume=no")
    return ckpt


def _check_same_kind(run_dir: Path, kind: str) -> None:
    """``run.resume=auto`` into a folder another kind of job wrote (an RL run, another pretraining) is
    refused before anything in it changes."""
    from rlgen.config import yaml_load

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    try:
        data = yaml_load(saved.read_text(encoding="utf-8"))
        other = data.get("kind") if isinstance(data, dict) else None
    except Exception as e:  # noqa: BLE001 — a damaged file is a refusal too
        raise CheckpointError(f"run.resume=auto: {saved} is unreadable ({type(e).__name__}); not resuming into it") from e
    if other != kind:
        what = "an RL (train_rl.py) run" if other in (None, "train") else f"a {other} run"
        raise CheckpointError(f"run.resume=auto: {run_dir} holds {what}; this job is {kind} (use another "
                              f"run.name, or run.resume=no to move the old run aside)")


class _Run:
    """The state of one call of ``run_pretraining``: what was done, when, and the window to log."""

    def __init__(self, cfg, task, plan: LoopPlan, state: dict | None):
        self.cfg, self.task, self.plan = cfg, task, plan
        self.run_dir = cfg.run.dir
        state = state or {}  # a resumed checkpoint's trainer_state/state.json
        self.step, self.elapsed_before = int(state.get("step", 0)), float(state.get("elapsed_s", 0.0))
        # training scalars of the steps since the last row that logged them
        self.window: list[dict] = list(state.get("window", []))
        self.t0 = self.last_save = self.last_log = time.time()
        self.checkpoint: Path | None = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def row_for(self, step: int, final: bool) -> dict:
        """Window means of the training scalars on a logging step, + evaluation when it is due."""
        p, row = self.plan, {}
        if self.window and (step % max(1, p.log_every) == 0 or final):
            keys = [k for k in self.window[-1] if all(k in w for w in self.window)]
            row = {k: sum(w[k] for w in self.window) / len(self.window) for k in keys}
            now = time.time()
            row["steps_per_s"] = round(len(self.window) / max(now - self.last_log, 1e-9), 2)
            self.window, self.last_log = [], now
        evaluate = getattr(self.task, "evaluate", None)
        if evaluate is not None and ((p.eval_every > 0 and step % p.eval_every == 0) or final):
            row.update(evaluate(step))
        if row:
            row["elapsed_min"] = round(self.elapsed() / 60, 3)
        return row

    def checkpoint_due(self, step: int, final: bool) -> bool:
        p = self.plan
        return final or (p.checkpoint_every > 0 and step % p.checkpoint_every == 0) or \
            (p.checkpoint_every_minutes > 0 and time.time() - self.last_save >= 60 * p.checkpoint_every_minutes)

    def save(self, step: int, row: dict, final: bool) -> Path:
        report = getattr(self.task, "report", None) if final else None
        with atomic_checkpoint(self.run_dir, step) as d:
            (d / STATE_DIR).mkdir()
            task_state = self.task.save(d)
            save_config(self.cfg, d / "config.yaml")
            save_torch_state(d / STATE_DIR / "rng.pt", _rng_state())
            state = {"step": step, "elapsed_s": self.elapsed(), "metrics": row, "window": self.window,
                     "task": task_state}
            (d / STATE_DIR / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            result = report() if report is not None else None
            if result is not None:
                (d / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        prune_checkpoints(self.run_dir, self.plan.keep_checkpoints)
        self.last_save = time.time()
        return self.run_dir / "checkpoints" / str(step)


def run_pretraining(cfg, task) -> Path:
    """Run (or resume, per ``run.resume``) ``task`` under ``cfg.run``; returns the final checkpoint."""
    from rlgen.runtime.storage import is_uri

    if is_uri(cfg.run.root):
        from rlgen.config import ConfigError

        raise ConfigError(f"run.root={cfg.run.root}: pretraining writes a local folder (fsspec URIs are for "
                          f"train_rl.py jobs); pretrain locally and copy the checkpoint")
    threads = torch.get_num_threads()
    try:
        set_threads(cfg.run.num_threads)
        seed_everything(cfg.run.seed)
        return _fit(cfg, task)
    finally:
        torch.set_num_threads(threads)  # run.num_threads applies to this job only


def _fit(cfg, task) -> Path:
    from tqdm.auto import tqdm

    resume = resume_source(cfg)
    state = json.loads((resume / STATE_DIR / "state.json").read_text()) if resume is not None else None
    task.init(resume)
    if resume is not None:
        task.load(resume, state.get("task") or {})
        _set_rng_state(load_torch_state(resume / STATE_DIR / "rng.pt"))  # last: init may have drawn
    plan = task.plan()
    run = _Run(cfg, task, plan, state)
    prepare_run_dir(cfg)  # after init: config.yaml records what the task filled in
    from rlgen.config import to_dict

    logger = MetricsLogger(run.run_dir, cfg.run.tensorboard, resume_step=run.step if resume is not None else None,
                           wandb=cfg.run.wandb_settings(to_dict(cfg)))
    bar = tqdm(total=plan.last_step, initial=run.step, disable=not cfg.run.progress, desc=plan.label)
    try:
        for i in range(run.step, plan.last_step):
            run.window.append(task.train_step(i))
            step = run.step = i + 1
            bar.update(1)
            out_of_time = plan.max_minutes > 0 and run.elapsed() >= 60 * plan.max_minutes
            final = step == plan.last_step or out_of_time
            row = run.row_for(step, final)
            if row:
                logger.log(step, **row)
                if "loss" in row:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if run.checkpoint_due(step, final):
                run.checkpoint = run.save(step, row, final)
            if out_of_time:
                bar.write(f"[{plan.label}] wall budget of {plan.max_minutes} min reached at step {step}")
                break
    finally:
        bar.close()
        logger.close()
    # nothing left to train (resumed at the end): the newest checkpoint stands
    return run.checkpoint or find_latest_checkpoint(run.run_dir)

