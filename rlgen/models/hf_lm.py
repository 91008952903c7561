"""Hugging Face diffusion LMs (LLaDA, Dream, LLaDA2-style block diffusion) as rlgen policies.

What differs between these model families is a few *conventions*, typed in ``MaskedLMOptions``
(job configs: ``policy.lm.<name>``, ``ConventionOptions``; ``policy.trust_remote_code``,
``policy.mask_token_id``, ``policy.dtype``, ``policy.lora``, ``policy.gradient_checkpointing`` for the
rest) and detected from ``config.json``'s ``model_type`` when left unset:

============  ================  ======================  ==============================================
model_type    attention         logits                  attention mask handed to the network
============  ================  ======================  ==============================================
llada         bidirectional     logits[:, i] → token i  2-D padding mask (LLaDA, arXiv:2502.09992)
dream         bidirectional     shifted: → token i + 1  4-D bool mask, pad-skipping position ids
                                                        (Dream 7B, arXiv:2508.15487: AR-initialised)
llada2_moe    block_causal      logits[:, i] → token i  4-D additive mask + position ids (LLaDA2,
                                                        block diffusion; Arriola et al. 2025,
                                                        arXiv:2503.09573)
other         bidirectional     → token i               2-D padding mask (BERT-style encoders)
============  ================  ======================  ==============================================

Loading never runs code from a folder unless the *caller* says so (``trust_remote_code``, from the
user's config or command line; never from a file in the folder), and a Hub id is looked up in the
local Hugging Face cache first (``local_files_only``), so an offline machine gets a one-line error
naming the id instead of a network timeout.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rlgen.models import ModelLoadError, quiet_hf_progress

ATTENTION = ("bidirectional", "block_causal")
MASK_FORMATS = ("2d", "bool", "additive")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# model_type (lower case) → (attention, shift_logits, attention_mask_format, default block size)
FAMILIES = {
    "llada": ("bidirectional", False, "2d", None),
    "dream": ("bidirectional", True, "bool", None),
    "llada2_moe": ("block_causal", False, "additive", 32),
}


@dataclass
class LoraOptions:
    """LoRA (Hu et al. 2021, arXiv:2106.09685) on the policy's linear layers; the rest stays frozen."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # names (suffix match) or one regex; None: per architecture

    def __post_init__(self):
        if self.r <= 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"policy.lora: r ({self.r}) and alpha ({self.alpha}) must be > 0 and dropout "
                             f"({self.dropout}) in [0, 1)")


