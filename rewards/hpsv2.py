"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv:2306.09341): an open_clip ViT-H-14
fine-tuned on human preferences; the score is ``cos(image, prompt)`` (≈ 0.25–0.35 for real images).

    rewards: {hpsv2: 1.0}
    reward_kwargs: {hpsv2: {checkpoint: /models/HPS_v2.1_compressed.pt}}   # or a Hub id (xswu/HPSv2)

The architecture is open_clip's ``ViT-H-14`` (``model:``), built without pretrained weights, then HPS's
state dict is loaded (a torch file holding ``{"state_dict": …}`` or the bare state dict, or a
``.safetensors``). ``checkpoint`` is a local file or a Hub repo id whose ``filename`` is fetched from the
local Hugging Face cache (or downloaded where a network exists). Images are preprocessed with the
architecture's own open_clip settings by torch ops (rewards/clip_score.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.clip_score import as_image_batch, open_clip_module, preprocess_images
from rewards.hub import local_weights
from rlgen.registry import register_reward

HPS_ARCH = "ViT-H-14"
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"


def load_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


@register_reward("hpsv2")
class HPSv2:
    def __init__(self, checkpoint: str = HPS_REPO, filename: str = HPS_FILE, model: str = HPS_ARCH,
                 device: str = "cpu", scale: float = 1.0, batch_size: int = 32):
        oc = open_clip_module()
        self.device, self.scale, self.batch_size = torch.device(device), float(scale), int(batch_size)
        weights = local_weights(checkpoint, "hpsv2", filename=None if Path(checkpoint).exists() else filename)
        if weights.is_dir():
            weights = weights / filename
        if model not in oc.list_models():
            raise ValueError(f"hpsv2: unknown open_clip architecture {model!r}")
        net = oc.create_model(model, pretrained=None)
        state = {k.removeprefix("module."): v for k, v in load_state(weights).items()}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"hpsv2: {weights} does not fit open_clip {model}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer = oc.get_tokenizer(model)
        self.cfg = dict(getattr(net.visual, "preprocess_cfg", {}) or {})
        self.cfg.setdefault("size", net.visual.image_size)

    @torch.no_grad()
    def __call__(self, samples, prompts, **meta) -> torch.Tensor:
        x = as_image_batch(samples, "hpsv2")
        if len(x) != len(prompts):
            raise ValueError(f"hpsv2: {len(x)} samples but {len(prompts)} prompts; they must pair up")
        out = []
        for i in range(0, len(x), self.batch_size):
            img = self.model.encode_image(preprocess_images(x[i:i + self.batch_size].to(self.device), self.cfg))
            txt = self.model.encode_text(self.tokenizer(list(prompts[i:i + self.batch_size])).to(self.device))
            out.append((F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1))
        return (self.scale * torch.cat(out)).cpu()
