"""DiffusionGemma (native in transformers ≥ 5.19) as an evaluation target or an OPD teacher.

DiffusionGemma is a block-diffusion encoder-decoder: an encoder caches the clean context (prompt +
finished canvases); a decoder denoises one *canvas* of ``config.canvas_length`` tokens at a time.
Its noise is uniform over the vocabulary (no mask token), and its own sampler
(``DiffusionGemmaGenerationMixin.generate``) runs, per canvas: start from random tokens; each step
predicts every position (with self-conditioning on the previous step's logits and a linearly
decreasing temperature), *accepts* the lowest-entropy positions whose summed entropy stays under a
bound (entropy-bounded sampling, arXiv:2505.24857), re-draws every other position uniformly at random
(renoising), and stops when the argmax canvas is stable and confident; the canvas finally written is
the last step's argmax.

This wrapper exposes what rlgen needs from it without re-implementing that sampler:

- ``generate(prompt_ids, gen_length, seed=...)``: the model's own ``generate`` (seeded locally);
- ``canvas_logits(context_ids, canvas_ids)``: the denoiser's logits for a canvas given a clean
  context (one decoder step, no self-conditioning), temperature 1;
- ``token_logprobs(prompt_ids, answer_ids)``: per-token teacher scores of an answer, canvas by
  canvas, each canvas read with the clean context before it and itself as the (noise-free) decoder
  input — the view of the sampler's last step — usable as an OPD teacher signal.

RL on DiffusionGemma's own sampler is not offered: see ``RL_NOTE``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rlgen.models import MODEL_META, ModelLoadError, quiet_hf_progress
from rlgen.registry import register_model

RL_NOTE = """\
RL on DiffusionGemma's sampler needs a per-step log-probability of the sampled trajectory. One step
maps canvas x_t (plus self-conditioning logits s_t) to x_{t-1}: the denoiser samples every position
from softmax(logits_t / T_t), an acceptance mask a_t (the lowest-entropy positions under the entropy
bound; a deterministic function of logits_t) keeps those samples, and every other position is redrawn
uniformly. So log π(x_{t-1} | x_t, s_t) = Σ_i a_{t,i} · log softmax(logits_t / T_t)[x_{t-1,i}] + (#rejected)·log(1/V),
the second term policy-independent. A rollout must therefore record, per step: x_t, s_t (or recompute
it, which chains steps and is costly to differentiate through), T_t, a_t and the sampled tokens; the
acceptance mask gets no gradient (like LLaDA's confidence remasking). The written canvas is the last
step's *argmax*, not a sample, so it has no log-probability of its own: RL needs the sampled canvas
kept as the output (or a final sampling step). Accepted positions can be re-sampled at later steps
(acceptance is recomputed every step), so per-token credit is per (step, position), as in rlgen's
``trajectory`` estimator, not per position."""


@register_model("diffusion_gemma")
class DiffusionGemmaLM(nn.Module):
    """A ``DiffusionGemmaForBlockDiffusion`` and its tokenizer (optional)."""

    def __init__(self, net: nn.Module, tokenizer=None):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        cfg = net.config
        self.pad_id = cfg.text_config.pad_token_id
        eos = cfg.text_config.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype=None, trust_remote_code: bool = False,
             **unused) -> "DiffusionGemmaLM":
        """A local DiffusionGemma folder (``config.json`` with model_type ``diffusion_gemma``)."""
        from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

        from rlgen.models.hf_lm import torch_dtype

        unknown = sorted(k for k, v in unused.items() if v not in (None, False))
        if unknown:
            raise ModelLoadError(f"{path}: options {unknown} do not apply to a DiffusionGemma model")
        p = Path(path)
        kw = {"local_files_only": True, "use_safetensors": True}
        if dtype is not None:
            kw["dtype"] = torch_dtype(dtype)
        with quiet_hf_progress():
            net = DiffusionGemmaForBlockDiffusion.from_pretrained(str(p), **kw)
        tokenizer = None
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
        return cls(net, tokenizer).to(device).eval()

    @classmethod
    def from_pretrained(cls, path, device="cpu", **kw) -> "DiffusionGemmaLM":
        return cls.load(path, device=device, **kw)

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        with quiet_hf_progress():
            self.net.save_pretrained(str(p))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(p))
        (p / MODEL_META).write_text(json.dumps({"model_type": "diffusion_gemma"}, indent=2) + "\n")

    @property
    def canvas_length(self) -> int:
        return int(self.net.config.canvas_length)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, gen_length: int, attention_mask: torch.Tensor | None = None,
                 seed: int | None = None, **generation_kwargs) -> torch.Tensor:
        """(B, P + ⌈gen_length / canvas⌉·canvas) ids from DiffusionGemma's own sampler.

        It draws from torch's global generator; ``seed`` reseeds it inside a forked RNG state, so the
        caller's stream is untouched. ``generation_kwargs`` go to ``DiffusionGemmaGenerationConfig``
        (``max_denoising_steps``, ``sampler_config``, ``t_min``/``t_max`` …).
        """
        kw = dict(max_new_tokens=gen_length, return_dict_in_generate=True, **generation_kwargs)
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if seed is not None:
                torch.manual_seed(seed)
            return self.net.generate(prompt_ids, **kw).sequences

    @torch.no_grad()
    def generate_answers(self, prompt_ids: torch.Tensor, gen_length: int, generator: torch.Generator | None = None,
                         temperature: float | None = None) -> torch.Tensor:
        """(B, gen_length) answer ids from its own sampler: what rlgen's text benchmarks decode with
        (``rlgen.eval.text``). ``generator`` seeds it; ``temperature`` is ignored: the sampler follows its
        own temperature schedule (``sampler_config``)."""
        seed = None if generator is None else int(torch.randint(2**31 - 1, (1,), generator=generator))
        P = prompt_ids.shape[1]
        return self.generate(prompt_ids, gen_length, seed=seed)[:, P:P + gen_length]

    def canvas_logits(self, context_ids: torch.Tensor, canvas_ids: torch.Tensor) -> torch.Tensor:
        """(B, C, V) denoiser logits of ``canvas_ids`` (B, C) after a clean ``context_ids`` (B, L)."""
        return self.net(input_ids=context_ids, decoder_input_ids=canvas_ids).logits

    def token_logprobs(self, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """(B, G) log p(answer token) per canvas, given the clean prefix (see the module docstring)."""
        C, G = self.canvas_length, answer_ids.shape[1]
        out = []
        for start in range(0, G, C):
            canvas = answer_ids[:, start:start + C]
            width = canvas.shape[1]
            if width < C:  # the last canvas is padded, as generate pads finished rows
                canvas = torch.cat([canvas, canvas.new_full((canvas.shape[0], C - width), self.pad_id)], dim=1)
            context = torch.cat([prompt_ids, answer_ids[:, :start]], dim=1)
            logp = torch.log_softmax(self.canvas_logits(context, canvas).float(), dim=-1)  # (B, C, V)
            out.append(logp.gather(-1, canvas[..., None]).squeeze(-1)[:, :width])
        return torch.cat(out, dim=1)