@dataclass
class ConventionOptions:
    """``policy.lm:`` in job configs: the conventions of ``MaskedLMOptions`` (same names), each None
    = detected from the folder. Checked when the config loads, so a bad value names its key."""

    attention: str | None = None  # bidirectional (LLaDA, Dream) | block_causal (LLaDA2)
    shift_logits: bool | None = None  # Dream-style: the raw logits[:, i] predict token i + 1
    block_size: int | None = None  # block-causal models: the block length they were trained with
    attention_mask_format: str | None = None  # 2d | bool | additive: how masks reach the network

    def __post_init__(self):
        from rlgen.config import FieldError

        for name, choices in (("attention", ATTENTION), ("attention_mask_format", MASK_FORMATS)):
            if getattr(self, name) is not None and getattr(self, name) not in choices:
                raise FieldError(name, f"must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.block_size is not None and self.block_size <= 0:
            raise FieldError("block_size", f"must be > 0, got {self.block_size}")

    def given(self) -> dict:
        """The fields set (not None): load options for ``MaskedLMOptions``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class MaskedLMOptions:
    """How to load and read a masked-diffusion LM (keyword options of ``load_model``; the ``policy:``
    fields of a job config, conventions under ``policy.lm``). None = detect from the folder."""

    trust_remote_code: bool = False  # run the folder's own modeling/tokenizer code (LLaDA, Dream, LLaDA2)
    mask_token_id: int | None = None  # default: the tokenizer's mask token, then config.json's mask_token_id
    dtype: str | None = None  # float32 | bfloat16 | float16; None = float32 (or the rlgen checkpoint's)
    attention: str | None = None  # bidirectional | block_causal
    shift_logits: bool | None = None  # Dream-style: the raw logits[:, i] predict token i + 1
    block_size: int | None = None  # block-causal models: the block length they were trained with
    attention_mask_format: str | None = None  # 2d | bool | additive (4-D masks); how masks reach the network
    gradient_checkpointing: bool = False
    lora: LoraOptions | None = None

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if isinstance(self.lora, dict):
            self.lora = LoraOptions(**self.lora)
        if self.attention is not None and self.attention not in ATTENTION:
            raise ValueError(f"policy.lm.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.attention_mask_format is not None and self.attention_mask_format not in MASK_FORMATS:
            raise ValueError(f"policy.lm.attention_mask_format must be one of {MASK_FORMATS}, "
                             f"got {self.attention_mask_format!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"policy.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"policy.lm.block_size must be > 0, got {self.block_size}")

    @classmethod
    def from_kwargs(cls, **kw) -> "MaskedLMOptions":
        """Options from keyword arguments; an unknown name is one error listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise TypeError(f"unknown masked-LM option(s) {unknown}; known: {sorted(known)}")
        return cls(**kw)


@dataclass
class Conventions:
    """The resolved conventions a ``MaskedDiffusionLM`` follows (saved in rlgen_model.json)."""

    attention: str = "bidirectional"
    shift_logits: bool = False
    block_size: int | None = None
    attention_mask_format: str = "2d"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_conventions(config, options: MaskedLMOptions, saved: dict | None = None) -> Conventions:
    """Explicit options win, then what an rlgen checkpoint saved, then the model_type table, then config."""
    attention, shift, mask_format, block = FAMILIES.get(str(getattr(config, "model_type", "")).lower(),
                                                        ("bidirectional", False, "2d", None))
    base = Conventions(attention=attention, shift_logits=shift, block_size=block, attention_mask_format=mask_format)
    if getattr(config, "block_size", None):  # e.g. a block-diffusion config naming its training block
        base.block_size = int(config.block_size)
    if saved:
        base = Conventions(**{k: saved[k] for k in base.to_dict() if k in saved})
    conv = Conventions(**{k: (getattr(options, k) if getattr(options, k) is not None else v)
                          for k, v in base.to_dict().items()})
    if conv.attention == "block_causal":
        if conv.block_size is None:
            raise ModelLoadError("block-causal attention needs a block size: set policy.lm.block_size= "
                                 "(Python: block_size=)")
        if conv.attention_mask_format == "2d":  # a 2-D mask cannot say "earlier blocks only"
            conv.attention_mask_format = "additive"
    return conv


def read_conventions(folder: Path, **options) -> Conventions:
    """A policy folder's conventions from its metadata files alone (no code runs, no weights load):
    ``rlgen_model.json``'s record, else config.json's ``model_type``/``block_size``; ``options``
    (``MaskedLMOptions`` names, e.g. ``PolicyConfig.load_options()``) win as they do when loading."""
    from types import SimpleNamespace

    folder = Path(folder)
    meta, config = _read_json(folder / "rlgen_model.json"), _read_json(folder / "config.json")
    if not meta and not config:
        raise ModelLoadError(f"{folder}: neither rlgen_model.json nor config.json; not a masked-LM folder")
    known = {f.name for f in fields(Conventions)}
    opts = MaskedLMOptions(**{k: v for k, v in options.items() if k in known})
    return resolve_conventions(SimpleNamespace(**config), opts, meta.get("conventions"))


def token_identity(path: str | Path) -> tuple | None:
    """(vocabulary, mask id) of a masked-LM folder (an rlgen checkpoint, its run folder, or a Hugging
    Face folder) read from its files with the ``tokenizers`` library: no tokenizer code runs. None
    when the folder holds no ``tokenizer.json`` (a model loaded later compares itself)."""
    from tokenizers import Tokenizer

    folder = Path(path)
    if (folder / "checkpoints").is_dir():
        from rlgen.runtime.rundir import resolve_checkpoint

        folder = resolve_checkpoint(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    meta, config = _read_json(folder / "rlgen_model.json"), _read_json(folder / "config.json")
    mask_token = _read_json(folder / "tokenizer_config.json").get("mask_token")
    mask_token = mask_token.get("content") if isinstance(mask_token, dict) else mask_token
    mask = meta.get("mask_id", config.get("mask_token_id", vocab.get(mask_token) if mask_token else None))
    return vocab, mask


# ----------------------------------------------------------------------------------------------
# Locating a model: a folder or a Hub id (cache first)
# ----------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.md"]


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def resolve_model_path(spec: str | Path) -> tuple[Path, str]:
    """A local folder, or a Hub id (``owner/name``) from the local cache → (folder, source string).

    ``source`` is what a LoRA checkpoint records as its base: the absolute folder or the Hub id.
    """
    p = Path(spec).expanduser()
    if p.exists():
        return p.resolve(), str(p.resolve())
    text = str(spec)
    if not _HUB_ID.match(text):
        raise ModelLoadError(f"model not found: {text} (no such folder, and not a Hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True)), text
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        pass
    if _offline():
        raise ModelLoadError(f"{text}: no such folder, and Hub id {text!r} is not in the local cache (Hugging Face) "
                             f"(offline); download it first (hf download {text}) or give a folder")
    try:  # safetensors and text files only: pickled weights are never fetched (or loaded)
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS)), text
    except Exception as e:
        raise ModelLoadError(f"{text}: no such folder, and Hub id {text!r} is not in the local cache (Hugging Face) "
                             f"and could not be downloaded ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# Loading the pieces
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: corrupt JSON ({e})") from None


def remote_code_files(folder: Path) -> list[str]:
    """The code files a folder needs transformers to run (its ``auto_map`` entries), if any."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    files = set()
    cfg = _read_json(folder / "config.json")
    if cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING:
        files |= {str(v).split(".")[0] + ".py" for v in cfg["auto_map"].values() if isinstance(v, str)}
    tok = _read_json(folder / "tokenizer_config.json")
    tok_map = (tok.get("auto_map") or {}).get("AutoTokenizer") if isinstance(tok.get("auto_map"), dict) else None
    if tok_map and tokenizer_class_from_name(str(tok.get("tokenizer_class"))) is None:
        entries = tok_map if isinstance(tok_map, list) else [tok_map]
        files |= {str(v).split(".")[0] + ".py" for v in entries if v}
    return sorted(files)


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    files = remote_code_files(folder)
    if files and not trust_remote_code:
        raise ModelLoadError(f"{folder}: the model ships its own code ({', '.join(files)}; auto_map in its "
                             f"config) that transformers must run to load it; if you trust this folder, set "
                             f"policy.trust_remote_code=true (CLIs: --trust-remote-code; Python: trust_remote_code=True)")


def load_hf_tokenizer(folder: Path, trust_remote_code: bool):
    """The folder's tokenizer, loaded with the same ``trust_remote_code`` as the model."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)


def resolve_mask_id(tokenizer, config, given: int | None, where: Path) -> int:
    """``given``, else the tokenizer's mask token, else config.json's ``mask_token_id``."""
    for candidate in (given, getattr(tokenizer, "mask_token_id", None), getattr(config, "mask_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise ModelLoadError(f"{where}: no mask token: the tokenizer has none and config.json has no mask_token_id; "
                         f"set policy.mask_token_id=<id> (Python: mask_token_id=)")


def torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_hf_network(folder: Path, trust_remote_code: bool, dtype=None):
    """(network, config): the LM class the folder registers, safetensors only (a pickle can run code).

    Native classes: ``AutoModelForMaskedLM``, then ``AutoModel``. Remote code: the first of
    ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` / ``AutoModel`` its ``auto_map`` names (LLaDA
    and LLaDA2 register their LM under the causal-LM key although they attend bidirectionally).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    check_remote_code(folder, trust_remote_code)
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(folder), **kw)
    load_kw = dict(kw, use_safetensors=True)
    if dtype is not None:
        load_kw["dtype"] = torch_dtype(dtype)
    auto_map = getattr(config, "auto_map", None) or {}
    with quiet_hf_progress():
        if trust_remote_code and auto_map:
            for key, cls in (("AutoModelForMaskedLM", AutoModelForMaskedLM),
                             ("AutoModelForCausalLM", AutoModelForCausalLM), ("AutoModel", AutoModel)):
                if key in auto_map:
                    return cls.from_pretrained(str(folder), **load_kw), config
        try:
            return AutoModelForMaskedLM.from_pretrained(str(folder), **load_kw), config
        except ValueError:  # config class not in the masked-LM mapping
            return AutoModel.from_pretrained(str(folder), **load_kw), config


def enable_gradient_checkpointing(net) -> None:
    """Recompute activations in backward (memory for time); non-reentrant, so frozen inputs are fine."""
    if not getattr(net, "supports_gradient_checkpointing", False):
        raise ModelLoadError(f"{type(net).__name__} does not support gradient checkpointing; set "
                             f"policy.gradient_checkpointing=false")
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def options_field_names() -> list[str]:
    return [f.name for f in fields(MaskedLMOptions)]


__all__ = ["MaskedLMOptions", "ConventionOptions", "LoraOptions", "Conventions", "resolve_conventions",
           "read_conventions", "token_identity", "resolve_model_path", "check_remote_code", "load_hf_tokenizer",
           "load_hf_network", "resolve_mask_id", "torch_dtype", "enable_gradient_checkpointing"]
