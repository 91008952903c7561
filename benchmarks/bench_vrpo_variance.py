"""Variance of VRPO's preference-score estimate with and without its variance reduction.

    python benchmarks/bench_vrpo_variance.py --policy runs/vrpo_arith --reference runs/mdm_arith_base \
        --pairs runs/pairs_arith/pairs.jsonl [--n 8] [--repeats 64] [--num-pairs 64]

The preference score of a pair is ``s = β·((B_θ(y_w) − B_ref(y_w)) − (B_θ(y_l) − B_ref(y_l)))``
(LLaDA 1.5, arXiv:2505.19223, Eq. 4), each B an ELBO estimate from n samples (the budget: the
same number of forward passes in every variant). For each pair the score is re-estimated
``--repeats`` times with fresh draws; the variance over repeats is averaged over pairs. Variants:

  naive        n i.i.d. (timestep, mask) samples, drawn separately for policy and reference
  one_timestep one timestep per answer, n masks at it (the paper's worst allocation); separate draws
  allocation   n stratified timesteps, one mask each ("optimal allocation"); still separate draws
  antithetic   i.i.d. samples, shared by policy and reference
  vrpo         both (what training uses by default)

Printed: the variance of each and the ratio naive / variant (VRPO's target: ≥ 4×). β only scales
every variance by β², so ratios do not depend on it. ``--policy`` should differ from
``--reference`` (e.g. a DPO-trained run against its base, or two checkpoints of one run): with
identical models (the first step of DPO) the antithetic score is exactly 0, so the ratio is
infinite there; what allocation alone contributes is then seen in the variance of one model's
ELBO, also printed (``elbo``: naive i.i.d. vs stratified timesteps, per model, same n).
"""
from __future__ import annotations

import argparse
import json
import time


import torch

from rlgen.algos.vrpo import VRPOConfig, preference_score
from rlgen.data.pairs import load_pairs
from rlgen.families import family_of
from rlgen.models import load_model


