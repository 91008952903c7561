"""Masked-diffusion language models: a transformer that maps ids → logits over the vocabulary.

``MaskedDiffusionLM`` wraps any transformers model whose forward takes ``input_ids`` and returns
logits, and hides how model families differ (rlgen/models/hf_lm.py): full bidirectional attention
(LLaDA, arXiv:2502.09992: the mask predictor is a plain bidirectional Transformer), Dream's shifted
logits (undone here, so ``logits[:, i]`` always predicts token ``i``), and LLaDA2-style block-causal
attention (block diffusion: block ``b`` attends to blocks ``≤ b``; the 4-D mask and position ids are
built here). Sources:

- ``MaskedDiffusionLM.tiny(tokenizer, ...)``: a small ``BertForMaskedLM`` trained from scratch here
  (d=128 × 4 layers ≈ 0.8M parameters, the size docs/feasibility.md measured to learn 2-digit arithmetic
  in minutes on one CPU thread).
- ``MaskedDiffusionLM.load(folder_or_hub_id, trust_remote_code=..., **options)``: a Hugging Face
  folder (LLaDA / Dream / LLaDA2 with their own code behind ``trust_remote_code``) or an rlgen
  checkpoint; ``rlgen.models.load_model`` calls it.

A saved folder is an ordinary HF model folder (config.json + model.safetensors, plus the model's own
code files when it has them), the tokenizer, and ``rlgen_model.json`` ({"model_type": "masked_lm",
"mask_id": …, conventions}). A LoRA policy saves only its adapter (a peft folder) and a pointer to the
base model (rlgen/models/lora.py). ``trust_remote_code`` is never read from a folder: only the caller
grants it.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from rlgen.models import MODEL_META, ModelLoadError, quiet_hf_progress, read_model_meta
from rlgen.models.hf_lm import (Conventions, MaskedLMOptions, enable_gradient_checkpointing, load_hf_network,
                                load_hf_tokenizer, resolve_conventions, resolve_mask_id, resolve_model_path)
from rlgen.registry import register_model


@register_model("masked_lm")
class MaskedDiffusionLM(nn.Module):
    """``forward(input_ids (B, L), attention_mask=None) -> logits (B, L, V)``, plus token ids.

    A policy of the ``masked_lm`` family (rlgen/families/masked_lm.py).
    """

    family = "masked_lm"
    # BERT-style self-attention projections; Llama-style models name theirs q_proj/k_proj/v_proj/o_proj
    default_lora_targets = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, net: nn.Module, tokenizer, mask_id: int, pad_id: int | None = None,
                 eos_id: int | None = None, conventions: Conventions | None = None, source: str | None = None):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.mask_id = int(mask_id)
        self.pad_id = pad_id if pad_id is not None else tokenizer.pad_token_id
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.conventions = conventions or Conventions()
        self.source = source  # folder or Hub id the weights came from (a LoRA checkpoint's base)
        self.lora_base: str | None = None  # set by rlgen.models.lora.add_lora
        self._check_vocab()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, tokenizer, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
             intermediate_size: int = 512, max_length: int = 64) -> "MaskedDiffusionLM":
        """A fresh bidirectional BERT sized for the character-level tasks (dropout off: the
        masking noise already regularises, and tiny models underfit rather than overfit)."""
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_length, type_vocab_size=1,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         pad_token_id=tokenizer.pad_token_id)
        return cls(BertForMaskedLM(cfg), tokenizer, mask_id=tokenizer.mask_token_id)

    @classmethod
    def load(cls, spec: str | Path, device: str | torch.device = "cpu", dtype=None, trust_remote_code: bool = False,
             options: MaskedLMOptions | None = None, **option_kwargs) -> "MaskedDiffusionLM":
        """An rlgen checkpoint (``rlgen_model.json``), a Hugging Face folder, or a Hub id (cache first)."""
        opts = _merge_options(options, option_kwargs, dtype=dtype, trust_remote_code=trust_remote_code)
        folder, source = resolve_model_path(spec)
        if (folder / MODEL_META).is_file():
            return cls.from_pretrained(folder, device=device, options=opts)
        return cls.from_hf(folder, device=device, options=opts, source=source)

    @classmethod
    def from_hf(cls, path: str | Path, mask_id: int | None = None, device: str | torch.device = "cpu",
                trust_remote_code: bool = False, dtype=None, tokenizer_path: str | Path | None = None,
                options: MaskedLMOptions | None = None, source: str | None = None, saved: dict | None = None,
                **option_kwargs) -> "MaskedDiffusionLM":
        """Load a masked-diffusion LM from a LOCAL Hugging Face folder (never downloads).

        ``mask_id`` (or ``options.mask_token_id``) defaults to the tokenizer's mask token, then the
        config's ``mask_token_id``. ``saved`` holds an rlgen checkpoint's recorded conventions.
        """
        opts = _merge_options(options, option_kwargs, dtype=dtype, trust_remote_code=trust_remote_code,
                              mask_token_id=mask_id)
        p = Path(path)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: no config.json; expected a local Hugging Face model folder")
        net, config = load_hf_network(p, opts.trust_remote_code, opts.dtype)
        tokenizer = load_hf_tokenizer(Path(tokenizer_path or p), opts.trust_remote_code)
        mask = resolve_mask_id(tokenizer, config, opts.mask_token_id, p)
        conv = resolve_conventions(config, opts, saved)
        model = cls(net, tokenizer, mask_id=mask, conventions=conv, source=source or str(p.resolve()))
        if opts.gradient_checkpointing:
            enable_gradient_checkpointing(net)
        if opts.lora is not None:
            from rlgen.models.lora import add_lora

            add_lora(model, opts.lora)
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        options: MaskedLMOptions | None = None, **option_kwargs) -> "MaskedDiffusionLM":
        """An rlgen checkpoint; ``trust_remote_code`` comes from the caller only, never from the folder."""
        opts = _merge_options(options, option_kwargs, trust_remote_code=trust_remote_code)
        meta = read_model_meta(path)
        if meta["model_type"] != "masked_lm":
            raise ModelLoadError(f"{path}/{MODEL_META}: model_type is {meta['model_type']!r}, not 'masked_lm'")
        if meta.get("lora_base"):
            from rlgen.models.lora import load_lora_checkpoint

            return load_lora_checkpoint(cls, Path(path), meta, device, opts)
        if opts.mask_token_id is None:
            opts.mask_token_id = meta["mask_id"]
        model = cls.from_hf(path, device=device, options=opts, saved=meta.get("conventions"),
                            source=str(Path(path).resolve()))  # this checkpoint is a LoRA's base from now on
        model.pad_id, model.eos_id = meta.get("pad_id", model.pad_id), meta.get("eos_id", model.eos_id)
        return model

    def meta(self) -> dict:
        """What rlgen_model.json records (never trust_remote_code: only a caller grants that)."""
        return {"model_type": "masked_lm", "hf_class": type(self.net).__name__, "mask_id": self.mask_id,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "vocab_size": self.vocab_size,
                "conventions": self.conventions.to_dict(), "source": self.source}

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        meta = self.meta()
        from rlgen.models.lora import has_lora, save_lora

        if has_lora(self):
            save_lora(self, p)  # adapter_config.json + adapter_model.safetensors
            meta["lora_base"] = self.lora_base
        else:
            with quiet_hf_progress():
                self.net.save_pretrained(str(p))  # config.json + model.safetensors (+ its code files)
        self.tokenizer.save_pretrained(str(p))
        (p / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------
    def lora_module(self) -> nn.Module:
        """The transformers model peft adapters attach to (``add_adapter``/``disable_adapters``…)."""
        return self.net

    @property
    def is_block_causal(self) -> bool:
        return self.conventions.attention == "block_causal"

    @property
    def block_size(self) -> int | None:
        return self.conventions.block_size if self.is_block_causal else None

    @property
    def forbidden_ids(self) -> tuple[int, ...]:
        """Ids decoding never predicts (and log-prob replay excludes): [MASK], and the pad token
        unless it is also the end-of-text token (LLaDA-style tokenizers pad with it)."""
        return (self.mask_id,) if self.pad_id in (None, self.eos_id) else (self.mask_id, self.pad_id)

    @property
    def vocab_size(self) -> int:
        out = self.net.get_output_embeddings() if hasattr(self.net, "get_output_embeddings") else None
        if out is not None and hasattr(out, "weight"):
            return int(out.weight.shape[0])
        return int(self.net.config.vocab_size)

    @property
    def max_length(self) -> int | None:
        return getattr(self.net.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def _check_vocab(self) -> None:
        # The model may have more rows than the tokenizer (padded vocabularies), never fewer.
        n_tok, n_model = len(self.tokenizer), self.vocab_size
        if n_tok > n_model:
            raise ModelLoadError(f"tokenizer has {n_tok} tokens but the model's output layer only {n_model}: "
                                 f"they do not belong together")
        if not 0 <= self.mask_id < n_model:
            raise ModelLoadError(f"mask_id {self.mask_id} is outside the model vocabulary (0..{n_model - 1})")

    # ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, position_ids: torch.Tensor | None = None):
        """logits (B, L, V); with ``use_cache`` or ``past_key_values`` a ``CachedLMOutput``.

        ``attention_mask`` (B, C + L) marks real tokens (0 = padding) over the cached C positions and
        the L fed ones. Prefix caching: ``past_key_values`` is a transformers ``Cache`` holding the
        keys/values of the first C positions of every layer; ``input_ids`` are then positions C..
        (position ids continue at C) and the cache is extended in place (the sampler crops it back).
        The result equals a full forward when the cached keys/values are what a full forward would
        compute for the prefix now: always for a block-causal model whose cache ends on a block
        boundary (earlier blocks never see later ones), only approximately for a bidirectional model
        of more than one layer once later tokens changed (Fast-dLLM, arXiv:2505.22618).
        ``position_ids`` (B, L) or (1, L): the fed tokens' absolute positions, for a cache that also
        holds positions after them (the dual cache, rlgen/samplers/kv_cache.py); unpadded
        bidirectional models only, whose network takes ``position_ids``.
        """
        cached = past_key_values is not None or use_cache
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = start + input_ids.shape[1]
        if position_ids is not None:
            total = max(total, int(position_ids.max()) + 1)
        if self.max_length is not None and total > self.max_length:
            raise ValueError(f"sequence length {total} exceeds the model's max_position_embeddings {self.max_length}")
        kwargs = self._mask_kwargs(input_ids, attention_mask, start, cached)
        if position_ids is not None:
            kwargs["position_ids"] = self._explicit_positions(input_ids, attention_mask, position_ids)
        if not cached:
            return self._logits(self.net(input_ids=input_ids, **kwargs))
        from transformers import DynamicCache

        if self.conventions.shift_logits:
            raise ValueError("prefix caching is not supported for shifted-logit (Dream-style) models")
        if not self.is_block_causal and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("prefix caching does not support padded inputs (attention_mask with zeros)")
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.net.config)
        # BERT-style encoders ignore use_cache but still extend a cache they are handed.
        out = self.net(input_ids=input_ids, past_key_values=cache, use_cache=True, **kwargs)
        if cache.get_seq_length() != start + input_ids.shape[1]:
            raise ValueError(f"{type(self.net).__name__} did not fill the key/value cache: it cannot be "
                             f"prefix-cached")
        return CachedLMOutput(self._logits(out), cache)

    def _explicit_positions(self, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor):
        """(B, L) position ids the caller chose, after checking the network can take them as meant."""
        if self.is_block_causal or (attention_mask is not None and not bool(attention_mask.all())):
            raise ValueError("explicit position_ids need an unpadded bidirectional model "
                             "(block-causal and padded inputs build their own)")
        if "position_ids" not in inspect.signature(self.net.forward).parameters:
            raise ValueError(f"{type(self.net).__name__}.forward takes no position_ids: it cannot be dual-cached")
        return position_ids.expand(input_ids.shape)

    def _mask_kwargs(self, input_ids: torch.Tensor, attention_mask, start: int, cached: bool) -> dict:
        """What the network gets besides the ids: a 2-D padding mask, or a 4-D mask + position ids."""
        B, L = input_ids.shape
        conv = self.conventions
        device, total = input_ids.device, start + L
        if attention_mask is not None and tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must cover the cached and fed "
                             f"positions: ({B}, {total})")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if conv.attention_mask_format == "2d":
            return {} if attention_mask is None or cached else {"attention_mask": attention_mask}
        if not self.is_block_causal and not padded:
            return {}  # bidirectional and nothing to hide: the network's own default (full attention)
        keys = torch.ones(B, total, dtype=torch.bool, device=device) if attention_mask is None \
            else attention_mask.bool()  # (B, K)
        q_pos = torch.arange(start, total, device=device)  # (L,) absolute positions of the fed tokens
        k_pos = torch.arange(total, device=device)  # (K,)
        allow = keys[:, None, None, :].expand(B, 1, L, total)  # (B, 1, L, K)
        if self.is_block_causal:  # blocks are aligned to absolute position 0, as LLaDA2 trains them
            bs = conv.block_size
            allow = allow & ((k_pos // bs)[None, :] <= (q_pos // bs)[:, None])
        allow = allow | (k_pos[None, :] == q_pos[:, None])  # a padded query still sees itself: no empty softmax
        mask = self._network_mask(allow)
        if padded and not self.is_block_causal:  # Dream: pads take no position (cumulative count of real tokens)
            position_ids = (keys.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
        else:
            position_ids = q_pos.expand(B, L)
        return {"attention_mask": mask, "position_ids": position_ids}

    def _network_mask(self, allow: torch.Tensor) -> torch.Tensor:
        """A (B, 1, L, K) bool "may attend" matrix in the network's 4-D format (bool or additive)."""
        if self.conventions.attention_mask_format == "bool":
            return allow
        if self.conventions.attention_mask_format != "additive":
            raise ValueError(f"{type(self.net).__name__} takes 2-D padding masks only; a 4-D attention pattern "
                             f"needs policy.lm.attention_mask_format=bool or additive")
        return torch.zeros(allow.shape, dtype=self.dtype, device=allow.device).masked_fill(
            ~allow, torch.finfo(self.dtype).min)

    def forward_with_pattern(self, input_ids: torch.Tensor, allow: torch.Tensor,
                             position_ids: torch.Tensor) -> torch.Tensor:
        """logits (B, L, V) under an explicit attention pattern ``allow`` (B, 1, L, L) bool and
        ``position_ids`` (B, L): e.g. block diffusion's two-copy training sequence
        (``rlgen.samplers.likelihood.block_elbo``)."""
        out = self.net(input_ids=input_ids, attention_mask=self._network_mask(allow), position_ids=position_ids)
        return self._logits(out)

    def _logits(self, out) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.shape[-1] < len(self.tokenizer):
            raise ModelLoadError(f"{type(self.net).__name__} returned a last dimension of {logits.shape[-1]}, "
                                 f"not vocabulary logits; it has no language-model head")
        if self.conventions.shift_logits:
            # raw logits[:, i] predict token i + 1 (Dream); shift right so logits[:, i] predict token i.
            # Position 0 has no prediction of its own and keeps the raw first row, as Dream's generate does.
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits  # (B, L, V)


def _merge_options(options: MaskedLMOptions | None, option_kwargs: dict, **overrides) -> MaskedLMOptions:
    """One options object from a dataclass, keyword options and explicit arguments (non-default win)."""
    base = options if options is not None else MaskedLMOptions()
    kw = {f: getattr(base, f) for f in base.__dataclass_fields__}
    if option_kwargs:
        MaskedLMOptions.from_kwargs(**option_kwargs)  # unknown names and bad values fail here, named
    kw.update(option_kwargs)
    for key, value in overrides.items():
        if value is not None and value is not False:
            kw[key] = value
    return MaskedLMOptions(**kw)


@dataclass
class CachedLMOutput:
    logits: torch.Tensor  # (B, L_new, V): logits of the positions fed, not of the cached prefix
    past_key_values: object  # the transformers Cache, now holding prefix + fed positions
