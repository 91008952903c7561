"""An enumerable masked-diffusion LM for wd1 / SPG tests: a 1-token prompt, a 2-token answer over a
3-token vocabulary (+ [MASK] = 3). Each answer position's conditional is a free logit table indexed
by (position, prompt, what the other answer position shows), so every quantity — the any-order
decoding probability log π, the ELBO, the upper bound — is a handful of table look-ups, computed
here by hand and independently of rlgen's estimators."""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

V, MASK, P, G = 3, 3, 1, 2


class TableLM(nn.Module):
    """logits[:, 1 + k, :3] = T[k, prompt, token shown at the other answer position (3 = [MASK])]."""

    mask_id, pad_id = MASK, MASK
    device = torch.device("cpu")

    def __init__(self, seed=0, table: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.T = nn.Parameter(torch.randn(G, V, V + 1, V, generator=g) if table is None else table.clone())

    def forward(self, x):  # (B, 3) -> (B, 3, V + 1)
        out = torch.zeros(x.shape[0], P + G, V + 1)
        q = x[:, 0]
        for k in range(G):
            other = x[:, P + 1 - k]
            out = out.index_put((torch.arange(x.shape[0]), torch.full_like(q, P + k)),
                                torch.cat([self.T[k, q, other], torch.zeros(x.shape[0], 1)], dim=1))
        return out


def cond(model: TableLM, k: int, q: int, other: int) -> torch.Tensor:
    """(V,) p(answer position k = · | prompt q, the other position showing ``other``), [MASK] excluded."""
    return torch.softmax(model.T[k, q, other], dim=-1)


def log_pi(model, q, a, b, block_length=2) -> torch.Tensor:
    """Exact log-probability of answer (a, b): uniform random decoding order within a block of 2
    (½ of each order), or left to right with blocks of 1 (the semi-autoregressive sampler)."""
    left_first = cond(model, 0, q, MASK)[a] * cond(model, 1, q, a)[b]
    if block_length == 1:
        return torch.log(left_first)
    return torch.log(0.5 * left_first + 0.5 * cond(model, 1, q, MASK)[b] * cond(model, 0, q, b)[a])


def revealed_states(a, b):
    """Per answer token: [(probability under ρ_i, token the other position shows)] — the state at
    which token i is revealed under a uniform random order: other still masked (½) or already shown (½)."""
    return [[(0.5, MASK), (0.5, b)], [(0.5, MASK), (0.5, a)]]


def elbo(model, q, a, b) -> torch.Tensor:
    toks = (a, b)
    return sum(w * torch.log(cond(model, k, q, o)[toks[k]]) for k in range(G) for w, o in revealed_states(a, b)[k])


def eubo(model, q, a, b, beta) -> torch.Tensor:
    toks = (a, b)
    return sum(torch.log(sum(w * cond(model, k, q, o)[toks[k]] ** beta for w, o in revealed_states(a, b)[k])) / beta
               for k in range(G))


def all_answers():
    return list(itertools.product(range(V), repeat=G))


def total_probability(model, q) -> float:
    return float(sum(math.exp(float(log_pi(model, q, a, b))) for a, b in all_answers()))
