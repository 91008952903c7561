"""Masked-diffusion trainer: the loss by hand, masking, lr schedule, a tiny run with exact resume."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import rlgen.pretrain.masked_diffusion as mdm
from rlgen.config import load_config
from rlgen.runtime.rundir import read_metrics

# One thread: on a shared 2-core machine a second OpenMP thread waits ~30 ms per op for a core.
torch.set_num_threads(1)


def test_loss_matches_hand_computation():
    # B=2 sequences of L=3 over a vocabulary of 3
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
                           [[1.0, 1.0, 3.0], [0.5, 0.0, 0.0], [0.0, 2.0, 1.0]]])
    targets = torch.tensor([[0, 2, 1], [2, 0, 1]])
    masked = torch.tensor([[True, True, False], [False, True, True]])
    t = torch.tensor([0.5, 0.25])

    def ce(row, target):  # −log softmax(row)[target]
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    seq0 = (ce([2, 0, 0], 0) + ce([0, 1, 0], 2)) / 0.5 / 2   # answer length 2
    seq1 = (ce([0.5, 0, 0], 0) + ce([0, 2, 1], 1)) / 0.25 / 3  # answer length 3
    got = mdm.mdm_loss(logits, targets, masked, t, torch.tensor([2.0, 3.0]))
    assert got.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # a float normaliser (one length for the batch) and no masked token at all
    assert mdm.mdm_loss(logits, targets, masked, t, 3.0).item() == pytest.approx((seq0 * 2 / 3 + seq1) / 2, rel=1e-6)
    assert mdm.mdm_loss(logits, targets, torch.zeros_like(masked), t, 3.0).item() == 0.0


def test_complementary_masks_cover_each_answer_token_once():
    seqs = torch.arange(4 * 9).reshape(4, 9)
    g = torch.Generator().manual_seed(0)
    targets, masked, t = mdm.draw_masks(seqs, prompt_len=5, eps=0.1, complementary=True, generator=g)
    assert targets.shape == (8, 9) and torch.equal(targets[:4], targets[4:])
    assert not masked[:, :5].any()                       # the prompt is never masked
    assert torch.equal(masked[:4, 5:] ^ masked[4:, 5:], torch.ones(4, 4, dtype=torch.bool))  # exactly once
    assert torch.allclose(t[:4] + t[4:], torch.ones(4))
    assert ((t >= 0.1) & (t <= 0.9)).all()


def test_plain_masks_respect_floor_and_prompt():
    g = torch.Generator().manual_seed(1)
    _, masked, t = mdm.draw_masks(torch.zeros(2000, 6, dtype=torch.long), 2, 0.3, False, g)
    assert not masked[:, :2].any() and (t >= 0.3).all()
    assert masked[:, 2:].float().mean().item() == pytest.approx(t.mean().item(), abs=0.02)


def test_lr_schedule():
    cfg = mdm.MDMTrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert mdm.lr_at(0, cfg) == pytest.approx(0.1)
    assert mdm.lr_at(10, cfg) == pytest.approx(1.0)
    assert mdm.lr_at(60, cfg) == pytest.approx(0.55)     # cosine halfway: 0.1 + 0.9·0.5
    assert mdm.lr_at(110, cfg) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert mdm.lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.75)


def _cfg(tmp_path, name, *extra):
    return load_config(None, [
        "kind=mdm_pretrain", f"run.name={name}", f"run.root={tmp_path}", "run.progress=false", "run.num_threads=1",
        "run.tensorboard=false", "data.task=arith", "data.num_train=300", "data.eval_n_per_level=3",
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_length=16", "train.batch_size=8", "train.max_steps=6", "train.warmup_steps=2",
        "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batch_size=16", *extra],
        schema=mdm.MDMPretrainConfig)


def test_tiny_run_writes_layout_and_resumes_exactly(tmp_path, monkeypatch):
    straight = mdm.train(_cfg(tmp_path, "straight", "train.ema=0.9", "train.complementary=true"))
    ck = straight / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["3", "6"]
    assert (ck / "latest").resolve().name == "6"
    assert (ck / "6" / "rlgen_model.json").is_file() and (ck / "6" / "trainer_state" / "optimizer.pt").is_file()
    assert (straight / "samples" / "step_3.txt").read_text().startswith("step 3  accuracy")
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "eval_accuracy", "eval_pm2"} <= set(rows[2])

    # Crash during update 5, then resume=auto: steps stay contiguous and match the straight run.
    real_step = mdm.MDMTask.train_step

    def crashing(self, step):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, step)

    monkeypatch.setattr(mdm.MDMTask, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        mdm.train(_cfg(tmp_path, "crashed", "train.ema=0.9", "train.complementary=true"))
    monkeypatch.setattr(mdm.MDMTask, "train_step", real_step)
    resumed = mdm.train(_cfg(tmp_path, "crashed", "train.ema=0.9", "train.complementary=true", "run.resume=auto"))
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, again):
        assert a["loss"] == b["loss"], a["step"]
    sa = json.loads((ck / "6" / "trainer_state" / "state.json").read_text())
    sb = json.loads((resumed / "checkpoints" / "6" / "trainer_state" / "state.json").read_text())
    assert sa["step"] == sb["step"] == 6 and sa["metrics"]["loss"] == sb["metrics"]["loss"]
    for sub in ("model.safetensors", "trainer_state/model.safetensors"):  # published EMA and raw weights
        a, b = load_file(str(ck / "6" / sub)), load_file(str(resumed / "checkpoints" / "6" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_pretraining_on_raw_text(tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("12+34=64\n5*6=03\n99-9=009\n")
    cfg = _cfg(tmp_path, "raw", f"data.text_file={text}", "train.objective=pretrain", "train.max_steps=2",
               "train.eval_every=0", "train.checkpoint_every=0")
    buckets = mdm.build_buckets(cfg, mdm.build_tokenizer())
    assert sorted(tuple(b.seqs.shape) for b in buckets) == [(1, 7), (2, 9)]  # + [EOS], grouped by length
    assert all(b.prompt_len == 0 for b in buckets)
    run = mdm.train(cfg)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    with pytest.raises(Exception, match="max_length 4 < longest training sequence 9"):
        mdm.build_buckets(_cfg(tmp_path, "raw2", f"data.text_file={text}", "model.max_length=4"), mdm.build_tokenizer())


def test_fine_tune_from_a_plain_hf_folder(tmp_path):
    from rlgen.models.masked_lm import MaskedDiffusionLM

    hf = tmp_path / "hf"
    tiny = MaskedDiffusionLM.tiny(mdm.build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64, max_length=20)
    tiny.net.save_pretrained(hf)         # an ordinary HF folder: no rlgen_model.json
    tiny.tokenizer.save_pretrained(hf)
    run = mdm.train(_cfg(tmp_path, "ft", f"model.init_from={hf}", "train.max_steps=1", "train.eval_every=0"))
    ck = run / "checkpoints" / "1"
    assert json.loads((ck / "rlgen_model.json").read_text())["hf_class"] == "BertForMaskedLM"
    assert json.loads((ck / "config.json").read_text())["hidden_size"] == 32  # the HF model, not model.*


def test_stop_step_ends_early_on_the_full_schedule(tmp_path):
    cfg = _cfg(tmp_path, "stop", "train.stop_step=3", "train.eval_every=0", "train.checkpoint_every=0")
    run = mdm.train(cfg)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([mdm.lr_at(i, cfg.train) for i in range(3)])
    assert rows[-1]["lr"] > mdm.lr_at(5, cfg.train)  # still mid-schedule (max_steps=6)
    assert (run / "checkpoints" / "latest").resolve().name == "3"
