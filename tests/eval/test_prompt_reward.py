"""The ``reward`` benchmark on a diffusers pipeline: mean reward of held-out prompts' samples."""
import pytest
import torch

from rlgen.evaluate import EvalRequest, run_benchmark
from rlgen.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def every_other_unscored(samples, prompts, **meta):
    return [None if i % 2 else 1.0 for i in range(len(prompts))]


def test_mean_reward_of_the_policys_samples(tiny_pipelines, tmp_path):
    prompts = tmp_path / "test.txt"
    prompts.write_text("a photo of a cat\n# a comment\na bowl of fruit\na red car\n")
    policy = load_model(tiny_pipelines["sd3"])
    opts = {"reward": "rewards.examples:brightness", "steps": 2, "cfg": 2.0}
    res = run_benchmark("reward", EvalRequest(prompts=prompts, seed=5, options=opts, samples_per_prompt=2,
                                              return_samples=True), policy)
    expanded = [p for p in ("a photo of a cat", "a bowl of fruit", "a red car") for _ in range(2)]
    images = policy.generate(expanded, num_steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    want = images.float().flatten(1).mean(1).mean().item()  # brightness: the mean pixel of each image
    assert res["accuracy"] == pytest.approx(want, abs=1e-5) and res["n"] == 6 and res["unscored"] == 0
    assert res["per_task"] == {"rewards.examples:brightness": res["accuracy"]} and res["steps"] == 2
    assert res["samples"]["images"].shape == (3, 3, 64, 64)  # the first sample of each prompt, decoded RGB

    res = run_benchmark("reward", EvalRequest(prompts=prompts, options={
        "reward": "tests.eval.test_prompt_reward:every_other_unscored", "steps": 1}), policy)
    assert res["accuracy"] == 1.0 and res["n"] == 2 and res["unscored"] == 1


def test_bad_requests_are_one_line(tiny_pipelines):
    from rlgen.evaluate import check_options

    with pytest.raises(ValueError, match="needs a prompts file"):
        run_benchmark("reward", EvalRequest(options={"steps": 1}), load_model(tiny_pipelines["sd3"]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rewrd'\]"):
        check_options("reward", {"rewrd": "pickscore"})
