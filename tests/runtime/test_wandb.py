"""Weights & Biases beside TensorBoard (``run.wandb: true``), in offline mode: every metrics row is
logged to a W&B run whose files live in the run folder, and a resumed job continues that run."""
import glob
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

wandb = pytest.importorskip("wandb", reason="the optional 'wandb' extra is not installed (pip install 'rlgen[wandb]')")


def run_file(run_dir, expect: tuple[bytes, ...] = (), timeout: float = 60.0) -> bytes:
    """The offline run's record file. W&B's service process writes it; on a loaded machine its last
    records reached the disk after ``finish()`` returned (seen once in the full suite), so wait up to
    ``timeout`` s for ``expect`` before handing the bytes to the assertions."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        with open(path, "rb") as f:
            data = f.read()
        if all(t in data for t in expect) or time.monotonic() > deadline:
            return data
        time.sleep(0.5)


def test_metrics_rows_reach_an_offline_wandb_run(tmp_path, monkeypatch):
    from rlgen.config import load_config, to_dict
    from rlgen.runtime.rundir import MetricsLogger, read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(QUICKSTART, ["run.wandb=true", "run.wandb_project=rlgen-test"])
    settings = cfg.run.wandb_settings(to_dict(cfg))
    assert settings["project"] == "rlgen-test" and settings["name"] == "quickstart" and settings["entity"] is None

    log = MetricsLogger(tmp_path, tensorboard=False, wandb=settings)
    run = log._wandb
    assert run.config["algo"]["name"] == "flow_grpo" and run.project == "rlgen-test"
    log.log(0, reward_mean=0.25)
    log.log(1, reward_mean=0.8125, loss=-0.03125, note="text is not a W&B scalar")
    log.close()
    expect = (b"reward_mean", b"0.8125", b"-0.03125", b"loss")
    data = run_file(tmp_path, expect)  # W&B's own record of the run (protobuf records; the values as JSON text)
    for text in expect:
        assert text in data, text
    assert b"text is not a W&B scalar" not in data
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]  # metrics.jsonl is unchanged by W&B

    first = (tmp_path / "wandb_id.txt").read_text().strip()
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=1, wandb=settings)
    assert resumed._wandb.id == first  # a resumed job continues the same W&B run
    resumed.close()


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from rlgen.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"override 'run\.wandb=true': key 'run\.wandb' is true but the wandb "
                                          r"package is not installed"):
        load_config(QUICKSTART, ["run.wandb=true"])
