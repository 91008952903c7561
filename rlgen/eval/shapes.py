"""The shapes benchmark (GenEval-style): sample each prompt K times, check with the verifier.

Without a prompts file it uses the built-in held-out list (``heldout_prompts``: 32 prompts for
each of the six task types). A prompts file has one prompt per line (blank lines and lines
starting with '#' are skipped); its per-task report uses the surface form of each prompt
(single → single_object, pair → two_object, count → counting, position → position), since
GenEval's colors / color_attr share surface forms with single_object / two_object.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from rlgen.data.shapes import PromptError, heldout_prompts, parse_prompt
from rlgen.eval.flow_common import (SAMPLING_OPTIONS, FlowSampling, attach_grid, check_flow_policy,
                                    flow_sampling_from, generate_images, settings_dict)
from rlgen.registry import register_benchmark

FORM_TO_TASK = {"single": "single_object", "pair": "two_object", "count": "counting", "position": "position"}
DEFAULT_SAMPLES_PER_PROMPT = 4
MAX_PROMPT_CHARS = 2000


def read_prompt_file(path: Path) -> list[tuple[str, str]]:
    """(prompt, task) pairs from a file; a prompt outside the grammar is an error naming its line."""
    from rlgen.utils import read_text_file

    items = []
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if len(text) > MAX_PROMPT_CHARS:  # never echo a huge line into an error
            raise PromptError(f"{path}:{lineno}: a prompt of {len(text)} characters (at most {MAX_PROMPT_CHARS})")
        try:
            form = parse_prompt(text).form
        except PromptError as e:
            raise PromptError(f"{path}:{lineno}: {e}") from e
        items.append((text, FORM_TO_TASK[form]))
    if not items:
        raise ValueError(f"{path}: no prompts (one prompt per line expected)")
    return items


def score_images(images, prompts: list[str], tasks: list[str]) -> dict:
    """GenEval-style accuracy (extra objects allowed) and ``accuracy_strict`` (exactly the named
    objects; rewards.shapes_verifier's strict mode), overall and per task type."""
    from rewards.shapes_verifier import detect_objects, verify

    per_task, per_task_strict = defaultdict(list), defaultdict(list)
    scores = []
    for img, prompt, task in zip(images, prompts, tasks):
        dets = detect_objects(img)
        v = verify(img, prompt, dets=dets)
        per_task[task].append(float(v.passed))
        per_task_strict[task].append(float(verify(img, prompt, strict=True, dets=dets).passed))
        scores.append(v.score)
    passed = [p for ps in per_task.values() for p in ps]
    strict = [p for ps in per_task_strict.values() for p in ps]
    return {"accuracy": sum(passed) / len(passed), "accuracy_strict": sum(strict) / len(strict),
            "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
            "per_task_strict": {t: sum(v) / len(v) for t, v in sorted(per_task_strict.items())},
            "per_task_n": {t: len(v) for t, v in sorted(per_task.items())},
            "mean_score": sum(scores) / len(scores), "n": len(passed)}


PROMPT_SETS = ("heldout", "unseen")  # the fixed held-out list | captions exclude_unseen training never sees


def group_diversity(images, k: int) -> float | None:
    """Mean pairwise RMS pixel distance between the k samples of each prompt (images (N, C, H, W) in
    [-1, 1], grouped k at a time), averaged over prompts; None if k < 2. Mode collapse under RL
    shows here first: the same prompt drawn the same way every time."""
    if k < 2:
        return None
    x = images.float().reshape(-1, k, images[0].numel())  # (prompts, k, D)
    d = torch.cdist(x, x) / x.shape[-1] ** 0.5  # (prompts, k, k) RMS distance
    return float(d.sum((1, 2)).mean() / (k * (k - 1)))


def _items(req) -> list[tuple[str, str]]:
    from rlgen.data.shapes_heldout import unseen_prompts

    n = int(req.options.get("prompts_per_task", 32))
    if n < 1:
        raise ValueError(f"shapes benchmark: prompts_per_task must be ≥ 1, got {n}")
    prompt_set = req.options.get("prompt_set", "heldout")
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"shapes benchmark: prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    if req.prompts:
        return read_prompt_file(req.prompts)
    return heldout_prompts(n) if prompt_set == "heldout" else unseen_prompts(n)


@register_benchmark("shapes")
def shapes_benchmark(req, policy) -> dict:
    items = _items(req)
    k = req.samples_per_prompt or DEFAULT_SAMPLES_PER_PROMPT
    if k < 1:
        raise ValueError(f"--samples-per-prompt must be ≥ 1, got {k}")
    sampling = flow_sampling_from({o: v for o, v in req.options.items() if o not in ("prompts_per_task", "prompt_set")},
                                  FlowSampling())
    check_flow_policy(policy, "shapes")
    prompts = [p for p, _ in items for _ in range(k)]
    tasks = [t for _, t in items for _ in range(k)]
    images = generate_images(policy, prompts, sampling, req.seed, req.batch_size, req.progress)
    result = score_images(images, prompts, tasks)
    if (div := group_diversity(images, k)) is not None:
        result["diversity"] = div
    result.update(settings_dict(sampling, k), prompts=len(items),
                  prompt_source=str(req.prompts) if req.prompts else
                  f"builtin:{req.options.get('prompt_set', 'heldout')}_prompts")
    firsts = list(range(0, len(images), k))  # the first sample of each prompt
    attach_grid(req, result, images, prompts, firsts[::max(1, len(firsts) // 64)][:64], nrow=8, scale=4)
    return result


shapes_benchmark.options = {*SAMPLING_OPTIONS, "prompts_per_task", "prompt_set"}
shapes_benchmark.prepare = _items
