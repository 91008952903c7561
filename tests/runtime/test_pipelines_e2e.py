"""Diffusers pipelines through ``train_rl.py`` on the one runtime: Flow-GRPO, Diffusion-DPO and Flow-OPD,
each 2 steps with LoRA on the tiny SD3 and the tiny FLUX pipeline folder, then resumed to step 3.

What is checked against something independent: the LoRA checkpoints load into *plain diffusers*
(``pipe.load_lora_weights(checkpoints/<step>)``) and change its output exactly into what rlgen's
``load_model(checkpoints/<step>)`` generates; the learner's trained adapter differs from the start;
the run folder holds what DESIGN.md promises (metrics rows, grids of decoded RGB images, checkpoints/0).
"""
import json

import pytest
import torch

import train_rl
from rlgen.runtime.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["run.progress=false", "run.tensorboard=false", "run.device=cpu", "train.save_every=1", "train.max_minutes=0",
          "resources.rollout_threads=1", "resources.learner_threads=1", "ray.num_cpus=3", "policy.lora.rank=4",
          "eval.benchmark=shapes", "eval.every=2", "eval.samples_per_prompt=1", "eval.batch_size=8"]
PROMPTS = "a photo of a cat\na red car on a street\na bowl of fruit on a table\ntwo dogs on a sofa\n"
# the pipelines' own guidance: SD3 runs both CFG branches (unconditional detached in training), FLUX.1-dev
# embeds the scale; the tiny FLUX pipeline's default resolution is FLUX's 1024, so set 64
PIPE = {"sd3": ["rollout.cfg_scale=2.0"], "flux": ["rollout.cfg_scale=3.5", "policy.options={resolution: 64}"]}


def job_args(algo: str, pipe: str, tmp_path, tiny_pipelines) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    base = [f"policy.checkpoint={tiny_pipelines[pipe]}", *PIPE[pipe],
            "eval.options={prompts_per_task: 1, steps: 2}"]
    if algo == "diffusion_dpo":
        return ["configs/dpo/diffusion_dpo_shapes.yaml", *base, f"pairs.path={tmp_path}/pairs/pairs.jsonl",
                "pairs.build.rewards={'rewards.examples:brightness': 1.0}", f"pairs.build.prompts={prompts}",
                "pairs.build.samples_per_prompt=2", "pairs.build.num_steps=2", "pairs.build.margin=0",
                "pairs.per_step=4", "pairs.batch=2", "learner.micro_batch_size=2", "algo.beta=100"]
    config = {"flow_grpo": "configs/rl/flow_grpo_shapes.yaml", "flow_opd": "configs/opd/flow_opd_shapes.yaml"}[algo]
    extra = [f"algo.teacher={tiny_pipelines[pipe]}", "algo.teacher_cfg_scale=3.0"] if algo == "flow_opd" else []
    return [config, *base, "prompts.source=file", f"prompts.file={prompts}", "prompts.per_step=2",
            "prompts.group_size=2", "rewards={'rewards.examples:brightness': 1.0}", "rollout.num_steps=2",
            "rollout.sde_window=0", "rollout.batch_size=4", "learner.micro_batch_size=2", "algo.num_minibatches=1",
            "algo.timestep_fraction=1.0", "train.grid_every=1", *extra]


def check_lora_checkpoint(ckpt, pipe_dir, size: dict, cfg: float):
    """rlgen's checkpoint loads on its own, and plain diffusers applies its adapter to the base pipeline."""
    from diffusers import DiffusionPipeline

    from rlgen.models import load_model

    meta = json.loads((ckpt / "rlgen_model.json").read_text())
    assert meta["weights"] == "lora" and meta["lora"]["rank"] == 4 and not (ckpt / "transformer").exists()
    ours = load_model(ckpt).eval()
    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, kw = ["a photo of a cat", "a bowl of fruit"], dict(num_inference_steps=2, guidance_scale=cfg,
                                                                output_type="latent", **size)
    base = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(ckpt))
    tuned = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    mine = ours.generate(prompts, num_steps=2, cfg_scale=cfg, generator=torch.Generator().manual_seed(0),
                         output_type="latent")
    assert (mine - tuned).abs().max().item() <= 1e-4  # plain diffusers + the adapter = the post-trained policy
    return (tuned - base).abs().max().item()


def check_run(run, steps: int, online: bool):
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for key in (("reward_mean", "time_rollout") if online else ("implicit_acc",)) + ("loss", "grad_norm"):
        assert key in rows[1], key
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]  # the shapes benchmark ran on the pipeline
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").resolve().name == str(steps) and (ckpts / "0" / "rlgen_model.json").is_file()
    assert list((run / "samples").glob("eval_*.png"))
    if online:
        assert (run / "samples" / "train_00001.png").is_file()  # decoded RGB rollouts, not latents
    return rows


def lora_delta(ckpt_a, ckpt_b) -> float:
    from safetensors.torch import load_file

    a, b = (load_file(str(c / "pytorch_lora_weights.safetensors")) for c in (ckpt_a, ckpt_b))
    assert a.keys() == b.keys() and all(k.startswith("transformer.") and "lora_" in k for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a if "lora_B" in k)


