"""End to end: train_rl.py runs Diffusion-DPO (DeepSpeed engine, pairs built on the fly) and VRPO
(torch engine, a hand-written pairs file) for 2 steps on tiny models, then resumes for one more;
the run folder holds what DESIGN.md promises."""
import json

import pytest
import torch

from rlgen.runtime.rundir import read_metrics
from tests_helpers import tiny_flow_policy

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["run.progress=false", "run.tensorboard=false", "run.device=cpu", "learner.micro_batch_size=2",
          "train.pairs_per_step=4", "train.save_every=1"]


def check_run(run, steps):
    from rlgen.models import load_model

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for key in ("loss", "implicit_acc", "reward_margin", "grad_norm", "time_learn"):
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").resolve().name == str(steps)
    assert (run / "config.yaml").is_file() and "## Preference training" in (run / "report.md").read_text()
    start, end = load_model(ckpts / "0"), load_model(ckpts / str(steps))  # each loads on its own
    assert max((a - b).abs().max().item() for a, b in zip(start.parameters(), end.parameters())) > 0
    return rows


def test_diffusion_dpo_two_steps_then_resume(tmp_path):
    import train_rl

    policy = tiny_flow_policy(tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na red square\n")
    args = ["--config", "configs/dpo/diffusion_dpo_shapes.yaml", f"run.root={tmp_path}", "run.name=dpo",
            f"policy.checkpoint={policy}", f"pairs.path={tmp_path}/pairs/pairs.jsonl",
            "pairs.build.rewards={'rewards.examples:brightness': 1.0}", f"pairs.build.prompts={prompts}",
            "pairs.build.samples_per_prompt=3", "pairs.build.num_steps=2",
            "pairs.build.strategy=best_worst", "pairs.build.margin=0", "train.engine=deepspeed",
            "eval.every=2", "eval.prompts_per_task=1", "eval.samples_per_prompt=1", "eval.num_steps=2", *COMMON]
    assert train_rl.main([*args, "train.steps=2"]) == 0
    assert (tmp_path / "pairs" / "contact_sheet.png").is_file()
    rows = check_run(tmp_path / "dpo", 2)
    assert rows[0]["pairs"] == 4
    assert list((tmp_path / "dpo" / "samples").glob("eval_*.png"))
    assert train_rl.main([*args, "train.steps=3", "run.resume=auto"]) == 0
    check_run(tmp_path / "dpo", 3)
    state = json.loads((tmp_path / "dpo" / "checkpoints" / "3" / "driver_state.json").read_text())
    assert state["step"] == 3


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


def test_vrpo_two_steps_then_resume(tmp_path):
    import train_rl
    from rlgen.data.tokenizer import build_tokenizer
    from rlgen.models.masked_lm import MaskedDiffusionLM

    torch.manual_seed(0)
    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64).save_pretrained(tmp_path / "lm")
    pairs = arith_pairs(tmp_path / "pairs.jsonl")
    args = ["--config", "configs/dpo/vrpo_arith.yaml", f"run.root={tmp_path}", "run.name=vrpo",
            f"policy.checkpoint={tmp_path / 'lm'}", f"pairs.path={pairs}", "pairs.on_error=skip",
            "train.engine=torch", "algo.n_samples=2", "eval.every=2", "eval.n_per_level=2", *COMMON]
    assert train_rl.main([*args, "train.steps=2"]) == 0
    rows = check_run(tmp_path / "vrpo", 2)
    assert rows[0]["pairs"] == 6 and rows[0]["pairs_skipped"] == 1  # the malformed last line
    assert train_rl.main([*args, "train.steps=3", "run.resume=auto"]) == 0
    check_run(tmp_path / "vrpo", 3)


def test_strict_pairs_error_names_the_row(tmp_path):
    from rlgen.data.pairs import PairFormatError
    from rlgen.runtime.preference import PreferenceTrainer, VRPOJobConfig

    cfg = VRPOJobConfig()
    cfg.run.root, cfg.run.name, cfg.run.progress = str(tmp_path), "bad", False
    cfg.pairs.path = str(arith_pairs(tmp_path / "pairs.jsonl"))
    from rlgen.data.tokenizer import build_tokenizer
    from rlgen.models.masked_lm import MaskedDiffusionLM

    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64).save_pretrained(tmp_path / "lm")
    cfg.policy.checkpoint = str(tmp_path / "lm")
    with pytest.raises(PairFormatError, match="row 7: invalid JSON"):
        PreferenceTrainer(cfg).fit()
