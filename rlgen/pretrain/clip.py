"""Train a small CLIP on rlgen's captioned data, for the clip_score reward (offline, no hub).

    python -m rlgen.pretrain --config configs/pretrain/clip_shapes.yaml run.num_threads=1

The architecture is any open_clip model name; rlgen's tiny ones are JSON configs in
rlgen/assets/open_clip (registered with ``open_clip.add_model_config``). Loss: open_clip's
symmetric contrastive loss (``ClipLoss``'s logits) with one change. A shapes batch repeats
captions (only 18 single-object captions exist; Fashion-MNIST has 10 prompts), and ClipLoss's
arange target would push an image away from its own caption's duplicate; so every pair with the
same caption is a positive and the target spreads evenly over them (identical to ClipLoss when
the captions are distinct).

Checkpoints (``checkpoints/<step>/``) hold ``open_clip_config.json`` + ``open_clip_model.safetensors``
(the layout of open_clip's hub repos: ``create_model("local-dir:DIR")`` loads it, in
``train.save_dtype``) and ``trainer_state/`` (full-precision weights, optimizer, data and noise
generators) for ``run.resume`` (rlgen.pretrain.loop). The final one also gets ``eval.json``:
held-out retrieval accuracy among K candidates of the same surface form (image → caption and
caption → image).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlgen.config import register_config
from rlgen.runtime.rundir import RunConfig
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.registry import register_pretrainer
from rlgen.utils import resolve_device


@dataclass
class ClipData:
    name: str = "shapes"              # shapes | fashion_mnist
    image_size: int = 32              # shapes render size
    tasks: list[str] | None = None    # shapes task types to caption (None = all six)
    eval_per_group: int = 100         # held-out images per task type (shapes) / in all (fashion_mnist)
    eval_candidates: int = 8          # K: the right caption/image among K of the same surface form
    eval_seed: int = 10_000


@dataclass
class ClipModel:
    name: str = "rlgen-tiny-clip"     # any open_clip architecture
    pretrained: str | None = None     # start from a tag or a state-dict file (None = random init)
    # mean = std = 0.5 feeds pixels in [-1, 1] to the model unchanged; None keeps the architecture's
    image_mean: list[float] | None = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] | None = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ClipTrain:
    max_steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1         # cosine decay to lr·min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1         # on matrices only (open_clip's choice)
    augment_noise: float = 0.05       # Gaussian noise std on [-1, 1] pixels: generated samples are noisy
    log_every: int = 25
    checkpoint_every: int = 500
    save_dtype: str = "float32"       # float16 halves the file (49408×width token table ≈ 80 % of a tiny CLIP)


@register_config("clip_pretrain")
@dataclass
class ClipPretrainConfig:
    kind: str = "clip_pretrain"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="clip_shapes"))
    data: ClipData = field(default_factory=ClipData)
    model: ClipModel = field(default_factory=ClipModel)
    train: ClipTrain = field(default_factory=ClipTrain)

    def __post_init__(self):
        if self.data.name not in SOURCES:
            raise ValueError(f"data.name must be one of {sorted(SOURCES)}, got {self.data.name!r}")
        if self.train.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"train.save_dtype must be float32, float16 or bfloat16, got {self.train.save_dtype!r}")


# ----------------------------------------------------------------------------------------------
# Data: captioned batches and a held-out set with candidate captions of the same surface form
# ----------------------------------------------------------------------------------------------
class ShapesSource:
    def __init__(self, cfg: ClipData, seed: int):
        from rlgen.data import shapes

        self.S, self.cfg = shapes, cfg
        self.rng = np.random.default_rng([seed, 0])

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        x, captions, _ = self.S.make_batch(self.rng, n, self.cfg.image_size, self.cfg.tasks)
        return x, captions  # (n, 3, H, W) in [-1, 1]

    def heldout(self) -> tuple[torch.Tensor, list[str], list[str]]:
        """Fresh images (never seen in training; the captions are the grammar's): per task type
        ``eval_per_group`` of them, with the task as the group."""
        xs, caps, groups = [], [], []
        for k, task in enumerate(self.cfg.tasks or self.S.TASK_TYPES):
            x, c, t = self.S.make_batch(np.random.default_rng([self.cfg.eval_seed, k]), self.cfg.eval_per_group,
                                        self.cfg.image_size, [task])
            xs.append(x), caps.extend(c), groups.extend(t)
        return torch.cat(xs), caps, groups

    def candidates(self, group: str) -> list[str]:
        return self.S.all_prompts(group)  # every caption of the task: same surface form


class FashionSource:
    def __init__(self, cfg: ClipData, seed: int):
        from rlgen.data import fashion_mnist

        self.F, self.cfg = fashion_mnist, cfg
        self.x, self.y = fashion_mnist.FashionMNIST("train").tensors()  # (N, 1, 28, 28), (N,)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self.y), (n,), generator=self.gen)
        return self.x[idx], [self.F.class_prompt(int(y)) for y in self.y[idx]]

    def heldout(self) -> tuple[torch.Tensor, list[str], list[str]]:
        ds = self.F.FashionMNIST("test", size=self.cfg.eval_per_group, seed=self.cfg.eval_seed)
        x, y = ds.tensors()
        return x, [self.F.class_prompt(int(v)) for v in y], ["fashion_mnist"] * len(y)

    def candidates(self, group: str) -> list[str]:
        return list(self.F.PROMPTS)


SOURCES = {"shapes": ShapesSource, "fashion_mnist": FashionSource}


# ----------------------------------------------------------------------------------------------
# Loss and evaluation
# ----------------------------------------------------------------------------------------------
def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over (B, D) unit features where all pairs sharing a caption are positives."""
    from rewards.clip_score import open_clip_module

    logits_i, logits_t = open_clip_module().ClipLoss().get_logits(image_features, text_features, logit_scale)
    ids = {c: j for j, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions], device=image_features.device)
    same = (cid[:, None] == cid[None, :]).float()  # (B, B), symmetric, diagonal all ones
    target = same / same.sum(1, keepdim=True)      # each row: uniform over that caption's pairs
    return (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target)) / 2


