"""The run folder layout every job shares (see DESIGN.md, Conventions → Runs).

runs/<name>/
  config.yaml            resolved config
  metrics.jsonl          one JSON object per step
  tb/                    TensorBoard events
  samples/               PNG grids / text files
  checkpoints/<step>/    each loadable on its own; written to a temp dir, then renamed
  checkpoints/latest     symlink to the newest complete checkpoint
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rlgen.config import FieldError, check_range, save_config


@dataclass
class RunConfig:
    """``run:`` of every job (RL and pretraining): where its run folder is and how it is written."""

    name: str = "run"          # runs/<name>/ (a plain name: letters, digits, '_', '-', '.')
    root: str = "runs"         # parent folder of run folders (a local path or an fsspec URI)
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    resume: str = "no"         # no | auto (latest checkpoint of this run, if any) | <checkpoint dir>
    tensorboard: bool = True
    progress: bool = True      # tqdm progress bars
    num_threads: int = 0       # torch intra-op threads in the driver; 0 = leave torch's default
    # Weights & Biases beside TensorBoard (pip install 'rlgen[wandb]'; WANDB_MODE=offline works offline)
    wandb: bool = False
    wandb_project: str = "rlgen"
    wandb_entity: str = ""     # "" = the logged-in user's default entity

    def __post_init__(self):
        # a name is one folder inside run.root: "../x", "a/b" or "/abs" would write elsewhere
        n = self.name
        if not n or n in (".", "..") or "/" in n or "\\" in n or any(ord(c) < 32 for c in n):
            raise FieldError("name", f"must be a plain folder name (no '/', '\\', '..'), got {n!r}; "
                                     f"run.root chooses where run folders go")
        check_range(self, "num_threads", lo=0)
        if self.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise FieldError("wandb", "is true but the wandb package is not installed (pip install 'rlgen[wandb]')")

    def wandb_settings(self, config: dict) -> dict | None:
        """What ``MetricsLogger`` passes to ``wandb.init`` (None when W&B is off)."""
        if not self.wandb:
            return None
        return {"project": self.wandb_project, "entity": self.wandb_entity or None, "name": self.name, "config": config}

    @property
    def dir(self) -> Path:
        """The folder the job writes: ``root/name``; for an fsspec URI root (``s3://…``) a local
        staging folder that rlgen/runtime/storage.py mirrors to ``root/name``."""
        from rlgen.runtime.storage import is_uri, local_root, staging_dir

        return staging_dir(self.root, self.name) if is_uri(self.root) else Path(local_root(self.root)) / self.name

CKPT_DIRNAME = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def prepare_run_dir(cfg) -> Path:
    """Create runs/<name>/ and write the resolved config. ``cfg.run`` must be a RunConfig.

    A fresh run (``run.resume=no``) in a folder that already holds checkpoints moves the old run
    aside to ``<name>.prev-<time>`` first: starting over never deletes earlier work.
    """
    d = cfg.run.dir
    if str(getattr(cfg.run, "resume", "no")) == "no" and find_latest_checkpoint(d) is not None:
        aside = d.with_name(f"{d.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = d.with_name(f"{d.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        os.replace(d, aside)
        print(f"[rlgen] {d} held an earlier run (run.resume=no starts over): moved it to {aside}")
    (d / "samples").mkdir(parents=True, exist_ok=True)
    (d / CKPT_DIRNAME).mkdir(exist_ok=True)
    remove_stale_temp(d)
    save_config(cfg, d / "config.yaml")
    return d


def remove_stale_temp(run_dir: Path) -> list[Path]:
    """Delete checkpoint temp entries (``.tmp-<step>-<pid>``, ``.old-<step>-<pid>``, ``.latest-<pid>``)
    left by a process that no longer exists: a writer killed mid-save. A live writer's are kept."""
    root, removed = Path(run_dir) / CKPT_DIRNAME, []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        pid = p.name.rsplit("-", 1)[-1]
        if p.name.startswith((".tmp-", ".old-", ".latest-")) and pid.isdigit() and not _pid_alive(int(pid)):
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_checkpoint(run_dir: Path, step: int) -> Iterator[Path]:
    """Yield a temp folder to write checkpoint ``step`` into; publish it only if the block succeeds.

    The folder is renamed into place (atomic on one filesystem) after a COMPLETE marker is written,
    and ``latest`` is switched with an atomic symlink replace, so a crash at any point leaves the
    previous checkpoint as ``latest`` and never exposes a half-written one.
    """
    root = Path(run_dir) / CKPT_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        _fsync_dir(tmp)
        final = root / str(step)
        if final.exists():  # re-saving a step (e.g. after resume): replace it whole
            old = root / f".old-{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        link_tmp = root / f".latest-{os.getpid()}"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(str(step), link_tmp)
        os.replace(link_tmp, root / "latest")
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete_checkpoint(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (follows ``latest``, falls back to scanning)."""
    root = Path(run_dir) / CKPT_DIRNAME
    link = root / "latest"
    if link.exists() and is_complete_checkpoint(link.resolve()):
        return link.resolve()
    steps = sorted((int(p.name), p) for p in root.glob("*") if p.name.isdigit() and is_complete_checkpoint(p))
    return steps[-1][1] if steps else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder or a run folder (→ its latest checkpoint); clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / CKPT_DIRNAME).is_dir():
        latest = find_latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"run folder {p} has no complete checkpoint under {p / CKPT_DIRNAME}")
        return latest
    if p.is_dir() and (p / COMPLETE_MARKER).exists() or (p / "rlgen_model.json").is_file():
        return p
    raise CheckpointError(f"{p} is neither a checkpoint folder (no {COMPLETE_MARKER} / rlgen_model.json) "
                          f"nor a run folder (no {CKPT_DIRNAME}/)")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest numbered checkpoints (and always step 0, the starting policy)."""
    if keep <= 0:
        return
    root = Path(run_dir) / CKPT_DIRNAME
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit())
    for s in steps[:-keep]:
        if s != 0:
            shutil.rmtree(root / str(s), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
class MetricsLogger:
    """Appends one JSON line per step to metrics.jsonl (+ TensorBoard scalars).

    On resume from step S, rows with step > S are dropped first, so a crash between logging and
    checkpointing leaves neither a gap nor a duplicate.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 wandb: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            rows = read_metrics(self.path)
            kept = [r for r in rows if r.get("step", -1) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an existing folder starts a fresh log
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        self._wandb = start_wandb(run_dir, wandb, resume_step is not None) if wandb else None

    def log(self, step: int, **metrics) -> dict:
        row = {"step": int(step)}
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/inf; keep it visible rather than silently dropped
            row[k] = v
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=step)
        return row

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def start_wandb(run_dir: Path, settings: dict, resume: bool):
    """A W&B run whose files live in ``run_dir/wandb``; a resumed job continues the same W&B run
    (its id is kept in ``run_dir/wandb_id.txt``). W&B ignores steps at or below its last one, so
    rows a crash logged past the checkpoint are not rewritten there."""
    import uuid

    import wandb

    id_file = Path(run_dir) / "wandb_id.txt"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(dir=str(run_dir), id=run_id, resume="allow", **settings)


def read_metrics(path: Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    rows = []
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a crash mid-write
    return rows
