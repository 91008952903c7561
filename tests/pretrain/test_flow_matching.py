"""Flow-matching pretraining: pure pieces against hand computation and statistics, then tiny runs
(run folder layout, crash + resume equal to an uninterrupted run, generic datasets)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlgen.config import ConfigError, load_config
from rlgen.models import load_model
from rlgen.models.flow import FlowPolicy
from rlgen.models.prompt_encoder import PromptEmbeds
from rlgen.pretrain.flow_matching import (FlowMatchingTask, FlowPretrainConfig, _EpochBatches, drop_prompts,
                                          flow_matching_loss, lr_at, sample_sigmas, train)
from rlgen.runtime.rundir import read_metrics


# ------------------------------------------------------------------------------- pure pieces
def test_loss_equals_hand_computation():
    # x, ε per sample (B=2, one channel, 1×2 pixels); a "model" that returns 2·x_σ + σ.
    x = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.0]]]])
    eps = torch.tensor([[[[0.0, 2.0]]], [[[-1.0, 1.0]]]])
    sigma = torch.tensor([0.25, 0.5])
    model = lambda x_s, s, emb: 2 * x_s + s.reshape(-1, 1, 1, 1)  # noqa: E731
    emb = PromptEmbeds(torch.zeros(2, 1, 1), torch.ones(2, 1), torch.zeros(2, 1))
    # by hand: x_σ = (1−σ)x + σε; v = 2x_σ + σ; target = ε − x
    # sample 0: x_σ = [0.75, -0.75+0.5] = [0.75, -0.25]; v = [1.75, -0.25]; target = [-1, 3]
    # sample 1: x_σ = [0.25-0.5, 0.5]  = [-0.25, 0.5];  v = [0.0, 1.5];    target = [-1.5, 1]
    sq = [(1.75 + 1) ** 2, (-0.25 - 3) ** 2, (0.0 + 1.5) ** 2, (1.5 - 1) ** 2]
    loss = flow_matching_loss(model, x, eps, sigma, emb)
    assert loss.item() == pytest.approx(sum(sq) / 4, rel=1e-6)


def test_uniform_sigmas_fill_the_unit_interval():
    s = sample_sigmas(200_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert s.shape == (200_000,) and s.min() >= 0 and s.max() <= 1
    assert s.mean().item() == pytest.approx(0.5, abs=0.005)
    assert s.var().item() == pytest.approx(1 / 12, abs=0.002)
    # each tenth of [0, 1] holds a tenth of the draws
    hist = torch.histc(s, bins=10, min=0, max=1) / len(s)
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.005)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.6)])
def test_logit_normal_sigmas_have_the_given_logit_mean_and_std(mean, std):
    s = sample_sigmas(200_000, "logit_normal", mean, std, generator=torch.Generator().manual_seed(1)).double()
    logit = torch.log(s / (1 - s))
    assert logit.mean().item() == pytest.approx(mean, abs=0.01)
    assert logit.std().item() == pytest.approx(std, abs=0.01)
    assert (s > 0).all() and (s < 1).all()


def test_unknown_sigma_density_is_an_error():
    with pytest.raises(ValueError, match="cosmic"):
        sample_sigmas(4, "cosmic")


def test_prompt_dropout_rate():
    g = torch.Generator().manual_seed(0)
    prompts = [f"p{i}" for i in range(20_000)]
    assert drop_prompts(prompts, 0.0, g) == prompts and drop_prompts(prompts, 1.0, g) == [""] * len(prompts)
    out = drop_prompts(prompts, 0.3, g)
    assert sum(o == "" for o in out) / len(out) == pytest.approx(0.3, abs=0.015)
    assert all(o in ("", p) for o, p in zip(out, prompts))


def test_lr_schedule_warmup_then_cosine_to_floor():
    lr = lambda s: lr_at(s, 1e-3, 10, 110, 0.05)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # half way through the cosine
    assert lr(110) == pytest.approx(5e-5) and lr(500) == pytest.approx(5e-5)
    assert all(lr(s + 1) <= lr(s) for s in range(10, 120))


def test_epoch_batches_restart_at_any_position():
    full = iter(_EpochBatches(10, 3, seed=7))
    first = [next(full) for _ in range(8)]  # 3 batches per epoch: crosses two epoch boundaries
    later = iter(_EpochBatches(10, 3, seed=7, start=5))
    assert [next(later) for _ in range(3)] == first[5:]
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))  # no repeats within an epoch


# ------------------------------------------------------------------------------- config
TINY = ["model.image_size=16", "model.block_out_channels=[16, 32]", "model.cross_attention=[false, true]",
        "model.norm_num_groups=8", "model.attention_heads=2", "model.text_dim=16", "model.text_layers=1",
        "model.text_ff=32", "data.options={image_size: 16}", "data.vocab_prompts=256", "train.batch_size=4",
        "train.max_steps=6", "train.warmup_steps=2", "train.checkpoint_every=3", "sample.every=3",
        "sample.num_prompts=2", "sample.num_steps=3", "run.progress=false", "run.tensorboard=false",
        "run.num_threads=1"]


def tiny_cfg(tmp_path, name: str, *extra: str) -> FlowPretrainConfig:
    return load_config("configs/pretrain/flow_shapes.yaml", [*TINY, f"run.root={tmp_path}", f"run.name={name}", *extra],
                       schema=FlowPretrainConfig)


def test_shipped_configs_parse():
    shapes = load_config("configs/pretrain/flow_shapes.yaml", schema=FlowPretrainConfig)
    fm = load_config("configs/pretrain/flow_fashion_mnist.yaml", schema=FlowPretrainConfig)
    assert shapes.kind == fm.kind == "flow_pretrain"
    assert (fm.model.in_channels, fm.model.image_size, fm.data.dataset) == (1, 28, "fashion_mnist")


def test_unknown_config_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: flow_pretrain\ntrain:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, schema=FlowPretrainConfig)
    assert "train.max_step" in str(e.value) and str(p) in str(e.value)


# ------------------------------------------------------------------------------- tiny runs
def test_tiny_run_layout_then_crash_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    ref_ckpt = train(tiny_cfg(tmp_path, "straight"))
    run = tmp_path / "straight"
    assert (run / "config.yaml").is_file() and (run / "samples" / "step_6.png").is_file()
    assert (run / "samples" / "step_3.png").is_file()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "steps_per_s"} <= set(read_metrics(run)[0])
    assert ref_ckpt == run / "checkpoints" / "6" and (run / "checkpoints" / "3").is_dir()
    assert (run / "checkpoints" / "latest").resolve().name == "6"
    assert isinstance(load_model(run), FlowPolicy)  # a run folder loads its latest checkpoint
    state = json.loads((ref_ckpt / "trainer_state" / "state.json").read_text())
    assert state["step"] == 6 and state["task"]["ema_step"] == 6

    # Crash after step 4 (checkpoint 3 is the latest), then resume=auto.
    orig = FlowMatchingTask.train_step

    def crashing(self, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return orig(self, step)

    monkeypatch.setattr(FlowMatchingTask, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(tmp_path, "crashy"))
    assert [r["step"] for r in read_metrics(tmp_path / "crashy")] == [1, 2, 3, 4]
    monkeypatch.setattr(FlowMatchingTask, "train_step", orig)
    ckpt = train(tiny_cfg(tmp_path, "crashy", "run.resume=auto"))
    steps = [r["step"] for r in read_metrics(tmp_path / "crashy")]
    assert steps == [1, 2, 3, 4, 5, 6]

    for sub in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "trainer_state/model.safetensors"):
        a, b = load_file(str(ref_ckpt / sub)), load_file(str(ckpt / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # the published (EMA) model differs from the raw weights it averages
    raw = load_file(str(ckpt / "trainer_state" / "model.safetensors"))
    ema = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(raw["backbone.unet." + k], v) for k, v in ema.items())


def test_resume_from_finished_run_returns_its_checkpoint(tmp_path):
    first = train(tiny_cfg(tmp_path, "done", "train.max_steps=3"))
    again = train(tiny_cfg(tmp_path, "done", "train.max_steps=3", "run.resume=auto"))
    assert again == first and [r["step"] for r in read_metrics(tmp_path / "done")] == [1, 2, 3]


def test_generic_dataset_through_a_dataloader(tmp_path):
    # shapes as a plain map-style dataset (on_the_fly off) exercises the DataLoader path
    cfg = tiny_cfg(tmp_path, "loader", "data.on_the_fly=false", "data.options={size: 16, image_size: 16}",
                   "train.max_steps=2", "train.checkpoint_every=2", "sample.every=0")
    ckpt = train(cfg)
    rows = read_metrics(tmp_path / "loader")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((ckpt / "trainer_state" / "state.json").read_text())["task"]["data"] == {"batches": 2}


def test_image_shape_mismatch_is_explained(tmp_path):
    cfg = tiny_cfg(tmp_path, "mismatch", "data.options={image_size: 32}")
    with pytest.raises(ValueError, match="model.in_channels / model.image_size"):
        train(cfg)
