"""Block-diffusion decoding with the exact block cache vs without, side by side in one run.

    python benchmarks/bench_block_decoding.py --out-dir runs/bench_block        # train (minutes), then measure
    python benchmarks/bench_block_decoding.py --model runs/bench_block/model    # measure a trained model again

The model is a tiny LLaDA2-layout block-causal LM (``rlgen.testing.tiny_lms.build_tiny_llada2``:
remote code, blocks of --block tokens) with rlgen's character tokenizer, trained here on arith
(--level, answers padded with [EOS] to --gen-length) with the block-diffusion ELBO
(``rlgen.samplers.likelihood.block_elbo``: every block per sample in one two-copy forward, each
block conditioned on clean earlier blocks, as decoding conditions it).

Measured on held-out problems, for LLaDA's schedule (one token per step) and a confidence
threshold: accuracy, answer tokens per second (every answer position decoded, no early eos stop;
each setting keeps its fastest of --repeats interleaved rounds) and positions fed to the model, with
``cache="none"`` (every step re-feeds the prompt and all finished blocks, as diffusers'
LLaDA2Pipeline does) and ``cache="prefix"`` (finished blocks' keys/values kept; exact for
block-causal models, so the tokens must not change). Ratios, not absolute times, are the result.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rlgen  # noqa: F401  (before transformers' model classes)
from rlgen.data.text_tasks import TaskDataset, get_task
from rlgen.data.tokenizer import build_tokenizer, decode_completion, encode_batch
from rlgen.eval.text import benchmark_problems
from rlgen.models import load_model
from rlgen.samplers.likelihood import block_elbo
from rlgen.samplers.masked import generate
from rlgen.testing.tiny_lms import build_tiny_llada2


def train(args) -> Path:
    """Build the tiny block-causal model and train it with the block-diffusion ELBO; its folder."""
    tok = build_tokenizer()
    out = Path(args.out_dir)
    init = build_tiny_llada2(out / "init", seed=args.seed, block_size=args.block, hidden_size=128, num_layers=4,
                             num_heads=4, intermediate_size=256, max_length=64, tokenizer=tok)
    model = load_model(init, trust_remote_code=True).train()
    data = TaskDataset("arith", tok, size=50_000, seed=args.seed, levels=[args.level])
    prompts = torch.stack([it.prompt_ids for it in data.items])  # (N, P): one level, one width
    answers = torch.stack([it.answer_ids for it in data.items])
    pad = args.gen_length - answers.shape[1]
    answers = torch.cat([answers, torch.full((len(answers), pad), tok.eos_token_id)], dim=1)  # (N, G)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(prompts), (args.train_batch,), generator=g)
        elbo = block_elbo(model, prompts[idx], answers[idx], model.mask_id, args.block, generator=g)  # (B,)
        loss = -elbo.mean() / args.gen_length
        for group in opt.param_groups:  # linear warm-up, then constant
            group["lr"] = args.lr * min(1.0, step / 100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    model.eval().save_pretrained(out / "model")
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s → {out / 'model'}")
    return out / "model"


@torch.no_grad()
def decode(model, problems, args, **kw) -> tuple[float, float, int, int, list]:
    """(accuracy, seconds, answer tokens, positions fed, answers) for one setting."""
    task = get_task("arith")
    ids = torch.tensor(encode_batch(model.tokenizer, [task.format_prompt(p) for p in problems]))
    right, secs, fed, answers = 0.0, 0.0, 0, []
    for s in range(0, len(problems), args.batch_size):
        t0 = time.perf_counter()
        out = generate(model, ids[s:s + args.batch_size], args.gen_length, None, args.block,
                       forbidden_ids=(model.pad_id, model.mask_id), **kw)
        secs += time.perf_counter() - t0
        fed += out.forward_tokens
        answers += out.answer.tolist()
        for p, row in zip(problems[s:s + args.batch_size], out.answer.tolist()):
            right += task.check(p, decode_completion(model.tokenizer, row))
    return right / len(problems), secs, len(problems) * args.gen_length, fed, answers


def measure(model_dir: Path, args) -> dict:
    model = load_model(model_dir, trust_remote_code=True).eval()
    problems = benchmark_problems("arith", None, {"n_per_level": args.n, "levels": args.level})
    settings = {"one_per_step": {"steps_per_block": args.block}, f"threshold_{args.threshold}": {
        "steps_per_block": args.block, "threshold": args.threshold}}
    best: dict[tuple[str, str], tuple] = {}
    for _ in range(args.repeats):  # interleaved: a burst of foreign load hits every setting alike
        for name, kw in settings.items():
            for cache in ("none", "prefix"):
                acc, secs, toks, fed, answers = decode(model, problems, args, cache=cache, **kw)
                prev = best.get((name, cache))
                best[(name, cache)] = (acc, min(secs, prev[1]) if prev else secs, toks, fed, answers)
    rows = {}
    print(f"\narith {args.level}: {len(problems)} held-out problems, gen_length {args.gen_length}, block {args.block}, "
          f"batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"{'setting':18s} {'acc none':>8s} {'acc cache':>9s} {'Δacc(pt)':>8s} {'tok/s none':>10s} "
          f"{'tok/s cache':>11s} {'ratio':>6s} {'fed ratio':>9s} {'same ans':>8s}")
    for name in settings:
        (a0, s0, t0, f0, ans0), (a1, s1, t1, f1, ans1) = best[(name, "none")], best[(name, "prefix")]
        same = sum(x == y for x, y in zip(ans0, ans1)) / len(ans0)
        rows[name] = {"accuracy_none": a0, "accuracy_cache": a1, "tokens_per_s_none": t0 / s0,
                      "tokens_per_s_cache": t1 / s1, "speedup": (t1 / s1) / (t0 / s0), "fed_none": f0,
                      "fed_cache": f1, "identical_answers": same}
        print(f"{name:18s} {a0:8.3f} {a1:9.3f} {100 * (a1 - a0):+8.1f} {t0 / s0:10.0f} {t1 / s1:11.0f} "
              f"{rows[name]['speedup']:6.2f} {f0 / f1:9.2f} {same:8.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a trained model folder (skips training)")
    ap.add_argument("--out-dir", default="runs/bench_block_decoding")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--level", default="pm2")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--gen-length", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128, help="decoding batch")
    ap.add_argument("--n", type=int, default=400, help="held-out problems")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else train(args)
    rows = measure(model_dir, args)
    out = Path(args.out_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model": str(model_dir), "settings": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
