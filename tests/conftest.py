"""Test-wide environment: quiet Ray, a persistent DeepSpeed extension cache, CPU DeepSpeed."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a shared-memory op on first init (~40 s); keep it for the whole CI run.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
