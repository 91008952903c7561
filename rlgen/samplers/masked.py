"""Masked-diffusion decoding: LLaDA's semi-autoregressive unmasking, with RL bookkeeping.

LLaDA (Nie et al. 2025, arXiv:2502.09992, Appendix B) generates an answer of ``gen_length`` tokens
that starts as all ``[MASK]``: the answer is cut into blocks decoded left to right, and inside a
block each step predicts every masked position at once and commits ("unmasks") a few of them —
the most confident ones ("low_confidence" remasking) or random ones. Fast-dLLM (Wu et al. 2025,
arXiv:2505.22618) adds confidence-threshold parallel decoding and approximate prefix KV caching.

Speed-ups here, and whether they change the result:
- **Per-row early exit and compaction (exact).** Rows advance independently: each row works on
  its own first unfinished block and a row that is done (answer complete, or ``eos_id`` reached)
  leaves the forward batch. A row's tokens are the same as decoding it alone (greedy decoding; a
  sampled row draws different noise). Batched threshold decoding no longer waits for the slowest
  row of each block (docs/feasibility.md, "Decoding speed").
- **``cache="prefix"`` / ``cache="dual"`` (approximate, Fast-dLLM; rlgen/samplers/kv_cache.py).**
  At the start of each block one full forward stores the keys/values of every position; later steps
  of that block reuse those of the prefix (``prefix``: they feed the block and the suffix) or of the
  prefix and the all-mask suffix (``dual``: they feed the block only). Exact for a one-layer model,
  approximate beyond (cached deeper states go stale as the block is unmasked). Needs a Hugging Face
  style model (``past_key_values``/``use_cache``, plus ``position_ids`` for ``dual``) that attends
  bidirectionally over cache and new tokens; blocks are decoded in lockstep.
- Dropping the all-mask suffix beyond the current block is NOT implemented: it changes what a
  bidirectional model sees and so the result, without a model trained for it.

All functions are pure torch: no I/O, no global state; sampling takes a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

REMASKING = ("low_confidence", "random")
CACHE_MODES = (None, "none", "prefix", "dual")  # generate(cache=...); see rlgen/samplers/kv_cache.py


@dataclass
class GenerateOutput:
    """A decoded batch and the trajectory an RL learner needs to replay it."""

    tokens: torch.Tensor  # (B, P + G) long, prompt included
    order: torch.Tensor  # (B, G) long: the row's step (0-based) that unmasked each position; -1 = eos fill
    token_logprobs: torch.Tensor  # (B, G) float32: log p(chosen token) at that step, temperature 1; 0 on fills
    confidence: torch.Tensor  # (B, G) float32: the score that ranked the position (prob. or random)
    steps_taken: torch.Tensor  # (B,) long: forward passes each row took part in
    nfe: int  # model calls (a CFG call runs conditional + unconditional halves as one batch)
    forward_tokens: int  # positions fed to the model, summed over calls: the compute actually spent
    prompt_length: int
    edits: torch.Tensor | None = None  # (B, G) long: token-editing rewrites per position (block decoding)

    @property
    def answer(self) -> torch.Tensor:  # (B, G)
        return self.tokens[:, self.prompt_length:]


@dataclass
class _Spec:
    """Settings shared by every step of one ``generate`` call."""

    prompt_len: int
    gen_length: int
    block_length: int
    mask_id: int
    temperature: float
    remasking: str
    threshold: float | None
    schedule: torch.Tensor | None  # (steps_per_block,) tokens unmasked at each step of a block
    cfg_scale: float
    forbidden: list[int]
    eos_id: int | None
    fill_id: int | None
    generator: torch.Generator | None


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: split each row's masks evenly over ``steps`` steps.

    ``mask_count`` (B,) → (B, steps) long; the remainder goes to the first steps, so 10 masks over
    4 steps give [3, 3, 2, 2] (LLaDA, arXiv:2502.09992, Appendix B).
    """
    mask_count = torch.as_tensor(mask_count, dtype=torch.long).reshape(-1)  # (B,)
    base = (mask_count // steps)[:, None]  # (B, 1)
    remainder = (mask_count % steps)[:, None]  # (B, 1)
    step_index = torch.arange(steps, device=mask_count.device)[None, :]  # (1, steps)
    return base + (step_index < remainder).long()  # (B, steps)


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """Gumbel-max perturbation: ``argmax`` of the result samples softmax(logits / temperature).

    LLaDA computes ``exp(logits) / (−log u)^T`` in float64 (low-precision Gumbel noise hurts
    generation quality); we take its log, ``logits − T·log(−log u)``, which has the same argmax
    and cannot overflow ``exp``. Temperature 0 returns the logits unchanged (greedy).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))


def _call(model, input_ids, attention_mask=None, **cache_kwargs):
    """Runs the model and returns (logits (b, l, V), output): plain tensors, ``.logits`` or tuples."""
    kwargs = dict(cache_kwargs)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        return out, out
    if hasattr(out, "logits"):
        return out.logits, out
    return out[0], out


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(b, l, V) logits of any masked-diffusion model output (a tensor, ``.logits`` or a tuple).

    ``attention_mask`` (b, l) marks real tokens of left-padded rows, as ``generate`` was given them.
    """
    return _call(model, input_ids, attention_mask)[0]


def _guided_logits(model, x, attention_mask, spec: _Spec, start: int = 0, end: int | None = None,
                   **cache_kwargs):
    """Forward ``x[:, start:end]`` (with CFG if asked); returns (logits, output, positions fed).

    logits (b, end − start, V) with forbidden tokens at −inf. CFG follows LLaDA: the unconditional
    input has every prompt position replaced by ``[MASK]``, and
    ``logits = uncond + (cfg + 1)·(cond − uncond)``.
    """
    feed = x[:, start:end]
    if spec.cfg_scale > 0:
        uncond = x.clone()
        uncond[:, : spec.prompt_len] = spec.mask_id
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        logits, out = _call(model, torch.cat([x, uncond]), am)  # (2b, L, V)
        cond, unc = logits.chunk(2)
        logits = unc + (spec.cfg_scale + 1.0) * (cond - unc)
        fed = 2 * x.numel()
    else:
        logits, out = _call(model, feed, attention_mask, **cache_kwargs)  # (b, end − start, V)
        fed = feed.numel()
    vocab = logits.shape[-1]
    banned = [t for t in spec.forbidden if 0 <= t < vocab]  # ids past the head cannot be predicted
    if banned:
        idx = torch.tensor(banned, device=logits.device)
        logits = logits.index_fill(-1, idx, float("-inf"))  # out of place: never edit model state
    return logits, out, fed


def _propose(logits: torch.Tensor, spec: _Spec):
    """Per-position proposal from guided logits (b, g, V): token, its log-prob, its ranking score."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)  # (b, g, V) float64 as in LLaDA
    x0 = add_gumbel_noise(logits, spec.temperature, spec.generator).argmax(-1)  # (b, g)
    lp = logp.gather(-1, x0[..., None]).squeeze(-1)  # (b, g)
    if spec.remasking == "low_confidence":
        score = lp.exp()  # probability of the proposed token under softmax(logits)
    else:
        score = torch.rand(x0.shape, generator=spec.generator, device=x0.device, dtype=torch.float64)
    return x0, lp, score


def _select(score, cand, k, threshold):
    """Which candidates to unmask: the top-``k`` per row, or all above ``threshold`` (≥ 1).

    score (b, G) float, cand (b, G) bool, k (b,) long or None. Ties go to the leftmost position
    (stable sort), so greedy decoding is deterministic.
    """
    score = score.masked_fill(~cand, float("-inf"))
    if threshold is not None:
        choose = cand & (score > threshold)
        best = score.argmax(dim=1)  # (b,) the most confident candidate is always taken
        has = cand.any(dim=1)
        choose[has, best[has]] = True
        return choose
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices  # (b, G)
    rank = torch.empty_like(ranked)
    rank.scatter_(1, ranked, torch.arange(score.shape[1], device=score.device).expand_as(ranked))
    return cand & (rank < k[:, None])


def _eos_stop(gen, order, logprobs, spec: _Spec):
    """Rows that are done: settled by eos (``_eos_settle``, edits in place) or fully unmasked. (b,) bool."""
    if spec.eos_id is None:
        return ~(gen == spec.mask_id).any(dim=1)
    return _eos_settle(gen, order, logprobs, spec) | ~(gen == spec.mask_id).any(dim=1)


def _eos_settle(gen, order, logprobs, spec: _Spec):
    """Rows whose answer is settled by eos: the first eos is unmasked and so is all before it.

    gen/order/logprobs are (b, G) and edited in place: positions after that eos become
    ``fill_id`` with order −1 (not a model decision, so RL gives them no credit). Returns (b,) bool.
    """
    masked = gen == spec.mask_id  # (b, G)
    pos = torch.arange(gen.shape[1], device=gen.device)[None, :]  # (1, G)
    is_eos = (gen == spec.eos_id) & ~masked
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.long().argmax(dim=1), gen.shape[1])[:, None]  # (b, 1)
    settled = has_eos & ~(masked & (pos < first)).any(dim=1)
    fill = settled[:, None] & (pos > first)  # (b, G)
    gen[fill] = spec.fill_id
    order[fill] = -1
    logprobs[fill] = 0.0
    return settled


def _decode_step(out: GenerateOutput, rows, logits, offset: int, spec: _Spec) -> torch.Tensor:
    """One unmasking step for ``rows`` (b,), in place on ``out``; returns (b,) bool: row done.

    ``logits`` (b, n, V) cover answer positions ``offset..offset + n`` (n = G − offset, or one block
    under the dual cache); each row's candidates are the masked positions of its first block that
    still has masks.
    """
    P, G, bl = spec.prompt_len, spec.gen_length, spec.block_length
    gen = out.tokens[rows, P:]  # (b, G) copies; written back below
    order, lps, confs = out.order[rows], out.token_logprobs[rows], out.confidence[rows]
    step = out.steps_taken[rows]  # (b,)
    masked = gen == spec.mask_id
    block = masked.view(len(rows), G // bl, bl).any(dim=2).long().argmax(dim=1)  # (b,) current block
    pos = torch.arange(G, device=gen.device)[None, :]
    span = slice(offset, offset + logits.shape[1])
    cand = masked & (pos // bl == block[:, None]) & (pos >= span.start) & (pos < span.stop)  # (b, G)

    x0, lp, score = _propose(logits, spec)  # (b, n) each
    full_score = torch.full(gen.shape, float("-inf"), dtype=torch.float64, device=gen.device)
    full_score[:, span] = score
    k = None if spec.schedule is None else spec.schedule[step % len(spec.schedule)]
    choose = _select(full_score, cand, k, spec.threshold)  # (b, G)

    tail = choose[:, span]
    gen[:, span] = torch.where(tail, x0, gen[:, span])
    order[choose] = step[:, None].expand_as(order)[choose]
    lps[:, span] = torch.where(tail, lp.float(), lps[:, span])
    confs[:, span] = torch.where(tail, score.float(), confs[:, span])
    done = _eos_stop(gen, order, lps, spec)

    out.tokens[rows, P:] = gen
    out.order[rows], out.token_logprobs[rows], out.confidence[rows] = order, lps, confs
    out.steps_taken[rows] = step + 1
    return done


def _resolve_mask_id(model, mask_id):
    if mask_id is not None:
        return int(mask_id)
    for owner in (model, getattr(model, "config", None)):
        for name in ("mask_id", "mask_token_id"):
            if getattr(owner, name, None) is not None:
                return int(getattr(owner, name))
    raise ValueError("mask_id is required: pass mask_id=… (the model exposes no mask_id/mask_token_id)")


def _validate(prompt_ids, gen_length, steps, block_length, temperature, remasking, threshold,
              cfg_scale, attention_mask, cache, model):
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(prompt_ids.shape)}")
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if threshold is None:
        if steps is None or steps <= 0 or steps % num_blocks:
            raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks ({num_blocks})")
        if steps // num_blocks > block_length:
            raise ValueError(f"{steps // num_blocks} steps per block exceed block_length ({block_length}): "
                             "some steps would unmask nothing")
    elif not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature ({temperature}) and cfg_scale ({cfg_scale}) must be ≥ 0")
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match prompt_ids {tuple(prompt_ids.shape)}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache is not None:
        from rlgen.samplers.kv_cache import check_cache

        check_cache(model, cache, cfg_scale, attention_mask)


@torch.no_grad()
def generate(model, prompt_ids, gen_length, steps, block_length, temperature=0.0,
             remasking="low_confidence", threshold=None, cfg_scale=0.0, mask_id=None, *,
             generator=None, eos_id=None, pad_id=None, forbidden_ids=(), attention_mask=None,
             cache=None, block_causal=None, steps_per_block=None, editing_threshold=None,
             max_post_steps=16) -> GenerateOutput:
    """LLaDA's semi-autoregressive unmasking (arXiv:2502.09992, Appendix B), or block diffusion.

    ``steps`` is the total over blocks (``steps // num_blocks`` per block, LLaDA's schedule); with
    ``threshold`` (Fast-dLLM, arXiv:2505.22618) it is ignored: each step unmasks every masked
    position of the current block whose confidence exceeds the threshold, at least the most
    confident one. ``mask_id`` defaults to the model's ``mask_id``/``config.mask_token_id``; it is
    never predicted, nor is any id in ``forbidden_ids``. With ``eos_id`` a row stops once an eos is
    unmasked with everything before it unmasked; the rest of the row becomes ``pad_id`` (default
    ``eos_id``). ``attention_mask`` (B, P) marks real prompt tokens of left-padded prompts; the
    model then gets ``attention_mask=`` over the whole sequence. ``generator`` (on the device of
    ``prompt_ids``) drives Gumbel noise and random remasking. See the module docstring for
    ``cache`` (None = automatic: the exact block cache for block-causal models, none otherwise;
    "none"; "prefix"; "dual").

    Block-causal models (``block_causal``, default: the model's ``is_block_causal``) decode with
    rlgen/samplers/block.py: blocks aligned to position 0 as LLaDA2 trains them, ``steps_per_block``
    steps each (default: ``steps`` at the same steps-per-token density, ``block_length`` if None),
    LLaDA2's threshold rule (commit everything above ``threshold`` if that meets the step's quota),
    optional LLaDA2.1 token editing (``editing_threshold``, ``max_post_steps``).
    """
    mask_id = _resolve_mask_id(model, mask_id)
    if block_causal is None:
        block_causal = bool(getattr(model, "is_block_causal", False))
    if block_causal:
        from rlgen.samplers.block import generate_block_causal

        return generate_block_causal(model, prompt_ids, gen_length, steps, block_length, temperature, remasking,
                                      threshold, cfg_scale, mask_id, generator, eos_id, pad_id, forbidden_ids,
                                      attention_mask, cache, steps_per_block, editing_threshold, max_post_steps)
    if editing_threshold is not None or steps_per_block is not None:
        raise ValueError("editing_threshold and steps_per_block apply to block-causal decoding only "
                         "(block_causal=True, or a block-causal policy)")
    cache = None if cache == "none" else cache
    _validate(prompt_ids, gen_length, steps, block_length, temperature, remasking, threshold,
              cfg_scale, attention_mask, cache, model)
    B, P = prompt_ids.shape
    device = prompt_ids.device
    num_blocks = gen_length // block_length
    schedule = None
    if threshold is None:  # every block starts fully masked, so one schedule serves all rows
        schedule = num_transfer_tokens(torch.tensor([block_length], device=device), steps // num_blocks)[0]
    spec = _Spec(P, gen_length, block_length, mask_id, float(temperature), remasking, threshold, schedule,
                 float(cfg_scale), sorted({mask_id, *map(int, forbidden_ids)}), eos_id,
                 eos_id if pad_id is None else pad_id, generator)
    tokens = torch.cat([prompt_ids, torch.full((B, gen_length), mask_id, dtype=prompt_ids.dtype, device=device)], 1)
    out = GenerateOutput(tokens=tokens,
                         order=torch.full((B, gen_length), -1, dtype=torch.long, device=device),
                         token_logprobs=torch.zeros(B, gen_length, device=device),
                         confidence=torch.zeros(B, gen_length, device=device),
                         steps_taken=torch.zeros(B, dtype=torch.long, device=device),
                         nfe=0, forward_tokens=0, prompt_length=P)
    am = None
    if attention_mask is not None:
        am = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype, device=device)], 1)
    if cache is not None:
        from rlgen.samplers.kv_cache import run_cached

        run_cached(model, out, am, spec, dual=cache == "dual")
    else:
        _run(model, out, am, spec)
    return out


def _run(model, out: GenerateOutput, am, spec: _Spec) -> None:
    """Uncached loop: every step feeds the full sequence of the rows not yet done."""
    B = out.tokens.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=out.tokens.device)
    for _ in range(2 * spec.gen_length + 1):  # ≥ 1 unmask per row per step: a guard, never reached
        if done.all():
            return
        rows = (~done).nonzero().squeeze(1)  # (b,) compaction: finished rows leave the batch
        logits, _, fed = _guided_logits(model, out.tokens[rows], None if am is None else am[rows], spec)
        out.nfe += 1
        out.forward_tokens += fed
        done[rows] = _decode_step(out, rows, logits[:, spec.prompt_len:], 0, spec)
    raise RuntimeError("decoding did not finish: a step unmasked nothing")

