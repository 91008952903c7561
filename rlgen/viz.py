"""Pictures people would rather look at: sample grids with captions, metric curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, 3) uint8 (grayscale is repeated to RGB)."""
    x = images.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, captions: Sequence[str] | None = None,
                    scale: int = 3, caption_every: int = 1) -> Path:
    """Write a PNG grid; each image is upscaled ``scale``× (nearest) and optionally captioned."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = max(1, min(nrow, n))
    ncol_rows = (n + nrow - 1) // nrow
    cell_w, cell_h = w * scale, h * scale
    cap_h = 12 if captions else 0
    pad = 2
    grid = Image.new("RGB", (nrow * (cell_w + pad) + pad, ncol_rows * (cell_h + cap_h + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    font = _font(9)
    for i in range(n):
        r, c = divmod(i, nrow)
        x0, y0 = pad + c * (cell_w + pad), pad + r * (cell_h + cap_h + pad)
        grid.paste(Image.fromarray(arr[i]).resize((cell_w, cell_h), Image.NEAREST), (x0, y0))
        if captions and i % caption_every == 0:
            text = captions[i]
            # crude fit: shrink the caption to the cell width
            while text and draw.textlength(text, font=font) > cell_w:
                text = text[:-2] + "…" if len(text) > 2 else ""
            draw.text((x0, y0 + cell_h), text, fill=(230, 230, 230), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = "",
                xlabel: str = "step", ylabel: str = "") -> Path:
    """One line per named (x, y) series, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
