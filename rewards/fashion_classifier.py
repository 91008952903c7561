"""Fashion-MNIST classifier reward: p(prompted class | image) from rlgen's own CNN classifier.

The default checkpoint ships in the package (rlgen/assets/fashion_classifier, trained with
configs/pretrain/fashion_classifier.yaml; its test accuracy is in eval.json beside the weights).
"""
from __future__ import annotations

from pathlib import Path

import torch

from rlgen.data.fashion_mnist import class_from_prompt
from rlgen.registry import register_reward

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "rlgen" / "assets" / "fashion_classifier"


def as_image_batch(samples) -> torch.Tensor:
    """Samples as a float tensor (B, C, H, W) in [-1, 1]; accepts a tensor or a list of tensors."""
    if isinstance(samples, torch.Tensor):
        x = samples
    else:
        x = torch.stack([torch.as_tensor(s) for s in samples])
    if x.dim() != 4:
        raise ValueError(f"image samples must be (B, C, H, W), got shape {tuple(x.shape)}")
    return x.float()


@register_reward("fashion_classifier")
class FashionClassifierReward:
    """Callable reward; holds the classifier once (RewardWorkers build it once per actor)."""

    def __init__(self, checkpoint: str | None = None, device: str = "cpu"):
        from rlgen.models import load_model

        self.device = device
        self.model = load_model(checkpoint or DEFAULT_CHECKPOINT, device=device).eval()
        self.classes = list(self.model.cfg.classes)

    @torch.no_grad()
    def __call__(self, samples, prompts, **meta) -> list[float]:
        x = as_image_batch(samples).to(self.device)
        if len(prompts) != len(x):
            raise ValueError(f"fashion_classifier: {len(x)} samples but {len(prompts)} prompts")
        labels = torch.tensor([class_from_prompt(p) for p in prompts], device=self.device)
        probs = self.model(x).softmax(-1)  # (B, num_classes)
        return probs.gather(1, labels[:, None]).squeeze(1).cpu().tolist()
