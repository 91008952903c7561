"""CLIP score through open_clip: cosine similarity of the image's and the prompt's embeddings.

    rewards: {clip_score: 1.0}
    reward_kwargs: {clip_score: {model: ViT-H-14, pretrained: laion2b_s32b_b79k, device: cuda}}

score = scale · cos(f_img(image), f_txt(prompt)), in [−scale, scale]. ``scale=1`` (default) is the
raw cosine (≈ 0.2–0.35 for a matching pair under OpenAI's CLIP); ``scale=100`` gives the numbers
papers report as "CLIP score"; CLIPScore (Hessel et al. 2021) is 2.5·max(cos, 0).

Which model (kwargs):
  * none of model/pretrained/checkpoint → rlgen's tiny CLIP trained on the shapes grammar
    (rlgen/assets/clip_shapes, configs/pretrain/clip_shapes.yaml; eval.json holds its retrieval
    accuracy). It knows the shapes vocabulary only.
  * ``checkpoint: DIR`` → a folder with open_clip_config.json + weights: what rlgen's CLIP trainer
    writes, and the layout of open_clip's Hugging Face repos (a downloaded one works offline).
  * ``model: NAME`` (+ ``pretrained: TAG | FILE``) → any open_clip architecture; a tag downloads
    through open_clip (network or its cache needed), a file is a local state dict.

Images arrive as (B, C, H, W) floats in [−1, 1] (C = 1 is repeated to 3 channels; uint8 in
[0, 255] is accepted too) and are resized (shortest side, bicubic, then centre crop) and normalised
with the model's own preprocess config by torch ops on the model's device: no PIL round trip.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlgen.registry import register_reward

ASSETS = Path(__file__).resolve().parents[1] / "rlgen" / "assets"
TINY_CONFIGS = ASSETS / "open_clip"          # rlgen-tiny-clip.json: architectures rlgen trains
DEFAULT_CHECKPOINT = ASSETS / "clip_shapes"  # the tiny CLIP trained on shapes captions


class ClipLoadError(RuntimeError):
    pass


def open_clip_module():
    """Import open_clip with rlgen's tiny architectures registered (idempotent)."""
    import rlgen  # noqa: F401  (makes torchvision importable beside a CPU torch; open_clip needs it)
    import open_clip

    if "rlgen-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIGS)
    return open_clip


def load_clip(model: str | None = None, pretrained: str | None = None, checkpoint: str | None = None,
              device: str | torch.device = "cpu", who: str = "clip_score"):
    """(open_clip model in eval mode, tokenizer). See the module doc for the three routes."""
    oc = open_clip_module()
    if checkpoint is None and model is None:
        if pretrained is not None:
            raise ClipLoadError(f"{who}: pretrained={pretrained!r} needs model=<open_clip architecture>")
        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is not None:
        if model is not None or pretrained is not None:
            raise ClipLoadError(f"{who}: give either checkpoint=DIR or model=NAME [+ pretrained], not both")
        ckpt = Path(checkpoint)
        if not (ckpt / "open_clip_config.json").is_file():
            raise ClipLoadError(f"{who}: {ckpt} is not an open_clip checkpoint folder (no open_clip_config.json; "
                                f"train one with `python -m rlgen.pretrain --config configs/pretrain/clip_shapes.yaml`)")
        name = f"local-dir:{ckpt}"
        pretrained = None
    else:
        name = model
        if model not in oc.list_models():
            raise ClipLoadError(f"{who}: unknown open_clip model {model!r}; known: {', '.join(oc.list_models())}")
        tags = oc.list_pretrained_tags_by_model(model)
        if pretrained is not None and pretrained not in tags and not Path(pretrained).is_file():
            raise ClipLoadError(f"{who}: pretrained={pretrained!r} is neither a tag of {model} ({', '.join(tags) or 'none'}) "
                                f"nor an existing file")
    try:
        net = oc.create_model(name, pretrained=pretrained, device=device)
        tokenizer = oc.get_tokenizer(name)
    except Exception as e:
        hint = (" Tags download from the internet (Hugging Face); offline, fetch the weights elsewhere and pass "
                "pretrained=/path/to/open_clip_pytorch_model.bin, or checkpoint=DIR (open_clip_config.json + "
                "weights), or drop model/pretrained to use rlgen's tiny shapes CLIP.") if pretrained else ""
        raise ClipLoadError(f"{who}: cannot load open_clip model {name!r} (pretrained={pretrained!r}): "
                            f"{type(e).__name__}: {e}.{hint}") from e
    return net.eval().requires_grad_(False), tokenizer


