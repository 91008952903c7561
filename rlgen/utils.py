"""Small helpers shared across rlgen: device choice, seeding, threads."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine")
    return dev


def compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype a policy holds its weights and computes in: ``name`` (float32 | bfloat16 | float16) on
    CUDA, float32 on CPU (``policy.dtype`` is a GPU setting; CPU kernels in half precision are slow)."""
    return getattr(torch, name) if torch.device(device).type == "cuda" else torch.float32


def derive_seed(*parts: int) -> int:
    """A seed that is a pure function of ``parts`` (e.g. run seed, iteration, worker): a resumed run
    draws exactly what the uninterrupted one drew, with no generator state to checkpoint."""
    return int(np.random.default_rng(list(parts)).integers(2**62))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    """0 keeps torch's default (all cores); otherwise pin intra-op threads (e.g. 1 per Ray actor)."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


class TextFileError(ValueError):
    """An input file that should be UTF-8 text is not; the message names the file and line."""


def read_text_file(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file. A binary file (a NUL byte) or bytes that are not UTF-8 are
    a ``TextFileError`` naming the file, the line and the byte offset, never a codec traceback."""
    with open(path, "rb") as f:
        data = f.read()
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TextFileError(f"{path}:{line}: a binary file (NUL byte at byte {nul}), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TextFileError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
