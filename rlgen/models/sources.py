"""Where a model comes from: an rlgen folder, a diffusers pipeline folder, a Hugging Face model folder, or a
Hub id resolved through the local cache (downloaded where a network exists).

``resolve_source(path_or_id) -> ModelSource(kind, path, name)`` with kind ``rlgen`` (checkpoint or run
folder: rlgen.runtime.rundir resolves it further), ``diffusers`` (``model_index.json``) or ``hf``
(``config.json``). Bad input is one line naming the path or id and what was expected.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rlgen.models import MODEL_META, ModelLoadError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EXPECTED = (f"an rlgen checkpoint or run folder ({MODEL_META} or checkpoints/), a diffusers pipeline folder "
            f"(model_index.json) or a Hugging Face model folder (config.json)")


@dataclass
class ModelSource:
    kind: str   # rlgen | diffusers | hf
    path: Path  # a local folder
    name: str   # what the user gave (a Hub id stays an id: checkpoints point at it portably)


def _kind_of(p: Path) -> str | None:
    if (p / MODEL_META).is_file() or (p / "checkpoints").is_dir() or (p / "COMPLETE").exists():
        return "rlgen"
    if (p / "model_index.json").is_file():
        return "diffusers"
    if (p / "config.json").is_file():
        return "hf"
    return None


def resolve_source(path_or_id: str | os.PathLike) -> ModelSource:
    p = Path(path_or_id)
    name = str(path_or_id)
    if p.is_dir():
        kind = _kind_of(p)
        if kind is None:
            raise ModelLoadError(f"{p}: not a model folder; expected {EXPECTED}")
        return ModelSource(kind, p, str(p.resolve()) if kind == "diffusers" else name)
    if p.exists():
        raise ModelLoadError(f"{p}: is a file; expected {EXPECTED}")
    if not _HUB_ID.match(name):
        raise ModelLoadError(f"checkpoint not found: {p}")
    return _from_hub(name)


def _from_hub(repo_id: str) -> ModelSource:
    """A Hub id → its local snapshot (cache first; a download only where a network exists)."""
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    errors = []
    for local_only in (True,) if offline else (True, False):
        for index, kind in (("model_index.json", "diffusers"), ("config.json", "hf")):
            try:
                hf_hub_download(repo_id, index, local_files_only=local_only)
            except Exception as e:  # EntryNotFound, LocalEntryNotFound, connection errors, gated repos…
                errors.append(f"{type(e).__name__}")
                continue
            return ModelSource(kind, _snapshot(repo_id, kind, local_only), repo_id)
    from huggingface_hub.constants import HF_HUB_CACHE

    why = "offline (HF_HUB_OFFLINE=1)" if offline else "and could not be downloaded (no network or no such repo)"
    raise ModelLoadError(f"checkpoint not found: {repo_id} is not a local folder, and as a Hugging Face Hub id it "
                         f"is not in the local cache ({HF_HUB_CACHE}) {why}")


def _snapshot(repo_id: str, kind: str, local_only: bool) -> Path:
    if kind == "diffusers":
        from diffusers import DiffusionPipeline

        # DiffusionPipeline.download fetches only what the pipeline loads (no duplicate variants).
        return Path(DiffusionPipeline.download(repo_id, local_files_only=local_only))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_files_only=local_only))
