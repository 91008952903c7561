"""scikit-learn's 8×8 handwritten digits (1,797 images, ships inside the wheel): tiny test data."""
from __future__ import annotations

import numpy as np
import torch

from rlgen.registry import register_dataset


def digit_prompt(label: int) -> str:
    return f"a handwritten digit {label}"


@register_dataset("digits")
class Digits(torch.utils.data.Dataset):
    """Items: dict(image=(1, 8, 8) float in [-1, 1], prompt=str, task=str(label), label=int)."""

    channels, image_size = 1, 8

    def __init__(self, split: str = "train", test_fraction: float = 0.2, seed: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(seed).permutation(len(d.target))
        n_test = int(round(len(order) * test_fraction))
        if split not in ("train", "test", "all"):
            raise ValueError(f"digits split must be train/test/all, got {split!r}")
        idx = {"train": order[n_test:], "test": order[:n_test], "all": order}[split]
        self.images = (d.images[idx].astype(np.float32) / 8.0 - 1.0)  # 0..16 → [-1, 1]
        self.labels = d.target[idx].astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        y = int(self.labels[i])
        return {"image": torch.from_numpy(self.images[i])[None], "prompt": digit_prompt(y), "task": str(y), "label": y}
