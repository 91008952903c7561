"""The GPU check of issue 16, prepared to run in one go on a CUDA machine (not run yet: none was available).

    python scripts/gpu_check_pipelines.py OUT_DIR      # ~3-5 min on one GPU, most of it actor start-up

1. In-process: a rollout worker with policy.dtype=bfloat16 on CUDA holds every pipeline component in
   bf16 and samples with fp32 trajectories; the same worker on CPU stays float32.
2. train_rl.py, Flow-GRPO with LoRA on the tiny SD3 pipeline in bf16 on CUDA, 3 steps: learner and rollout
   worker share the GPU (0.5 each), so the adapter goes through the object store; with two or more GPUs
   it also runs with ``train.weight_sync=collective`` (NCCL refuses two ranks on one device).
3. The last checkpoint applies to plain diffusers in bf16 (``load_lora_weights``) and equals rlgen's.
Prints one line per check and a JSON summary; exits non-zero on the first failure.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check_worker(sd3: Path) -> dict:
    import torch

    from rlgen.families import LoraSpec
    from rlgen.families.flow import ImageRolloutConfig
    from rollouts.worker import RolloutWorker

    cfg = ImageRolloutConfig(num_steps=4, cfg_scale=4.5, shift=0, batch_size=8)
    w = RolloutWorker(str(sd3), {}, cfg, LoraSpec(rank=4), device="cuda", dtype="bfloat16")
    dtypes = {n: str(m.dtype) for n, m in w.policy._frozen.items()} | {"transformer": str(w.policy.dtype)}
    assert set(dtypes.values()) == {"torch.bfloat16"}, dtypes
    ro = w.generate([{"prompt": "a photo of a cat"}] * 8, torch.zeros(8, dtype=torch.long), seed=0)
    assert ro.latents.dtype == torch.float32 and torch.isfinite(ro.log_probs).all() and ro.images.shape[1] == 3
    return {"worker_dtypes": dtypes, "log_prob_mean": ro.log_probs.mean().item()}


def run_job(sd3: Path, out: Path, name: str, sync: str) -> dict:
    prompts = out / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a street\na bowl of fruit\ntwo dogs on a sofa\n")
    args = [sys.executable, "train_rl.py", "--config", "configs/real/flow_grpo_sd35m_pickscore.yaml",
            f"run.root={out}", f"run.name={name}", "ray.address=", "run.progress=false",
            f"policy.checkpoint={sd3}", "policy.options.resolution=64", "policy.lora.rank=4",
            f"prompts.file={prompts}", "prompts.per_step=4", "prompts.group_size=4", "rollout.num_steps=4",
            "learner.num_learners=1", "learner.micro_batch_size=4", "resources.rollout_workers=1",
            "resources.reward_workers=1", "resources.reward_gpus=0", "resources.rollout_cpus=1",
            "resources.learner_cpus=1", "resources.reward_cpus=1",
            "rewards={'rewards.examples:brightness': 1.0}", "reward_kwargs={}", f"eval.prompts={prompts}",
            "eval.options={reward: 'rewards.examples:brightness', reward_kwargs: {}, steps: 4}",
            "train.steps=3", "train.save_every=3", "eval.every=3", f"train.weight_sync={sync}"]
    if sync == "object_store":
        args += ["resources.rollout_gpus=0.5", "resources.learner_gpus=0.5"]
    t0 = time.time()
    subprocess.run(args, cwd=ROOT, check=True)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["grad_norm"] > 0 for r in rows[1:])
    return {"seconds": round(time.time() - t0, 1), "time_sync": [r["time_sync"] for r in rows[1:]],
            "time_rollout": [r["time_rollout"] for r in rows[1:]], "time_learn": [r["time_learn"] for r in rows[1:]],
            "reward_mean": [r["reward_mean"] for r in rows[1:]]}


def check_checkpoint(sd3: Path, ckpt: Path) -> dict:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from rlgen.models import load_model

    ours = load_model(ckpt, device="cuda", dtype=torch.bfloat16)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3), torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(ckpt))
    kw = dict(num_inference_steps=4, guidance_scale=4.5, output_type="latent")
    theirs = pipe(["a photo of a cat"], generator=torch.Generator("cuda").manual_seed(0), **kw).images
    mine = ours.generate(["a photo of a cat"], num_steps=4, cfg_scale=4.5, output_type="latent",
                         generator=torch.Generator("cuda").manual_seed(0))
    diff = (mine.float() - theirs.float()).abs().max().item()
    assert diff < 5e-2, diff  # bf16 on both sides, different batching of the CFG branches
    return {"max_abs_diff_bf16": diff}


def main() -> None:
    import torch

    from rlgen.testing.tiny_pipelines import build_tiny_sd3

    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    assert torch.cuda.is_available(), "no CUDA device"
    sd3 = build_tiny_sd3(out / "sd3")
    summary = {"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0),
               "worker": check_worker(sd3)}
    print("[check] rollout worker in bf16: ok", flush=True)
    summary["object_store"] = run_job(sd3, out, "bf16_object_store", "object_store")
    print("[check] train_rl bf16, object-store sync: ok", flush=True)
    if torch.cuda.device_count() >= 2:
        summary["collective"] = run_job(sd3, out, "bf16_nccl", "collective")
        print("[check] train_rl bf16, NCCL sync: ok", flush=True)
    summary["checkpoint"] = check_checkpoint(sd3, out / "bf16_object_store" / "checkpoints" / "3")
    print("[check] checkpoint in plain diffusers (bf16): ok", flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
