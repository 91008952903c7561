"""Flow policies on real diffusers pipelines (SD3/SD3.5, FLUX.1): latent space, frozen VAE and text encoders.

``DiffusersFlowPolicy`` wraps a loaded diffusers pipeline and satisfies the flow-policy protocol
(docs/architecture.md; DESIGN.md "Flow time"): rlgen's samplers run in the *unpacked* VAE latent
space (C, H/8, W/8) with the pipeline's own σ grid, and ``velocity_fn`` returns the scheduler's
``model_output``, which is ``v = ε − x_data`` in rlgen's convention. What differs between pipeline classes
(prompt encoding, packing, σ shift, CFG vs an embedded guidance scale) lives in one adapter file per class
under ``rlgen/models/pipelines/``.

Only the transformer is an ``nn.Module`` child (so ``parameters()``, ``state_dict()``, DeepSpeed and weight
sync see the trained network alone); the VAE and text encoders are frozen, kept beside it, and follow
``.to(device/dtype)``. Prompt embeddings are cached per prompt string (LRU), so rollout workers run the
text encoders once per distinct prompt.

Checkpoints (``save_pretrained``): ``rlgen_model.json`` ({"model_type": "diffusers_flow", "base": <pipeline
folder or Hub id>, "options": …}) plus, when LoRA adapters are attached, ``pytorch_lora_weights.safetensors``
in diffusers' LoRA format (``pipe.load_lora_weights(dir)`` applies it to the base pipeline), or, for full
fine-tuning, ``transformer/`` (a diffusers model folder). See rlgen/models/diffusers_lora.py.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rlgen.models import MODEL_META, ModelLoadError, quiet_hf_progress
from rlgen.models.prompt_encoder import PromptEmbeds
from rlgen.registry import register_model

_TRUNCATION_WARNED = False  # one warning per process, not per prompt


def _warn_truncation(name: str, limit: int, prompt: str) -> None:
    global _TRUNCATION_WARNED
    if not _TRUNCATION_WARNED:
        _TRUNCATION_WARNED = True
        warnings.warn(f"prompts longer than the text encoders take are truncated ({name} keeps {limit} tokens), "
                      f"e.g. {prompt[:60]!r}…; this warning is shown once per process", stacklevel=4)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' pipelines log one truncation warning per call; rlgen warns once per process instead."""
    from diffusers.utils import logging as dlog

    level, bars = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        if bars:
            dlog.enable_progress_bar()


