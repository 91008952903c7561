"""SDE rollouts with log-probs through rlgen vs the diffusers pipeline call, and the prompt-embedding cache.

    python benchmarks/bench_diffusers_rollout.py [--pipeline DIR] [--batch 8] [--steps 10] [--cfg 4.5] \
        [--repeats 7] [--threads 1] [--device cpu]

On the same pipeline folder (default: the tiny SD3 pipeline, built into a temp dir), one "iteration" is:

- ``pipeline``: ``pipe(prompts, num_inference_steps, guidance_scale, output_type="latent")`` — prompt
  encoding + an Euler ODE loop (no log-probs, no stored trajectory);
- ``rlgen (cold)``: ``policy.encode_prompts`` with an empty cache + ``rlgen.samplers.flow.sample`` with
  Flow-GRPO's SDE (noise_level 0.7, every step stochastic, log-probs, all latents kept) — the same work
  plus what RL needs;
- ``rlgen (cached)``: the same with the prompts already in the policy's embedding cache, as rollout
  workers see them from the second iteration on (a group repeats each prompt; prompts recur over epochs);
- ``worker step`` / ``pipeline + decode``: what a training iteration's rollout costs on a rollout worker
  (``RolloutWorker.generate``: the same SDE sampling, all latents and log-probs, then the VAE decode of
  every sample to RGB for the rewards; its prompt cache warm from the step before) against the pipeline
  call that also decodes (``output_type="pt"``).

Runs are interleaved (pipeline, cold, cached, …) and the medians are reported with their ratios, measured
side by side in one process. Goal: rlgen (cold) / pipeline ≤ 1.10. No absolute-time assertions.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rlgen  # noqa: F401  (torchvision shim before diffusers pipelines)
from rlgen.models import load_model
from rlgen.samplers.flow import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=None, help="pipeline folder (default: build tiny SD3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.pipeline
        if path is None:
            from rlgen.testing.tiny_pipelines import build_tiny_sd3

            path = build_tiny_sd3(Path(tmp) / "sd3")
        policy = load_model(path, device=args.device)
        pipe = policy.pipeline  # the same modules: only the loop around them differs
        prompts = [f"a photo of object number {i} on a wooden table" for i in range(args.batch)]
        sigmas = policy.sigmas(args.steps)
        dev = policy.device

        def run_pipeline():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.cfg, output_type="latent",
                 generator=torch.Generator(dev).manual_seed(0))

        def run_rlgen(cold: bool):
            if cold:
                policy._cache.clear()
            g = torch.Generator(dev).manual_seed(0)
            with torch.no_grad():
                emb = policy.encode_prompts(prompts)
                noise = torch.randn((len(prompts), *policy.sample_shape), generator=g, device=dev)
                traj = sample(policy.velocity_fn(emb, args.cfg), noise, sigmas, noise_level=0.7, generator=g)
            assert traj.log_probs.shape == (len(prompts), args.steps)

        from rlgen.families.flow import ImageRolloutConfig
        from rollouts.worker import RolloutWorker

        worker = RolloutWorker(str(path), {}, ImageRolloutConfig(num_steps=args.steps, noise_level=0.7,
                                                                 cfg_scale=args.cfg, shift=0, batch_size=args.batch),
                               num_threads=args.threads, device=args.device)
        items, gids = [{"prompt": p} for p in prompts], torch.arange(len(prompts))

        def run_worker():
            ro = worker.generate(items, gids, seed=0)
            assert ro.images.shape[0] == len(prompts) and ro.log_probs.shape == (len(prompts), args.steps)

        def run_pipeline_decode():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.cfg, output_type="pt",
                 generator=torch.Generator(dev).manual_seed(0))

        runs = {"pipeline": run_pipeline, "rlgen (cold)": lambda: run_rlgen(True),
                "rlgen (cached)": lambda: run_rlgen(False), "pipeline + decode": run_pipeline_decode,
                "worker step": run_worker}
        times = {k: [] for k in runs}
        for fn in runs.values():  # warm-up (allocator, first-call costs)
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        encode = []
        for _ in range(args.repeats):
            policy._cache.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                policy.encode_prompts(prompts)
                policy.encode_prompts([""])
            encode.append(time.perf_counter() - t0)

    print(f"pipeline {path.name if args.pipeline else 'tiny SD3'}: batch {args.batch}, {args.steps} steps, "
          f"CFG {args.cfg}, {args.threads} thread(s), device {args.device}, median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:16s} {v * 1000:8.1f} ms")
    print(f"  rlgen SDE + log-probs (cold cache) / pipeline: {med['rlgen (cold)'] / med['pipeline']:.3f}x")
    print(f"  rlgen SDE + log-probs (cached)     / pipeline: {med['rlgen (cached)'] / med['pipeline']:.3f}x")
    print(f"  rollout worker step (decoded, cache warm) / pipeline + decode: "
          f"{med['worker step'] / med['pipeline + decode']:.3f}x; the worker encoded "
          f"{worker.policy.cache_misses} distinct prompts over {1 + args.repeats} steps "
          f"({worker.policy.cache_hits} cache hits)")
    print(f"  prompt encoding (B prompts + uncond): {statistics.median(encode) * 1000:.1f} ms; the cache saves "
          f"{1 - med['rlgen (cached)'] / med['rlgen (cold)']:.1%} of a rollout iteration "
          f"(cold / cached = {med['rlgen (cold)'] / med['rlgen (cached)']:.3f}x)")


if __name__ == "__main__":
    main()
