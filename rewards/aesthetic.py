"""Aesthetic score: the LAION aesthetic predictor's MLP on L2-normalised CLIP image embeddings.

    rewards: {aesthetic: 1.0}
    reward_kwargs: {aesthetic: {head: sac+logos+ava1-l14-linearMSE.pth, model: ViT-L-14, pretrained: openai}}

The head is LAION's ``MLP`` (improved-aesthetic-predictor): Linear(d,1024) Dropout(0.2)
Linear(1024,128) Dropout(0.2) Linear(128,64) Dropout(0.1) Linear(64,16) Linear(16,1), so its
state dict has exactly the keys ``layers.{0,2,4,6,7}.{weight,bias}`` and LAION's released files
load unchanged (torch ``.pth`` read with ``weights_only=True``, or ``.safetensors``). The hidden
sizes are read from the file, so heads for tiny CLIPs (e.g. d=64 → 64, 32, 16, 8) load the same
way. LAION's head expects ViT-L-14/openai embeddings (d = 768); the CLIP is chosen with the same
kwargs as ``clip_score`` (checkpoint / model / pretrained) and d must match the head.

Train a head with ``rlgen.pretrain.aesthetic`` (Bradley–Terry on preference pairs, or MSE on
ratings).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewards.clip_score import ClipEmbedder
from rlgen.registry import register_reward

LAION_HIDDEN = (1024, 128, 64, 16)
LAION_DROPOUT = (0.2, 0.2, 0.1)
_LINEAR_KEYS = (0, 2, 4, 6, 7)  # indices of the five Linear layers inside ``layers``
HEAD_FILE = "aesthetic_head.safetensors"  # what rlgen.pretrain.aesthetic writes in a checkpoint


class AestheticHead(nn.Module):
    """(B, d) unit CLIP image embeddings → (B,) scores. Layer indices match LAION's state dict."""

    def __init__(self, dim: int = 768, hidden: tuple[int, ...] = LAION_HIDDEN,
                 dropout: tuple[float, ...] = LAION_DROPOUT):
        super().__init__()
        if len(hidden) != 4 or len(dropout) != 3:
            raise ValueError(f"aesthetic head: hidden needs 4 sizes and dropout 3 rates (LAION's layout), "
                             f"got hidden={hidden}, dropout={dropout}")
        h1, h2, h3, h4 = hidden
        self.dim, self.hidden = dim, tuple(hidden)
        self.layers = nn.Sequential(
            nn.Linear(dim, h1), nn.Dropout(dropout[0]),
            nn.Linear(h1, h2), nn.Dropout(dropout[1]),
            nn.Linear(h2, h3), nn.Dropout(dropout[2]),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> "AestheticHead":
        """Build with the sizes the weights imply, then load them (strict)."""
        want = {f"layers.{i}.{p}" for i in _LINEAR_KEYS for p in ("weight", "bias")}
        if set(sd) != want:
            raise ValueError(f"aesthetic head {source}: expected keys {sorted(want)} (LAION's layout), "
                             f"missing {sorted(want - set(sd))}, unexpected {sorted(set(sd) - want)}")
        dims = [sd[f"layers.{i}.weight"].shape for i in _LINEAR_KEYS]  # (out, in) per Linear
        if dims[-1][0] != 1 or any(dims[j][0] != dims[j + 1][1] for j in range(4)):
            raise ValueError(f"aesthetic head {source}: layer shapes do not chain: {[tuple(d) for d in dims]}")
        head = cls(dims[0][1], tuple(d[0] for d in dims[:4]))
        head.load_state_dict({k: v.float() for k, v in sd.items()})
        return head


def load_head(path: str | Path) -> AestheticHead:
    """A head from a ``.safetensors`` file, a torch file (a plain state dict, or {'state_dict': …}),
    or a folder from ``rlgen.pretrain.aesthetic`` (checkpoint or run folder)."""
    p = Path(path)
    if p.is_dir():
        from rlgen.runtime.rundir import resolve_checkpoint

        p = resolve_checkpoint(p) / HEAD_FILE
    if not p.is_file():
        raise FileNotFoundError(f"aesthetic: head weights not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return AestheticHead.from_state_dict(dict(sd), str(p)).eval()  # for scoring: dropout off


def save_head(head: AestheticHead, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))


@register_reward("aesthetic")
class AestheticReward:
    """head(normalise(CLIP image embedding)) per sample; prompts are not used."""

    def __init__(self, head: str, checkpoint: str | None = None, model: str | None = None,
                 pretrained: str | None = None, device: str = "cpu", batch_size: int = 64):
        if not head:
            raise ValueError("aesthetic: give head=<path to the head's weights> (LAION's .pth, or one trained with "
                             "python -m rlgen.pretrain.aesthetic)")
        self.head = load_head(head).to(device).eval()
        self.embedder = ClipEmbedder(model, pretrained, checkpoint, device, batch_size, "aesthetic")
        probe = self.embedder.model.encode_text(self.embedder.tokenizer(["a"]).to(self.embedder.device))
        if probe.shape[-1] != self.head.dim:
            raise ValueError(f"aesthetic: the head takes {self.head.dim}-d embeddings but the CLIP gives "
                             f"{probe.shape[-1]}-d; pair the head with the CLIP it was trained on")

    @torch.no_grad()
    def __call__(self, samples, prompts, **meta) -> torch.Tensor:
        if len(samples) == 0:
            return torch.zeros(0)
        emb = self.embedder.embed_images(samples)  # (B, d), already L2-normalised as LAION's
        return self.head(emb).float().cpu()         # (B,)
