"""Fashion-MNIST (Xiao et al. 2017, MIT licence) from the Debian package ``dataset-fashion-mnist``.

Real data nobody here made: 60k train / 10k test grayscale 28×28 images in 10 classes. Prompts
are class-conditional ("a photo of a sneaker"). Images are scaled to [-1, 1], shape (1, 28, 28).
"""
from __future__ import annotations

import gzip
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from rlgen.registry import register_dataset

DEFAULT_ROOT = Path(os.environ.get("RLGEN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetMissingError(FileNotFoundError):
    pass


def class_prompt(label: int) -> str:
    name = CLASSES[label]
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


PROMPTS = tuple(class_prompt(i) for i in range(len(CLASSES)))
_PROMPT_RE = re.compile(r"^\s*a(?:n)?\s+photo\s+of\s+an?\s+(.+?)\s*\.?\s*$", re.I)


def class_from_prompt(prompt: str) -> int:
    """Inverse of class_prompt; also accepts a bare class name. Clear error otherwise."""
    m = _PROMPT_RE.match(prompt)
    name = (m.group(1) if m else prompt).strip().lower()
    if name not in CLASSES:
        raise ValueError(f"prompt {prompt!r} names no Fashion-MNIST class; expected 'a photo of a <class>' "
                         f"with class one of: {', '.join(CLASSES)}")
    return CLASSES.index(name)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got}, want {magic})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


@lru_cache(maxsize=4)
def load_arrays(split: str = "train", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) for split 'train' or 'test'."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    base = Path(root) if root else DEFAULT_ROOT
    img_f, lab_f = (base / f for f in _FILES[split])
    if not img_f.is_file() or not lab_f.is_file():
        raise DatasetMissingError(
            f"Fashion-MNIST not found under {base} (looked for {img_f.name}, {lab_f.name}). Install it with "
            f"'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point RLGEN_FASHION_MNIST / "
            f"data.root at a folder holding the four *-ubyte.gz files.")
    images = _read_idx(img_f, 2051)
    labels = _read_idx(lab_f, 2049).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{base}: {len(images)} images but {len(labels)} labels in split {split}")
    return images, labels


@register_dataset("fashion_mnist")
class FashionMNIST(torch.utils.data.Dataset):
    """Items: dict(image=(1, 28, 28) float in [-1, 1], prompt=str, task=class name, label=int)."""

    channels, image_size = 1, 28

    def __init__(self, split: str = "train", root: str | None = None, size: int | None = None,
                 classes: list[str] | None = None, seed: int = 0):
        images, labels = load_arrays(split, root)
        keep = np.ones(len(labels), dtype=bool)
        if classes:
            bad = [c for c in classes if c not in CLASSES]
            if bad:
                raise ValueError(f"unknown Fashion-MNIST classes {bad}; valid: {', '.join(CLASSES)}")
            keep = np.isin(labels, [CLASSES.index(c) for c in classes])
        idx = np.nonzero(keep)[0]
        if size is not None and size < len(idx):
            idx = np.random.default_rng(seed).choice(idx, size=size, replace=False)
        self.images, self.labels = images[idx], labels[idx]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        img = torch.from_numpy(self.images[i].astype(np.float32) / 127.5 - 1.0)[None]  # (1, 28, 28)
        y = int(self.labels[i])
        return {"image": img, "prompt": class_prompt(y), "task": CLASSES[y], "label": y}

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (N, 1, 28, 28) in [-1, 1] and labels (N,), for classifiers and metrics."""
        x = torch.from_numpy(self.images.astype(np.float32) / 127.5 - 1.0)[:, None]
        return x, torch.from_numpy(self.labels)