def as_image_batch(samples, who: str = "clip_score") -> torch.Tensor:
    """Samples → float (B, C, H, W) in [−1, 1]. Accepts a tensor/array or a list of (C, H, W);
    uint8 is taken as [0, 255], channel-last uint8 (B, H, W, C) is moved to channel-first."""
    x = samples if isinstance(samples, torch.Tensor) else (
        torch.stack([torch.as_tensor(s) for s in samples]) if isinstance(samples, (list, tuple))
        else torch.as_tensor(samples))
    if x.dim() != 4:
        raise ValueError(f"{who}: images must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1.0
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{who}: images need 1 or 3 channels in dim 1, got shape {tuple(x.shape)}")
    return x.float()


def preprocess_images(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """(B, C, H, W) in [−1, 1] → (B, 3, S, S) normalised as open_clip's own transform would
    (Resize shortest side + CenterCrop, ToTensor's [0, 1], Normalize(mean, std))."""
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = (x.clamp(-1, 1) + 1) / 2  # [0, 1], as ToTensor gives
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale → RGB, as PIL's convert("RGB")
    h, w = x.shape[-2:]
    if (h, w) != size:
        if cfg.get("resize_mode", "shortest") == "squash":
            new = size
        else:  # "shortest": scale so the short side matches, then centre-crop the long one
            s = max(size[0] / h, size[1] / w)
            new = (max(size[0], round(h * s)), max(size[1], round(w * s)))
        mode = cfg.get("interpolation", "bicubic")
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bicubic"
        kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
        x = F.interpolate(x, size=new, mode=mode, **kw).clamp(0, 1)
        top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
        x = x[..., top:top + size[0], left:left + size[1]]
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class ClipEmbedder:
    """An open_clip model + tokenizer with batched, L2-normalised image and text embeddings."""

    def __init__(self, model: str | None = None, pretrained: str | None = None, checkpoint: str | None = None,
                 device: str = "cpu", batch_size: int = 64, who: str = "clip_score"):
        self.device, self.batch_size, self.who = torch.device(device), batch_size, who
        self.model, self.tokenizer = load_clip(model, pretrained, checkpoint, self.device, who)
        self.preprocess_cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        self.preprocess_cfg.setdefault("size", self.model.visual.image_size)

    @torch.no_grad()
    def embed_images(self, samples) -> torch.Tensor:
        """(B, C, H, W) in [−1, 1] → (B, D) unit vectors, on the model's device."""
        x = as_image_batch(samples, self.who)
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = preprocess_images(x[i:i + self.batch_size].to(self.device), self.preprocess_cfg)
            out.append(F.normalize(self.model.encode_image(xb).float(), dim=-1))
        if not out:
            raise ValueError(f"{self.who}: empty image batch")
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """B strings → (B, D) unit vectors; each distinct string is encoded once (an RL group
        repeats its prompt G times)."""
        uniq = list(dict.fromkeys(texts))
        out = []
        for i in range(0, len(uniq), self.batch_size):
            tok = self.tokenizer(uniq[i:i + self.batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1))
        table = torch.cat(out)
        index = {t: j for j, t in enumerate(uniq)}
        return table[torch.tensor([index[t] for t in texts], device=table.device)]


@register_reward("clip_score")
class ClipScore:
    """scale · cos(image, prompt) per sample; the CLIP model is built once per reward worker."""

    def __init__(self, checkpoint: str | None = None, model: str | None = None, pretrained: str | None = None,
                 device: str = "cpu", scale: float = 1.0, batch_size: int = 64):
        self.embedder = ClipEmbedder(model, pretrained, checkpoint, device, batch_size, "clip_score")
        self.scale = float(scale)

    def __call__(self, samples, prompts, **meta) -> torch.Tensor:
        if isinstance(prompts, str) or len(prompts) != len(samples):
            n = len(prompts) if not isinstance(prompts, str) else "a single string as"
            raise ValueError(f"clip_score: {len(samples)} samples but {n} prompts; they must pair up")
        if len(prompts) == 0:
            return torch.zeros(0)
        img = self.embedder.embed_images(samples)          # (B, D)
        txt = self.embedder.embed_texts(list(prompts))     # (B, D)
        return (self.scale * (img * txt).sum(-1)).cpu()    # (B,)
