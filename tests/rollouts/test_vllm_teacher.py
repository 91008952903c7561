"""The autoregressive teacher of text OPD on vLLM: a tiny Llama sharing the masked-diffusion
student's character tokenizer scores the student's tokens exactly as transformers does; a text
OPD run with it trains end to end."""
import pytest
import torch

import rlgen  # noqa: F401
from rlgen.data.tokenizer import build_tokenizer
from rlgen.models.masked_lm import MaskedDiffusionLM
from rollouts.testing import build_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("opd_vllm")
    torch.manual_seed(0)
    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_length=16).save_pretrained(d / "student")
    return d / "student", build_tiny_llama(d / "ar_teacher", seed=3, tokenizer=build_tokenizer())


def test_vllm_teacher_scores_student_tokens_like_transformers(models):
    from transformers import AutoModelForCausalLM

    from rlgen.models import load_model
    from rollouts.vllm_engine import VLLMTeacher

    student = load_model(models[0])
    teacher = VLLMTeacher(str(models[1]))
    teacher.check_vocab(len(student.tokenizer.get_vocab()))
    try:
        tok = student.tokenizer
        rows = [tok.encode("12+34=") + tok.encode("64") + [tok.eos_token_id], tok.encode("07-05=") + tok.encode("200")]
        P = 6
        tokens = torch.tensor(rows)  # (2, 9)
        got = teacher.token_logprobs(tokens, P)  # (2, 3)
        hf = AutoModelForCausalLM.from_pretrained(models[1], dtype=torch.float32).eval()
        with torch.no_grad():
            lp = hf(tokens).logits.log_softmax(-1)  # (2, 9, V): position t predicts token t+1
        want = torch.stack([lp[:, P - 1 + k].gather(1, tokens[:, P + k, None])[:, 0] for k in range(3)], dim=1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    finally:
        teacher.close()


@pytest.mark.slow
def test_text_opd_with_a_vllm_teacher_runs(tmp_path, models):
    import train_rl
    from rlgen.runtime.rundir import read_metrics

    args = ["--config", "configs/opd/mdm_opd_arith.yaml", f"run.root={tmp_path}", "run.name=v",
            f"policy.checkpoint={models[0]}", f"algo.teacher={models[1]}", "algo.teacher_kind=vllm",
            "run.tensorboard=false", "run.progress=false", "prompts.per_step=4", "prompts.group_size=2",
            "train.steps=2", "train.max_minutes=0", "eval.every=2", "eval.options={n_per_level: 4}", "eval.pass_k=0",
            "resources.rollout_threads=1", "resources.learner_threads=1"]
    assert train_rl.main(args) == 0
    rows = read_metrics(tmp_path / "v")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["distill_kl"] != 0
