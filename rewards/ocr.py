"""OCR reward for text rendering (Flow-GRPO's): 1 − normalised edit distance between the prompt's quoted text
and what OCR reads in the image.

    rewards: {ocr: 1.0}        # prompts like: a storefront sign that says "OPEN LATE"

Liu et al. 2025 (Flow-GRPO, arXiv:2505.05470) score text rendering with PaddleOCR; here the same PP-OCRv4
detection + recognition models run through ``rapidocr-onnxruntime``, whose wheel ships the weights, so the
reward works offline. As Flow-GRPO: the target is the first double-quoted span of the prompt; spaces are
removed and both sides lower-cased; a target found inside the read text scores 1; otherwise the Levenshtein
distance, capped at the target's length, is divided by that length. Samples smaller than ``min_side`` pixels
are upscaled (bicubic) first: the detector misses text in 64-px images.
"""
from __future__ import annotations

import numpy as np
import torch

from rlgen.registry import register_reward


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def quoted_text(prompt: str) -> str | None:
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def text_score(read: str, target: str) -> float:
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not target:
        return 1.0
    dist = 0 if target in read else min(edit_distance(read, target), len(target))
    return 1.0 - dist / len(target)


@register_reward("ocr")
class OcrReward:
    """Per sample: text_score(OCR(image), the prompt's quoted text); None when a prompt quotes nothing."""

    def __init__(self, min_side: int = 256, min_confidence: float = 0.0):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError("ocr: needs rapidocr-onnxruntime (pip install rapidocr-onnxruntime onnxruntime)") from e
        self.engine = RapidOCR()
        self.min_side, self.min_confidence = int(min_side), float(min_confidence)

    def read(self, image: np.ndarray) -> str:
        """(H, W, 3) uint8 RGB → the recognised text, boxes joined in reading order."""
        from PIL import Image

        h, w = image.shape[:2]
        if min(h, w) < self.min_side:
            s = self.min_side / min(h, w)
            image = np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BICUBIC))
        result, _ = self.engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR takes OpenCV's BGR
        return "".join(text for _, text, conf in (result or []) if float(conf) > self.min_confidence)

    @torch.no_grad()
    def __call__(self, samples, prompts, **meta) -> list[float | None]:
        from rewards.clip_score import as_image_batch
        from rlgen.viz import to_uint8

        if len(samples) != len(prompts):
            raise ValueError(f"ocr: {len(samples)} samples but {len(prompts)} prompts; they must pair up")
        images = to_uint8(as_image_batch(samples, "ocr"))  # (B, H, W, 3)
        out = []
        for img, prompt in zip(images, prompts):
            target = quoted_text(prompt)
            out.append(None if target is None else text_score(self.read(img), target))
        return out
