"""Fast-dLLM key/value caching for masked-diffusion decoding: the prefix cache and the dual cache.

Fast-dLLM (Wu et al. 2025, arXiv:2505.22618, Sec. 3.2) reuses attention keys/values across the
steps of one semi-autoregressive block. At the start of every block one full forward stores the
keys/values of all positions (the refresh); the later steps of the block then feed fewer positions:

- ``cache="prefix"``: the cache keeps the positions before the block (prompt + finished blocks);
  each step feeds the block and everything after it.
- ``cache="dual"`` (Fast-dLLM's DualCache): the cache keeps the prefix AND the suffix (the positions
  after the block, still all ``[MASK]``); each step feeds the block's ``block_length`` positions only.

**How the dual cache lives in a plain transformers ``Cache``.** The block's span is cut out of every
layer's keys/values after the refresh, so the cache holds [prefix, suffix]; each step appends the
fed block's keys/values at the end and they are cropped off again before the next step. Softmax
attention over a set of keys does not depend on their order, so this equals attending over the
positions in place, provided (1) attention is full (bidirectional, no mask: padded prompts are
refused) and (2) every cached key carries its own position: rotary embeddings applied before the
cache update (Llama; the LLaDA/Dream layouts of rlgen/testing/tiny_lms.py) or absolute position
embeddings added at the input (BERT). The fed block gets explicit ``position_ids``
(``start .. start + block_length``), because the cache length no longer says where it sits; the
model's forward must take ``position_ids``. Models that rotate keys after reading the cache (the
position is the index in the cache, as in LLaDA's released modeling code) do not fit; Fast-dLLM
patches those to overwrite the block's slot in place (``replace_position``).

**Exactness.** In a one-layer model a position's keys/values depend on its own token and position
only; prefix tokens are final and suffix tokens stay ``[MASK]`` until their block starts, so both
caches hold exactly what a full forward would compute: the same tokens as no cache. From the second
layer on, cached keys/values depend on the whole sequence, including the block tokens unmasked after
the refresh: the prefix cache's prefix goes stale, the dual cache's prefix and suffix both do. The
first step of every block is a full forward (exact); a single block (no suffix) makes dual = prefix.

Blocks are decoded in lockstep (the cache needs one block position per batch); rows done with a block
leave the batch and the cache. Pure torch: no I/O.
"""
from __future__ import annotations

import inspect

import torch

from rlgen.samplers.masked import GenerateOutput, _decode_step, _guided_logits, _Spec

CACHES = ("prefix", "dual")


def check_cache(model, cache: str, cfg_scale: float, attention_mask: torch.Tensor | None) -> None:
    """One-line ValueErrors for what ``cache`` ("prefix"/"dual") cannot do with this model and input."""
    need = ("past_key_values", "use_cache") + (("position_ids",) if cache == "dual" else ())
    params = inspect.signature(model.forward).parameters
    missing = [n for n in need if n not in params]
    if missing:
        raise ValueError(f"cache={cache!r} needs a model whose forward takes {', '.join(need)} (a Hugging Face "
                         f"style model); {type(model).__name__}.forward lacks {', '.join(missing)}")
    if cfg_scale > 0:
        raise ValueError(f"cache={cache!r} does not support cfg_scale > 0")
    if cache == "dual" and attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("cache='dual' does not support padded prompts (attention_mask with zeros): the cache "
                         "holds the suffix out of order, which only full attention tolerates")


def crop_cache(cache, length: int) -> None:
    """Shrink a Hugging Face ``Cache`` (edited in place by each forward) back to ``length``."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative = number of tokens to drop (transformers ≥ 4.4x and 5.x)


def cut_span(cache, start: int, end: int) -> None:
    """Remove positions ``start..end`` from every layer of a transformers ``DynamicCache``, in place.

    Each layer's keys/values are (b, heads, T, d); afterwards (b, heads, T − (end − start), d) with
    the positions after ``end`` moved up to ``start`` (their keys keep the positions baked into them).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"cache='dual' needs a transformers DynamicCache, got {type(cache).__name__}")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise ValueError(f"cache='dual' needs full-attention cache layers, got {type(layer).__name__}")
        if layer.get_seq_length() == 0:
            continue
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., end:, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., end:, :]], dim=-2)


def run_cached(model, out: GenerateOutput, am, spec: _Spec, dual: bool) -> None:
    """Fast-dLLM prefix (``dual=False``) or dual caching over the blocks of ``out``, in place."""
    B = out.tokens.shape[0]
    P, bl = spec.prompt_len, spec.block_length
    device = out.tokens.device
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for block in range(spec.gen_length // bl):
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        start, end = P + block * bl, P + (block + 1) * bl  # positions < start are final
        # the refresh: one full forward, whose keys/values of every position the block's steps reuse
        logits, res, fed = _guided_logits(model, out.tokens[rows], None if am is None else am[rows], spec,
                                          use_cache=True)
        cache = res.past_key_values
        if dual:
            cut_span(cache, start, end)  # [prefix, suffix]; each step appends the block after them
        else:
            crop_cache(cache, start)  # [prefix]
        kept = cache.get_seq_length()
        logits = logits[:, start:]  # (b, L − start, V)
        position_ids = torch.arange(start, end, device=device)[None, :]  # (1, bl) the fed block's positions
        while True:
            out.nfe += 1
            out.forward_tokens += fed
            finished = _decode_step(out, rows, logits, start - P, spec)  # (b,)
            done[rows] = finished
            busy = ~finished & (out.tokens[rows, start:end] == spec.mask_id).any(dim=1)
            if not busy.any():
                break
            crop_cache(cache, kept)  # drop the positions the last step appended
            if not busy.all():  # rows done with this block leave the batch, and their cache rows too
                cache.batch_select_indices(busy.nonzero().squeeze(1))
                rows = rows[busy]
            extra = {"position_ids": position_ids.expand(len(rows), bl)} if dual else {}
            logits, _, fed = _guided_logits(model, out.tokens[rows], None if am is None else am[rows], spec,
                                            start=start, end=end if dual else None, past_key_values=cache,
                                            use_cache=True, **extra)  # (b, bl or L − start, V)
