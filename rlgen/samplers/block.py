"""Block-diffusion decoding for block-causal masked LMs (LLaDA2-style), with RL bookkeeping.

A block-causal model (Arriola et al. 2025, "Block Diffusion", arXiv:2503.09573; LLaDA2) attends
within its own block and to earlier blocks only. Blocks are aligned to absolute position 0, as these
models are trained: the prompt fills the first ``P // bl`` blocks, the block holding the prompt's end
is decoded with its prompt positions fixed, and the last block may run past ``P + G`` (those tail
positions are decoded but hidden from every query, then dropped) — the layout of diffusers'
``LLaDA2Pipeline``. Inside a block each step predicts every masked position and commits:

- with ``threshold``: every masked position whose confidence exceeds it, if that is at least the
  step's quota of LLaDA's even schedule (``num_transfer_tokens(block_length, steps_per_block)``);
  otherwise the quota's most confident positions (diffusers' ``BlockRefinementScheduler``);
- without: the quota's most confident positions (LLaDA's schedule, per block).

**Token editing** (LLaDA2.1; ``editing_threshold``): a committed answer token of the current block
whose re-prediction is a *different* token with probability above the threshold is replaced, in the
same step as commits; once the block has no masks, up to ``max_post_steps`` extra steps keep editing
while anything changes. RL note: an edited position's ``order`` / ``token_logprobs`` describe its last
write, and ``edits`` counts rewrites; trajectory-replaying estimators are exact only without edits.

**Prefix cache (exact).** ``cache="prefix"``: the keys/values of every finished block are kept in a
transformers ``Cache`` and each step feeds only the current block (at a block change, the finished
block too, which stores it). Earlier blocks never attend to later ones, so the cached keys/values are
exactly what a full forward would compute: same tokens, fewer positions fed.

Pure torch: no I/O; sampling takes a ``torch.Generator``.
"""
from __future__ import annotations

import torch

from rlgen.samplers.kv_cache import crop_cache
from rlgen.samplers.masked import (REMASKING, GenerateOutput, _eos_settle, _propose, _Spec,
                                   num_transfer_tokens)


def validate_block(prompt_ids, gen_length, steps_per_block, block_length, threshold, editing_threshold,
                   max_post_steps, cfg_scale, model) -> None:
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(prompt_ids.shape)}")
    if gen_length <= 0 or block_length <= 0:
        raise ValueError(f"gen_length ({gen_length}) and block_length ({block_length}) must be positive")
    if not 1 <= steps_per_block <= block_length:
        raise ValueError(f"steps per block ({steps_per_block}) must lie in 1..block_length ({block_length}): "
                         f"more steps than positions would commit nothing")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if editing_threshold is not None and not 0.0 < editing_threshold <= 1.0:
        raise ValueError(f"editing_threshold must lie in (0, 1], got {editing_threshold}")
    if max_post_steps < 0:
        raise ValueError(f"max_post_steps must be ≥ 0, got {max_post_steps}")
    if cfg_scale > 0:
        raise ValueError("cfg_scale > 0 is not supported for block-causal decoding")
    own = getattr(model, "block_size", None)
    if own is not None and own != block_length:
        raise ValueError(f"block_length ({block_length}) differs from the block size the policy attends with "
                         f"({own}); decode with block_length={own} or load it with policy.lm.block_size={block_length}")


def steps_per_block_from(steps: int | None, gen_length: int, block_length: int) -> int:
    """LLaDA's ``steps`` (a total over ``gen_length``) → the same steps-per-token density per block."""
    if steps is None:
        return block_length  # one commit per step at least, as many steps as positions
    return max(1, round(steps * block_length / gen_length))


def _select(score, active, k: int, threshold):
    """LLaDA2's commit rule on (b, bl): all above ``threshold`` if that meets the quota ``k``, else top-k.

    Ties go to the leftmost position (stable sort), so greedy decoding is deterministic.
    """
    score = score.masked_fill(~active, float("-inf"))
    quota = torch.minimum(torch.full_like(active.sum(1), k), active.sum(1))  # (b,)
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(ranked)
    rank.scatter_(1, ranked, torch.arange(score.shape[1], device=score.device).expand_as(ranked))
    top = active & (rank < quota[:, None])
    if threshold is None:
        return top
    high = active & (score > threshold)
    enough = high.sum(1) >= quota
    return torch.where(enough[:, None], high, top)


