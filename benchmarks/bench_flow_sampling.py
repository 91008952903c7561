"""Overhead of SDE sampling with log-probs over a bare loop of model forwards.

    python benchmarks/bench_flow_sampling.py [--device cuda] [--batch 32] [--steps 10 20] [--repeats 3]

The floor is what any sampler must pay: one velocity forward per step plus an Euler update. Our
`rlgen.samplers.flow.sample` adds Flow-GRPO's SDE step (Liu et al. 2025, arXiv:2505.05470): noise
draws, the Gaussian log-density and storing every latent. The ratio sample / floor is the
overhead; the velocity net is a tiny diffusers UNet2DModel so the ratio is a pessimistic bound
(bigger models make the per-step bookkeeping relatively cheaper). No absolute-time assertions.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

# rlgen first: importing it makes torchvision (pulled in by diffusers' model classes) importable
# beside a CPU-only torch (see rlgen/_compat.py).
from rlgen.samplers.flow import sample, sigma_schedule

from diffusers import UNet2DModel  # isort: skip


def tiny_unet(channels: int, widths: tuple[int, ...]) -> UNet2DModel:
    # One resolution level per width, no attention: small enough for a shared CPU, still a real conv net.
    return UNet2DModel(
        sample_size=32,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        norm_num_groups=min(widths) // 2,
    )


def make_velocity_fn(model: UNet2DModel):
    # diffusers' flow pipelines feed the model timestep = σ·1000 (num_train_timesteps).
    return lambda x, sigma: model(x, sigma * 1000).sample


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def floor_loop(velocity_fn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Bare Euler loop: model forwards and x + v·dt, nothing recorded."""
    x = noise
    for i in range(sigmas.numel() - 1):
        v = velocity_fn(x, sigmas[i].expand(x.shape[0]))  # (B, C, H, W)
        x = x + v * (sigmas[i + 1] - sigmas[i])
    return x


def paired_medians(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median seconds per callable; repeats interleave the callables so load drift hits all alike."""
    for fn in fns.values():
        fn(warmup=True)  # allocator, cuDNN autotuning, lazy inits
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side (3 x size x size)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="UNet block channels")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu)")
    parser.add_argument("--ode", action="store_true", help="also time sample() with noise_level=0")
    args = parser.parse_args()
    device = torch.device(args.device)
    # The ratio, not throughput, is the result: one thread keeps CPU timings stable on a shared
    # machine, where torch's default (a thread per core) gets oversubscribed and noisy.
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = tiny_unet(3, tuple(args.widths)).to(device).eval()
    velocity_fn = make_velocity_fn(model)
    noise = torch.randn(args.batch, 3, args.size, args.size, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    print(f"device={device} batch={args.batch} shape=3x{args.size}x{args.size} unet={args.widths} "
          f"threads={torch.get_num_threads()} noise_level={args.noise_level} repeats={args.repeats}")
    cols = ["floor", "SDE sample"] + (["ODE sample"] if args.ode else [])
    header = f"{'steps':>5} | " + " | ".join(f"{c + ' (s)':>14}" for c in cols)
    header += f" | {'SDE/floor':>9} | {'extra ms/step':>13}"
    print(header + "\n" + "-" * len(header))
    for steps in args.steps:
        sigmas = sigma_schedule(steps, device=device)
        one_step = sigma_schedule(1, device=device)

        def run(noise_level, warmup=False):
            grid = one_step if warmup else sigmas
            return sample(velocity_fn, noise, grid, noise_level=noise_level, generator=gen)

        fns = {
            "floor": lambda warmup=False: floor_loop(velocity_fn, noise, one_step if warmup else sigmas),
            "SDE sample": lambda warmup=False: run(args.noise_level, warmup),
        }
        if args.ode:
            fns["ODE sample"] = lambda warmup=False: run(0.0, warmup)
        med = paired_medians(fns, device, args.repeats)
        row = " | ".join(f"{med[c]:>14.3f}" for c in cols)
        extra_ms = 1000 * (med["SDE sample"] - med["floor"]) / steps
        print(f"{steps:>5} | {row} | {med['SDE sample'] / med['floor']:>8.3f}x | {extra_ms:>13.2f}")


if __name__ == "__main__":
    main()
