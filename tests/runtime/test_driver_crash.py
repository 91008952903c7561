"""Driver crash: SIGKILL train_rl.py while it writes a checkpoint, resume with run.resume=auto, and
finish with the same metrics steps and the same final weights as an uninterrupted run of the same
seed (CPU) — for every registered job: image and text RL, REINFORCE, image and text distillation, and
both offline preference jobs."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlgen.runtime.rundir import find_latest_checkpoint, read_metrics
from tests.runtime.test_jobs_e2e import job_args
from tests.runtime.tiny import save_tiny_lm
from tests_helpers import tiny_flow_policy

REPO = Path(__file__).resolve().parents[2]


def args(root, models, name, job, ray_tmp, steps=4, resume="no"):
    config, *extra = job_args(job, Path(root), models)
    return ["--config", config, f"run.root={root}", f"run.name={name}", f"run.resume={resume}", "run.progress=false",
            "run.tensorboard=false", *extra, f"train.steps={steps}", "train.save_every=1", "train.keep_checkpoints=10",
            "train.grid_every=0", "train.max_minutes=0", "eval.benchmark=", f"ray.temp_dir={ray_tmp}",
            "resources.rollout_threads=1", "resources.learner_threads=1", "ray.num_cpus=3"]


def kill_cluster(ray_tmp: str) -> None:
    """Stop what is left of the Ray cluster that ``ray_tmp`` names (only that one)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if ray_tmp.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def weights(ckpt: Path) -> dict:
    from rlgen.models import load_model

    return {n: p.detach().clone() for n, p in load_model(ckpt).named_parameters()}


@pytest.mark.slow  # three short Ray jobs per case
@pytest.mark.parametrize("job", ["flow_grpo", "mdm_grpo", "diffusion_dpo", "reinforce", "flow_opd", "mdm_opd", "vrpo"])
def test_sigkill_during_a_checkpoint_write_then_resume_matches_an_uninterrupted_run(tmp_path, job):
    models = {"flow": tiny_flow_policy(tmp_path / "tiny"), "lm": tmp_path / "lm", "teacher": tmp_path / "teacher"}
    save_tiny_lm(models["lm"], max_length=16)
    save_tiny_lm(models["teacher"], seed=1, max_length=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ray_tmp = tempfile.mkdtemp(prefix="rlk_")
    try:
        # 1. crash: wait until the driver is writing checkpoint 2 (its temp folder exists), then kill -9
        proc = subprocess.Popen([sys.executable, "train_rl.py", *args(tmp_path, models, "crash", job, ray_tmp)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpts = tmp_path / "crash" / "checkpoints"
        deadline = time.time() + 600
        while not (ckpts.is_dir() and any(p.name.startswith(".tmp-2-") for p in ckpts.iterdir())):
            assert proc.poll() is None and time.time() < deadline, "the run ended before checkpoint 2"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_cluster(ray_tmp)
        latest = find_latest_checkpoint(tmp_path / "crash")
        assert latest is not None and latest.name == "1"  # the half-written 2 is never "latest"

        import train_rl

        # 2. resume to the end; 3. the same job, never interrupted
        assert train_rl.main(args(tmp_path, models, "crash", job, ray_tmp, resume="auto")) == 0
        assert train_rl.main(args(tmp_path, models, "straight", job, ray_tmp)) == 0
    finally:
        kill_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == [0, 1, 2, 3, 4]
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())  # the partial write was cleaned up
    a, b = weights(ckpts / "4"), weights(tmp_path / "straight" / "checkpoints" / "4")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert max((a[k] - weights(ckpts / "0")[k]).abs().max().item() for k in a) > 0  # it did train