def generate_block_causal(model, prompt_ids, gen_length, steps, block_length, temperature, remasking, threshold,
                          cfg_scale, mask_id, generator, eos_id, pad_id, forbidden_ids, attention_mask, cache,
                          steps_per_block, editing_threshold, max_post_steps) -> GenerateOutput:
    """``masked.generate`` for block-causal models: validation, then ``generate_blocks``."""
    spb = steps_per_block if steps_per_block is not None else steps_per_block_from(steps, gen_length, block_length)
    validate_block(prompt_ids, gen_length, spb, block_length, threshold, editing_threshold, max_post_steps,
                   cfg_scale, model)
    if remasking not in REMASKING or temperature < 0:
        raise ValueError(f"remasking must be one of {REMASKING} and temperature ≥ 0 "
                         f"(got {remasking!r}, {temperature})")
    if cache == "dual":
        raise ValueError("cache='dual' is for bidirectional models; a block-causal model's cache='prefix' is "
                         "already exact (no block attends to later ones, so there is no suffix to cache)")
    if cache not in (None, "prefix", "none"):
        raise ValueError(f"cache must be None, 'prefix' or 'none', got {cache!r}")
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match prompt_ids "
                         f"{tuple(prompt_ids.shape)}")
    spec = _Spec(prompt_ids.shape[1], gen_length, block_length, mask_id, float(temperature), remasking, threshold,
                 None, 0.0, sorted({mask_id, *map(int, forbidden_ids)}), eos_id,
                 eos_id if pad_id is None else pad_id, generator)
    return generate_blocks(model, prompt_ids, gen_length, spb, block_length, spec, attention_mask=attention_mask,
                           cache=cache != "none", editing_threshold=editing_threshold, max_post_steps=max_post_steps)


