"""What every text-task verifier does first to a completion: strip the tokenizer's special tokens.

A completion is the decoded answer text (``rlgen.data.tokenizer.decode_completion`` already cuts it
at [EOS]); raw decodes may still hold "[EOS]"/"[PAD]"/"[MASK]" strings, which are removed here so
the verifiers in arith.py, countdown.py and sudoku.py accept either. Standard library only: the
task modules stay importable without torch's tokenizer stack or the rewards package.
"""
from __future__ import annotations

import re

_SPECIAL = re.compile(r"\[(PAD|MASK)\]")


def clean_completion(text: str) -> str:
    """Cut at the first "[EOS]", drop "[PAD]"/"[MASK]" strings, strip surrounding whitespace."""
    return _SPECIAL.sub("", text.split("[EOS]", 1)[0]).strip()
