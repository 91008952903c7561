"""CLIP score: the shipped tiny CLIP ranks true captions first; preprocessing matches open_clip's;
clear load errors; the trainer's loss, checkpoints and resume."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards.clip_score import DEFAULT_CHECKPOINT, ClipLoadError, ClipScore, open_clip_module, preprocess_images
from rlgen.config import load_config
from rlgen.data import shapes as S
from rlgen.pretrain.clip import clip_loss, train


@pytest.fixture(scope="module")
def clip():
    return ClipScore()  # no kwargs: the shipped tiny shapes CLIP


def test_shipped_checkpoint_is_small_and_documented():
    files = {p.name: p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "eval.json"} <= set(files)
    assert sum(files.values()) <= 10 * 2**20
    ev = json.loads((DEFAULT_CHECKPOINT / "eval.json").read_text())
    assert ev["image_to_text"] > 3 * ev["chance"]


def test_true_caption_ranks_first_on_heldout_images(clip):
    """Fresh images (a seed no training or eval run used) against K = 6 captions of the same surface
    form: the true one must win far more often than chance (1/6)."""
    k, rng = 6, np.random.default_rng(987654)
    images, cands = [], []
    for task in S.TASK_TYPES:
        x, prompts, _ = S.make_batch(rng, 12, 32, [task])
        for image, prompt in zip(x, prompts):
            others = [p for p in S.all_prompts(task) if p != prompt]
            cands += [prompt] + [others[j] for j in rng.choice(len(others), k - 1, replace=False)]
            images.append(image[None].expand(k, -1, -1, -1))
    scores = clip(torch.cat(images), cands).view(-1, k)  # (N, k), column 0 the true caption
    hits, total = int((scores.argmax(1) == 0).sum()), len(scores)
    rate = hits / total
    print(f"image→caption among {k}: {rate:.2f} (chance {1 / k:.2f})")
    assert rate > 0.8  # the shipped model scores ≈ 0.97 among 8 in its eval.json


def test_score_is_scaled_cosine_and_handles_grayscale_and_uint8(clip):
    images, prompts, _ = S.make_batch(np.random.default_rng(5), 4)
    base = clip(images, prompts)
    assert base.shape == (4,) and base.abs().max() <= 1.0
    torch.testing.assert_close(ClipScore(scale=100.0)(images, prompts), 100 * base)
    # the tiny CLIP's preprocessing is the identity on 32×32 inputs in [-1, 1]: embed by hand
    model, tok = clip.embedder.model, clip.embedder.tokenizer
    with torch.no_grad():
        hand = (F.normalize(model.encode_image(images), dim=-1) * F.normalize(model.encode_text(tok(prompts)), dim=-1)).sum(-1)
    torch.testing.assert_close(base, hand)
    uint8_hwc = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    torch.testing.assert_close(clip(uint8_hwc, prompts), base, atol=1e-4, rtol=0)
    gray = images.mean(1, keepdim=True)  # (B, 1, H, W) → repeated to RGB
    torch.testing.assert_close(clip(gray, prompts), clip(gray.expand(-1, 3, -1, -1), prompts))


@pytest.mark.parametrize("size", [224, 48])
def test_preprocessing_matches_open_clip_transform(size):
    """Our torch resize/crop/normalise against open_clip's own PIL pipeline on a 64×64 image."""
    from PIL import Image

    from open_clip.transform import PreprocessCfg, image_transform

    open_clip_module()
    cfg = asdict(PreprocessCfg(size=size))  # OpenAI mean/std, bicubic, shortest side + centre crop
    tf = image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"],
                         interpolation="bicubic", resize_mode="shortest")
    x = S.make_batch(np.random.default_rng(3), 1, image_size=64)[0]  # (1, 3, 64, 64)
    pil = Image.fromarray(((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    ref, ours = tf(pil), preprocess_images(x, cfg)[0]
    assert ours.shape == ref.shape == (3, size, size)
    assert (ours - ref).abs().max() < 0.03  # PIL rounds to uint8: one level is 1/255/std ≈ 0.015


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ClipLoadError, match="pretrained='no-such-tag' is neither a tag of ViT-B-32"):
        ClipScore(model="ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ClipLoadError, match="unknown open_clip model 'ViT-Q-99'"):
        ClipScore(model="ViT-Q-99")
    with pytest.raises(ClipLoadError, match="not an open_clip checkpoint folder"):
        ClipScore(checkpoint=str(tmp_path))
    with pytest.raises(ClipLoadError, match="either checkpoint=DIR or model=NAME"):
        ClipScore(checkpoint=str(DEFAULT_CHECKPOINT), model="ViT-B-32")


def test_clip_loss_is_open_clip_loss_for_distinct_captions_and_multi_positive_otherwise():
    oc = open_clip_module()
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    distinct = ["a", "b", "c", "d", "e"]
    torch.testing.assert_close(clip_loss(img, txt, scale, distinct), oc.ClipLoss()(img, txt, scale))
    # samples 0 and 3 share a caption (identical text features, as the trainer encodes them):
    # their rows put half the target mass on each other
    txt[3] = txt[0]
    caps = ["a", "b", "c", "a", "e"]
    logits = scale * img @ txt.T
    target = torch.eye(5)
    target[0, 3] = target[3, 0] = 1.0
    target /= target.sum(1, keepdim=True)
    hand = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale, caps), hand)


def test_trainer_writes_loadable_checkpoints_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest on a shared CPU
    try:
        _train_and_resume(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_and_resume(tmp_path):
    over = [f"run.root={tmp_path}", "run.name=c", "run.progress=false", "run.tensorboard=false",
            "train.batch_size=16", "train.checkpoint_every=1", "train.warmup_steps=1",
            "data.eval_per_group=6", "data.eval_candidates=4"]
    result = train(load_config("configs/pretrain/clip_shapes.yaml", over + ["train.max_steps=2"]))
    ckpt = tmp_path / "c" / "checkpoints" / "2"
    ev = json.loads((ckpt / "eval.json").read_text())
    assert ev["steps"] == 2 and ev["candidates"] == 4 and set(ev["per_group"]) == set(S.TASK_TYPES)
    assert 0 <= result["image_to_text"] <= 1 and ev["chance"] == 0.25
    assert (tmp_path / "c" / "checkpoints" / "1" / "trainer_state" / "optimizer.pt").is_file()
    scores = ClipScore(checkpoint=str(ckpt))(*S.make_batch(np.random.default_rng(0), 3)[:2])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # resume: continue the same run to step 3 from its latest checkpoint
    train(load_config("configs/pretrain/clip_shapes.yaml", over + ["train.max_steps=3", "run.resume=auto"]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "c" / "checkpoints" / "3" / "eval.json").is_file() and max(steps) == 3
