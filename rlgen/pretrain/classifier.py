"""Train the image classifier used as a verifier reward and as the metric feature extractor.

    python -m rlgen.pretrain --config configs/pretrain/fashion_classifier.yaml
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rlgen.config import register_config
from rlgen.runtime.rundir import RunConfig
from rlgen.models.classifier import ClassifierConfig, ImageClassifier
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.registry import DATASETS, register_pretrainer
from rlgen.utils import resolve_device


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
    checkpoint_every: int = 0  # steps (0 = only at the end)


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
    dev = next(model.parameters()).device
    correct = sum((model(x[i:i + batch].to(dev)).argmax(-1).cpu() == y[i:i + batch]).sum().item()
                  for i in range(0, len(y), batch))
    return correct / max(1, len(y))


@register_pretrainer("classifier_pretrain")
class ClassifierTask:
    """The classifier, AdamW + one-cycle schedule over ``epochs``; one cross-entropy update per step."""

    def __init__(self, cfg: ClassifierPretrainConfig):
        self.cfg, self.result = cfg, None

    def plan(self) -> LoopPlan:
        return LoopPlan(last_step=self.steps, log_every=50, checkpoint_every=self.cfg.train.checkpoint_every,
                        label="classifier")

    def init(self, resume: Path | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device, self.t0 = resolve_device(cfg.run.device), time.time()
        ds_cls = DATASETS.get(cfg.data.name)
        self.x_tr, self.y_tr = ds_cls(split=cfg.data.train_split).tensors()
        self.x_te, self.y_te = ds_cls(split=cfg.data.test_split).tensors()
        if not cfg.model.classes:
            from rlgen.data import fashion_mnist

            cfg.model.classes = list(fashion_mnist.CLASSES)
        self.model = ImageClassifier(cfg.model).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.steps = int(t.epochs * len(self.y_tr) / t.batch_size)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=t.lr, total_steps=self.steps)
        self.gen = torch.Generator().manual_seed(cfg.run.seed)

    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        self.model.train()
        idx = torch.randint(0, len(self.y_tr), (t.batch_size,), generator=self.gen)
        xb = _shift(self.x_tr[idx], t.augment_shift, self.gen).to(self.device)
        loss = F.cross_entropy(self.model(xb), self.y_tr[idx].to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"loss": loss.item(), "lr": self.sched.get_last_lr()[0]}

    def evaluate(self, step: int) -> dict:
        acc = accuracy(self.model, self.x_te, self.y_te)
        self.result = {"test_accuracy": acc, "steps": step, "minutes": round((time.time() - self.t0) / 60, 2)}
        return {"test_accuracy": acc}

    def report(self) -> dict | None:
        return self.result

    def save(self, d: Path) -> dict:
        self.model.save_pretrained(d)
        save_weights(self.model, d)
        save_torch_state(task_state_path(d, "optimizer.pt"), {"optimizer": self.opt.state_dict(),
                                                              "scheduler": self.sched.state_dict(),
                                                              "gen": self.gen.get_state()})
        return {}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.model, d)
        extra = load_torch_state(task_state_path(d, "optimizer.pt"))
        self.opt.load_state_dict(extra["optimizer"])
        self.sched.load_state_dict(extra["scheduler"])
        self.gen.set_state(extra["gen"])


def train(cfg: ClassifierPretrainConfig) -> dict:
    """Run (or resume) the classifier job; returns the final evaluation (the checkpoint's eval.json)."""
    result = json.loads((run_pretraining(cfg, ClassifierTask(cfg)) / "eval.json").read_text())
    print(json.dumps(result))
    return result
