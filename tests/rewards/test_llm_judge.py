"""LLM-judge reward on a tiny Llama served by vLLM: p(yes)/(p(yes)+p(no)) equals transformers'."""
import math

import pytest
import torch

from rewards.llm_judge import DEFAULT_TEMPLATE, LLMJudgeReward
from rlgen.registry import REWARDS
from rollouts.testing import build_tiny_llama

TOL = 1e-4
PROMPTS = ["a red circle", "two blue squares", "the sum of two and three", "a green triangle"]
SAMPLES = ["a red circle is good", "no", "five", "square square square dog cat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("judge") / "llama", seed=0)


@pytest.fixture(scope="module")
def judge(model_dir):
    j = LLMJudgeReward(model_dir, max_prompt_tokens=256)
    yield j
    j.close()


@pytest.fixture(scope="module")
def hf_yes_prob(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    yes, no = tok.encode(" yes"), tok.encode(" no")
    assert len(yes) == len(no) == 1

    @torch.no_grad()
    def f(ids: list[int]) -> float:
        lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        return (lp[yes[0]].exp() / (lp[yes[0]].exp() + lp[no[0]].exp())).item()

    f.tokenizer = tok
    return f


def test_registered():
    assert REWARDS.get("llm_judge") is LLMJudgeReward


def test_yes_probability_matches_transformers(judge, hf_yes_prob):
    got = judge(SAMPLES, PROMPTS)
    assert len(got) == len(PROMPTS) and all(0.0 < g < 1.0 for g in got)
    for p, s, g in zip(PROMPTS, SAMPLES, got):
        ids = hf_yes_prob.tokenizer.encode(DEFAULT_TEMPLATE.format(prompt=p, sample=s))
        assert judge.render(p, s) == ids
        assert math.isclose(g, hf_yes_prob(ids), abs_tol=TOL), (p, s, g, hf_yes_prob(ids))


def test_tokens_outside_top_k_are_scored_explicitly(judge, hf_yes_prob):
    # top_k=1: the judge's tiny random model rarely ranks " yes" or " no" first, so (nearly) every
    # item takes the explicit-scoring path; the result must not change.
    narrow = LLMJudgeReward(engine=judge.engine, top_k=1, max_prompt_tokens=256)
    ids = [narrow.render(p, s) for p, s in zip(PROMPTS, SAMPLES)]
    tops = judge.engine.next_token_logprobs(ids, top_k=1)
    assert any(narrow.yes_id not in t or narrow.no_id not in t for t in tops)
    got = narrow(SAMPLES, PROMPTS)
    assert got == pytest.approx(judge(SAMPLES, PROMPTS), abs=TOL)
    assert got == pytest.approx([hf_yes_prob(i) for i in ids], abs=TOL)


def test_yes_no_must_be_single_tokens(judge):
    with pytest.raises(ValueError, match="must be exactly one"):
        LLMJudgeReward(engine=judge.engine, yes_token=" yesterday-ish")
    with pytest.raises(ValueError, match="same token"):
        LLMJudgeReward(engine=judge.engine, yes_token=" no")
    with pytest.raises(ValueError, match=r"\{sample\}"):
        LLMJudgeReward(engine=judge.engine, template="Prompt: {prompt} Answer:")


def test_long_inputs_are_cut_to_max_prompt_tokens(judge, hf_yes_prob):
    short = LLMJudgeReward(engine=judge.engine, max_prompt_tokens=48)
    tail = hf_yes_prob.tokenizer.encode("\nAnswer:")
    long_sample = " ".join(["red blue green circle"] * 40)
    for prompt, sample in [("a red circle", long_sample), (long_sample, "yes")]:
        ids = short.render(prompt, sample)
        assert len(ids) <= 48 and ids[-len(tail):] == tail  # the question's end is never cut
    (g,) = short([long_sample], ["a red circle"])
    assert math.isclose(g, hf_yes_prob(short.render("a red circle", long_sample)), abs_tol=TOL)
    with pytest.raises(ValueError, match="template alone"):
        LLMJudgeReward(engine=judge.engine, max_prompt_tokens=5)


def test_images_need_captions(judge):
    images = [torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)]
    with pytest.raises(TypeError, match="captions"):
        judge(images, ["a red circle", "a blue square"])
    with_captions = judge(images, ["a red circle", "a blue square"], captions=["a red circle", "a cat"])
    assert with_captions == pytest.approx(judge(["a red circle", "a cat"], ["a red circle", "a blue square"]))
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        judge(["a", "b"], ["p"])
