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
from rlgen.config import register_config
from rlgen.runtime.rundir import RunConfig
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.registry import register_pretrainer


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
    checkpoint_every: int = 0       # steps (0 = only at the end)


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


class HeadFitter:
    """One update at a time of ``head`` on in-memory embeddings: Bradley–Terry on (N, d) chosen /
    rejected embeddings, or MSE of (N, d) ``emb`` against (N,) ``ratings``. Embeddings should be
    L2-normalised (as the reward feeds them). ``fit_head`` and the trainer both step it."""

    def __init__(self, head: AestheticHead, emb_w: torch.Tensor | None = None, emb_l: torch.Tensor | None = None, *,
                 emb: torch.Tensor | None = None, ratings: torch.Tensor | None = None, batch_size: int = 256,
                 lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0):
        self.pairs = emb_w is not None
        if self.pairs == (emb is not None) or (self.pairs and emb_l is None) or (not self.pairs and ratings is None):
            raise ValueError("fit_head: give emb_w and emb_l (pairs, Bradley–Terry) or emb and ratings (MSE)")
        self.head, self.emb_w, self.emb_l, self.emb, self.ratings = head, emb_w, emb_l, emb, ratings
        self.n, self.batch_size = (len(emb_w) if self.pairs else len(emb)), batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self) -> float:
        self.head.train()
        idx = torch.randint(0, self.n, (min(self.batch_size, self.n),), generator=self.gen)
        if self.pairs:
            loss = bradley_terry_loss(self.head(self.emb_w[idx]), self.head(self.emb_l[idx]))
        else:
            loss = F.mse_loss(self.head(self.emb[idx]), self.ratings[idx].float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def fit_head(head: AestheticHead, emb_w: torch.Tensor | None = None, emb_l: torch.Tensor | None = None, *,
             emb: torch.Tensor | None = None, ratings: torch.Tensor | None = None, steps: int = 1000,
             batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0) -> list[float]:
    """Train ``head`` in place on tensors (no run folder; see ``HeadFitter``); the per-step losses."""
    fitter = HeadFitter(head, emb_w, emb_l, emb=emb, ratings=ratings, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, seed=seed)
    losses = [fitter.step() for _ in range(steps)]
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


@register_pretrainer("aesthetic_pretrain")
class AestheticTask:
    """Embeds every pair's images once with the CLIP, then fits the head on the embeddings."""

    def __init__(self, cfg: AestheticPretrainConfig):
        self.cfg, self.result = cfg, None

    def plan(self) -> LoopPlan:
        t = self.cfg.train
        return LoopPlan(last_step=t.steps, log_every=100, checkpoint_every=t.checkpoint_every, label="aesthetic head")

    def init(self, resume: Path | None) -> None:
        from rewards.clip_score import ClipEmbedder

        cfg, c, t = self.cfg, self.cfg.clip, self.cfg.train
        if not cfg.data.pairs:
            raise ValueError("aesthetic head: set data.pairs=<pairs JSONL> (rows: prompt, chosen, rejected image paths)")
        rows = read_pairs(cfg.data.pairs)
        if t.loss == "mse" and any("chosen_score" not in r or "rejected_score" not in r for r in rows):
            raise ValueError(f"{cfg.data.pairs}: train.loss=mse needs chosen_score and rejected_score in every row")
        embedder = ClipEmbedder(c.model, c.pretrained, c.checkpoint, "cpu", who="aesthetic head")
        self.t0 = time.time()
        emb_w, emb_l = _embed_paths(embedder, [r["chosen"] for r in rows]), _embed_paths(embedder, [r["rejected"] for r in rows])
        n_test = int(len(rows) * cfg.data.heldout_frac)
        tr, te = slice(0, len(rows) - n_test), slice(len(rows) - n_test, len(rows))
        self.heldout = (emb_w[te], emb_l[te])
        self.info = {"pairs": len(rows), "heldout_pairs": n_test, "loss": t.loss, "dim": emb_w.shape[1]}
        self.head = AestheticHead(emb_w.shape[1], tuple(cfg.hidden), LAION_DROPOUT)
        opts = dict(batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, seed=cfg.run.seed)
        if t.loss == "bt":
            self.fitter = HeadFitter(self.head, emb_w[tr], emb_l[tr], **opts)
        else:
            ratings = torch.tensor([[r["chosen_score"], r["rejected_score"]] for r in rows], dtype=torch.float32)
            self.fitter = HeadFitter(self.head, emb=torch.cat([emb_w[tr], emb_l[tr]]),
                                     ratings=torch.cat([ratings[tr, 0], ratings[tr, 1]]), **opts)

    def train_step(self, step: int) -> dict:
        return {"loss": self.fitter.step()}

    def evaluate(self, step: int) -> dict:
        self.head.eval()
        self.result = {**self.info, "minutes": round((time.time() - self.t0) / 60, 2)}
        if self.info["heldout_pairs"]:
            self.result["heldout_pairwise_accuracy"] = pairwise_accuracy(self.head, *self.heldout)
        return {k: v for k, v in self.result.items() if isinstance(v, float)}

    def report(self) -> dict | None:
        return self.result

    def save(self, d: Path) -> dict:
        save_head(self.head, d / HEAD_FILE)
        save_weights(self.head, d)
        save_torch_state(task_state_path(d, "optimizer.pt"), {"optimizer": self.fitter.opt.state_dict(),
                                                              "gen": self.fitter.gen.get_state()})
        return {}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.head, d)
        extra = load_torch_state(task_state_path(d, "optimizer.pt"))
        self.fitter.opt.load_state_dict(extra["optimizer"])
        self.fitter.gen.set_state(extra["gen"])


def train(cfg: AestheticPretrainConfig) -> dict:
    """Run (or resume) the aesthetic-head job; returns the final evaluation (the checkpoint's eval.json)."""
    result = json.loads((run_pretraining(cfg, AestheticTask(cfg)) / "eval.json").read_text())
    print(json.dumps(result))
    return result
