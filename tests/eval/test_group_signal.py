"""scripts/group_signal.py: group statistics by hand, and the estimator comparison on a tiny model."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rlgen.data.tokenizer import build_tokenizer
from rlgen.models.masked_lm import MaskedDiffusionLM

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("group_signal", ROOT / "scripts" / "group_signal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_group_stats_by_hand():
    # group 0: one correct of three (mixed, passes); group 1: all wrong, equal (uniform);
    # group 2: partial credits only (mixed, no pass)
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.2]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    s = _script().group_stats(rewards, groups)
    assert s["mean"] == pytest.approx(1.8 / 9)
    assert s["pass@G"] == pytest.approx(1 / 3)
    assert s["mixed"] == pytest.approx(2 / 3)


def test_trajectory_estimator_matches_the_sampler(tmp_path, capsys):
    """End to end on a tiny random model: the trajectory replay is the sampler's own log-prob (gap 0,
    correlation 1), so the comparison measures each estimator against the policy that sampled."""
    torch.manual_seed(0)
    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_length=24).save_pretrained(tmp_path)
    rc = _script().main(["--config", str(ROOT / "configs/rl/mdm_grpo_countdown.yaml"), "--steps", "1", "--json",
                         "--estimators", "trajectory,d1", f"policy.checkpoint={tmp_path}", "prompts.per_step=4",
                         "prompts.group_size=4"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["groups"] == 4 and res["G"] == 4
    assert res["estimators"]["trajectory"]["token_gap"] < 1e-4
    assert res["estimators"]["trajectory"]["corr_with_exact"] == pytest.approx(1.0, abs=1e-4)
    assert set(res["estimators"]) == {"trajectory", "d1"}
