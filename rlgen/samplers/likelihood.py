"""Monte-Carlo ELBO estimators of log p(answer | prompt) for masked-diffusion language models.

A masked-diffusion LM has no tractable likelihood; LLaDA (Nie et al. 2025, arXiv:2502.09992,
Eq. 3 and Eq. 6) scores an answer of L tokens by a lower bound with two equal-expectation forms:

- t-form: t ~ U(0, 1], mask each answer token independently with probability t,
  estimate ``(1/t) · Σ_masked log p_θ(x_i | x_t)``;
- l-form: l ~ U{1..L}, mask exactly l answer tokens uniformly at random,
  estimate ``(L/l) · Σ_masked log p_θ(x_i | x_l)`` (LLaDA uses it for evaluation).

The t-form's variance is infinite: with probability ≈ L·t a sample masks one token and weighs it
by 1/t, so its second moment grows like ∫ dt/t near 0 (stratifying t does not remove this). Its
mean is still right, but prefer the l-form (weights at most L), the default of :func:`make_mask_plan`.

Both have expectation ``Σ_M (k−1)!(L−k)!/L! · Σ_{i∈M} log p(x_i | x_M)`` over masks M of size k ≥ 1;
for a model whose conditionals ignore the context this is exactly ``Σ_i log p(x_i)``. Only answer
positions are masked; the prompt stays visible; answer padding (``answer_mask`` False) is never
masked and never counted.

VRPO (LLaDA 1.5, Zhu et al. 2025, arXiv:2505.19223) reduces the variance of ELBO differences in
preference optimisation: spend a budget of n samples as n distinct timesteps with one mask each
("optimal allocation"; we also stratify the timesteps), and score the policy and the reference
model on the SAME timesteps and masks (antithetic sampling). :class:`MaskPlan` holds those draws
so :func:`elbo_from_plan` can reuse them for both models. Everything keeps autograd (the policy's
ELBO is a training loss); pass a ``torch.Generator`` for reproducible draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMS = ("t", "l")
ALLOCATIONS = ("optimal", "naive", "one_timestep")


@dataclass
class MaskPlan:
    """Precomputed ELBO draws, shared by every model scored on them. n samples, B rows, L tokens."""

    masks: torch.Tensor  # (n, B, L) bool: answer positions replaced by [MASK] in sample j
    weights: torch.Tensor  # (n, B) float32: 1/t (t-form) or L_b/l (l-form); 0 for empty answers
    t: torch.Tensor  # (n, B) float32: the masking level, t or l/L_b
    form: str

    @property
    def n_samples(self) -> int:
        return self.masks.shape[0]


def token_logprobs(model, input_ids, mask_id=None, targets=None, attention_mask=None) -> torch.Tensor:
    """log p_θ(· | input_ids) per position: (B, S, V), or (B, S) gathered at ``targets`` (B, S).

    ``model(input_ids)`` may return logits or an object with ``.logits``. The ``[MASK]`` logit is
    excluded (the sampler never predicts ``[MASK]`` either), and the softmax runs in float32 or
    better so bf16 models keep the small differences DPO-style losses are made of.
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    out = model(input_ids, **kwargs)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        logits = out[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, S, V)
    if mask_id is not None and 0 <= mask_id < logits.shape[-1]:
        keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[mask_id] = False
        logits = logits.masked_fill(~keep, float("-inf"))  # out of place: autograd-safe
    logp = torch.log_softmax(logits, dim=-1)
    if targets is None:
        return logp
    return logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, S)


def _levels(n, batch, generator, device, allocation) -> torch.Tensor:
    """(n, B) uniform draws in (0, 1]: i.i.d. ("naive"), one per stratum ((j + v)/n, "optimal"), or
    one level shared by the n samples of a row ("one_timestep": LLaDA 1.5's n_t = 1, n masks at one
    timestep, the allocation its Theorem shows to be worst; for measurements).

    Stratifying keeps each sample's level uniform on average over j, so the mean stays unbiased.
    """
    v = torch.rand(n, batch, generator=generator, device=device)  # [0, 1)
    if allocation == "one_timestep":
        v = v[:1].expand(n, batch)
    if allocation == "optimal":
        v = (torch.arange(n, device=device, dtype=v.dtype)[:, None] + v) / n
    return 1.0 - v  # (0, 1]: t = 0 would give weight 1/0