@torch.no_grad()
def retrieval_accuracy(embed_images, embed_texts, images: torch.Tensor, captions: list[str], groups: list[str],
                       candidates, k: int, seed: int = 0) -> dict:
    """Held-out retrieval among ``k`` candidates of the same group (surface form); ties count as misses.

    image → caption: the true caption vs k−1 other captions from ``candidates(group)``;
    caption → image: the true image vs k−1 images of the same group with a different caption.
    """
    rng = np.random.default_rng(seed)
    img = embed_images(images)  # (N, D) unit
    pool = {g: candidates(g) for g in dict.fromkeys(groups)}
    k = min([k] + [len(p) for p in pool.values()])
    rows, texts = [], []
    for c, g in zip(captions, groups):
        others = [o for o in pool[g] if o != c]
        rows.append([c] + [others[j] for j in rng.choice(len(others), k - 1, replace=False)])
        texts.extend(rows[-1])
    txt = embed_texts(texts).view(len(captions), k, -1)  # (N, k, D)
    i2t = (torch.einsum("nd,nkd->nk", img, txt))          # (N, k) column 0 is the truth
    i2t_ok = (i2t[:, 0:1] > i2t[:, 1:]).all(1)
    t2i_ok = torch.zeros(len(captions), dtype=torch.bool)
    by_group = {g: [i for i, gi in enumerate(groups) if gi == g] for g in pool}
    for i, (c, g) in enumerate(zip(captions, groups)):
        others = [j for j in by_group[g] if captions[j] != c]
        if len(others) < k - 1:
            continue
        pick = [i] + [others[j] for j in rng.choice(len(others), k - 1, replace=False)]
        sims = img[pick] @ txt[i, 0]  # (k,)
        t2i_ok[i] = bool((sims[0] > sims[1:]).all())
    per = {g: {"image_to_text": i2t_ok[idx].float().mean().item(), "text_to_image": t2i_ok[idx].float().mean().item()}
           for g, idx in by_group.items()}
    return {"image_to_text": i2t_ok.float().mean().item(), "text_to_image": t2i_ok.float().mean().item(),
            "candidates": k, "chance": 1.0 / k, "n": len(captions), "per_group": per}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _lr_at(step: int, t: ClipTrain) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def build_model(cfg: ClipPretrainConfig, device: torch.device):
    from rewards.clip_score import open_clip_module

    oc = open_clip_module()
    pp = {k: tuple(v) for k, v in (("mean", cfg.model.image_mean), ("std", cfg.model.image_std)) if v is not None}
    model = oc.create_model(cfg.model.name, pretrained=cfg.model.pretrained, device=device,
                            force_preprocess_cfg=pp)
    return model, oc.get_tokenizer(cfg.model.name), oc.get_model_config(cfg.model.name)


