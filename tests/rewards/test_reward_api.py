"""The reward plug-in API: four ways to name a reward, weighted mixing, None/NaN, errors."""
import math
import textwrap

import numpy as np
import pytest
import torch

from rewards.base import RewardError, RewardMixer, RewardsConfig, resolve_reward, to_score_tensor
from rlgen.config import ConfigError, from_dict
from rlgen.data.shapes import make_batch
from rlgen.registry import REWARDS, RegistryError

# A user's own reward module, as they would write it: imported by `module.path:function`.
USER_MODULE = textwrap.dedent('''
    import math

    def length_reward(prompts, completions, **kwargs):
        """trl's reward_funcs signature: longer completions score higher."""
        return [float(len(c)) for c in completions]

    def answer_match(prompts, completions, answer, **kwargs):
        """trl style with a dataset column passed by name."""
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    def scaled(samples, prompts, factor=1.0):
        """rlgen style without **meta; `factor` comes from reward_kwargs."""
        return [factor * len(s) for s in samples]

    def sometimes_none(samples, prompts, **meta):
        return [None if "?" in s else 1.0 for s in samples]

    def nan_at_two(samples, prompts, **meta):
        return [math.nan if i == 2 else 0.0 for i in range(len(samples))]

    def inf_at_one(samples, prompts, **meta):
        return [math.inf if i == 1 else 0.0 for i in range(len(samples))]

    def broken(samples, prompts, **meta):
        raise KeyError("no such column")

    def too_short(samples, prompts, **meta):
        return [0.0] * (len(samples) - 1)

    def as_tensor(samples, prompts, **meta):
        import torch
        return torch.arange(len(samples), dtype=torch.float64)

    def slow(samples, prompts, **meta):
        import time
        time.sleep(1.0)
        return [0.0] * len(samples)

    class Counting:
        """A class reward: built once with kwargs, then called."""
        built = 0

        def __init__(self, bonus=0.0):
            Counting.built += 1
            self.bonus = bonus

        def __call__(self, samples, prompts, **meta):
            return [self.bonus + i for i in range(len(samples))]

    class Holding:
        """A reward that owns a resource (an engine, a session) and releases it in close()."""
        closed = 0

        def __call__(self, samples, prompts, **meta):
            return [0.0] * len(samples)

        def close(self):
            Holding.closed += 1
''')

TEXTS = ["12", "1234", "x", "123456"]
PROMPTS = ["p0", "p1", "p2", "p3"]


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("my_rewards", None)
    mod = importlib.import_module("my_rewards")
    yield mod
    sys.modules.pop("my_rewards", None)


def test_registered_name_scores_real_images():
    images, prompts, _ = make_batch(np.random.default_rng(0), 6)
    reward = resolve_reward("shapes_verifier")
    assert reward.style == "rlgen"
    # Ground-truth renders pass their own captions; a swapped caption mostly does not.
    assert reward(images, prompts) == [1.0] * 6
    assert sum(reward(images, prompts[1:] + prompts[:1])) < 6


def test_module_path_and_kwargs(user_module):
    reward = resolve_reward("my_rewards:scaled", factor=3.0)
    assert reward(TEXTS, PROMPTS) == [6.0, 12.0, 3.0, 18.0]
    # no **meta in its signature: meta it does not name is not passed
    assert reward(TEXTS, PROMPTS, problems=[1, 2, 3, 4]) == [6.0, 12.0, 3.0, 18.0]


def test_entry_point_route():
    # pyproject.toml declares `constant_half = rewards.examples:constant_half` in rlgen.rewards;
    # nothing registers it by name, so the registry must find it through the entry point.
    from importlib.metadata import entry_points

    assert "constant_half" in [ep.name for ep in entry_points(group="rlgen.rewards")]
    assert resolve_reward("constant_half")(TEXTS, PROMPTS) == [0.5] * 4


def test_trl_style_function_works_unchanged(user_module):
    reward = resolve_reward("my_rewards:length_reward")
    assert reward.style == "trl"
    assert reward(TEXTS, PROMPTS) == [2.0, 4.0, 1.0, 6.0]
    match = resolve_reward("my_rewards:answer_match")
    assert match(["4", " 7 ", "9", "1"], PROMPTS, answer=["4", "7", "8", "1"]) == [1.0, 1.0, 0.0, 1.0]
    # rlgen's text verifiers take both conventions; they are called the rlgen way
    assert resolve_reward("arith_verifier").style == "rlgen"


def test_class_reward_built_once_with_kwargs(user_module):
    mixer = RewardMixer(RewardsConfig(rewards={"my_rewards:Counting": 1.0},
                                      reward_kwargs={"my_rewards:Counting": {"bonus": 10.0}}))
    for _ in range(3):
        out = mixer(TEXTS, PROMPTS)
    assert user_module.Counting.built == 1
    assert out.total.tolist() == [10.0, 11.0, 12.0, 13.0]


def test_close_reaches_rewards_that_hold_resources(user_module):
    mixer = RewardMixer(RewardsConfig(rewards={"my_rewards:Holding": 1.0, "my_rewards:scaled": 1.0}))
    mixer(TEXTS, PROMPTS)
    mixer.close()
    assert user_module.Holding.closed == 1


def test_unknown_reward_names_candidates():
    with pytest.raises(RegistryError, match="unknown reward 'no_such_reward'.*shapes_verifier"):
        resolve_reward("no_such_reward")


