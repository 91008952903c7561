"""The ``reward`` benchmark: a reward model's mean score on held-out prompts, as Flow-GRPO evaluates
(PickScore or OCR on its test prompts, 40 steps at CFG 4.5 for SD3.5; Liu et al. 2025, arXiv:2505.05470).

    python -m rlgen.evaluate --checkpoint DIR --benchmark reward --prompts test.txt \
        --set reward=pickscore --set "reward_kwargs={scale: 0.03846}" --set steps=40 --set cfg=4.5

In a run (``eval.benchmark: reward``) it executes on rollout worker 0 with the policy that worker holds;
the reward model is built once per process and kept. A reward that takes ``device`` gets the policy's
device unless ``reward_kwargs`` names one. ``accuracy`` is the mean score (in [0, 1] for ``ocr`` and for
PickScore scaled by 1/26 as Flow-GRPO does; other rewards keep their own range); ``per_task`` holds it
under the reward's name; samples with no score (None/NaN) are counted in ``unscored``.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

from rlgen.eval.flow_common import (SAMPLING_OPTIONS, FlowSampling, attach_grid, check_flow_policy,
                                    flow_sampling_from, generate_images, settings_dict)
from rlgen.registry import register_benchmark

DEFAULT_REWARD = "pickscore"
_REWARDS: dict[str, object] = {}  # (name, kwargs) → built reward: PickScore loads once per worker, not per eval


def _prompts(req) -> list[str]:
    if req.prompts is None:
        raise ValueError("the reward benchmark needs a prompts file (eval.prompts=FILE, or --prompts FILE)")
    from rlgen.runtime.sources import _read_lines

    return _read_lines(Path(req.prompts), "eval.prompts")


def _reward(name: str, kwargs: dict, device: str):
    from rewards.base import resolve_reward
    from rlgen.registry import REWARDS

    obj = REWARDS.get(name) if ":" not in name else None
    if inspect.isclass(obj) and "device" in inspect.signature(obj).parameters and "device" not in kwargs:
        kwargs = {**kwargs, "device": device}  # the reward model sits beside the policy
    key = f"{name}:{json.dumps(kwargs, sort_keys=True, default=str)}"
    if key not in _REWARDS:
        _REWARDS[key] = resolve_reward(name, **kwargs)
    return _REWARDS[key]


@register_benchmark("reward")
def reward_benchmark(req, policy) -> dict:
    from rewards.base import to_score_tensor

    check_flow_policy(policy, "reward")
    prompts = _prompts(req)
    opts = dict(req.options)
    name, kwargs = str(opts.pop("reward", DEFAULT_REWARD)), dict(opts.pop("reward_kwargs", None) or {})
    sampling = flow_sampling_from(opts, FlowSampling(steps=40, cfg=4.5))
    k = req.samples_per_prompt or 1
    expanded = [p for p in prompts for _ in range(k)]
    images = generate_images(policy, expanded, sampling, req.seed, req.batch_size, req.progress)  # (N, 3, H, W)
    reward = _reward(name, kwargs, str(getattr(policy, "device", "cpu")))
    scores, _, _ = to_score_tensor(reward(images, expanded), name, expanded, "drop")  # (N,) NaN = no score
    valid = scores[scores.isfinite()]
    mean = valid.mean().item() if len(valid) else math.nan
    result = {"accuracy": mean, "per_task": {name: mean}, "n": len(valid), "unscored": len(scores) - len(valid),
              "reward_std": valid.std().item() if len(valid) > 1 else 0.0, "reward": name,
              **settings_dict(sampling, k), "prompts": len(prompts), "prompt_source": str(req.prompts)}
    firsts = list(range(0, len(images), k))[:16]  # the first sample of the first 16 prompts
    attach_grid(req, result, images, expanded, firsts, nrow=4, scale=max(1, 128 // images.shape[-1]))
    return result


reward_benchmark.options = {*SAMPLING_OPTIONS, "reward", "reward_kwargs"}
reward_benchmark.prepare = _prompts
