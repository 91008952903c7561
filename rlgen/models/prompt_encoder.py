"""A tiny learned prompt encoder: a word-level tokenizer plus a small transformers ``BertModel``.

The tokenizer is a ``tokenizers`` WordLevel model over a closed vocabulary (the words of the data's
captions, lower-cased, punctuation split off), with ``[PAD]``, ``[UNK]`` and a leading ``[CLS]``;
it is saved and loaded as a Hugging Face tokenizer folder. The empty prompt ``""`` encodes to the
lone ``[CLS]`` token: that is the unconditional prompt classifier-free guidance uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS = (PAD, UNK, CLS)


@dataclass
class PromptEmbeds:
    """Encoded prompts: what a flow backbone is conditioned on."""

    tokens: torch.Tensor  # (B, T, D) per-token features
    mask: torch.Tensor  # (B, T) 1 for real tokens ([CLS] included), 0 for padding
    pooled: torch.Tensor  # (B, D) masked mean of tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "PromptEmbeds":
        """Select batch rows (an int, slice, index list or tensor) of all three fields."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return PromptEmbeds(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        """Each prompt n times in a row, e.g. for a group of n samples per prompt."""
        return PromptEmbeds(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0),
                            self.pooled.repeat_interleave(n, 0))

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch; token lengths may differ (shorter ones are zero-padded)."""
        t = max(e.tokens.shape[1] for e in items)
        tokens = [nn.functional.pad(e.tokens, (0, 0, 0, t - e.tokens.shape[1])) for e in items]
        masks = [nn.functional.pad(e.mask, (0, t - e.mask.shape[1])) for e in items]
        return PromptEmbeds(torch.cat(tokens), torch.cat(masks), torch.cat([e.pooled for e in items]))


def words_of(texts: Iterable[str]) -> list[str]:
    """Sorted distinct lower-cased words (punctuation split off, as the tokenizer does)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    found = {w for text in texts for w, _ in split.pre_tokenize_str(text.lower())}
    return sorted(found - set(SPECIAL_TOKENS))


def build_tokenizer(vocab: Sequence[str], max_tokens: int):
    """A ``PreTrainedTokenizerFast`` over ``vocab`` (ids: [PAD] 0, [UNK] 1, [CLS] 2, then words)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(w.lower() for w in vocab) if w not in SPECIAL_TOKENS]
    ids = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, ids[CLS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, cls_token=CLS,
                                   model_max_length=max_tokens)


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


class PromptEncoder(nn.Module):
    """Token ids → PromptEmbeds with a small bidirectional ``BertModel`` (no pooler, no dropout)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    @classmethod
    def build(cls, vocab_size: int, dim: int, layers: int, heads: int, ff: int, max_tokens: int) -> "PromptEncoder":
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ff, max_position_embeddings=max_tokens,
                            type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            pad_token_id=0)
        return cls(BertModel(config, add_pooling_layer=False))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PromptEncoder":
        from transformers import BertModel

        return cls(BertModel.from_pretrained(str(path), add_pooling_layer=False, use_safetensors=True))

    def save_pretrained(self, path: str | Path) -> None:
        self.bert.save_pretrained(str(path), safe_serialization=True)

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> PromptEmbeds:
        # input_ids, mask: (B, T); padding positions are masked out of attention and the mean.
        tokens = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        m = mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
        return PromptEmbeds(tokens, mask, pooled)