def test_weighted_mix_matches_hand_computation(user_module):
    mixer = RewardMixer({"my_rewards:length_reward": -0.5, "constant_half": 2.0, "my_rewards:as_tensor": 0.25})
    out = mixer(TEXTS, PROMPTS)
    hand = [-0.5 * len(t) + 2.0 * 0.5 + 0.25 * i for i, t in enumerate(TEXTS)]
    assert out.total.tolist() == pytest.approx(hand)
    assert out.total.dtype == torch.float32 and out.valid.all()
    assert out.components["my_rewards:length_reward"].tolist() == [2.0, 4.0, 1.0, 6.0]
    assert out.metrics["reward/my_rewards:length_reward/mean"] == pytest.approx(3.25)
    assert out.metrics["reward/my_rewards:length_reward/std"] == pytest.approx(np.std([2, 4, 1, 6]))
    assert out.metrics["reward/total/mean"] == pytest.approx(np.mean(hand))


def test_none_is_excluded_and_counted(user_module):
    mixer = RewardMixer({"my_rewards:sometimes_none": 1.0, "constant_half": 1.0})
    out = mixer(["ok", "what?", "fine", "eh?"], PROMPTS)
    assert out.valid.tolist() == [True, False, True, False]
    assert math.isnan(out.total[1]) and math.isnan(out.total[3])
    assert out.total[out.valid].tolist() == [1.5, 1.5]
    assert out.metrics["reward/my_rewards:sometimes_none/none"] == 2
    assert out.metrics["reward/my_rewards:sometimes_none/mean"] == 1.0  # over scored samples only
    assert out.metrics["reward/valid_frac"] == 0.5


@pytest.mark.parametrize("name, index, value", [("my_rewards:nan_at_two", 2, "nan"), ("my_rewards:inf_at_one", 1, "inf")])
def test_non_finite_is_an_error_naming_reward_index_prompt(user_module, name, index, value):
    mixer = RewardMixer({name: 1.0})
    with pytest.raises(RewardError, match=rf"reward '{name}' returned {value} for sample {index} "
                                          rf"\(prompt 'p{index}'\)") as e:
        mixer(TEXTS, PROMPTS)
    assert (e.value.reward, e.value.index, e.value.prompt) == (name, index, f"p{index}")


def test_non_finite_drop_mode(user_module):
    mixer = RewardMixer(RewardsConfig(rewards={"my_rewards:nan_at_two": 1.0, "constant_half": 1.0}, nan="drop"))
    out = mixer(TEXTS, PROMPTS)
    assert out.valid.tolist() == [True, True, False, True]
    assert out.metrics["reward/my_rewards:nan_at_two/dropped"] == 1
    assert out.metrics["reward/my_rewards:nan_at_two/none"] == 0


def test_exception_inside_reward_names_it(user_module):
    with pytest.raises(RewardError, match=r"reward 'my_rewards:broken' failed .*KeyError.*no such column") as e:
        RewardMixer({"constant_half": 1.0, "my_rewards:broken": 1.0})(TEXTS, PROMPTS)
    assert isinstance(e.value.__cause__, KeyError)
    # a real reward's own error (a prompt outside the shapes grammar) keeps its text
    images, _, _ = make_batch(np.random.default_rng(1), 2)
    with pytest.raises(RewardError, match=r"reward 'shapes_verifier' failed.*'a photo of a cat'"):
        RewardMixer({"shapes_verifier": 1.0})(images, ["a red circle", "a photo of a cat"])


def test_wrong_output_length_and_shape(user_module):
    with pytest.raises(RewardError, match=r"reward 'my_rewards:too_short' returned 3 scores for 4 samples"):
        RewardMixer({"my_rewards:too_short": 1.0})(TEXTS, PROMPTS)
    with pytest.raises(RewardError, match=r"reward 'x' returned a tensor of shape \(4, 1\); expected \(4,\)"):
        to_score_tensor(torch.zeros(4, 1), "x", PROMPTS, "error")
    with pytest.raises(RewardError, match=r"reward 'x' returned str 'a' for sample 1 \(prompt 'p1'\)"):
        to_score_tensor([0.0, "a", 0.0, 0.0], "x", PROMPTS, "error")
    with pytest.raises(RewardError, match="3 samples but 4 prompts"):
        RewardMixer({"constant_half": 1.0})(TEXTS[:3], PROMPTS)


def test_timeout_is_a_reward_error(user_module):
    mixer = RewardMixer(RewardsConfig(rewards={"my_rewards:slow": 1.0, "constant_half": 1.0},
                                      timeouts={"my_rewards:slow": 0.1}))
    with pytest.raises(RewardError, match=r"reward 'my_rewards:slow' timed out after 0.1 s"):
        mixer(TEXTS, PROMPTS)
    mixer.close()


def test_config_from_yaml_data_and_typos():
    cfg = from_dict(RewardsConfig, {"rewards": {"shapes_verifier": 1.0, "clip_score": 0.5},
                                    "reward_kwargs": {"clip_score": {"scale": 100}}, "nan": "drop",
                                    "timeouts": {"clip_score": 30}})
    specs = {s.name: s for s in cfg.specs()}
    assert specs["clip_score"].weight == 0.5 and specs["clip_score"].kwargs == {"scale": 100}
    assert specs["clip_score"].timeout_s == 30.0 and specs["shapes_verifier"].timeout_s == 0.0
    with pytest.raises(ConfigError, match=r"reward_kwargs names \['clip_scor'\]"):
        from_dict(RewardsConfig, {"rewards": {"clip_score": 1.0}, "reward_kwargs": {"clip_scor": {}}})
    with pytest.raises(ConfigError, match="nan must be 'error' or 'drop'"):
        from_dict(RewardsConfig, {"rewards": {"clip_score": 1.0}, "nan": "ignore"})
    with pytest.raises(ConfigError, match="weight of 'clip_score' must be a finite number"):
        from_dict(RewardsConfig, {"rewards": {"clip_score": float("nan")}})
    assert "clip_score" in REWARDS.names() and "aesthetic" in REWARDS.names()