def save_clip(model, model_cfg: dict, d: Path, dtype: str = "float32") -> None:
    """open_clip's hub layout: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in model.visual.preprocess_cfg.items()}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}, indent=2))
    sd = {k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))


def evaluate(model, tokenizer, source, cfg: ClipPretrainConfig, device) -> dict:
    from rewards.clip_score import preprocess_images

    pp = model.visual.preprocess_cfg
    model.eval()
    emb_i = lambda x: torch.cat([F.normalize(model.encode_image(preprocess_images(x[i:i + 256].to(device), pp)), dim=-1)
                                 for i in range(0, len(x), 256)]).cpu()
    emb_t = lambda t: torch.cat([F.normalize(model.encode_text(tokenizer(t[i:i + 512]).to(device)), dim=-1)
                                 for i in range(0, len(t), 512)]).cpu()
    x, caps, groups = source.heldout()
    return retrieval_accuracy(emb_i, emb_t, x, caps, groups, source.candidates, cfg.data.eval_candidates,
                              seed=cfg.data.eval_seed)


@register_pretrainer("clip_pretrain")
class ClipTask:
    """An open_clip model, AdamW and a captioned-batch source; one contrastive update per step."""

    def __init__(self, cfg: ClipPretrainConfig):
        self.cfg, self.result = cfg, None

    def plan(self) -> LoopPlan:
        t = self.cfg.train
        return LoopPlan(last_step=t.max_steps, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                        label="clip pretrain")

    def init(self, resume: Path | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device, self.t0 = resolve_device(cfg.run.device), time.time()
        self.source = SOURCES[cfg.data.name](cfg.data, cfg.run.seed)
        self.model, self.tokenizer, self.model_cfg = build_model(cfg, self.device)
        named = list(self.model.named_parameters())
        decay = [p for n, p in named if p.ndim >= 2 and "logit_scale" not in n]
        rest = [p for n, p in named if not (p.ndim >= 2 and "logit_scale" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.98), eps=1e-6)
        self.noise_gen = torch.Generator().manual_seed(cfg.run.seed)  # augmentation noise

    def train_step(self, step: int) -> dict:
        from rewards.clip_score import preprocess_images

        t, model, device = self.cfg.train, self.model, self.device
        model.train()
        x, captions = self.source.batch(t.batch_size)
        if t.augment_noise > 0:
            x = (x + t.augment_noise * torch.randn(x.shape, generator=self.noise_gen)).clamp(-1, 1)
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(step, t)
        uniq = list(dict.fromkeys(captions))  # encode each distinct caption once, then expand
        txt = F.normalize(model.encode_text(self.tokenizer(uniq).to(device)), dim=-1)
        pos = {c: j for j, c in enumerate(uniq)}
        txt = txt[torch.tensor([pos[c] for c in captions], device=device)]
        img = F.normalize(model.encode_image(preprocess_images(x.to(device), model.visual.preprocess_cfg)), dim=-1)
        loss = clip_loss(img, txt, model.logit_scale.exp(), captions)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer: temperature ≥ 0.01
        return {"loss": loss.item(), "lr": self.opt.param_groups[0]["lr"], "logit_scale": model.logit_scale.exp().item()}

    def evaluate(self, step: int) -> dict:
        """Held-out retrieval (at the end of the run); the full result becomes eval.json."""
        cfg = self.cfg
        self.result = evaluate(self.model, self.tokenizer, self.source, cfg, self.device)
        self.result.update(steps=step, minutes=round((time.time() - self.t0) / 60, 2), model=cfg.model.name,
                           data=cfg.data.name, config=asdict(cfg.train))
        return {"eval_image_to_text": self.result["image_to_text"], "eval_text_to_image": self.result["text_to_image"]}

    def report(self) -> dict | None:
        return self.result

    def save(self, d: Path) -> dict:
        save_clip(self.model, self.model_cfg, d, self.cfg.train.save_dtype)  # what clip_score loads
        save_weights(self.model, d)  # full precision, whatever save_dtype: resuming is exact
        extra = {"optimizer": self.opt.state_dict(), "noise_gen": self.noise_gen.get_state()}
        if hasattr(self.source, "gen"):
            extra["gen"] = self.source.gen.get_state()
        save_torch_state(task_state_path(d, "optimizer.pt"), extra)
        return {"rng": self.source.rng.bit_generator.state} if hasattr(self.source, "rng") else {}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.model, d)
        extra = load_torch_state(task_state_path(d, "optimizer.pt"))
        self.opt.load_state_dict(extra["optimizer"])
        self.noise_gen.set_state(extra["noise_gen"])
        if "gen" in extra:
            self.source.gen.set_state(extra["gen"])
        if "rng" in state:
            self.source.rng.bit_generator.state = state["rng"]


def train(cfg: ClipPretrainConfig) -> dict:
    """Run (or resume) a CLIP pretraining job; returns the final evaluation (the checkpoint's eval.json)."""
    ckpt = run_pretraining(cfg, ClipTask(cfg))
    result = json.loads((ckpt / "eval.json").read_text())
    print(json.dumps({k: result[k] for k in ("image_to_text", "text_to_image", "candidates", "steps", "minutes")}))
    return result
