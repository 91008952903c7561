"""Preference pairs on disk: one row per (prompt, chosen, rejected), validated before training.

A pairs file is JSONL (one JSON object per line) or parquet (read through ``datasets``)::

    {"prompt": "a red circle", "chosen": "images/000003_w.png", "rejected": "images/000003_l.png",
     "chosen_score": 1.0, "rejected_score": 0.33, "meta": {"task": "single_object"}}
    {"prompt": "47+85=", "chosen": "231", "rejected": "221", "meta": {"problem": {...}, "gen_length": 3}}

- ``prompt``, ``chosen``, ``rejected``: required strings. For images, ``chosen``/``rejected`` are
  image file paths relative to the pairs file's folder (or ``image_root``) and must stay inside it:
  an absolute path, a ``..`` or a symlink leading out is refused (a shared pairs file must not make
  training read arbitrary files); for text they are the completions.
- ``chosen_score``, ``rejected_score`` (numbers) and ``meta`` (an object): optional.

``load_pairs`` checks every row before training starts. A malformed row — invalid JSON, not an
object, a missing or non-string field, empty text, a non-numeric score, an unreadable or wrongly
sized image, chosen identical to rejected, a ``meta.problem`` that is malformed or whose prompt the
row's prompt does not hold, or a duplicate of an earlier row — is reported with its row number (the line number of a JSONL file, 1-based). ``on_error="strict"`` (default) stops at the
first one; ``"skip"`` drops such rows and counts them by kind.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

REQUIRED = ("prompt", "chosen", "rejected")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MODALITIES = ("auto", "image", "text")
ON_ERROR = ("strict", "skip")
PAIRS_FILE = "pairs.jsonl"


class PairFormatError(ValueError):
    """A malformed pairs file or row; ``kind`` names the problem, ``row`` its row number."""

    def __init__(self, message: str, kind: str = "file", row: int | None = None):
        super().__init__(message)
        self.kind, self.row = kind, row


@dataclass
class PairRow:
    prompt: str
    chosen: str                     # completion text, or the image path as written in the file
    rejected: str
    row: int                        # row number in the file (JSONL: line number), 1-based
    chosen_score: float | None = None
    rejected_score: float | None = None
    meta: dict = field(default_factory=dict)
    chosen_image: torch.Tensor | None = None    # (C, H, W) float32 in [-1, 1], images only
    rejected_image: torch.Tensor | None = None


@dataclass
class PairSet:
    rows: list[PairRow]
    modality: str                   # image | text
    path: Path
    skipped: dict[str, int] = field(default_factory=dict)  # error kind → rows dropped (on_error=skip)
    errors: list[str] = field(default_factory=list)       # messages of dropped rows (first 20)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        dropped = sum(self.skipped.values())
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.path}: {len(self.rows)} {self.modality} pairs" + (f", {dropped} skipped ({kinds})" if dropped else "")

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected), each (N, C, H, W) in [-1, 1] (image pairs only)."""
        if self.modality != "image":
            raise ValueError(f"{self.path} holds {self.modality} pairs, not images")
        return (torch.stack([r.chosen_image for r in self.rows]), torch.stack([r.rejected_image for r in self.rows]))


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def read_image(path: Path) -> torch.Tensor:
    """An RGB image file → (3, H, W) float32 in [-1, 1]; OSError/ValueError when unreadable."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def write_image(image: torch.Tensor, path: Path) -> None:
    """(C, H, W) in [-1, 1] → PNG (lossless, so a round trip gives the same uint8 pixels)."""
    from PIL import Image

    from rlgen.viz import to_uint8

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image[None])[0]).save(path)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, parsed object or a PairFormatError) for every non-blank row."""
    if path.suffix == ".parquet":
        import datasets

        try:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:  # pyarrow/datasets raise many types for a corrupt file
            raise PairFormatError(f"{path}: cannot read parquet: {type(e).__name__}: {e}") from e
        for i, obj in enumerate(ds, start=1):
            yield i, obj
        return
    from rlgen.utils import TextFileError, read_text_file

    try:
        text = read_text_file(path)
    except TextFileError as e:
        raise PairFormatError(str(e)) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, PairFormatError(f"{path}: row {lineno}: invalid JSON ({e.msg})", "invalid_json", lineno)


def _is_image_path(value: str) -> bool:
    return value.lower().endswith(IMAGE_SUFFIXES)


def _check_row(obj: Any, n: int, where: str) -> PairRow:
    """Field checks that need no files; raises PairFormatError."""
    if isinstance(obj, PairFormatError):
        raise obj
    if not isinstance(obj, dict):
        raise PairFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}", "not_an_object", n)
    for key in REQUIRED:
        if obj.get(key) is None:
            raise PairFormatError(f"{where}: missing field '{key}' (need {', '.join(REQUIRED)})", "missing_field", n)
        if not isinstance(obj[key], str):
            raise PairFormatError(f"{where}: field '{key}' must be a string, got {obj[key]!r}", "wrong_type", n)
        if not obj[key].strip():
            raise PairFormatError(f"{where}: field '{key}' is empty", "empty_text", n)
    scores = {}
    for key in ("chosen_score", "rejected_score"):
        v = obj.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise PairFormatError(f"{where}: field '{key}' must be a finite number, got {v!r}", "wrong_type", n)
        scores[key] = None if v is None else float(v)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise PairFormatError(f"{where}: field 'meta' must be an object, got {meta!r}", "wrong_type", n)
    if obj["chosen"] == obj["rejected"]:
        raise PairFormatError(f"{where}: chosen and rejected are identical ({obj['chosen']!r})", "identical_pair", n)
    if meta.get("problem") is not None:
        _check_problem(meta["problem"], obj["prompt"], n, where)
    return PairRow(obj["prompt"], obj["chosen"], obj["rejected"], n, scores["chosen_score"],
                   scores["rejected_score"], meta)