class TextPairs:
    """Token ids of pairs (what ``Family.prepare_pairs`` gives a VRPO job)."""

    def __init__(self, prompt_ids, chosen_ids, rejected_ids, mask_id: int, eos_id: int):
        self.prompt_ids, self.chosen_ids, self.rejected_ids = prompt_ids, chosen_ids, rejected_ids
        self.mask_id, self.eos_id = mask_id, eos_id

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def load(cls, pairs, policy) -> "TextPairs":
        d = family_of(policy).prepare_pairs(policy, pairs)
        return cls(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"], policy.mask_id, d["eos_id"])


def pad_answers(answers: list[list[int]], fill: int) -> torch.Tensor:
    """Right-pad token lists to one length with ``fill`` (the EOS the sampler fills answers with)."""
    width = max(len(a) for a in answers)
    return torch.tensor([a + [fill] * (width - len(a)) for a in answers])  # (B, L)

VARIANTS = {"naive": dict(allocation="naive", antithetic=False),
            "one_timestep": dict(allocation="one_timestep", antithetic=False),
            "allocation": dict(allocation="optimal", antithetic=False),
            "antithetic": dict(allocation="naive", antithetic=True),
            "vrpo": dict(allocation="optimal", antithetic=True)}


def score_variance(policy, ref, data: TextPairs, idx: list[int], cfg: VRPOConfig, repeats: int, seed: int) -> float:
    """Mean over the pairs ``idx`` of the variance (over ``repeats`` fresh draws) of their score."""
    by_len: dict[int, list[int]] = {}
    for i in idx:  # one forward batch per prompt length
        by_len.setdefault(len(data.prompt_ids[i]), []).append(i)
    variances = []
    for group in by_len.values():
        prompt = torch.tensor([data.prompt_ids[i] for i in group])  # (b, P)
        both = pad_answers([data.chosen_ids[i] for i in group] + [data.rejected_ids[i] for i in group], data.eos_id)
        w, l = both.chunk(2)  # (b, L) each
        draws = torch.stack([preference_score(policy, ref, prompt, w, l, data.mask_id, cfg,
                                              torch.Generator().manual_seed(seed * 100_003 + r))
                             for r in range(repeats)])  # (R, b)
        variances.append(draws.double().var(0))
    return torch.cat(variances).mean().item()


def elbo_variance(model, data: TextPairs, idx: list[int], n: int, allocation: str, form: str, repeats: int,
                  seed: int) -> float:
    """Mean over the chosen and rejected answers of ``idx`` of the variance of ``model``'s ELBO."""
    from rlgen.samplers.likelihood import elbo_from_plan, make_mask_plan

    by_len: dict[int, list[int]] = {}
    for i in idx:
        by_len.setdefault(len(data.prompt_ids[i]), []).append(i)
    variances = []
    with torch.no_grad():
        for group in by_len.values():
            prompt = torch.tensor([data.prompt_ids[i] for i in group] * 2)  # (2b, P)
            answers = pad_answers([data.chosen_ids[i] for i in group] + [data.rejected_ids[i] for i in group],
                                  data.eos_id)  # (2b, L)
            draws = []
            for r in range(repeats):
                g = torch.Generator().manual_seed(seed * 100_003 + r)
                plan = make_mask_plan(*answers.shape, n, g, form=form, allocation=allocation)
                draws.append(elbo_from_plan(model, prompt, answers, plan, data.mask_id))
            variances.append(torch.stack(draws).double().var(0))  # (2b,)
    return torch.cat(variances).mean().item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="policy checkpoint or run folder")
    ap.add_argument("--reference", required=True, help="reference checkpoint or run folder")
    ap.add_argument("--pairs", required=True, help="text pairs file (python -m rlgen.pairs build …)")
    ap.add_argument("--n", type=int, default=8, help="ELBO sampling budget per estimate")
    ap.add_argument("--repeats", type=int, default=64)
    ap.add_argument("--num-pairs", type=int, default=64)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--form", default="l", choices=["l", "t"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy, ref = load_model(args.policy).eval(), load_model(args.reference).eval()
    pairs = load_pairs(args.pairs, modality="text")
    base = VRPOConfig(beta=args.beta, n_samples=args.n, form=args.form)
    data = TextPairs.load(pairs, policy)
    idx = list(range(min(args.num_pairs, len(data))))
    t0 = time.time()
    res = {name: score_variance(policy, ref, data, idx, VRPOConfig(beta=args.beta, n_samples=args.n, form=args.form,
                                                                   **kw), args.repeats, args.seed)
           for name, kw in VARIANTS.items()}
    elbo = {who: {a: elbo_variance(m, data, idx, args.n, a, args.form, args.repeats, args.seed)
                  for a in ("naive", "optimal")} for who, m in (("policy", policy), ("reference", ref))}
    out = {"policy": args.policy, "reference": args.reference, "pairs": len(idx), "n": args.n,
           "repeats": args.repeats, "form": args.form, "variance": res,
           "ratio_vs_naive": {k: res["naive"] / v if v > 0 else float("inf") for k, v in res.items()},
           "elbo_variance": elbo, "seconds": round(time.time() - t0, 1)}
    print(f"preference-score variance, budget n={args.n}, {len(idx)} pairs × {args.repeats} repeats "
          f"({out['seconds']} s)")
    for k, v in res.items():
        print(f"  {k:<11} {v:12.5g}   naive/{k} = {out['ratio_vs_naive'][k]:.2f}×")
    print(f"VRPO variance reduction at equal budget: {out['ratio_vs_naive']['vrpo']:.1f}×")
    for who, v in elbo.items():
        print(f"  ELBO of one answer, {who:<9}: naive {v['naive']:.5g}, stratified {v['optimal']:.5g} "
              f"(naive/stratified = {v['naive'] / v['optimal']:.2f}×)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
