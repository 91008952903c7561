"""Decoding strategies for a masked-diffusion LM, measured side by side in one run.

    python benchmarks/bench_mdm_decoding.py --checkpoint rlgen/assets/mdm_countdown_base --task countdown

For each strategy: accuracy on held-out problems, forward passes per answer token (NFE/token) and
per answer (NFE/ans), tokens/s batched (--batch-size) and at batch 1 (on --n1 problems spread
evenly over the levels), all as ratios to LLaDA's default (one token per step, one block).
Answer tokens are the task's fixed answer width, [EOS] padding included (countdown), givens
included (sudoku rewrites the whole grid). Strategies:
  one_per_step      steps = gen_length (the baseline)
  steps_1/<k>       steps = ceil(gen_length / k) per answer (k tokens per step; --step-divisors)
  threshold_<t>     confidence-threshold parallel decoding (Fast-dLLM), per-row early exit
  threshold_<t>@block  the same in semi-autoregressive blocks of --cache-block tokens (no cache)
  threshold_<t>+prefix the same blocks with Fast-dLLM's approximate prefix KV cache
  threshold_<t>+dual   the same blocks with Fast-dLLM's dual cache (prefix + all-mask suffix cached,
                    only the block fed; rlgen/samplers/kv_cache.py)
  blocks@block / blocks+prefix / blocks+dual   one token per step in those blocks, without and
                    with each cache (more steps per block, so more reuse per refresh)
                    (a block size that does not divide the answer width falls back to one block,
                    whose prefix is the prompt and which has no suffix: dual = prefix there; only
                    for models that accept past_key_values)
--cache-only keeps one_per_step and the block/cache strategies. Besides the ratios to one_per_step,
×blk(B) and ×blk(1) give each cached strategy's tokens/s as a ratio to the same blocks uncached;
pos/tok = positions fed to the model per answer token (batched; the compute spent, timing-free).
No absolute-time claims: timings are noisy (each strategy keeps its fastest of --repeats
interleaved rounds); compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import torch

from rlgen.data.text_tasks import get_task
from rlgen.data.tokenizer import decode_completion, encode_batch
from rlgen.eval.text import benchmark_problems
from rlgen.models import load_model
from rlgen.samplers.masked import generate


def decode(model, problems, batch_size, **kw) -> tuple[list[float], int, int, float, int]:
    """(rewards, row forward passes, answer tokens, seconds, positions fed) for one strategy."""
    tok = model.tokenizer
    ids = encode_batch(tok, [get_task(p["task"]).format_prompt(p) for p in problems])
    groups = defaultdict(list)
    for i, p in enumerate(problems):
        groups[(len(ids[i]), get_task(p["task"]).gen_length(p))].append(i)
    rewards = [0.0] * len(problems)
    steps = tokens = fed = 0
    secs = 0.0
    for (_, g), idx in sorted(groups.items()):
        block = min(kw.get("block_length") or g, g)
        block = g if g % block else block
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            prompt = torch.tensor([ids[i] for i in chunk])
            n_steps = math.ceil(g * kw["steps_frac"]) if kw.get("steps_frac") else g
            n_steps = max(g // block, n_steps - n_steps % (g // block))
            t0 = time.perf_counter()
            out = generate(model, prompt, gen_length=g, steps=n_steps, block_length=block,
                           threshold=kw.get("threshold"), cache=kw.get("cache"), mask_id=model.mask_id,
                           eos_id=model.eos_id, forbidden_ids=(model.pad_id, model.mask_id))
            secs += time.perf_counter() - t0
            for i, row in zip(chunk, out.answer.tolist()):
                rewards[i] = get_task(problems[i]["task"]).check(problems[i], decode_completion(tok, row))
            steps += int(out.steps_taken.sum())
            tokens += len(chunk) * g
            fed += out.forward_tokens
    return rewards, steps, tokens, secs, fed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--task", default="arith")
    ap.add_argument("--n-per-level", type=int, default=200)
    ap.add_argument("--levels", default="", help="comma-separated levels (default: the task's)")
    ap.add_argument("--n1", type=int, default=48, help="problems decoded at batch 1")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--thresholds", default="0.9,0.7")
    ap.add_argument("--step-divisors", default="2", help="fixed schedules with gen_length / k steps")
    ap.add_argument("--cache-block", type=int, default=4)
    ap.add_argument("--cache-modes", default="prefix,dual", help="caches compared with the same blocks uncached")
    ap.add_argument("--cache-only", action="store_true", help="skip the unblocked step/threshold strategies")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds; the fastest of each is kept")
    ap.add_argument("--out", help="also write the table as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    problems = benchmark_problems(args.task, None, {"n_per_level": args.n_per_level, "levels": args.levels or None})
    # batch-1 subset: every k-th problem, so every level is in it (the list is ordered by level)
    subset = problems[::max(1, len(problems) // args.n1)][:args.n1]
    strategies = {"one_per_step": {}}
    if not args.cache_only:
        for k in filter(None, args.step_divisors.split(",")):
            strategies[f"steps_1/{k}"] = {"steps_frac": 1.0 / float(k)}
        for t in filter(None, args.thresholds.split(",")):
            strategies[f"threshold_{t}"] = {"threshold": float(t)}
    caches = [c for c in args.cache_modes.split(",") if c]
    # the same blocks without a cache isolate each cache's effect
    for name, kw in [("blocks", {})] + [(f"threshold_{t}", {"threshold": float(t)})
                                        for t in filter(None, args.thresholds.split(","))]:
        strategies[f"{name}@block"] = {**kw, "block_length": args.cache_block}
        for c in caches:
            strategies[f"{name}+{c}"] = {**kw, "cache": c, "block_length": args.cache_block}
    rows, secs, secs1 = {}, {}, {}
    with torch.no_grad():
        # Strategies take turns, --repeats rounds, and each keeps its fastest time: on a shared
        # machine a burst of foreign load then hits every strategy alike instead of one of them.
        for rep in range(args.repeats):
            for name, kw in strategies.items():
                if rows.get(name, 0) is None:
                    continue
                try:
                    r, steps, toks, t, fed = decode(model, problems, args.batch_size, **dict(kw))
                    _, _, toks1, t1, _ = decode(model, subset, 1, **dict(kw))
                except (ValueError, TypeError) as e:
                    rows[name] = None
                    print(f"{name}: n/a ({e})")
                    continue
                secs[name], secs1[name] = min(secs.get(name, t), t), min(secs1.get(name, t1), t1)
                rows[name] = (sum(r) / len(r), steps / toks, toks / secs[name], toks1 / secs1[name],
                              steps / len(problems), fed / toks)
    base = rows["one_per_step"]
    print(f"\ntask={args.task} problems={len(problems)} batch={args.batch_size} threads={args.threads}")
    print(f"{'strategy':22s} {'accuracy':>8s} {'Δacc(pt)':>8s} {'NFE/tok':>8s} {'NFE/ans':>8s} {'tok/s×(B)':>10s} "
          f"{'tok/s×(1)':>10s} {'×blk(B)':>8s} {'×blk(1)':>8s} {'pos/tok':>8s}")
    for name, row in rows.items():
        if row is None:
            print(f"{name:22s} {'n/a':>8s}")
            continue
        acc, nfe, tps, tps1, nfe_ans, pos = row
        blk = rows.get(name.rsplit("+", 1)[0] + "@block") if "+" in name else None
        vs = f"{tps / blk[2]:8.2f} {tps1 / blk[3]:8.2f}" if blk else f"{'':8s} {'':8s}"
        print(f"{name:22s} {acc:8.3f} {100 * (acc - base[0]):+8.1f} {nfe:8.3f} {nfe_ans:8.2f} {tps / base[2]:10.2f} "
              f"{tps1 / base[3]:10.2f} {vs} {pos:8.1f}")
    if args.out:
        table = {name: None if row is None else dict(zip(("accuracy", "nfe_per_token", "tokens_per_s",
                                                          "tokens_per_s_batch1", "nfe_per_answer",
                                                          "positions_fed_per_token"), row)) for name, row in rows.items()}
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "n_problems": len(problems), "strategies": table}, fh, indent=2)


if __name__ == "__main__":
    main()
