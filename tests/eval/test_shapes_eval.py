"""The shapes benchmark: lenient and strict accuracy, the unseen prompt set, group diversity."""
import numpy as np
import pytest

from rlgen.data import shapes as S
from rlgen.data.shapes_heldout import is_unseen
from rlgen.eval.shapes import score_images
from rlgen.evaluate import EvalRequest, run_benchmark
from rlgen.models import load_model


def test_strict_accuracy_counts_a_second_copy_as_a_failure():
    rng = np.random.default_rng(0)
    two = S.render(S.scene_for_prompt(rng, "two red circles"))
    one = S.render(S.scene_for_prompt(rng, "a red circle"))
    res = score_images([two, one], ["a red circle", "a red circle"], ["single_object", "single_object"])
    assert res["accuracy"] == 1.0 and res["accuracy_strict"] == 0.5
    assert res["per_task_strict"] == {"single_object": 0.5}


def test_unseen_prompt_set_on_the_shipped_base():
    req = EvalRequest(options={"prompt_set": "unseen", "prompts_per_task": 1, "steps": 2}, samples_per_prompt=2,
                      seed=0, progress=False)
    res = run_benchmark("shapes", req, load_model("rlgen/assets/flow_shapes_base"))
    assert res["prompt_source"] == "builtin:unseen_prompts" and res["n"] == 12
    assert 0 <= res["accuracy_strict"] <= res["accuracy"] <= 1 and res["diversity"] > 0
    with pytest.raises(ValueError, match="prompt_set must be one of"):
        run_benchmark("shapes", EvalRequest(options={"prompt_set": "train"}), load_model("rlgen/assets/flow_shapes_base"))