@register_model("diffusers_flow")
class DiffusersFlowPolicy(nn.Module):
    """A diffusers flow-matching pipeline as an rlgen flow policy (trained part: ``self.transformer``)."""

    family = "flow"

    def __init__(self, pipe, adapter, base: str, prompt_cache_size: int = 1024, cfg_detach_uncond: bool = True):
        super().__init__()
        self.transformer = pipe.transformer
        self.adapter, self.base = adapter, str(base)
        # Frozen parts live outside the module tree: a plain dict hides them from parameters()/state_dict().
        self._frozen = {n: m for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                        if isinstance(m := getattr(pipe, n, None), nn.Module)}
        for m in self._frozen.values():
            m.requires_grad_(False).eval()
        self._pipe = pipe
        self.prompt_cache_size, self.cfg_detach_uncond = int(prompt_cache_size), bool(cfg_detach_uncond)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = self.cache_misses = 0

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline_dir(cls, path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                          resolution: int | None = None, max_sequence_length: int | None = None,
                          base: str | None = None, **options) -> "DiffusersFlowPolicy":
        """Load a diffusers pipeline folder (``model_index.json``) with its adapter."""
        from rlgen.models.pipelines import adapter_for

        check_options(options, str(path))
        path = Path(path)
        index = _read_model_index(path)
        adapter_cls = adapter_for(index.get("_class_name", "?"), str(path / "model_index.json"))
        import diffusers

        pipe_cls = getattr(diffusers, adapter_cls.pipeline_class)
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        try:
            with quiet_hf_progress(), _quiet_diffusers(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # 0.42 renames torch_dtype; older ones lack dtype
                pipe = pipe_cls.from_pretrained(str(path), local_files_only=True, **kw)
        except Exception as e:  # diffusers/transformers raise many types for a broken folder
            raise ModelLoadError(f"{path}: cannot load {adapter_cls.pipeline_class}: {type(e).__name__}: {e}") from e
        pipe.set_progress_bar_config(disable=True)
        adapter = adapter_cls(pipe, resolution, max_sequence_length, where=str(path))
        policy = cls(pipe, adapter, base or str(path.resolve()), **options)
        return policy.to(device).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                        **options) -> "DiffusersFlowPolicy":
        """An rlgen checkpoint of a post-trained pipeline: the base + LoRA adapter or a full transformer."""
        from rlgen.models.diffusers_lora import load_checkpoint

        return load_checkpoint(cls, Path(path), device=device, dtype=dtype, **options)

    def save_pretrained(self, path: str | Path) -> Path:
        from rlgen.models.diffusers_lora import save_checkpoint

        return save_checkpoint(self, Path(path))

    @property
    def options(self) -> dict:
        """What a checkpoint must remember to rebuild this policy from its base."""
        return {"resolution": self.adapter.resolution, "max_sequence_length": self.adapter.max_sequence_length,
                "prompt_cache_size": self.prompt_cache_size, "cfg_detach_uncond": self.cfg_detach_uncond}

    # ------------------------------------------------------------------------------------------
    # Device / dtype: the frozen parts follow the transformer
    # ------------------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for m in self._frozen.values():
            m._apply(fn, *args, **kwargs)
        self._cache.clear()  # cached embeddings are on the old device/dtype
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen.values():
            m.eval()  # frozen parts never switch to training mode (dropout stays off)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.adapter.latent_shape

    @property
    def pipeline(self):
        """The underlying diffusers pipeline (its transformer is this policy's, adapters included)."""
        return self._pipe

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------
    # Sampling surface
    # ------------------------------------------------------------------------------------------
    def sigmas(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """(num_steps+1,) float32 grid from 1 to 0: the pipeline scheduler's own (SD3 shift, FLUX μ)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return self.adapter.sigmas(int(num_steps), shift)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """PromptEmbeds (B, T, D) / (B, P) through the frozen text encoders; each distinct prompt string is
        encoded once and kept in an LRU cache of ``prompt_cache_size`` entries."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, got a single string")
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self.cache_hits += len(prompts) - len(missing)
        self.cache_misses += len(missing)
        if missing and self.adapter.uses_cfg and "" not in self._cache and "" not in missing:
            missing.append("")  # CFG's unconditional prompt rides along: one encoder pass, not two
        if missing:
            self._check_lengths(missing)
            with _quiet_diffusers():
                emb = self.adapter.encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (emb.tokens[i], emb.pooled[i])
        for p in prompts:
            self._cache.move_to_end(p)
        rows = [self._cache[p] for p in prompts]
        while len(self._cache) > max(self.prompt_cache_size, len(set(prompts))):
            self._cache.popitem(last=False)
        if not rows:
            raise ValueError("encode_prompts got an empty prompt list")
        tokens = torch.stack([t for t, _ in rows])  # (B, T, D)
        pooled = torch.stack([p for _, p in rows])  # (B, P)
        return PromptEmbeds(tokens, torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device), pooled)

    def _check_lengths(self, prompts: list[str]) -> None:
        if _TRUNCATION_WARNED:
            return
        for name, tok, limit in self.adapter.token_limits():
            lengths = [len(ids) for ids in tok(prompts, truncation=False).input_ids]  # one batched call
            if max(lengths) > limit:
                _warn_truncation(name, limit, prompts[lengths.index(max(lengths))])
                return

    def _embeds(self, prompts_or_embeds) -> PromptEmbeds:
        if isinstance(prompts_or_embeds, PromptEmbeds):
            return prompts_or_embeds.to(self.device)
        return self.encode_prompts(prompts_or_embeds)

    def forward(self, x: torch.Tensor, sigma, emb: PromptEmbeds, guidance: float | None = None) -> torch.Tensor:
        """v (B, C, h, w) at latents x (B, C, h, w), σ (B,) or float. x is cast to the weights' dtype and v
        comes back in x's dtype (samplers keep their state in full precision)."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s  # (B,)
        emb = PromptEmbeds(emb.tokens.to(self.dtype), emb.mask, emb.pooled.to(self.dtype))
        v = self.adapter.velocity(self.transformer, x.to(self.dtype), s, emb, guidance)
        return v.to(x.dtype)

    def velocity_fn(self, prompts_or_embeds, cfg_scale: float = 1.0,
                    cfg_detach_uncond: bool | None = None) -> Callable:
        """``(x, sigma) -> v`` for rlgen's samplers and learners (gradients flow through the transformer).

        SD3: ``cfg_scale > 1`` runs the unconditional ("" prompt) and conditional branches and combines
        ``v_u + w·(v_c − v_u)`` — in one 2B-row pass (the pipeline's order) when no gradient is needed, or
        with the unconditional branch under ``no_grad`` when ``cfg_detach_uncond`` (default: the policy's
        option, True as in Flow-GRPO) and grad is on. FLUX.1-dev: ``cfg_scale`` is the embedded guidance.
        """
        from rlgen.samplers.flow import cfg_combine

        emb = self._embeds(prompts_or_embeds)
        if not self.adapter.uses_cfg:
            return lambda x, sigma: self(x, sigma, emb, guidance=cfg_scale)
        if cfg_scale <= 1.0:  # the pipeline's do_classifier_free_guidance is guidance_scale > 1
            return lambda x, sigma: self(x, sigma, emb)
        uncond = self.encode_prompts([""]).to(self.device)
        uncond = PromptEmbeds(uncond.tokens.expand(len(emb), -1, -1), uncond.mask.expand(len(emb), -1),
                              uncond.pooled.expand(len(emb), -1))
        both = PromptEmbeds.cat([uncond, emb])  # (2B, …): unconditional rows first, as the pipeline
        detach = self.cfg_detach_uncond if cfg_detach_uncond is None else cfg_detach_uncond

        def fn(x: torch.Tensor, sigma) -> torch.Tensor:
            s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
            s = s.expand(x.shape[0]) if s.ndim == 0 else s
            if detach and torch.is_grad_enabled():
                with torch.no_grad():
                    v_u = self(x, s, uncond)
                return cfg_combine(self(x, s, emb), v_u, cfg_scale)
            v_u, v_c = self(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)  # (B, C, h, w) each
            return cfg_combine(v_c, v_u, cfg_scale)

        return fn

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents → (B, 3, H, W) RGB in [-1, 1], float32, through the frozen VAE."""
        return self.adapter.decode(latents).float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, C, h, w) latents (VAE mean), e.g. for Diffusion-DPO image pairs."""
        with torch.no_grad():
            return self.adapter.encode_images(images.to(self.device)).float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], num_steps: int | None = None, cfg_scale: float | None = None,
                 generator: torch.Generator | None = None, noise_level: float = 0.0, shift: float | None = None,
                 batch_size: int = 64, output_type: str = "pt", progress: bool = False, teacache=None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] (``output_type="pt"``) or latents in the pipeline's format
        (``"latent"``). The start noise is drawn for the whole batch at once, in the transformer's dtype,
        exactly as the pipeline's ``prepare_latents`` draws it, so with ``noise_level=0`` this returns what
        ``pipe(prompts, num_inference_steps, guidance_scale, generator=…, output_type="latent")`` returns.
        ``teacache`` (``TeaCacheConfig`` or ``TeaCache``, rlgen/samplers/teacache.py) skips forwards on ODE steps."""
        from diffusers.utils.torch_utils import randn_tensor

        from rlgen.models.teacache import teacache_for
        from rlgen.samplers.flow import sample

        cache = teacache_for(self, teacache)  # sample() never skips an SDE step

        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
        num_steps = num_steps or self.adapter.default_steps
        cfg_scale = self.adapter.default_guidance if cfg_scale is None else cfg_scale
        prompts = list(prompts)
        dev = self.device
        emb = self.encode_prompts(prompts)
        noise = randn_tensor((len(prompts), *self.sample_shape), generator=generator, device=dev, dtype=self.dtype)
        sigmas = self.sigmas(num_steps, shift)
        step_gen = generator
        if generator is not None and generator.device != dev:  # SDE noise is drawn on the latents' device
            step_gen = torch.Generator(dev).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        out = []
        for i in range(0, len(prompts), batch_size):
            traj = sample(self.velocity_fn(emb[i:i + batch_size], cfg_scale), noise[i:i + batch_size], sigmas,
                          noise_level=noise_level, generator=step_gen, keep_latents=False, progress=progress,
                          teacache=cache)
            x = traj.samples
            out.append(self.adapter.to_pipeline_latents(x) if output_type == "latent" else self.decode(x))
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------
    # LoRA (peft on the transformer; see rlgen/models/diffusers_lora.py for the file format)
    # ------------------------------------------------------------------------------------------
    def lora_module(self) -> nn.Module:
        return self.transformer

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return self.adapter.lora_targets

    def add_lora(self, rank: int = 32, alpha: float = 64, target_modules: Sequence[str] | None = None,
                 init: str | bool = "gaussian", adapter_name: str = "default") -> None:
        """Attach a peft LoRA adapter (defaults: Flow-GRPO's r 32, α 64, gaussian init, its targets)."""
        from rlgen.models.diffusers_lora import lora_config

        self.transformer.add_adapter(lora_config(rank, alpha, target_modules or self.default_lora_targets, init),
                                     adapter_name=adapter_name)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: adapters disabled inside the block (no copy of the weights)."""
        if not self.has_lora:
            raise RuntimeError("reference(): no LoRA adapter attached; a full fine-tune needs its own reference copy")
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()


# ``policy.options`` of a pipeline (train_rl.py) = the keyword arguments of ``load_model`` besides dtype
PIPELINE_OPTIONS = ("resolution", "max_sequence_length", "prompt_cache_size", "cfg_detach_uncond")


def check_options(options: dict, where: str) -> None:
    """A misspelt pipeline option is one line naming it and the valid ones (before any weights load)."""
    bad = sorted(set(options) - set(PIPELINE_OPTIONS))
    if bad:
        raise ModelLoadError(f"{where}: option(s) {bad} do not apply to a diffusers pipeline (policy.options); "
                             f"valid: {', '.join(PIPELINE_OPTIONS)}")


def _read_model_index(path: Path) -> dict:
    p = path / "model_index.json"
    try:
        index = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{p}: cannot read a diffusers model_index.json ({e})") from e
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ModelLoadError(f"{p}: missing '_class_name' (not a diffusers pipeline index)")
    return index


def write_meta(path: Path, meta: dict) -> None:
    (path / MODEL_META).write_text(json.dumps(meta, indent=2))
