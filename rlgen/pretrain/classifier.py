"""Train the image classifier used as a verifier reward and as the metric feature extractor.

    python -m rlgen.pretrain --config configs/pretrain/fashion_classifier.yaml
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rlgen.config import RunConfig, register_config
from rlgen.models.classifier import ClassifierConfig, ImageClassifier
from rlgen.registry import DATASETS
from rlgen.runtime.rundir import MetricsLogger, atomic_checkpoint, prepare_run_dir
from rlgen.utils import resolve_device, seed_everything, set_threads


@dataclass
class ClassifierData:
    name: str = "fashion_mnist"
    train_split: str = "train"
    test_split: str = "test"


@dataclass
class ClassifierTrain:
    epochs: float = 2.0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment_shift: int = 2     # random translation in pixels: generated samples are not centred exactly


@register_config("classifier_pretrain")
@dataclass
class ClassifierPretrainConfig:
    kind: str = "classifier_pretrain"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="fashion_classifier"))
    data: ClassifierData = field(default_factory=ClassifierData)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: ClassifierTrain = field(default_factory=ClassifierTrain)


def _shift(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    if k <= 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-k, k + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def accuracy(model: ImageClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return correct / max(1, len(y))


def train(cfg: ClassifierPretrainConfig) -> dict:
    set_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    run_dir = prepare_run_dir(cfg)
    ds_cls = DATASETS.get(cfg.data.name)
    x_tr, y_tr = ds_cls(split=cfg.data.train_split).tensors()
    x_te, y_te = ds_cls(split=cfg.data.test_split).tensors()
    if not cfg.model.classes:
        from rlgen.data import fashion_mnist

        cfg.model.classes = list(fashion_mnist.CLASSES)
    model = ImageClassifier(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps = int(cfg.train.epochs * len(y_tr) / cfg.train.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    log = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard)
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc="classifier", disable=not cfg.run.progress)
    for step in bar:
        model.train()
        idx = torch.randint(0, len(y_tr), (cfg.train.batch_size,), generator=gen)
        xb = _shift(x_tr[idx], cfg.train.augment_shift, gen).to(device)
        loss = F.cross_entropy(model(xb), y_tr[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log.log(step, loss=loss.item(), lr=sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model = model.cpu()
    test_acc = accuracy(model, x_te, y_te)
    result = {"test_accuracy": test_acc, "steps": steps, "minutes": round((time.time() - t0) / 60, 2)}
    log.log(steps, test_accuracy=test_acc)
    log.close()
    with atomic_checkpoint(run_dir, steps) as d:
        model.save_pretrained(d)
        (d / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result
