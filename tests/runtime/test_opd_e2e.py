"""train_rl.py with kind flow_opd (Ray rollout/reward workers + DeepSpeed learner, teacher on the
learner) and kind mdm_opd (in-process), each for 2 iterations on tiny models; the student moves
toward its teacher; a teacher with another tokenizer is refused before training."""
import pytest
import torch
from safetensors.torch import load_file

import rlgen  # noqa: F401
import train_rl
from rlgen.data.tokenizer import build_tokenizer
from rlgen.models.masked_lm import MaskedDiffusionLM
from rlgen.runtime.rundir import read_metrics
from tests_helpers import tiny_flow_policy


def tiny_mdm(path, seed, charset=None):
    torch.manual_seed(seed)
    tok = build_tokenizer() if charset is None else build_tokenizer(charset)
    MaskedDiffusionLM.tiny(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_length=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mdm_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("mdm")
    return tiny_mdm(d / "student", 0), tiny_mdm(d / "teacher", 1)


def _text_args(tmp_path, student, teacher, *extra):
    return ["--config", "configs/opd/mdm_opd_arith.yaml", f"run.root={tmp_path}", "run.name=t",
            f"policy.checkpoint={student}", f"algo.teacher={teacher}", "run.tensorboard=false", "run.progress=false",
            "problems.per_iteration=4", "problems.group_size=2", "train.iterations=2", "train.max_minutes=0",
            "eval.every=1", "eval.n_per_level=4", "eval.pass_k=0", "optim.lr=3e-3", *extra]


@pytest.mark.usefixtures("one_thread")
def test_text_opd_two_iterations_then_resume(tmp_path, mdm_pair):
    student, teacher = mdm_pair
    assert train_rl.main(_text_args(tmp_path, student, teacher)) == 0
    run = tmp_path / "t"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["distill_kl"] > 0 and "reward_mean" in rows[1]
    assert "eval/teacher_accuracy" in rows[0]
    report = (run / "report.md").read_text()
    assert "on-policy distillation" in report and "gap closed" in report
    w0, w2 = (load_file(run / "checkpoints" / s / "model.safetensors") for s in ("0", "2"))
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)
    assert train_rl.main(_text_args(tmp_path, student, teacher, "train.iterations=3", "run.resume=auto",
                                    "algo.states=final", "algo.reward_weight=0.5")) == 0
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]


@pytest.mark.usefixtures("one_thread")
def test_text_opd_lowers_the_kl_to_its_teacher(tmp_path, mdm_pair):
    """Repeated updates on one iteration's rollouts pull the student's distributions to the teacher's."""
    from rlgen.config import load_config
    from rlgen.runtime.opd import TextOPDTrainer
    from rollouts.text import text_rollout

    student, teacher = mdm_pair
    cfg = load_config("configs/opd/mdm_opd_arith.yaml", _text_args(tmp_path, student, teacher)[2:])
    tr = TextOPDTrainer(cfg)
    batches = text_rollout(tr.policy, tr._problems(1), cfg.rollout, 2, tr._reward, torch.Generator().manual_seed(0))
    kls = [tr._learn(batches, 1)["distill_kl"] for _ in range(20)]
    assert kls[-1] < 0.5 * kls[0]


def test_teacher_with_another_tokenizer_is_refused(tmp_path, mdm_pair):
    other = tiny_mdm(tmp_path / "other", 2, charset="0123456789+-*=,:()x ")
    with pytest.raises(ValueError, match="tokenizer"):
        train_rl.main(_text_args(tmp_path, mdm_pair[0], other))


def test_image_opd_two_iterations_on_the_ray_runtime(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow")
    student = tiny_flow_policy(d / "student")
    teacher = tiny_flow_policy(d / "teacher")  # same weights: at CFG 3 its steps still differ from CFG 1
    root = tmp_path_factory.mktemp("runs")
    args = ["--config", "configs/opd/flow_opd_shapes.yaml", f"run.root={root}", "run.name=e2e", "run.progress=false",
            "run.tensorboard=false", f"policy.checkpoint={student}", f"algo.teacher={teacher}",
            "algo.teacher_cfg_scale=3.0", "resources.rollout_threads=1", "resources.learner_threads=1",
            "prompts.per_iteration=2", "prompts.group_size=4", "rollout.num_steps=4", "rollout.sde_window=2",
            "rollout.batch_size=8", "learner.micro_batch_size=4", "learner.num_minibatches=2", "train.iterations=2",
            "train.save_every=1", "train.grid_every=0", "eval.every=2", "eval.prompts_per_task=1",
            "eval.samples_per_prompt=1", "eval.num_steps=4"]
    assert train_rl.main(args) == 0
    rows = read_metrics(root / "e2e")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["distill_kl"] > 0 and "policy_loss" not in rows[1]  # pure distillation
    assert 0 <= rows[0]["eval/teacher_accuracy"] <= 1
    assert "gap closed" in (root / "e2e" / "report.md").read_text()
    from rlgen.models import load_model

    start, end = load_model(root / "e2e" / "checkpoints" / "0"), load_model(root / "e2e" / "checkpoints" / "2")
    assert max((a - b).abs().max().item() for a, b in zip(start.parameters(), end.parameters())) > 0
