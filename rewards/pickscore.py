"""PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv:2305.01569): a CLIP-H fine-tuned on human
preferences; the score is ``logit_scale · cos(image, prompt)`` (≈ 18–23 for real images).

    rewards: {pickscore: 1.0}
    reward_kwargs: {pickscore: {model: yuvalkirstain/PickScore_v1,
                                processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K, scale: 0.03846}}

``model`` is a transformers ``CLIPModel`` folder or Hub id, ``processor`` the ``CLIPProcessor`` (image
preprocessing + tokenizer) folder or Hub id; both load offline from a local folder or the Hugging Face cache.
Flow-GRPO divides the score by 26 (``scale: 1/26``). Images (B, 3, H, W) in [−1, 1] are resized and
normalised with the processor's own settings by torch ops on the model's device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewards.hub import local_weights
from rlgen.registry import register_reward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def processor_preprocess_cfg(processor) -> dict:
    """A CLIPImageProcessor's resize/crop/normalise settings in rlgen's preprocess_images vocabulary."""
    ip = processor.image_processor
    size = ip.size.get("shortest_edge", ip.size.get("height"))
    crop = (ip.crop_size["height"], ip.crop_size["width"]) if getattr(ip, "do_center_crop", True) else (size, size)
    return {"size": crop, "resize_short": size, "mean": tuple(ip.image_mean), "std": tuple(ip.image_std),
            "interpolation": "bicubic"}


def clip_pixels(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1] → CLIP pixel values: shortest side to ``resize_short``, centre crop, normalise."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    s = cfg["resize_short"] / min(h, w)
    new = (max(cfg["size"][0], round(h * s)), max(cfg["size"][1], round(w * s)))
    if new != (h, w):
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new[0] - cfg["size"][0]) // 2, (new[1] - cfg["size"][1]) // 2
    x = x[..., top:top + cfg["size"][0], left:left + cfg["size"][1]]
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@register_reward("pickscore")
class PickScore:
    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, device: str = "cpu",
                 dtype: str = "float32", scale: float = 1.0, batch_size: int = 32):
        import rlgen  # noqa: F401  (torchvision shim before transformers' CLIP)
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.scale, self.batch_size = torch.device(device), float(scale), int(batch_size)
        model_dir = local_weights(model, "pickscore model")
        self.processor = CLIPProcessor.from_pretrained(str(local_weights(processor, "pickscore processor")))
        self.model = CLIPModel.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.cfg = processor_preprocess_cfg(self.processor)

    @torch.no_grad()
    def __call__(self, samples, prompts, **meta) -> torch.Tensor:
        from rewards.clip_score import as_image_batch

        x = as_image_batch(samples, "pickscore")
        if len(x) != len(prompts):
            raise ValueError(f"pickscore: {len(x)} samples but {len(prompts)} prompts; they must pair up")
        dtype = self.model.dtype
        out = []
        for i in range(0, len(x), self.batch_size):
            pix = clip_pixels(x[i:i + self.batch_size].to(self.device), self.cfg).to(dtype)
            img = F.normalize(_features(self.model.get_image_features(pixel_values=pix)).float(), dim=-1)
            tok = self.processor.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                           max_length=77, return_tensors="pt").to(self.device)
            txt = F.normalize(_features(self.model.get_text_features(**tok)).float(), dim=-1)
            out.append(self.model.logit_scale.exp().float() * (img * txt).sum(-1))  # (b,)
        return (self.scale * torch.cat(out)).cpu()


def _features(out):
    """transformers 5 may return a model output object where 4.x returned the projected tensor."""
    return out if torch.is_tensor(out) else getattr(out, "pooler_output", out[0])