def make_mask_plan(batch, answer_len, n_samples, generator=None, form="l", allocation="optimal",
                   answer_mask=None, device=None) -> MaskPlan:
    """Draw the timesteps and masks for ``n_samples`` ELBO samples of ``batch`` answers.

    ``answer_mask`` (B, L) bool marks real answer tokens (default: all); L_b = its row sums.
    ``allocation="optimal"`` is VRPO's n distinct (stratified) timesteps with one mask each;
    ``"naive"`` draws n i.i.d. (timestep, mask) pairs, plain Monte-Carlo; ``"one_timestep"`` draws
    one timestep per row and n masks at it (the paper's worst split of the same budget).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}")
    # draw where the generator lives (a CPU generator cannot fill CUDA tensors), then move
    draw = generator.device if generator is not None else torch.device(device or "cpu")
    device = draw if device is None else torch.device(device)
    if answer_mask is None:
        answer_mask = torch.ones(batch, answer_len, dtype=torch.bool, device=device)
    if tuple(answer_mask.shape) != (batch, answer_len):
        raise ValueError(f"answer_mask {tuple(answer_mask.shape)} must be (batch, answer_len) = {(batch, answer_len)}")
    real = answer_mask.to(device=draw, dtype=torch.bool)[None]  # (1, B, L)
    n_real = real.sum(-1).float()  # (1, B) L_b
    u = _levels(n_samples, batch, generator, draw, allocation)  # (n, B)
    scores = torch.rand(n_samples, batch, answer_len, generator=generator, device=draw)  # (n, B, L)
    if form == "t":
        masks = (scores < u[..., None]) & real  # each real token masked w.p. t
        weights, level = 1.0 / u, u
    else:
        l = torch.ceil(u * n_real).clamp_min(1.0)  # (n, B) uniform on {1..L_b}
        # rank the real positions by a random score; the l lowest are masked (pads rank last)
        rank = scores.masked_fill(~real, 2.0).argsort(-1).argsort(-1)  # (n, B, L)
        masks = (rank < l[..., None]) & real
        weights = torch.where(n_real > 0, n_real / l, torch.zeros_like(l))
        level = torch.where(n_real > 0, l / n_real.clamp_min(1.0), torch.zeros_like(l))
    return MaskPlan(masks=masks.to(device), weights=weights.float().to(device), t=level.float().to(device), form=form)


def make_block_mask_plan(batch, prompt_len, answer_len, block_size, n_samples, generator=None,
                         answer_mask=None, allocation="optimal", device=None) -> MaskPlan:
    """ELBO draws for a *block-causal* model (block diffusion; Arriola et al. 2025, arXiv:2503.09573).

    Its likelihood factorises over blocks aligned to absolute position 0 (as the sampler decodes
    them): log p(answer) ≥ Σ_b ELBO(block b | clean blocks < b). Each sample picks one of the K
    blocks that hold answer positions uniformly, masks l ~ U{1..n_b} of that block's real answer
    tokens (l-form) and weighs them by ``K · n_b / l``: unbiased for the sum over blocks. Earlier
    blocks stay clean (what the sampler conditions on) and later ones too (a block-causal model never
    looks at them). Use with ``elbo_from_plan`` like ``make_mask_plan``'s plans (VRPO, training).
    """
    if n_samples < 1 or block_size < 1:
        raise ValueError(f"n_samples ({n_samples}) and block_size ({block_size}) must be ≥ 1")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    draw = generator.device if generator is not None else torch.device(device or "cpu")
    device = draw if device is None else torch.device(device)
    real = torch.ones(batch, answer_len, dtype=torch.bool, device=draw) if answer_mask is None \
        else answer_mask.to(device=draw, dtype=torch.bool)
    block_of = (prompt_len + torch.arange(answer_len, device=draw)) // block_size  # (L,) absolute block ids
    first, K = int(block_of[0]), int(block_of[-1] - block_of[0]) + 1
    chosen = first + torch.randint(K, (n_samples, batch), generator=generator, device=draw)  # (n, B)
    in_block = (block_of[None, None, :] == chosen[..., None]) & real[None]  # (n, B, L)
    n_b = in_block.sum(-1).float()  # (n, B)
    u = _levels(n_samples, batch, generator, draw, allocation)
    l = torch.ceil(u * n_b).clamp_min(1.0)
    scores = torch.rand(n_samples, batch, answer_len, generator=generator, device=draw)
    rank = scores.masked_fill(~in_block, 2.0).argsort(-1).argsort(-1)
    masks = (rank < l[..., None]) & in_block
    weights = torch.where(n_b > 0, K * n_b / l, torch.zeros_like(l))
    level = torch.where(n_b > 0, l / n_b.clamp_min(1.0), torch.zeros_like(l))
    return MaskPlan(masks=masks.to(device), weights=weights.float().to(device), t=level.float().to(device), form="l")


def elbo_from_plan(model, prompt_ids, answer_ids, plan: MaskPlan, mask_id, attention_mask=None,
                   return_samples=False, samples_per_forward=None):
    """ELBO estimate (B,) = mean over the plan's samples of ``weight · Σ_masked log p(x_i | x_masked)``.

    ``prompt_ids`` (B, P), ``answer_ids`` (B, L). With ``attention_mask`` (B, P) for left-padded
    prompts the model gets ``attention_mask=`` over prompt + answer. ``return_samples=True`` also
    returns the per-sample estimates (n, B), e.g. to measure variance. ``samples_per_forward``
    bounds how many of the n samples share one forward batch (default: all).
    """
    n, B, L = plan.masks.shape
    if prompt_ids.shape[0] != B or tuple(answer_ids.shape) != (B, L):
        raise ValueError(f"plan is for (B, L) = {(B, L)}; got prompt {tuple(prompt_ids.shape)}, "
                         f"answer {tuple(answer_ids.shape)}")
    P = prompt_ids.shape[1]
    clean = torch.cat([prompt_ids, answer_ids], dim=1)  # (B, P + L)
    am = None
    if attention_mask is not None:
        am = torch.cat([attention_mask, torch.ones_like(answer_ids, dtype=attention_mask.dtype)], dim=1)
    chunk = n if samples_per_forward is None else max(1, int(samples_per_forward))
    parts = []
    for lo in range(0, n, chunk):
        masks = plan.masks[lo:lo + chunk].to(clean.device)  # (c, B, L)
        c = masks.shape[0]
        noisy = clean.expand(c, B, P + L).clone()
        noisy[..., P:] = torch.where(masks, torch.full_like(answer_ids, mask_id), noisy[..., P:])
        logp = token_logprobs(model, noisy.reshape(c * B, P + L), mask_id,
                              targets=clean.repeat(c, 1), attention_mask=None if am is None else am.repeat(c, 1))
        logp = logp.reshape(c, B, P + L)[..., P:]  # (c, B, L) answer positions only
        # where() rather than a product: an unmasked position's log-prob may be -inf (its token is
        # visible, e.g. a [MASK]-valued pad), and 0·(-inf) would poison the sum.
        summed = torch.where(masks, logp, torch.zeros_like(logp)).sum(-1)  # (c, B)
        parts.append(plan.weights[lo:lo + chunk].to(summed.device) * summed)
    per_sample = torch.cat(parts, dim=0)  # (n, B)
    elbo = per_sample.mean(dim=0)
    return (elbo, per_sample) if return_samples else elbo


def elbo_t(model, prompt_ids, answer_ids, mask_id, n_samples, generator=None, answer_mask=None,
           attention_mask=None, return_samples=False):
    """Plain Monte-Carlo t-form ELBO (LLaDA Eq. 3): n i.i.d. t ~ U(0, 1], Bernoulli(t) masks. (B,)"""
    plan = make_mask_plan(answer_ids.shape[0], answer_ids.shape[1], n_samples, generator, form="t",
                          allocation="naive", answer_mask=answer_mask, device=answer_ids.device)
    return elbo_from_plan(model, prompt_ids, answer_ids, plan, mask_id, attention_mask, return_samples)


def elbo_l(model, prompt_ids, answer_ids, mask_id, n_samples, generator=None, answer_mask=None,
           attention_mask=None, return_samples=False):
    """Plain Monte-Carlo l-form ELBO (LLaDA Eq. 6): n i.i.d. l ~ U{1..L}, exactly l masked. (B,)"""
    plan = make_mask_plan(answer_ids.shape[0], answer_ids.shape[1], n_samples, generator, form="l",
                          allocation="naive", answer_mask=answer_mask, device=answer_ids.device)
    return elbo_from_plan(model, prompt_ids, answer_ids, plan, mask_id, attention_mask, return_samples)


def block_elbo(model, prompt_ids, answer_ids, mask_id, block_size, generator=None, answer_mask=None,
               return_details=False):
    """Every block's ELBO of a block-causal model in ONE forward (BD3-LM's two-copy sequence,
    Arriola et al. 2025, arXiv:2503.09573): (B,) unbiased for Σ_b ELBO(block b | clean blocks < b).

    The input is [noisy copy ; clean copy] of prompt + answer (2L positions, both with positions
    0..L−1). A noisy position of block b attends to the noisy positions of block b and the clean
    positions of blocks < b; a clean position attends block-causally to clean positions — exactly
    what the sampler shows the model while it decodes block b. Each block of each row masks
    l_b ~ U{1..n_b} of its real answer tokens (l-form) with weight n_b / l_b. Blocks are aligned to
    position 0, as ``generate`` decodes them. Needs ``model.forward_with_pattern`` (MaskedDiffusionLM).
    ``return_details`` adds (masks, per-token log-probs, weights), each (B, G).
    """
    B, P = prompt_ids.shape
    G = answer_ids.shape[1]
    L, device = P + G, answer_ids.device
    draw = generator.device if generator is not None else device
    clean = torch.cat([prompt_ids, answer_ids], dim=1)  # (B, L)
    real = torch.ones(B, G, dtype=torch.bool, device=draw) if answer_mask is None else answer_mask.to(draw).bool()
    blk = torch.arange(L, device=draw) // block_size  # (L,)
    masks = torch.zeros(B, G, dtype=torch.bool, device=draw)
    weights = torch.zeros(B, G, device=draw)
    scores = torch.rand(B, G, generator=generator, device=draw)
    for b in blk[P:].unique().tolist():  # a handful of blocks: a loop reads best
        cols = (blk[P:] == b).nonzero().squeeze(1)
        r = real[:, cols]  # (B, n)
        n_b = r.sum(1, keepdim=True).float()  # (B, 1)
        l = torch.ceil((1.0 - torch.rand(B, 1, generator=generator, device=draw)) * n_b).clamp_min(1.0)
        rank = scores[:, cols].masked_fill(~r, 2.0).argsort(-1).argsort(-1)
        masks[:, cols] = (rank < l) & r
        weights[:, cols] = torch.where(n_b > 0, n_b / l, torch.zeros_like(l)).expand_as(r)
    masks, weights, blk = masks.to(device), weights.to(device), blk.to(device)
    noisy = clean.clone()
    noisy[:, P:] = torch.where(masks, torch.full_like(answer_ids, mask_id), answer_ids)
    q_blk, k_blk = blk[:, None], blk[None, :]  # (L, 1), (1, L)
    allow = torch.cat([torch.cat([q_blk == k_blk, k_blk < q_blk], dim=1),  # noisy queries
                       torch.cat([torch.zeros(L, L, dtype=torch.bool, device=device), k_blk <= q_blk], dim=1)])
    allow = allow[None, None].expand(B, 1, 2 * L, 2 * L)  # (B, 1, 2L, 2L)
    positions = torch.arange(L, device=device).repeat(2).expand(B, 2 * L)
    logits = model.forward_with_pattern(torch.cat([noisy, clean], dim=1), allow, positions)[:, P:L]  # (B, G, V)
    logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=device), float("-inf"))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, answer_ids[..., None]).squeeze(-1)  # (B, G)
    elbo = torch.where(masks, weights * logp, torch.zeros_like(logp)).sum(-1)
    return (elbo, masks, logp, weights) if return_details else elbo
