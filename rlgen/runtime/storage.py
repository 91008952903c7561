"""Run folders on an fsspec URI (``run.root=s3://bucket/runs``, ``gs://…``, ``memory://…``, ``local://…``).

A job always works in a local folder: ``RunConfig.dir`` of a URI root is a *staging* folder on the
driver's disk (``$RLGEN_STAGING_DIR`` or ``<tmp>/rlgen-staging``, one per URI and run name), so
every writer — ``atomic_checkpoint``, ``MetricsLogger``, the samples and the report — keeps its
local, atomic behaviour. ``RunStore`` mirrors that folder to the URI, with the driver as the only
process that talks to the remote filesystem:

- after each checkpoint: the checkpoint's files, then its ``COMPLETE`` marker, then
  ``checkpoints/latest`` (a small file holding the step: object stores have no symlinks), then the
  run's other files that changed (metrics, samples, config, TensorBoard events); old checkpoints
  are pruned there as locally. A remote checkpoint without ``COMPLETE`` (an upload cut short) is
  never ``latest`` and is never resumed from;
- on ``run.resume=auto``: the staging folder is cleared and refilled from the URI — the run's
  files and its newest complete checkpoint — before the set-up checks read it;
- on ``run.resume=no`` into a URI holding checkpoints: that run is moved aside to
  ``<name>.prev-<time>`` (as a local run folder is).

``file://`` roots are plain local paths (no staging). Learners write checkpoints into the staging
folder when they share the driver's node; on other nodes they send their files to the driver
through Ray (``Learner.save(path, ship=True)``), so a cluster needs no shared filesystem.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from rlgen.runtime.rundir import CKPT_DIRNAME, COMPLETE_MARKER

LATEST = "latest"


def is_uri(root: str) -> bool:
    """A remote run root (any fsspec protocol but ``file://``, which is a local path)."""
    return "://" in str(root) and not str(root).startswith("file://")


def local_root(root: str) -> str:
    return str(root)[len("file://"):] if str(root).startswith("file://") else str(root)


def staging_dir(root: str, name: str) -> Path:
    """The driver-local folder a run with a URI root works in (stable across restarts of the job)."""
    base = Path(os.environ.get("RLGEN_STAGING_DIR") or Path(tempfile.gettempdir()) / "rlgen-staging")
    return base / hashlib.sha1(str(root).rstrip("/").encode()).hexdigest()[:16] / name


class RunStore:
    """The remote side of one run folder (see the module docstring)."""

    def __init__(self, root: str, name: str):
        import fsspec

        self.uri = f"{str(root).rstrip('/')}/{name}"
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.uri)
        except (ImportError, ValueError) as e:
            raise ValueError(f"run.root: cannot open {self.uri} with fsspec ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); install the filesystem's package (s3fs, gcsfs …)") from None
        self.local = staging_dir(root, name)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime_ns) last uploaded

    def _r(self, rel: str = "") -> str:
        return f"{self.path.rstrip('/')}/{rel}" if rel else self.path

    def describe(self, local_path: Path | None) -> str | None:
        """A staging path as the URI users know it."""
        if local_path is None:
            return None
        try:
            return f"{self.uri}/{Path(local_path).relative_to(self.local).as_posix()}"
        except ValueError:
            return str(local_path)

    # ------------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------------
    def _complete(self, step: int) -> bool:
        return self.fs.exists(self._r(f"{CKPT_DIRNAME}/{step}/{COMPLETE_MARKER}"))

    def latest_step(self) -> int | None:
        """The newest complete remote checkpoint: ``latest`` if it names one, else a scan."""
        try:
            step = int(self.fs.cat_file(self._r(f"{CKPT_DIRNAME}/{LATEST}")).decode().strip())
            if self._complete(step):
                return step
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            pass  # none yet, or torn: scan
        if not self.fs.isdir(self._r(CKPT_DIRNAME)):
            return None
        steps = sorted((int(p.rstrip("/").rsplit("/", 1)[-1]) for p in self.fs.ls(self._r(CKPT_DIRNAME), detail=False)
                        if p.rstrip("/").rsplit("/", 1)[-1].isdigit()), reverse=True)
        return next((s for s in steps if self._complete(s)), None)

    def pull(self) -> Path | None:
        """Refill the staging folder from the URI: the run's files and its newest complete checkpoint."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        if not self.fs.exists(self._r()):
            return None
        step = self.latest_step()
        for rel in self._remote_files():
            top = rel.split("/", 2)
            if top[0] == CKPT_DIRNAME and (len(top) < 3 or top[1] != str(step)):
                continue  # only the checkpoint resumed from comes down
            (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._r(rel), str(self.local / rel))
        if step is None:
            return None
        os.symlink(str(step), self.local / CKPT_DIRNAME / LATEST)
        self._pushed = {rel: _stat(self.local / rel) for rel in _local_files(self.local)}
        return self.local / CKPT_DIRNAME / str(step)

    def _remote_files(self) -> list[str]:
        root = self._r().rstrip("/")
        return sorted(p[len(root) + 1:] for p in self.fs.find(root) if p.startswith(root + "/"))

    # ------------------------------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------------------------------
    def start_fresh(self) -> None:
        """``run.resume=no``: move a remote run that holds checkpoints aside; start an empty staging folder."""
        if self.fs.exists(self._r()) and self.latest_step() is not None:
            aside = f"{self.path.rstrip('/')}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
            self.fs.mv(self._r(), aside, recursive=True)
            print(f"[rlgen] {self.uri} held an earlier run (run.resume=no starts over): moved it to {aside}")
        shutil.rmtree(self.local, ignore_errors=True)
        self._pushed = {}

    def push_checkpoint(self, step: int, keep: int) -> None:
        """Upload checkpoint ``step`` (its COMPLETE marker last), point ``latest`` at it, prune."""
        d = self.local / CKPT_DIRNAME / str(step)
        rels = [r for r in _local_files(d) if r != COMPLETE_MARKER]
        target = f"{CKPT_DIRNAME}/{step}"
        if self.fs.exists(self._r(target)):  # a re-save of a step (after a resume): replace it whole
            self.fs.rm(self._r(target), recursive=True)
        for rel in [*rels, COMPLETE_MARKER]:
            self._put(d / rel, f"{target}/{rel}")
        self.fs.pipe_file(self._r(f"{CKPT_DIRNAME}/{LATEST}"), str(step).encode())
        self._prune(keep)

    def push_files(self) -> None:
        """Upload the run's files outside ``checkpoints/`` that changed since the last upload."""
        for rel in _local_files(self.local):
            if rel.split("/", 1)[0] == CKPT_DIRNAME:
                continue
            st = _stat(self.local / rel)
            if self._pushed.get(rel) != st:
                self._put(self.local / rel, rel)
                self._pushed[rel] = st

    def _put(self, src: Path, rel: str) -> None:
        parent = self._r(rel).rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(src), self._r(rel))

    def _prune(self, keep: int) -> None:
        if keep <= 0 or not self.fs.isdir(self._r(CKPT_DIRNAME)):
            return
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._r(CKPT_DIRNAME), detail=False)]
        for s in sorted(int(n) for n in names if n.isdigit())[:-keep]:
            if s != 0:
                self.fs.rm(self._r(f"{CKPT_DIRNAME}/{s}"), recursive=True)


def _local_files(root: Path) -> list[str]:
    """Regular files under ``root`` (relative, posix), skipping checkpoint temp entries and links."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".tmp-", ".old-"))]
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink() and not f.startswith(".latest-"):
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def open_store(run_cfg) -> RunStore | None:
    """The RunStore of a run whose ``run.root`` is a URI; None for a local folder."""
    return RunStore(run_cfg.root, run_cfg.name) if is_uri(run_cfg.root) else None


# ----------------------------------------------------------------------------------------------
# Learner files through Ray (no shared filesystem between a learner's node and the driver's)
# ----------------------------------------------------------------------------------------------
def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` as {relative posix path: bytes}."""
    return {rel: (Path(root) / rel).read_bytes() for rel in _local_files(Path(root))}


def write_tree(files: dict[str, bytes], root: Path) -> None:
    """The inverse of ``read_tree``; refuses paths that would leave ``root``."""
    root = Path(root)
    for rel, data in files.items():
        p = (root / rel).resolve()
        if not p.is_relative_to(root.resolve()):
            raise ValueError(f"refusing to write {rel!r} outside {root}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