def generate_blocks(model, prompt_ids, gen_length, steps_per_block, block_length, spec: _Spec, *,
                    attention_mask=None, cache=True, editing_threshold=None, max_post_steps=16) -> GenerateOutput:
    """Decode ``gen_length`` tokens after ``prompt_ids`` (B, P) block by block; see the module docstring."""
    B, P = prompt_ids.shape
    device, bl, G = prompt_ids.device, block_length, gen_length
    total = -(-(P + G) // bl) * bl  # the window is whole blocks; the tail past P + G is hidden
    x = torch.full((B, total), spec.mask_id, dtype=prompt_ids.dtype, device=device)
    x[:, :P] = prompt_ids
    am = torch.zeros(B, total, dtype=torch.long, device=device)
    am[:, :P] = 1 if attention_mask is None else attention_mask
    am[:, P:P + G] = 1
    width = total - P  # answer + tail
    out = GenerateOutput(tokens=x[:, :P + G].clone(),
                         order=torch.full((B, width), -1, dtype=torch.long, device=device),
                         token_logprobs=torch.zeros(B, width, device=device),
                         confidence=torch.zeros(B, width, device=device),
                         steps_taken=torch.zeros(B, dtype=torch.long, device=device), nfe=0, forward_tokens=0,
                         prompt_length=P, edits=torch.zeros(B, width, dtype=torch.long, device=device))
    schedule = num_transfer_tokens(torch.tensor([bl], device=device), steps_per_block)[0].tolist()
    state = _BlockState(x, am, out, spec, cache, editing_threshold, max_post_steps, schedule)
    for blk in range(P // bl, total // bl):
        if state.rows.numel() == 0:
            break
        state.decode_block(model, blk * bl, (blk + 1) * bl)
    out.tokens = x[:, :P + G]
    out.order, out.token_logprobs = out.order[:, :G], out.token_logprobs[:, :G]
    out.confidence, out.edits = out.confidence[:, :G], out.edits[:, :G]
    return out


class _BlockState:
    """The decoding state shared by the blocks of one call: tokens, active rows and the cache."""

    def __init__(self, x, am, out, spec, use_cache, editing_threshold, max_post_steps, schedule):
        self.x, self.am, self.out, self.spec = x, am, out, spec
        self.use_cache, self.edit_thr, self.max_post = use_cache, editing_threshold, max_post_steps
        self.schedule = schedule
        self.rows = torch.arange(x.shape[0], device=x.device)  # rows still decoding (not settled by eos)
        self.cache, self.cached = None, 0  # the transformers Cache and how many positions it holds

    def _forward(self, model, start: int, end: int) -> torch.Tensor:
        """Logits (b, end − start, V) of the current block for the active rows, mask id banned."""
        from rlgen.samplers.masked import _call

        x, am = self.x[self.rows, :end], self.am[self.rows, :end]
        if self.use_cache:
            logits, res = _call(model, x[:, self.cached:], am, past_key_values=self.cache, use_cache=True)
            self.out.forward_tokens += x[:, self.cached:].numel()
            self.cache = res.past_key_values
            crop_cache(self.cache, start)  # keep finished blocks only; the current one changes every step
            self.cached = start
        else:
            logits, _ = _call(model, x, am)
            self.out.forward_tokens += x.numel()
        self.out.nfe += 1
        logits = logits[:, -(end - start):]
        banned = [t for t in self.spec.forbidden if 0 <= t < logits.shape[-1]]
        if banned:
            logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
        return logits

    def decode_block(self, model, start: int, end: int) -> None:
        """Steps on positions start..end until the block is done (LLaDA2Pipeline's loop conditions)."""
        P = self.out.prompt_length
        fixed = torch.arange(start, end, device=self.x.device) < P  # (bl,) prompt positions inside the block
        step_idx, post = 0, 0
        while self.rows.numel():
            cur = self.x[self.rows, start:end]  # (b, bl)
            active = cur == self.spec.mask_id
            masks_remaining = bool(active.any())
            post += not masks_remaining
            x0, lp, score = _propose(self._forward(model, start, end), self.spec)  # (b, bl) each
            k = self.schedule[min(step_idx, len(self.schedule) - 1)]
            commit = _select(score, active, k, self.spec.threshold)
            edit = torch.zeros_like(commit)
            if self.edit_thr is not None:  # the re-prediction's probability, whatever ranked the commits
                edit = ~active & ~fixed[None, :] & (x0 != cur) & (lp.exp() > self.edit_thr)
            self._apply(start, end, commit | edit, edit, x0, lp, score)
            step_idx += masks_remaining
            if masks_remaining and step_idx >= len(self.schedule):
                break  # the schedule is spent (it sums to the block length, so no mask is left)
            if not masks_remaining and (self.edit_thr is None or not edit.any() or post > self.max_post):
                break
            if self.edit_thr is None and not (self.x[self.rows, start:end] == self.spec.mask_id).any():
                break  # nothing left to commit or edit: another step would change nothing

    def _apply(self, start, end, write, edit, x0, lp, score) -> None:
        """Write committed/edited tokens and their trajectory; rows settled by eos leave the batch."""
        P, rows, out = self.out.prompt_length, self.rows, self.out
        cur = self.x[rows, start:end]
        self.x[rows, start:end] = torch.where(write, x0, cur)
        a, b = start - P, end - P  # answer coordinates; negative = prompt positions (never written)
        lo = max(a, 0)
        w = write[:, lo - a:]
        step = out.steps_taken[rows][:, None]
        for buf, val in ((out.order, step.expand_as(w)), (out.token_logprobs, lp[:, lo - a:].float()),
                         (out.confidence, score[:, lo - a:].float())):
            seg = buf[rows, lo:b]
            buf[rows, lo:b] = torch.where(w, val.to(seg.dtype), seg)
        out.edits[rows, lo:b] += edit[:, lo - a:].long()
        out.steps_taken[rows] += 1
        if self.spec.eos_id is None:
            return
        gen = self.x[rows, P:P + self.spec.gen_length]
        order, lps = out.order[rows, :self.spec.gen_length], out.token_logprobs[rows, :self.spec.gen_length]
        settled = _eos_settle(gen, order, lps, self.spec)  # edits gen/order/lps in place (fills after eos)
        self.x[rows, P:P + self.spec.gen_length] = gen
        out.order[rows, :self.spec.gen_length], out.token_logprobs[rows, :self.spec.gen_length] = order, lps
        if settled.any():
            keep = (~settled).nonzero().squeeze(1)
            if self.cache is not None:
                self.cache.batch_select_indices(keep)
            self.rows = rows[keep]
