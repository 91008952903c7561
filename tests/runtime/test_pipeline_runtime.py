"""The runtime's pieces on a diffusers pipeline, in one process (no Ray, no DeepSpeed): the rollout worker
(decoded RGB rollouts, the prompt-embedding cache across steps and weight syncs, adapter-only weights,
policy.dtype), a Flow-GRPO update on the learner's LoRA policy, the learner's export into a checkpoint
that plain diffusers loads, and Diffusion-DPO image pairs encoded by the pipeline's VAE.
(tests/runtime/test_pipelines_e2e.py runs the same through train_rl.py on a Ray cluster.)"""
import types

import pytest
import torch

from rlgen.families import LoraSpec, family_of
from rlgen.families.flow import ImageRolloutConfig
from rlgen.models import load_model
from rlgen.runtime.engine import trainable_parameters
from rollouts.worker import RolloutWorker
from tests.algos.engines import adamw, context

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of fruit"]
CFG = ImageRolloutConfig(num_steps=2, noise_level=0.7, cfg_scale=2.0, batch_size=4)


def items(prompts, g=2):
    return [{"prompt": p} for p in prompts for _ in range(g)], torch.tensor([i for i in range(len(prompts))
                                                                             for _ in range(g)])


def count_encodes(policy) -> list[str]:
    """Wrap the pipeline adapter's text-encoder call: the prompts it is actually asked to encode."""
    seen, encode = [], policy.adapter.encode

    def counting(prompts):
        seen.extend(prompts)
        return encode(prompts)

    policy.adapter.encode = counting
    return seen


def test_worker_rollouts_cache_prompts_across_steps_and_weight_syncs(tiny_pipelines):
    worker = RolloutWorker(str(tiny_pipelines["sd3"]), {}, CFG, LoraSpec(rank=4), num_threads=1, device="cpu",
                           dtype="bfloat16")  # on CPU policy.dtype is ignored: float32
    assert worker.policy.dtype == torch.float32 and worker.policy._frozen["text_encoder_3"].dtype == torch.float32
    encoded = count_encodes(worker.policy)
    its, gids = items(PROMPTS[:2])
    ro = worker.generate(its, gids, seed=0)
    assert ro.latents.shape == (4, 3, 16, 8, 8) and ro.images.shape == (4, 3, 64, 64)  # latents; RGB decoded
    assert ro.images.min() >= -1 and ro.images.max() <= 1 and torch.isfinite(ro.log_probs).all()
    assert sorted(encoded) == sorted(PROMPTS[:2] + [""])  # each distinct string once, CFG's "" with them

    # a learner's trained adapter arrives (only lora_A/lora_B, by name); the cache survives it
    learner = load_model(tiny_pipelines["sd3"])
    family_of(learner).add_lora(learner, LoraSpec(rank=4))
    with torch.no_grad():
        for _, p in trainable_parameters(learner):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    adapter = {n: p.detach().numpy().copy() for n, p in trainable_parameters(learner)}
    assert adapter and all("lora_" in n for n in adapter)
    worker.load_weights(1, adapter)
    ro2 = worker.generate(its, gids, seed=0)
    assert ro2.weights_version == 1 and (ro2.latents[:, -1] - ro.latents[:, -1]).abs().max() > 1e-4
    its3, gids3 = items(PROMPTS[1:])  # step 3: one prompt seen before, one new
    worker.generate(its3, gids3, seed=1)
    assert sorted(encoded) == sorted(PROMPTS + [""])  # only the new prompt reached the text encoders


def test_learner_update_export_and_checkpoint(tiny_pipelines, tmp_path):
    """The learner's side: LoRA through the family, Flow-GRPO through the family's train module, then
    ``Learner._export_policy`` + ``Family.save`` → a folder load_model and plain diffusers both load."""
    from diffusers import StableDiffusion3Pipeline

    from rlgen.algos.advantages import group_advantages
    from rlgen.algos.flow_grpo import FlowGRPO, FlowGRPOConfig
    from rlgen.runtime.learner import Learner, LearnerSpec

    path = tiny_pipelines["sd3"]
    worker = RolloutWorker(str(path), {}, CFG, LoraSpec(rank=4), num_threads=1, device="cpu")
    its, gids = items(PROMPTS[:2])
    batch = worker.generate(its, gids, seed=0)
    batch.rewards = batch.images.flatten(1).mean(1)
    batch.advantages, batch.global_size, batch.seed = group_advantages(batch.rewards, batch.group_ids), 4, 0

    policy = load_model(path)
    family, lora = family_of(policy), LoraSpec(rank=4)
    family.add_lora(policy, lora)
    family.enable_gradient_checkpointing(policy)
    engine = adamw(family.train_module(policy), lr=1e-2)
    metrics = FlowGRPO(FlowGRPOConfig(kl_beta=0.01, clip_range=1e-2)).update(context(policy, engine, lora=True), batch)
    assert metrics["kl"] >= 0 and metrics["grad_norm"] > 0
    trained = {n: p.detach().numpy().copy() for n, p in trainable_parameters(policy)}

    spec = LearnerSpec(str(path), {}, lora, None, None)
    fake = types.SimpleNamespace(spec=spec, family=family, _export=None)
    exported = Learner._export_policy(fake, trained)  # the learner's own code path (rank 0 at save)
    ckpt = tmp_path / "ckpt"
    family.save(exported, ckpt, lora)
    again = load_model(ckpt)
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again.velocity_fn(PROMPTS[:2], 2.0)(x, 0.6),
                                   policy.velocity_fn(PROMPTS[:2], 2.0)(x, 0.6), rtol=0, atol=1e-5)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(ckpt))
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    theirs = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kw).images
    ours = again.generate(PROMPTS[:2], num_steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                          output_type="latent")
    assert (ours - theirs).abs().max().item() <= 1e-4

    # a run started from that checkpoint keeps training its adapter (a rank mismatch is one line)
    family.add_lora(again, LoraSpec(rank=4))
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(trained)
    with pytest.raises(ValueError, match="policy.lora.rank=8, but the checkpoint holds a rank-4"):
        family.add_lora(load_model(ckpt), LoraSpec(rank=8))


