"""train.ema end to end through ``train_rl.py`` (its own module: the job starts and stops its own
local Ray cluster, so no other module's cluster may be up)."""
import pytest

from tests.runtime.test_ema import BENCH, probe

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# end to end through train_rl.py (the quickstart recipe: LoRA, so the EMA averages the adapter)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_job_evaluates_and_saves_the_ema_rollouts_stay_raw_and_it_resumes(tmp_path):
    import train_rl
    from rlgen.models import load_model
    from rlgen.runtime.rundir import read_metrics
    from tests.runtime.test_jobs_e2e import COMMON, IMAGE
    from tests_helpers import tiny_flow_policy

    flow = tiny_flow_policy(tmp_path / "flow")
    base = ["--config", "configs/quickstart.yaml", f"policy.checkpoint={flow}", f"run.root={tmp_path}", *COMMON,
            *IMAGE, "rewards={'rewards.examples:brightness': 1.0}", f"eval.benchmark={BENCH}", "eval.every=1",
            "train.grid_every=0", "optim.lr=0.01"]
    ema = [*base, "run.name=ema", "train.ema.decay=0.9"]
    assert train_rl.main([*ema, "train.steps=2"]) == 0
    assert train_rl.main([*base, "run.name=raw", "train.steps=2"]) == 0  # the same run without the EMA
    a, b = read_metrics(tmp_path / "ema"), read_metrics(tmp_path / "raw")
    ckpt = tmp_path / "ema" / "checkpoints"
    for step in (0, 1, 2):  # each evaluation saw the EMA the checkpoint's policy folder holds
        assert a[step]["eval/probe"] == pytest.approx(probe(load_model(ckpt / str(step))), rel=1e-6)
    raw2 = probe(load_model(tmp_path / "raw" / "checkpoints" / "2"))
    assert b[2]["eval/probe"] == pytest.approx(raw2, rel=1e-6)
    assert abs(a[2]["eval/probe"] - raw2) > 1e-4 * abs(raw2)  # the EMA is not the raw policy (100x the tolerance)
    # step 2's rollouts came after an EMA evaluation on worker 0, yet they are the raw run's
    for key in ("reward_mean", "loss", "grad_norm"):
        assert a[2][key] == b[2][key], key
    assert train_rl.main([*ema, "train.steps=3", "run.resume=auto"]) == 0
    a = read_metrics(tmp_path / "ema")
    assert [r["step"] for r in a] == [0, 1, 2, 3]
    assert a[3]["eval/probe"] == pytest.approx(probe(load_model(ckpt / "3")), rel=1e-6)
