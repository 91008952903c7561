"""DiffusionGemma as an on-policy distillation teacher (``algo.teacher_kind=sequence``): a student on the
same tokenizer samples, the teacher scores each sampled answer canvas by canvas given the clean prefix
(its own ``token_logprobs``), and the update's distillation signal is the per-answer log-probability gap
computed here from the two models directly."""
import pytest
import torch

import rlgen  # noqa: F401

from rlgen.algos.mdm_grpo import MDMGRPOConfig, banned_ids, make_plan, plan_logprobs
from rlgen.algos.opd import MDMOPD, MDMOPDConfig
from rlgen.families import LoraSpec, family_of
from rlgen.models import load_model
from rlgen.runtime.engine import OptimConfig, TorchEngine
from rlgen.testing.tiny_lms import CHATML_TEMPLATE, build_bpe_tokenizer, build_tiny_diffusion_gemma, build_tiny_llada2
from tests.algos.engines import context
from tests.runtime.tiny import text_rollout_batch

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS = [{"prompt": "What is 1 + 2?", "gen_length": 10}, {"prompt": "Add 30 and 12, please.", "gen_length": 10}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dg_opd")
    tok = build_bpe_tokenizer(["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"], mask="<|mask|>",
                              chat_template=CHATML_TEMPLATE)
    student = load_model(build_tiny_llada2(root / "student", tokenizer=tok, init_std=0.5), trust_remote_code=True)
    teacher_dir = build_tiny_diffusion_gemma(root / "teacher", tokenizer=tok)
    return student, load_model(teacher_dir), teacher_dir


def test_update_distills_the_answer_level_gap_to_diffusion_gemma(pair):
    student, teacher, teacher_dir = pair
    torch.manual_seed(0)
    family_of(student).add_lora(student, LoraSpec(rank=4))
    batch = text_rollout_batch(student, ITEMS, group_size=3)
    gaps = []
    with torch.no_grad():
        for b in batch.buckets:
            P = b.prompt_length
            plan = make_plan(MDMGRPOConfig(estimator="trajectory"), b.tokens, b.order, P, student.mask_id)
            s_lp = plan_logprobs(student, plan, b.tokens, banned_ids(student))  # (b, G) at each decision state
            t_lp = teacher.token_logprobs(b.tokens[:, :P], b.tokens[:, P:])
            m = (b.order >= 0).float()
            gaps.append(((s_lp - t_lp) * m).sum(1))
    want = torch.cat(gaps).mean().item()
    algo = MDMOPD(MDMOPDConfig(teacher=str(teacher_dir), teacher_kind="sequence"))
    ctx = context(student, TorchEngine(student, OptimConfig(lr=1e-2)), teacher=teacher, lora=True)
    algo.setup(ctx)
    before = [p.detach().clone() for p in student.parameters() if p.requires_grad]
    metrics = algo.update(ctx, batch)
    assert metrics["distill_kl"] == pytest.approx(want, rel=1e-4)
    assert any(not torch.equal(a, p) for a, p in zip(before, (p for p in student.parameters() if p.requires_grad)))


def test_a_teacher_without_answer_scores_or_on_another_tokenizer_is_refused(pair, tmp_path):
    student, _, _ = pair
    other = load_model(build_tiny_diffusion_gemma(tmp_path / "other"))  # its own BPE
    algo = MDMOPD(MDMOPDConfig(teacher="t", teacher_kind="sequence"))
    with pytest.raises(ValueError, match="teacher_kind=sequence needs a model with token_logprobs"):
        algo.setup(context(student, None, teacher=other))