def test_dpo_pairs_are_the_vae_latents_the_img2img_pipeline_makes(tiny_pipelines, tmp_path):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents

    from rlgen.data.pairs import load_pairs, pair_record, write_image, write_pairs

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    for i, im in enumerate(imgs):
        write_image(im, tmp_path / f"{i}.png")
    write_pairs(tmp_path / "pairs.jsonl", [pair_record("a cat", "0.png", "1.png", 1.0, 0.0, {}),
                                           pair_record("a dog", "2.png", "3.png", 1.0, 0.0, {})])
    pairs = load_pairs(tmp_path / "pairs.jsonl", "image")
    worker = RolloutWorker(str(tiny_pipelines["sd3"]), {}, CFG, num_threads=1, device="cpu")
    prepared = worker.prepare_pairs(pairs)
    assert prepared["chosen"].shape == (2, 16, 8, 8) and prepared["prompts"] == ["a cat", "a dog"]
    vae = worker.policy.pipeline.vae
    chosen, _ = pairs.images()
    with torch.no_grad():  # what diffusers' SD3 img2img pipeline does to an init image (posterior mode)
        z = retrieve_latents(vae.encode(chosen), sample_mode="argmax")
    torch.testing.assert_close(prepared["chosen"], (z - vae.config.shift_factor) * vae.config.scaling_factor)


def test_policy_dtype_is_a_cuda_setting():
    from rlgen.config import load_config
    from rlgen.runtime.setup import precision_note
    from rlgen.utils import compute_dtype

    assert compute_dtype("bfloat16", "cpu") == torch.float32 and compute_dtype("bfloat16", "cuda") == torch.bfloat16
    args = ["policy.checkpoint=x", "policy.dtype=bfloat16"]
    cfg = load_config("configs/rl/flow_grpo_shapes.yaml", args)
    assert "learners have no GPU" in precision_note(cfg) and "compute in float32" in precision_note(cfg)
    gpu = load_config("configs/rl/flow_grpo_shapes.yaml", args + ["resources.rollout_gpus=1",
                                                                  "resources.learner_gpus=1", "run.device=auto"])
    assert precision_note(gpu) is None
    assert precision_note(load_config("configs/rl/flow_grpo_shapes.yaml", ["policy.checkpoint=x"])) is None


def test_a_hub_id_is_a_starting_policy(tiny_pipelines, tmp_path, monkeypatch):
    """policy.checkpoint=owner/name: checked from the local Hugging Face cache before anything starts; the
    actors get the id, and checkpoints point at it (portable), not at a cache folder."""
    from tests_helpers import offline_hub_cache

    from rlgen.config import ConfigError
    from rlgen.models import detect_family
    from rlgen.runtime.job import PolicyConfig
    from rlgen.runtime.setup import base_checkpoint

    offline_hub_cache(monkeypatch, tmp_path / "hub", "acme/tiny-sd3", tiny_pipelines["sd3"])

    assert str(base_checkpoint(PolicyConfig(checkpoint="acme/tiny-sd3"))) == "acme/tiny-sd3"
    assert detect_family("acme/tiny-sd3") == "flow"
    policy = load_model("acme/tiny-sd3")
    family_of(policy).add_lora(policy, LoraSpec(rank=2))
    family_of(policy).save(policy, tmp_path / "ckpt", LoraSpec(rank=2))
    assert load_model(tmp_path / "ckpt").base == "acme/tiny-sd3"
    with pytest.raises(ConfigError, match=r"policy.checkpoint: .*acme/other.* not in the local cache") as e:
        base_checkpoint(PolicyConfig(checkpoint="acme/other"))
    assert "\n" not in str(e.value)
    with pytest.raises(Exception, match=r"option\(s\) \['resolutoin'\] do not apply to a diffusers pipeline"):
        base_checkpoint(PolicyConfig(checkpoint="acme/tiny-sd3", options={"resolutoin": 64}))
