"""LLM-as-judge reward: the judge model's probability of answering "yes" about a sample.

The prompt and the sample are rendered into a question template; the reward is the judge's
next-token probability of ``yes_token`` normalised over {yes, no}:

    p = e^{lp_yes} / (e^{lp_yes} + e^{lp_no})

read from vLLM's next-token log-probs (top-k); when either token is outside the returned top-k,
both are scored explicitly (``VLLMEngine.score``), so the value is exact either way.

Text samples are judged as they are. Images are out of scope for now: a text judge needs a
caption, so pass ``captions=[...]`` (one per sample) in the reward's meta and they are judged in
place of the samples; producing captions (a captioning model) is not part of rlgen yet.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from rlgen.registry import register_reward

DEFAULT_TEMPLATE = ("Question: does the response answer the prompt well? Reply yes or no.\n"
                    "Prompt: {prompt}\nResponse: {sample}\nAnswer:")


@register_reward("llm_judge")
class LLMJudgeReward:
    """Callable reward holding one judge engine (RewardWorkers build it once per actor).

    ``model_path``: a local HF folder of a causal LM (vLLM serves it). ``template`` must contain
    ``{prompt}`` and ``{sample}``. ``max_prompt_tokens`` bounds the rendered prompt: the sample is
    cut first (its head is kept), then the prompt. ``engine``: an existing ``VLLMEngine`` to share
    (then ``model_path`` may be None; a local engine, not a Ray actor handle: the judge reads its
    tokenizer); otherwise one is started with ``engine_kwargs``.
    """

    def __init__(self, model_path: str | Path | None = None, template: str = DEFAULT_TEMPLATE,
                 yes_token: str = " yes", no_token: str = " no", max_prompt_tokens: int = 1024,
                 top_k: int = 20, engine=None, **engine_kwargs):
        for field in ("{prompt}", "{sample}"):
            if field not in template:
                raise ValueError(f"llm_judge: template must contain {field}; got {template!r}")
        if engine is None:
            if model_path is None:
                raise ValueError("llm_judge: give model_path (a local HF folder) or engine")
            from rollouts.vllm_engine import VLLMEngine  # lazy: the registry imports this module

            engine = VLLMEngine(model_path, max_logprobs=max(top_k, 20), **engine_kwargs)
        self.engine = engine
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.top_k = min(top_k, engine.max_logprobs)
        tok = engine.tokenizer
        self.tokenizer = tok
        self.yes_id = _single_token(tok, yes_token, "yes_token")
        self.no_id = _single_token(tok, no_token, "no_token")
        if self.yes_id == self.no_id:
            raise ValueError(f"llm_judge: yes_token {yes_token!r} and no_token {no_token!r} are the same token")
        fixed = len(self._encode(template.format(prompt="", sample="")))
        if fixed >= max_prompt_tokens:
            raise ValueError(f"llm_judge: the template alone is {fixed} tokens, max_prompt_tokens={max_prompt_tokens}")

    def __call__(self, samples: Sequence[str], prompts: Sequence[str], **meta) -> list[float]:
        texts = meta.get("captions") or samples
        if len(texts) != len(prompts):
            raise ValueError(f"llm_judge: {len(texts)} samples but {len(prompts)} prompts")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"llm_judge judges text; got a {type(t).__name__} sample. Images need a "
                                f"caption: pass captions=[...] (one string per sample) in meta")
        ids = [self.render(p, t) for p, t in zip(prompts, texts)]
        return self.yes_probability(ids)

    def yes_probability(self, prompt_ids: list[list[int]]) -> list[float]:
        """p(yes) / (p(yes) + p(no)) after each rendered prompt."""
        lps = [(top.get(self.yes_id), top.get(self.no_id))
               for top in self.engine.next_token_logprobs(prompt_ids, top_k=self.top_k)]
        # Either token missing from the top-k: score both explicitly, in one batch.
        missing = [b for b, (y, n) in enumerate(lps) if y is None or n is None]
        if missing:
            pids = [prompt_ids[b] for b in missing]
            ys = self.engine.score(pids, [[self.yes_id]] * len(pids))
            ns = self.engine.score(pids, [[self.no_id]] * len(pids))
            for b, y, n in zip(missing, ys, ns):
                lps[b] = (y[0], n[0])
        # Normalise in log space: 1 / (1 + e^{lp_no - lp_yes}) never overflows.
        return [_sigmoid(y - n) for y, n in lps]

    def render(self, prompt: str, sample: str) -> list[int]:
        """Token ids of the filled template within ``max_prompt_tokens``: the sample is cut first
        (its head kept), then the prompt; the template itself is never cut."""
        for _ in range(8):  # re-tokenising a cut text can shift a token or two at the seam: retry
            ids = self._encode(self.template.format(prompt=prompt, sample=sample))
            over = len(ids) - self.max_prompt_tokens
            if over <= 0:
                return ids
            if sample:
                sample = self._cut(sample, over)
            else:
                prompt = self._cut(prompt, over)
        raise RuntimeError(f"llm_judge: could not fit the prompt into {self.max_prompt_tokens} tokens")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))  # with the tokenizer's special tokens (e.g. BOS)

    def _cut(self, text: str, n_tokens: int) -> str:
        """``text`` without its last ``n_tokens`` tokens."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        keep = len(ids) - n_tokens
        return self.tokenizer.decode(ids[:keep]) if keep > 0 else ""

    def close(self) -> None:
        self.engine.shutdown()


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"llm_judge: {what} {text!r} is {len(ids)} tokens {ids} for this tokenizer; it must be "
                         f"exactly one (try with/without a leading space, or another word)")
    return ids[0]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
