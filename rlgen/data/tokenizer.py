"""Character-level tokenizer for the text tasks (arith, countdown, sudoku).

One token per character, built with the `tokenizers` library (a WordLevel model over single
characters behind a pre-tokenizer that splits every character) and wrapped as a transformers
``PreTrainedTokenizerFast``, so it is saved and loaded beside the model in the usual HF format
(``tokenizer.json`` + ``tokenizer_config.json``) and ``AutoTokenizer.from_pretrained(dir)`` works.

Reserved tokens come first, so their ids are fixed whatever the character set:
    [PAD] = 0   filler; never produced by the tasks' fixed-width formats, kept for batching
    [MASK] = 1  the absorbing state of masked diffusion (the forward process writes it)
    [EOS] = 2   end of text; answers shorter than their task's generation length are padded with it

There is deliberately no [UNK]: a character outside the vocabulary is a bug in a task format or a
problems file, so ``encode`` raises a ValueError that names the text and the characters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, MASK, EOS = "[PAD]", "[MASK]", "[EOS]"
SPECIAL_TOKENS = (PAD, MASK, EOS)
# Everything the task formats write, plus letters and a little punctuation for new tasks.
CHARSET = "0123456789+-*/()=,:;.?!_|<> abcdefghijklmnopqrstuvwxyz"


def build_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A fresh character tokenizer: specials at ids 0..2, then ``charset`` in order."""
    if len(set(charset)) != len(charset):
        raise ValueError(f"charset has repeated characters: {charset!r}")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(charset))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Split "." (any single char) in "isolated" mode: every character becomes its own word,
    # spaces included. Special tokens written as text ("[EOS]") are matched before splitting.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # join tokens with no separator: decode(encode(s)) == s
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, mask_token=MASK, eos_token=EOS,
                                   clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` (ours or any local HF tokenizer folder)."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{p}: no tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)  # no code from files


def vocab_chars(tokenizer: PreTrainedTokenizerBase) -> set[str] | None:
    """The characters of a character-level tokenizer (cached on it); None for any other tokenizer
    (e.g. a pretrained LLaDA's BPE), whose own handling of unusual text then applies."""
    if not hasattr(tokenizer, "_rlgen_chars"):
        specials = set(tokenizer.all_special_tokens)
        vocab = [t for t in tokenizer.get_vocab() if t not in specials]
        tokenizer._rlgen_chars = set(vocab) if all(len(t) == 1 for t in vocab) else None
    return tokenizer._rlgen_chars


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Text → ids (one per character for ours); unknown characters are a ValueError naming the text."""
    known = vocab_chars(tokenizer)
    unknown = sorted(set(text) - known) if known is not None else []
    if unknown:
        raise ValueError(f"text {text!r} has characters outside the tokenizer vocabulary: {unknown}")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    known = vocab_chars(tokenizer)
    if known is not None:
        for text in texts:
            if not set(text) <= known:
                encode(tokenizer, text)  # raises with the message above
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def decode_completion(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Generated ids → text: cut at the first [EOS], drop [PAD]/[MASK] left anywhere else."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    drop = {tokenizer.pad_token_id, tokenizer.mask_token_id}
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)
