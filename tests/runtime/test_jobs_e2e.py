"""End to end through ``train_rl.py``: every registered algorithm runs 2 steps on a tiny model on the
one runtime (a local Ray cluster, rollout/reward workers, a DeepSpeed learner), then resumes for one
more; the run folder holds what DESIGN.md promises."""
import json

import pytest
import torch

import train_rl
from rlgen.runtime.rundir import read_metrics
from tests.runtime.tiny import save_tiny_lm
from tests_helpers import tiny_flow_policy

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["run.progress=false", "run.tensorboard=false", "run.device=cpu", "train.save_every=1", "train.max_minutes=0",
          "resources.rollout_threads=1", "resources.learner_threads=1", "ray.num_cpus=3"]
IMAGE = ["prompts.per_step=2", "prompts.group_size=4", "rollout.num_steps=4", "rollout.sde_window=0",
         "rollout.batch_size=8", "learner.micro_batch_size=4", "train.grid_every=1", "eval.every=2",
         "eval.samples_per_prompt=1", "eval.options={prompts_per_task: 1, steps: 4}"]
TEXT = ["prompts.per_step=4", "prompts.group_size=4", "eval.every=1", "eval.options={n_per_level: 4}",
        "eval.pass_k=2", "train.grid_every=1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    flow = tiny_flow_policy(root / "flow")
    save_tiny_lm(root / "lm", max_length=16)
    save_tiny_lm(root / "lm_teacher", seed=1, max_length=16)
    return {"flow": flow, "lm": root / "lm", "teacher": root / "lm_teacher"}


def arith_pairs(path):
    from rewards.text_verifiers import format_arith_answer

    rows = []
    for a, b in ((12, 34), (20, 15), (7, 8), (45, 11), (3, 9), (60, 21)):
        expr = f"{a:02d}+{b:02d}"
        good = format_arith_answer(expr)
        bad = good[:-1] + str((int(good[-1]) + 1) % 10)
        rows.append({"prompt": expr + "=", "chosen": good, "rejected": bad,
                     "meta": {"problem": {"task": "arith", "expression": expr}}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    return path


def job_args(name: str, tmp_path, models) -> list[str]:
    flow, lm = f"policy.checkpoint={models['flow']}", f"policy.checkpoint={models['lm']}"
    if name in ("flow_grpo", "reinforce", "flow_opd"):
        config = {"flow_grpo": "configs/rl/flow_grpo_shapes.yaml", "reinforce": "configs/rl/reinforce_shapes.yaml",
                  "flow_opd": "configs/opd/flow_opd_shapes.yaml"}[name]
        extra = [f"algo.teacher={models['flow']}", "algo.teacher_cfg_scale=2.0", "algo.num_minibatches=1",
                 "algo.timestep_fraction=0.5"] if name == "flow_opd" else []
        return [config, flow, "rewards={'rewards.examples:brightness': 1.0}", *IMAGE, *extra]
    if name == "diffusion_dpo":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red circle\na blue square\na green triangle\na red square\n")
        return ["configs/dpo/diffusion_dpo_shapes.yaml", flow, f"pairs.path={tmp_path}/pairs/pairs.jsonl",
                "pairs.build.rewards={'rewards.examples:brightness': 1.0}", f"pairs.build.prompts={prompts}",
                "pairs.build.samples_per_prompt=3", "pairs.build.num_steps=2", "pairs.build.margin=0",
                "pairs.per_step=4", "pairs.batch=2", "learner.micro_batch_size=2", "eval.every=2",
                "eval.samples_per_prompt=1", "eval.options={prompts_per_task: 1, steps: 2}"]
    if name == "vrpo":
        return ["configs/dpo/vrpo_arith.yaml", lm, f"pairs.path={arith_pairs(tmp_path / 'pairs.jsonl')}",
                "pairs.on_error=skip", "pairs.per_step=4", "pairs.batch=2", "algo.n_samples=2", "eval.every=2",
                "eval.options={n_per_level: 4}"]
    if name == "mdm_grpo":  # partial credit: a random model still gets mixed groups; two rollout workers
        return ["configs/rl/mdm_grpo_arith.yaml", lm, "rewards={arith_partial: 1.0}", "algo.estimator=coupled",
                "resources.rollout_workers=2", *TEXT]
    if name in ("wd1", "spg"):  # the masked-LM algorithms beside mdm_grpo (rlgen/algos/wd1.py, spg.py)
        return [f"configs/rl/{name}_arith.yaml", lm, "rewards={arith_partial: 1.0}", *TEXT]
    assert name == "mdm_opd"
    return ["configs/opd/mdm_opd_arith.yaml", lm, f"algo.teacher={models['teacher']}", *TEXT]


def check_run(run, steps: int, online: bool):
    from rlgen.models import load_model

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for key in (("reward_mean", "time_rollout") if online else ("implicit_acc",)) + ("loss", "grad_norm", "time_learn"):
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").resolve().name == str(steps)
    assert (run / "config.yaml").is_file() and (run / "report.md").is_file() and (run / "placement.json").is_file()
    assert list((run / "samples").glob("eval_*"))
    start, end = load_model(ckpts / "0"), load_model(ckpts / str(steps))  # each loads on its own
    assert max((a - b).abs().max().item() for a, b in zip(start.parameters(), end.parameters())) > 0
    return rows


# one online image job, one online text job and one offline job in the default suite; the rest are slow
@pytest.mark.parametrize("name", ["flow_grpo", "vrpo", "mdm_grpo",
                                  *(pytest.param(n, marks=pytest.mark.slow)
                                    for n in ("reinforce", "flow_opd", "diffusion_dpo", "mdm_opd", "wd1", "spg"))])
def test_two_steps_then_resume(name, tmp_path, models, capsys):
    import ray

    config, *extra = job_args(name, tmp_path, models)
    base = ["--config", config, f"run.root={tmp_path}", f"run.name={name}", *COMMON, *extra]
    assert train_rl.main([*base, "train.steps=2"]) == 0
    assert not ray.is_initialized()  # the job stopped the local cluster it started
    assert "held-out accuracy" in capsys.readouterr().out
    online = name not in ("diffusion_dpo", "vrpo")
    rows = check_run(tmp_path / name, 2, online)
    if name in ("flow_opd", "mdm_opd"):
        assert "eval/teacher_accuracy" in rows[0] and "distill_kl" in rows[1]
        assert "Teacher–student gap" in (tmp_path / name / "report.md").read_text()
    if name == "mdm_grpo":
        assert rows[1]["kept_frac"] > 0 and "eval/pass_at_2" in rows[0] and "eval/pm2" in rows[1]
    assert train_rl.main([*base, "train.steps=3", "run.resume=auto"]) == 0
    check_run(tmp_path / name, 3, online)
    state = json.loads((tmp_path / name / "checkpoints" / "3" / "driver_state.json").read_text())
    assert state["step"] == 3 and state["algo"] == name


def test_unknown_key_is_a_clear_error(capsys):
    assert train_rl.main(["--config", "configs/rl/flow_grpo_shapes.yaml", "algo.clip_rnage=0.1"]) == 2
    err = capsys.readouterr().err
    assert "algo.clip_rnage" in err and "override 'algo.clip_rnage=0.1'" in err


def test_prompt_outside_the_grammar_is_refused_before_the_run_folder_changes(tmp_path, models, capsys):
    run = tmp_path / "e2e"
    run.mkdir()
    (run / "config.yaml").write_text("# an earlier run's resolved config\n")
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    config, *extra = job_args("flow_grpo", tmp_path, models)
    assert train_rl.main(["--config", config, f"run.root={tmp_path}", "run.name=e2e", *COMMON, *extra,
                          "prompts.source=file", f"prompts.file={prompts}", "rewards={shapes_verifier: 1.0}"]) == 2
    assert "prompts.txt:2" in capsys.readouterr().err
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")} == before
    torch.set_num_threads(1)
