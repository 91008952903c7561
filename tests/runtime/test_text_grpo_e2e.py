"""train_rl.py with kind mdm_grpo: a 2-iteration run end to end on a tiny model, then a resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

import rlgen  # noqa: F401
from rlgen.data.tokenizer import build_tokenizer
from rlgen.models.masked_lm import MaskedDiffusionLM
from rlgen.runtime.rundir import read_metrics

import train_rl

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = "configs/rl/mdm_grpo_arith.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_length=16).save_pretrained(d)
    return d


def _args(tmp_path, base, *extra):
    return ["--config", CONFIG, f"run.root={tmp_path}", "run.name=t", f"policy.checkpoint={base}",
            "run.tensorboard=false", "run.progress=false", "problems.per_iteration=4", "problems.group_size=4",
            "rewards={arith_partial: 1.0}",  # partial credit: a random model still gets mixed groups
            "train.iterations=2", "train.max_minutes=0", "eval.every=1", "eval.n_per_level=4", "eval.pass_k=2",
            *extra]


def test_two_iterations_then_resume(tmp_path, base, capsys):
    assert train_rl.main(_args(tmp_path, base, "algo.estimator=coupled")) == 0
    run = tmp_path / "t"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["kept_frac"] > 0 and "loss" in rows[1] and "clip_frac" in rows[1]
    assert "eval/pass_at_2" in rows[0] and "eval/pass_at_2" in rows[2] and "eval/pm2" in rows[1]
    assert (run / "checkpoints" / "0" / "model.safetensors").is_file()
    w0, w2 = (load_file(run / "checkpoints" / s / "model.safetensors") for s in ("0", "2"))
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)  # the policy moved
    assert (run / "report.md").is_file() and (run / "report" / "eval_accuracy.png").is_file()
    assert "held-out accuracy" in capsys.readouterr().out

    assert train_rl.main(_args(tmp_path, base, "algo.estimator=trajectory", "train.iterations=3",
                               "run.resume=auto")) == 0
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    state = json.loads((run / "checkpoints" / "3" / "rlgen_model.json").read_text())
    assert state["model_type"] == "masked_lm"


def test_rollouts_in_two_ray_workers_then_resume(tmp_path, base):
    """rollout.workers=2: problems are sharded over TextRolloutWorker actors, rewards scored on the
    driver, weights synced after every update (a stale worker would fail the version check)."""
    import ray

    extra = ("rollout.workers=2", "rollout.worker_cpus=1", "ray.num_cpus=2")
    assert train_rl.main(_args(tmp_path, base, *extra)) == 0
    assert not ray.is_initialized()  # the job stopped the local cluster it started
    run = tmp_path / "t"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # 4 problems × 4 samples, all scored (rewards come back for every shard's rows)
    assert rows[1]["kept_frac"] > 0 and "time_sync" in rows[1] and rows[1]["reward_mean"] == rows[1]["reward_mean"]
    w0, w2 = (load_file(run / "checkpoints" / s / "model.safetensors") for s in ("0", "2"))
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)
    assert train_rl.main(_args(tmp_path, base, *extra, "train.iterations=3", "run.resume=auto")) == 0
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
