"""Masked-diffusion language models: a bidirectional transformer that maps ids → logits.

``MaskedDiffusionLM`` wraps any transformers model whose forward takes ``input_ids`` and returns
logits over the vocabulary, with no causal mask (LLaDA, arXiv:2502.09992: the mask predictor is a
plain bidirectional Transformer). Two sources:

- ``MaskedDiffusionLM.tiny(tokenizer, ...)``: a small ``BertForMaskedLM`` trained from scratch
  here (d=128 × 4 layers ≈ 0.8M parameters, the size FEASIBILITY.md measured to learn 2-digit
  arithmetic in minutes on one CPU thread). BERT attention is bidirectional by construction, and
  it was the fastest of BERT / ModernBERT at this size on CPU.
- ``MaskedDiffusionLM.from_hf(path, mask_id=...)``: a pretrained masked-diffusion LM (LLaDA- or
  Dream-style HF folder) from a LOCAL folder; ``trust_remote_code`` stays off unless asked for.

A saved folder is an ordinary HF model folder (config.json + model.safetensors), the tokenizer,
and ``rlgen_model.json`` ({"model_type": "masked_lm", "mask_id": …}) so ``rlgen.models.load_model``
finds this class.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from rlgen.data.tokenizer import load_tokenizer
from rlgen.models import MODEL_META, ModelLoadError, quiet_hf_progress, read_model_meta
from rlgen.registry import register_model


@register_model("masked_lm")
class MaskedDiffusionLM(nn.Module):
    """``forward(input_ids (B, L), attention_mask=None) -> logits (B, L, V)``, plus token ids."""

    def __init__(self, net: nn.Module, tokenizer, mask_id: int, pad_id: int | None = None,
                 eos_id: int | None = None, trust_remote_code: bool = False):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.mask_id = int(mask_id)
        self.pad_id = pad_id if pad_id is not None else tokenizer.pad_token_id
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
        self.trust_remote_code = trust_remote_code
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
    def from_hf(cls, path: str | Path, mask_id: int | None = None, device: str | torch.device = "cpu",
                trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                tokenizer_path: str | Path | None = None) -> "MaskedDiffusionLM":
        """Load a masked-diffusion LM from a local HF folder (never downloads).

        Tries ``AutoModelForMaskedLM`` first, then ``AutoModel`` (LLaDA/Dream register their LM
        class there). ``mask_id`` defaults to the tokenizer's mask token, then the config's
        ``mask_token_id``.
        """
        p = Path(path)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: no config.json; expected a local Hugging Face model folder")
        tokenizer = load_tokenizer(tokenizer_path or p)
        # safetensors only: a pickled pytorch_model.bin can run code when loaded
        kw = dict(local_files_only=True, trust_remote_code=trust_remote_code, use_safetensors=True)
        if dtype is not None:
            kw["dtype"] = dtype
        config = AutoConfig.from_pretrained(str(p), **{k: v for k, v in kw.items() if k != "use_safetensors"})
        with quiet_hf_progress():
            try:
                net = AutoModelForMaskedLM.from_pretrained(str(p), **kw)
            except ValueError:  # config class not in the masked-LM mapping
                net = AutoModel.from_pretrained(str(p), **kw)
        if mask_id is None:
            mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else \
                getattr(config, "mask_token_id", None)
        if mask_id is None:
            raise ModelLoadError(f"{p}: neither the tokenizer nor config.json names a mask token; pass mask_id=")
        model = cls(net, tokenizer, mask_id=mask_id, trust_remote_code=trust_remote_code)
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        trust_remote_code: bool = False) -> "MaskedDiffusionLM":
        """``trust_remote_code`` comes from the caller (config or command line), never from the
        folder: its rlgen_model.json may say anything."""
        meta = read_model_meta(path)
        if meta["model_type"] != "masked_lm":
            raise ModelLoadError(f"{path}/{MODEL_META}: model_type is {meta['model_type']!r}, not 'masked_lm'")
        model = cls.from_hf(path, mask_id=meta["mask_id"], device=device, trust_remote_code=trust_remote_code)
        model.pad_id, model.eos_id = meta.get("pad_id", model.pad_id), meta.get("eos_id", model.eos_id)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        with quiet_hf_progress():
            self.net.save_pretrained(str(p))  # config.json + model.safetensors
        self.tokenizer.save_pretrained(str(p))
        meta = {"model_type": "masked_lm", "hf_class": type(self.net).__name__, "mask_id": self.mask_id,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "vocab_size": self.vocab_size,
                "trust_remote_code": self.trust_remote_code}
        (p / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------
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

    def _check_vocab(self) -> None:
        # The model may have more rows than the tokenizer (padded vocabularies), never fewer.
        n_tok, n_model = len(self.tokenizer), self.vocab_size
        if n_tok > n_model:
            raise ModelLoadError(f"tokenizer has {n_tok} tokens but the model's output layer only {n_model}: "
                                 f"they do not belong together")
        if not 0 <= self.mask_id < n_model:
            raise ModelLoadError(f"mask_id {self.mask_id} is outside the model vocabulary (0..{n_model - 1})")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False):
        """logits (B, L, V); with ``use_cache`` or ``past_key_values`` a ``CachedLMOutput``.

        Prefix caching (used by ``generate(..., cache="prefix")``): ``past_key_values`` is a
        transformers ``Cache`` holding the keys/values of the first C positions of every layer;
        ``input_ids`` are then positions C.. (position ids continue at C) and attend to the cached
        keys and to each other, bidirectionally. The cache is extended in place with the new
        positions (the sampler crops it back to the prefix). The result equals a full forward only
        when the cached keys/values are what a full forward would compute for the prefix now — in
        a bidirectional model of more than one layer they are not, once later tokens changed.
        """
        if past_key_values is None and not use_cache:
            if self.max_length is not None and input_ids.shape[1] > self.max_length:
                raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's "
                                 f"max_position_embeddings {self.max_length}")
            out = self.net(input_ids=input_ids, attention_mask=attention_mask)
            return self._logits(out)
        from transformers import DynamicCache

        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("prefix caching does not support padded inputs (attention_mask with zeros)")
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.net.config)
        total = cache.get_seq_length() + input_ids.shape[1]
        if self.max_length is not None and total > self.max_length:
            raise ValueError(f"sequence length {total} exceeds the model's max_position_embeddings {self.max_length}")
        # BERT-style encoders ignore use_cache but still extend a cache they are handed.
        out = self.net(input_ids=input_ids, past_key_values=cache, use_cache=True)
        if cache.get_seq_length() != total:
            raise ValueError(f"{type(self.net).__name__} did not fill the key/value cache: it cannot be "
                             f"prefix-cached")
        return CachedLMOutput(self._logits(out), cache)

    def _logits(self, out) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.shape[-1] < len(self.tokenizer):
            raise ModelLoadError(f"{type(self.net).__name__} returned a last dimension of {logits.shape[-1]}, "
                                 f"not vocabulary logits; it has no language-model head")
        return logits  # (B, L, V)


@dataclass
class CachedLMOutput:
    logits: torch.Tensor  # (B, L_new, V): logits of the positions fed, not of the cached prefix
    past_key_values: object  # the transformers Cache, now holding prefix + fed positions
