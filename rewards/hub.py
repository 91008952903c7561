"""Reward weights from a local folder/file or a Hugging Face Hub id (cache first, download where a network
exists); offline and uncached is one line naming the id."""
from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def local_weights(name: str | os.PathLike, who: str, filename: str | None = None) -> Path:
    """A local folder or file for ``name``: the path itself if it exists, else a Hub repo (a snapshot, or
    ``filename`` inside it). Raises FileNotFoundError with one line naming ``who`` and the id."""
    p = Path(name)
    if p.exists():
        return p
    name = str(name)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"{who}: {name} not found (expected a local folder/file or a Hugging Face Hub id)")
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    for local_only in (True,) if offline else (True, False):
        try:
            if filename:
                return Path(hf_hub_download(name, filename, local_files_only=local_only))
            return Path(snapshot_download(name, local_files_only=local_only))
        except Exception:  # LocalEntryNotFound, connection errors, missing repo …
            continue
    what = f"{name} ({filename})" if filename else name
    raise FileNotFoundError(f"{who}: {what} is not a local path and not in the local Hugging Face cache"
                            f"{' (offline: HF_HUB_OFFLINE=1)' if offline else ', and it could not be downloaded'}")
