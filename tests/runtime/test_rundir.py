import json

import pytest

from rlgen.runtime.rundir import (CheckpointError, MetricsLogger, atomic_checkpoint, find_latest_checkpoint,
                                  read_metrics, resolve_checkpoint)


def test_atomic_checkpoint_publishes_only_complete(tmp_path):
    with atomic_checkpoint(tmp_path, 10) as d:
        (d / "w.bin").write_text("ten")
    assert find_latest_checkpoint(tmp_path).name == "10"
    with pytest.raises(RuntimeError):
        with atomic_checkpoint(tmp_path, 20) as d:
            (d / "w.bin").write_text("half")
            raise RuntimeError("crash mid-write")
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / "20").exists()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
    assert (ckpts / "latest").resolve().name == "10"
    assert (resolve_checkpoint(tmp_path) / "w.bin").read_text() == "ten"


def test_latest_ignores_incomplete_folders(tmp_path):
    with atomic_checkpoint(tmp_path, 5) as d:
        (d / "x").write_text("5")
    (tmp_path / "checkpoints" / "7").mkdir()  # e.g. copied by hand, no COMPLETE marker
    (tmp_path / "checkpoints" / "latest").unlink()
    assert find_latest_checkpoint(tmp_path).name == "5"


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(tmp_path / "junk")


def test_metrics_resume_drops_rows_after_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log(s, loss=float(s))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn line from a crash
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    log.log(4, loss=40.0)
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 40.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_metrics_nonfinite_values_stay_visible(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    row = log.log(1, loss=float("nan"))
    log.close()
    assert row["loss"] == "nan"


def test_fresh_run_moves_an_earlier_run_aside_instead_of_mixing_or_deleting(tmp_path):
    from dataclasses import dataclass, field

    from rlgen.runtime.rundir import RunConfig
    from rlgen.runtime.rundir import prepare_run_dir

    @dataclass
    class Job:
        kind: str = "toy"
        run: RunConfig = field(default_factory=lambda: RunConfig(name="r", root=str(tmp_path)))

    cfg = Job()
    run = prepare_run_dir(cfg)
    with atomic_checkpoint(run, 5) as d:
        (d / "w.txt").write_text("earlier")
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    prepare_run_dir(cfg)  # resume=no: start over
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.prev-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "5" / "w.txt").read_text() == "earlier"
    assert (aside[0] / "metrics.jsonl").is_file()
    assert not list((run / "checkpoints").iterdir()) and not (run / "metrics.jsonl").exists()
    cfg.run.resume = "auto"  # resuming keeps the folder where it is
    with atomic_checkpoint(run, 1):
        pass
    prepare_run_dir(cfg)
    assert (run / "checkpoints" / "1").is_dir() and len(list(tmp_path.glob("r.prev-*"))) == 1


def test_temp_folders_of_a_dead_writer_are_removed_a_live_ones_kept(tmp_path):
    import os
    import subprocess

    from rlgen.runtime.rundir import remove_stale_temp

    dead = subprocess.Popen(["true"])
    dead.wait()
    root = tmp_path / "checkpoints"
    (root / f".tmp-7-{dead.pid}").mkdir(parents=True)
    (root / f".old-6-{dead.pid}").mkdir()
    (root / f".tmp-8-{os.getpid()}").mkdir()
    (root / "5").mkdir()
    (root / f".latest-{dead.pid}").symlink_to("5")
    removed = remove_stale_temp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".tmp-7-{dead.pid}", f".old-6-{dead.pid}",
                                                      f".latest-{dead.pid}"])
    assert sorted(p.name for p in root.iterdir()) == sorted(["5", f".tmp-8-{os.getpid()}"])