def _check_problem(problem: Any, prompt: str, n: int, where: str) -> None:
    """A text pair's ``meta.problem`` (what the verifier and the answer width come from) must be a
    valid problem whose prompt the pair's prompt holds: otherwise the pair teaches one answer to
    another question."""
    from rlgen.data.text_tasks import ProblemError, get_task, validate_problem

    try:
        validate_problem(problem, f"{where}: meta.problem")
    except ProblemError as e:
        raise PairFormatError(str(e), "bad_problem", n) from None
    expected = get_task(problem["task"]).format_prompt(problem)
    if expected not in prompt:
        shown = prompt if len(prompt) <= 80 else prompt[:80] + f"… ({len(prompt)} characters)"
        raise PairFormatError(f"{where}: prompt {shown!r} contradicts its meta.problem, whose prompt is "
                              f"{expected!r}", "prompt_mismatch", n)


def _inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` with symlinks and ``..`` resolved, or None when that leaves ``root``."""
    p = (root / rel).resolve()
    return p if p.is_relative_to(root.resolve()) else None


def _load_images(row: PairRow, root: Path, image_size: int | None, where: str) -> None:
    for side in ("chosen", "rejected"):
        rel = getattr(row, side)
        p = _inside(root, rel)
        if p is None:
            raise PairFormatError(f"{where}: {side} image {rel!r} is outside the image folder {root} (absolute "
                                  f"paths and '..' are refused; pairs.image_root names another folder)",
                                  "image_outside_root", row.row)
        if not p.is_file():
            raise PairFormatError(f"{where}: {side} image {rel!r} not found (paths are relative to {root})",
                                  "unreadable_image", row.row)
        try:
            img = read_image(p)
        except (OSError, ValueError) as e:
            raise PairFormatError(f"{where}: cannot read {side} image {rel!r}: {e}", "unreadable_image",
                                  row.row) from e
        if image_size and tuple(img.shape[1:]) != (image_size, image_size):
            raise PairFormatError(f"{where}: {side} image {rel!r} is {img.shape[2]}×{img.shape[1]}, expected "
                                  f"{image_size}×{image_size}", "wrong_size", row.row)
        setattr(row, f"{side}_image", img)
        image_size = image_size or img.shape[-1]  # without a size given, rejected must match chosen


def load_pairs(path: str | Path, modality: str = "auto", on_error: str = "strict",
               image_size: int | None = None, image_root: str | Path | None = None) -> PairSet:
    """Read and validate a pairs file (JSONL, or ``.parquet``); see the module docstring.

    ``modality="auto"`` reads image pairs when the first row's chosen and rejected are image paths.
    ``image_size``: image pairs must be that many pixels square (None: any size, but all equal).
    ``image_root``: the folder image paths are relative to and confined to (default: the pairs
    file's folder).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    p = Path(path)
    if p.is_dir():
        p = p / PAIRS_FILE
    if not p.is_file():
        raise PairFormatError(f"pairs file not found: {p}")
    rows, seen, skipped, errors = [], {}, Counter(), []
    for n, obj in _raw_rows(p):
        where = f"{p}: row {n}"
        try:
            row = _check_row(obj, n, where)
            if modality == "auto":
                modality = "image" if _is_image_path(row.chosen) and _is_image_path(row.rejected) else "text"
            key = (row.prompt, row.chosen, row.rejected)
            if key in seen:
                raise PairFormatError(f"{where}: duplicate of row {seen[key]}", "duplicate", n)
            if modality == "image":
                _load_images(row, Path(image_root) if image_root else p.parent, image_size, where)
                image_size = image_size or row.chosen_image.shape[-1]  # all images of a set share one size
            seen[key] = n
            rows.append(row)
        except PairFormatError as e:
            if on_error == "strict":
                raise
            skipped[e.kind] += 1
            if len(errors) < 20:
                errors.append(str(e))
    if not rows:
        detail = f" ({sum(skipped.values())} rows skipped: {dict(skipped)})" if skipped else ""
        raise PairFormatError(f"{p}: no valid pairs{detail}")
    return PairSet(rows, "text" if modality == "auto" else modality, p, dict(skipped), errors)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def pair_record(prompt: str, chosen: str, rejected: str, chosen_score: float | None = None,
                rejected_score: float | None = None, meta: dict | None = None) -> dict:
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if chosen_score is not None:
        rec["chosen_score"] = float(chosen_score)
    if rejected_score is not None:
        rec["rejected_score"] = float(rejected_score)
    if meta:
        rec["meta"] = meta
    return rec


def write_pairs(path: str | Path, records: list[dict]) -> Path:
    """Write records as JSONL (``.parquet``: through ``datasets``); written to a temp file, then renamed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    if p.suffix == ".parquet":
        import datasets

        keys = list(dict.fromkeys(k for r in records for k in r))  # from_list keeps only the first row's keys
        datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in records]).to_parquet(str(tmp))
    else:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(p)
    return p
