"""How much learning signal a text GRPO job's rollouts carry, before any training.

    python scripts/group_signal.py --config configs/rl/mdm_grpo_countdown.yaml [--steps 20] \
        [--checkpoint DIR] [key=value ...]

Rolls out ``--steps`` training steps' prompts exactly as the job would (its prompt source, group
size, rollout settings and seed; overrides as for train_rl.py) with the policy at ``--checkpoint``
(default ``policy.checkpoint``), then scores every completion with the task's exact verifier and
with its partial-credit one. Prints, per reward:

- ``mean``: mean reward (exact: sampled accuracy at the rollout settings);
- ``pass@G``: fraction of groups with at least one correct sample (exact reward = 1);
- ``mixed``: fraction of groups whose rewards are not all equal, i.e. those GRPO keeps
  (``algo.skip_uniform_groups``) and learns from; the rest give no gradient;
- ``well_formed``: fraction of completions the verifier parses (partial reward > 0);
- ``distinct``: mean number of distinct completions per group (of G).

``--estimators d1,coupled`` also scores every completion with those log-prob estimators
(rlgen/algos/mdm_grpo.py, one plan each, seeded) and prints the Pearson correlation of each
sequence's estimated log-prob (summed over its decided tokens) with its exact log-prob under the
sampler (the ``trajectory`` replay), and their mean per-token gap: how well an estimator's ratio
tracks the policy that actually produced the samples.

Everything runs in this process on the CPU (no Ray); a step of countdown's config takes ~0.1 s.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
from tqdm import tqdm


def group_stats(rewards: list[float], groups: list[int], correct: float = 1.0) -> dict:
    """pass@G, mixed-group fraction and mean of ``rewards`` grouped by ``groups`` (same length)."""
    by = defaultdict(list)
    for r, g in zip(rewards, groups):
        by[g].append(r)
    n = max(len(by), 1)
    return {"mean": sum(rewards) / max(len(rewards), 1),
            "pass@G": sum(max(v) >= correct for v in by.values()) / n,
            "mixed": sum(max(v) - min(v) > 1e-12 for v in by.values()) / n}


def pearson(x: list[float], y: list[float]) -> float:
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([xt, yt]))[0, 1])


@torch.no_grad()
def estimator_logprobs(algo_cfg, policy, bucket, names, gen, seq_lp: dict, tok_gap: dict) -> None:
    """Append each row's summed exact (sampler) log-prob and each estimator's to ``seq_lp``."""
    from dataclasses import replace

    from rlgen.algos.mdm_grpo import banned_ids, make_plan, plan_logprobs

    decided = bucket.order >= 0  # (b, G): eos fill is not a model decision
    exact = torch.where(decided, bucket.token_logprobs, torch.zeros_like(bucket.token_logprobs))
    seq_lp["exact"] += exact.sum(1).tolist()
    for e in names:
        plan = make_plan(replace(algo_cfg, estimator=e), bucket.tokens, bucket.order, bucket.prompt_length,
                         policy.mask_id, gen)
        lp = plan_logprobs(policy, plan, bucket.tokens, banned_ids(policy))  # (b, G)
        seq_lp[e] += lp.sum(1).tolist()
        tok_gap[e] += ((lp - exact).abs()[decided]).tolist()


def main(argv: list[str] | None = None) -> int:
    import rlgen  # noqa: F401
    from rlgen.config import load_config
    from rlgen.data.text_tasks import get_task
    from rlgen.families.masked_lm import rollout_text
    from rlgen.models import load_model
    from rlgen.runtime.sources import PromptSource

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", default=None, help="policy to roll out (default: the config's policy.checkpoint)")
    ap.add_argument("--steps", type=int, default=20, help="training steps' prompts to roll out")
    ap.add_argument("--first-step", type=int, default=1)
    ap.add_argument("--estimators", default="", help="comma-separated estimators to compare with the exact "
                                                     "log-probs (d1, coupled)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    torch.set_num_threads(cfg.run.num_threads)
    task = get_task(cfg.prompts.source)
    policy = load_model(a.checkpoint or cfg.policy.checkpoint, device="cpu").eval()
    source = PromptSource(cfg.prompts, cfg.run.seed, "text")
    gen = torch.Generator().manual_seed(cfg.run.seed)
    G = cfg.prompts.group_size
    exact, partial, groups, distinct = [], [], [], []
    names = [e for e in a.estimators.split(",") if e]
    seq_lp = {e: [] for e in ["exact", *names]}  # per completion: summed log-prob of its decided tokens
    tok_gap = {e: [] for e in names}
    for step in tqdm(range(a.first_step, a.first_step + a.steps), desc="rollout steps"):
        items = [it for it in source.sample(step) for _ in range(G)]
        gids = torch.arange(len(items)) // G + step * 10_000
        out = rollout_text(policy, items, gids, cfg.rollout, gen)
        for it, text in zip(items, out.completions):
            exact.append(task.check(it["problem"], text))
            partial.append(task.check(it["problem"], text, partial=True))
        groups += gids.tolist()
        distinct += [len(set(out.completions[i:i + G])) for i in range(0, len(items), G)]
        for b in out.buckets:
            estimator_logprobs(cfg.algo, policy, b, names, gen, seq_lp, tok_gap)
    res = {"checkpoint": str(a.checkpoint or cfg.policy.checkpoint), "groups": len(set(groups)), "G": G,
           "temperature": cfg.rollout.temperature, "threshold": cfg.rollout.threshold,
           "exact": group_stats(exact, groups), "partial": group_stats(partial, groups),
           "well_formed": sum(p > 0 for p in partial) / len(partial), "distinct": sum(distinct) / len(distinct)}
    if names:
        res["estimators"] = {e: {"corr_with_exact": pearson(seq_lp[e], seq_lp["exact"]),
                                 "token_gap": sum(tok_gap[e]) / max(len(tok_gap[e]), 1)} for e in names}
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{res['checkpoint']}: {res['groups']} groups of G={G}, temperature {res['temperature']}, "
          f"threshold {res['threshold']}")
    for name in ("exact", "partial"):
        s = res[name]
        print(f"  {name:8s} mean {s['mean']:.3f}  pass@G {s['pass@G']:.3f}  mixed groups {s['mixed']:.3f}")
    print(f"  well-formed {res['well_formed']:.3f}  distinct completions per group {res['distinct']:.2f} / {G}")
    for e, v in res.get("estimators", {}).items():
        print(f"  {e:8s} sequence log-prob vs exact: corr {v['corr_with_exact']:.3f}, mean |token gap| "
              f"{v['token_gap']:.3f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