# what else each case switches on (the runtime paths a pipeline takes differently)
EXTRA = {("flow_grpo", "flux"): ["train.weight_sync=collective"],  # adapter-only broadcast (gloo here, NCCL on GPUs)
         ("flow_opd", "sd3"): ["policy.gradient_checkpointing=true", "policy.dtype=bfloat16",  # bf16: CUDA only
                               "policy.options={cfg_detach_uncond: false}"],
         ("diffusion_dpo", "flux"): ["policy.gradient_checkpointing=true"]}


def run_case(algo, pipe, tmp_path, tiny_pipelines, capsys):
    import ray

    config, *args = job_args(algo, pipe, tmp_path, tiny_pipelines)
    extra = EXTRA.get((algo, pipe), [])
    base = ["--config", config, f"run.root={tmp_path}", f"run.name={algo}_{pipe}", *COMMON, *args, *extra]
    assert train_rl.main([*base, "train.steps=2"]) == 0
    assert not ray.is_initialized()
    out = capsys.readouterr().out
    assert "held-out accuracy" in out
    if "policy.dtype=bfloat16" in extra:  # on CPU: said once, and the job trains in float32
        assert out.count("policy.dtype=bfloat16 applies on CUDA only") == 1
    run, online = tmp_path / f"{algo}_{pipe}", algo != "diffusion_dpo"
    rows = check_run(run, 2, online)
    if algo == "flow_opd":
        assert "eval/teacher_accuracy" in rows[0] and "distill_kl" in rows[1]
    ckpts = run / "checkpoints"
    assert lora_delta(ckpts / "0", ckpts / "2") > 0  # the learner's adapter moved and reached the checkpoint
    assert train_rl.main([*base, "train.steps=3", "run.resume=auto"]) == 0
    check_run(run, 3, online)
    assert json.loads((ckpts / "3" / "driver_state.json").read_text())["step"] == 3
    size = {"height": 64, "width": 64} if pipe == "flux" else {}
    moved = check_lora_checkpoint(ckpts / "3", tiny_pipelines[pipe], size, 2.0 if pipe == "sd3" else 3.5)
    assert moved > 0  # the adapter changes plain diffusers' output
    return run


# Each case takes 1.5-3.5 min on a shared 2-core machine (two jobs, each starting a Ray cluster, a rollout,
# a reward and a DeepSpeed learner actor that load the pipeline): all slow. The default suite has the same
# pieces in one process (tests/runtime/test_pipeline_runtime.py).
@pytest.mark.slow
@pytest.mark.parametrize("algo,pipe", [("flow_grpo", "sd3"), ("flow_grpo", "flux"), ("diffusion_dpo", "sd3"),
                                       ("diffusion_dpo", "flux"), ("flow_opd", "sd3"), ("flow_opd", "flux")])
def test_two_steps_then_resume(algo, pipe, tmp_path, tiny_pipelines, capsys):
    run_case(algo, pipe, tmp_path, tiny_pipelines, capsys)


@pytest.mark.slow
def test_a_real_recipe_runs_on_the_tiny_pipeline(tmp_path, tiny_pipelines, capsys):
    """configs/real/flow_grpo_sd35m_pickscore.yaml as written (bf16, LoRA r32, CFG 4.5 with the detached
    unconditional branch, collective adapter sync, the reward benchmark), shrunk to one CPU machine: only
    sizes, resources and the (downloaded) reward model change."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    cpu = ["ray.address=", "ray.num_cpus=3", "resources.rollout_workers=1", "resources.rollout_gpus=0",
           "resources.rollout_cpus=1", "resources.reward_workers=1", "resources.reward_gpus=0",
           "resources.reward_cpus=0.5", "resources.learner_gpus=0", "resources.learner_cpus=1",
           "learner.num_learners=1", "run.device=cpu"]
    small = [f"policy.checkpoint={tiny_pipelines['sd3']}", "policy.options.resolution=64", f"prompts.file={prompts}",
             "prompts.per_step=2", "prompts.group_size=2", "rollout.num_steps=2", "learner.micro_batch_size=1",
             "rewards={'rewards.examples:brightness': 1.0}", "reward_kwargs={}", f"eval.prompts={prompts}",
             "eval.options={reward: 'rewards.examples:brightness', reward_kwargs: {}, steps: 2}", "eval.every=2",
             "train.steps=2", "train.save_every=2"]
    args = ["--config", "configs/real/flow_grpo_sd35m_pickscore.yaml", f"run.root={tmp_path}", "run.name=real",
            "run.progress=false", "run.tensorboard=false", "resources.rollout_threads=1",
            "resources.learner_threads=1", *cpu, *small]
    assert train_rl.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("policy.dtype=bfloat16 applies on CUDA only") == 1
    rows = read_metrics(tmp_path / "real")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["kl"] >= 0 and "eval/reward_std" in rows[2]
    assert rows[0]["eval/accuracy"] == pytest.approx(rows[0]["eval/rewards.examples:brightness"])
    meta = json.loads((tmp_path / "real" / "checkpoints" / "2" / "rlgen_model.json").read_text())
    assert meta["lora"]["rank"] == 32 and meta["options"]["max_sequence_length"] == 128
