"""A small CNN image classifier: the Fashion-MNIST verifier reward and the feature extractor of the
Fréchet-distance / diversity metrics (its penultimate layer)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rlgen.models import MODEL_META, ModelLoadError, read_model_meta
from rlgen.registry import register_model


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    feature_dim: int = 128
    classes: list[str] = field(default_factory=list)
    dropout: float = 0.2


@register_model("image_classifier")
class ImageClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if not cfg.classes:
            raise ValueError("ClassifierConfig.classes must name the classes")
        self.cfg = cfg
        layers, c_in = [], cfg.in_channels
        for c in cfg.channels:  # each stage halves the resolution: 28 → 14 → 7 → 3
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(), nn.MaxPool2d(2)]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, cfg.feature_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, len(cfg.classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, C, H, W) in [-1, 1]."""
        h = self.trunk(x).mean(dim=(2, 3))  # global average pool → (B, C)
        return F.gelu(self.proj(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))  # (B, num_classes) logits

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(p / "model.safetensors"))
        (p / MODEL_META).write_text(json.dumps({"model_type": "image_classifier", "config": asdict(self.cfg)}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "ImageClassifier":
        p = Path(path)
        meta = read_model_meta(p)
        if meta["model_type"] != "image_classifier":
            raise ModelLoadError(f"{p}: model_type is {meta['model_type']!r}, not 'image_classifier'")
        model = cls(ClassifierConfig(**meta["config"]))
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise ModelLoadError(f"{p}: missing model.safetensors")
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise ModelLoadError(f"{weights}: corrupt weights file ({e})") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"{weights}: weights do not match the config (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        return model.to(device).eval()
