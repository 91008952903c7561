"""End to end: train_rl.py runs Flow-GRPO for 2 iterations on a tiny policy on a local Ray cluster,
then resumes for one more; the run folder holds what DESIGN.md promises."""
import json

import pytest

from rlgen.runtime.rundir import read_metrics
from tests_helpers import tiny_flow_policy


def overrides(tmp_path, policy, iterations):
    return [f"run.root={tmp_path}", "run.name=e2e", "run.progress=false", "run.tensorboard=false",
            f"policy.checkpoint={policy}", "rewards={'rewards.examples:brightness': 1.0}",
            "prompts.per_iteration=2", "prompts.group_size=4", "rollout.num_steps=4", "rollout.batch_size=8",
            "learner.micro_batch_size=4", "learner.timestep_fraction=0.5", f"train.iterations={iterations}",
            "train.save_every=1", "train.grid_every=1", "eval.every=2", "eval.prompts_per_task=1",
            "eval.samples_per_prompt=1", "eval.num_steps=4"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_flow_policy(tmp_path_factory.mktemp("policy") / "tiny")


def test_two_iterations_then_resume(tmp_path, policy_dir):
    import train_rl

    assert train_rl.main(["--config", "configs/rl/flow_grpo_shapes.yaml", *overrides(tmp_path, policy_dir, 2)]) == 0
    run = tmp_path / "e2e"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward_mean", "reward_std", "loss", "kl", "clip_frac", "time_rollout", "time_learn"):
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    ckpts = run / "checkpoints"
    assert (ckpts / "0" / "rlgen_model.json").is_file()  # the starting policy is saved
    assert (ckpts / "latest").resolve().name == "2"
    assert (run / "config.yaml").is_file() and (run / "report.md").is_file()
    assert list((run / "samples").glob("eval_*.png")) and list((run / "samples").glob("train_*.png"))
    # the published policy loads on its own and differs from the start (an update happened)
    from rlgen.models import load_model

    start, end = load_model(ckpts / "0"), load_model(ckpts / "2")
    diff = max((a - b).abs().max().item() for a, b in zip(start.parameters(), end.parameters()))
    assert diff > 0

    # resume: one more iteration continues the log without a gap or duplicate
    assert train_rl.main(["--config", "configs/rl/flow_grpo_shapes.yaml", *overrides(tmp_path, policy_dir, 3),
                          "run.resume=auto"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    state = json.loads((ckpts / "3" / "driver_state.json").read_text())
    assert state["iteration"] == 3


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    import train_rl

    assert train_rl.main(["--config", "configs/rl/flow_grpo_shapes.yaml", "algo.clip_rnage=0.1"]) == 2
    err = capsys.readouterr().err
    assert "algo.clip_rnage" in err and "flow_grpo_shapes.yaml" in err


def test_prompt_outside_the_grammar_is_refused_before_the_run_folder_changes(tmp_path, policy_dir):
    import train_rl
    from rlgen.data.shapes import PromptError

    run = tmp_path / "e2e"
    run.mkdir()
    (run / "config.yaml").write_text("kind: flow_grpo\n# an earlier run's resolved config\n")
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    args = [*overrides(tmp_path, policy_dir, 1), "prompts.source=file", f"prompts.file={prompts}",
            "rewards={shapes_verifier: 1.0}"]
    with pytest.raises(PromptError, match=r"prompts\.txt:2: .*a photo of a cat"):
        train_rl.main(["--config", "configs/rl/flow_grpo_shapes.yaml", *args])
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")} == before
