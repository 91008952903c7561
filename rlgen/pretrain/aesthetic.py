"""Train an aesthetic head (``rewards.aesthetic.AestheticHead``) on CLIP image embeddings.

    python -m rlgen.pretrain --config configs/pretrain/aesthetic_head.yaml data.pairs=PAIRS.jsonl

From preference pairs, Bradley–Terry: loss = −log σ(s_w − s_l) (``train.loss: bt``); or from
ratings, MSE to the score (``train.loss: mse``). Pairs are rlgen's JSONL rows
``{"prompt": …, "chosen": "a.png", "rejected": "b.png"[, "chosen_score": 6.1, "rejected_score": 4.0]}``
with image paths relative to the file (this reader is deliberately minimal: the preference-pairs
data module validates the format in full). The CLIP embeds every image once; the head then trains
on the (N, d) unit embeddings in memory. ``fit_head`` does the same directly on tensors.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewards.aesthetic import HEAD_FILE, LAION_DROPOUT, AestheticHead, save_head
from rlgen.config import RunConfig, register_config
from rlgen.runtime.rundir import MetricsLogger, atomic_checkpoint, prepare_run_dir
from rlgen.utils import seed_everything, set_threads


@dataclass
class AestheticData:
    pairs: str = ""                 # JSONL of preference pairs (see module doc)
    heldout_frac: float = 0.1       # last fraction of rows, for pairwise accuracy / rating error


@dataclass
class AestheticClip:                # which CLIP embeds the images: the clip_score kwargs
    checkpoint: str | None = None   # None with model None = rlgen's tiny shapes CLIP
    model: str | None = None
    pretrained: str | None = None


@dataclass
class AestheticTrain:
    loss: str = "bt"                # bt (pairs) | mse (ratings: the pairs' scores)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4


@register_config("aesthetic_pretrain")
@dataclass
class AestheticPretrainConfig:
    kind: str = "aesthetic_pretrain"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="aesthetic_head"))
    data: AestheticData = field(default_factory=AestheticData)
    clip: AestheticClip = field(default_factory=AestheticClip)
    hidden: list[int] = field(default_factory=lambda: [1024, 128, 64, 16])  # LAION's; smaller for tiny CLIPs
    train: AestheticTrain = field(default_factory=AestheticTrain)

    def __post_init__(self):
        if self.train.loss not in ("bt", "mse"):
            raise ValueError(f"train.loss must be 'bt' or 'mse', got {self.train.loss!r}")


# ----------------------------------------------------------------------------------------------
# Losses and fitting on tensors
# ----------------------------------------------------------------------------------------------
def bradley_terry_loss(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """mean −log σ(s_w − s_l) over (B,) scores; softplus(−x) = −log σ(x) without overflow."""
    return F.softplus(s_l - s_w).mean()


def fit_head(head: AestheticHead, emb_w: torch.Tensor | None = None, emb_l: torch.Tensor | None = None, *,
             emb: torch.Tensor | None = None, ratings: torch.Tensor | None = None, steps: int = 1000,
             batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
             log=None) -> list[float]:
    """Train ``head`` in place: BT on (N, d) chosen/rejected embeddings, or MSE on (N, d) ``emb``
    against (N,) ``ratings``. Embeddings should be L2-normalised (as the reward feeds them)."""
    pairs = emb_w is not None
    if pairs == (emb is not None) or (pairs and emb_l is None) or (not pairs and ratings is None):
        raise ValueError("fit_head: give emb_w and emb_l (pairs, Bradley–Terry) or emb and ratings (MSE)")
    n = len(emb_w) if pairs else len(emb)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    head.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        if pairs:
            loss = bradley_terry_loss(head(emb_w[idx]), head(emb_l[idx]))
        else:
            loss = F.mse_loss(head(emb[idx]), ratings[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == steps):
            log.log(step, loss=loss.item())
    head.eval()
    return losses


@torch.no_grad()
def pairwise_accuracy(head: AestheticHead, emb_w: torch.Tensor, emb_l: torch.Tensor) -> float:
    """Fraction of pairs the head orders correctly (s_w > s_l)."""
    head.eval()
    return (head(emb_w) > head(emb_l)).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Pairs on disk
# ----------------------------------------------------------------------------------------------
def read_pairs(path: str | Path) -> list[dict]:
    """Rows of a pairs JSONL with ``chosen``/``rejected`` resolved against the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pairs file not found: {p}")
    rows = []
    for ln, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"{p}:{ln}: pair row lacks {missing}")
        row["chosen"], row["rejected"] = str(p.parent / row["chosen"]), str(p.parent / row["rejected"])
        rows.append(row)
    if not rows:
        raise ValueError(f"{p}: no pairs")
    return rows


def load_image(path: str) -> torch.Tensor:
    """An image file → (C, H, W) float in [-1, 1] (grayscale stays 1 channel)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"), dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def _embed_paths(embedder, paths: list[str], batch: int = 256) -> torch.Tensor:
    return torch.cat([embedder.embed_images(torch.stack([load_image(q) for q in paths[i:i + batch]])).cpu()
                      for i in range(0, len(paths), batch)])


def train(cfg: AestheticPretrainConfig) -> dict:
    from rewards.clip_score import ClipEmbedder

    set_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)
    if not cfg.data.pairs:
        raise ValueError("aesthetic head: set data.pairs=<pairs JSONL> (rows: prompt, chosen, rejected image paths)")
    rows = read_pairs(cfg.data.pairs)
    run_dir = prepare_run_dir(cfg)
    c = cfg.clip
    embedder = ClipEmbedder(c.model, c.pretrained, c.checkpoint, "cpu", who="aesthetic head")
    t0 = time.time()
    emb_w, emb_l = _embed_paths(embedder, [r["chosen"] for r in rows]), _embed_paths(embedder, [r["rejected"] for r in rows])
    n_test = int(len(rows) * cfg.data.heldout_frac)
    tr, te = slice(0, len(rows) - n_test), slice(len(rows) - n_test, len(rows))
    head = AestheticHead(emb_w.shape[1], tuple(cfg.hidden), LAION_DROPOUT)
    log = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard)
    t = cfg.train
    opts = dict(steps=t.steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, seed=cfg.run.seed, log=log)
    if t.loss == "bt":
        fit_head(head, emb_w[tr], emb_l[tr], **opts)
    else:
        if any("chosen_score" not in r or "rejected_score" not in r for r in rows):
            raise ValueError(f"{cfg.data.pairs}: train.loss=mse needs chosen_score and rejected_score in every row")
        ratings = torch.tensor([[r["chosen_score"], r["rejected_score"]] for r in rows], dtype=torch.float32)
        fit_head(head, emb=torch.cat([emb_w[tr], emb_l[tr]]), ratings=torch.cat([ratings[tr, 0], ratings[tr, 1]]), **opts)
    result = {"pairs": len(rows), "heldout_pairs": n_test, "loss": t.loss, "dim": emb_w.shape[1],
              "minutes": round((time.time() - t0) / 60, 2)}
    if n_test:
        result["heldout_pairwise_accuracy"] = pairwise_accuracy(head, emb_w[te], emb_l[te])
    log.log(t.steps, **{k: v for k, v in result.items() if isinstance(v, float)})
    log.close()
    with atomic_checkpoint(run_dir, t.steps) as d:
        save_head(head, d / HEAD_FILE)
        (d / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result
