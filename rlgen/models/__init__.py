"""Generators rlgen trains: flow backbones + prompt encoders (flow.py), masked-diffusion LMs
(masked_lm.py). Every model folder holds ``rlgen_model.json`` naming its ``model_type``, a key of
the MODELS registry whose class implements ``save_pretrained(dir)`` / ``from_pretrained(dir, device)``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

MODEL_META = "rlgen_model.json"


class ModelLoadError(RuntimeError):
    pass


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers draws a progress bar per save/load; checkpoints every minute make that noise."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def read_model_meta(path: str | Path) -> dict:
    p = Path(path) / MODEL_META
    if not p.is_file():
        raise ModelLoadError(f"{Path(path)}: no {MODEL_META}; not an rlgen model folder")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p}: corrupt JSON ({e})") from e
    if not isinstance(meta, dict) or "model_type" not in meta:
        raise ModelLoadError(f"{p}: missing 'model_type'")
    return meta


def refuse_remote_code(folder: Path) -> None:
    """Raise if the folder's Hugging Face config asks to run Python files shipped in it (``auto_map``):
    only the caller may allow that (``trust_remote_code``), never the folder itself."""
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(folder) / name
        try:
            auto_map = json.loads(f.read_text()).get("auto_map") if f.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: the loader names the file
        if auto_map:
            refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            flat = [r for v in refs for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
            code = sorted({r.split("--")[-1].split(".")[0] + ".py" for r in flat})
            raise ModelLoadError(f"{f}: the model needs the Python code shipped in its folder "
                                 f"({', '.join(code[:3]) or 'auto_map'}); rlgen runs none unless told to: pass "
                                 f"--trust-remote-code (python -m rlgen.evaluate) only for a folder you trust")


def load_model(path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """Load any rlgen model from a checkpoint folder or a run folder (→ latest checkpoint).
    ``trust_remote_code``: let transformers import Python files from the folder (the caller's
    decision; a folder that needs them is refused otherwise)."""
    from rlgen.registry import MODELS
    from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as e:  # a missing or empty folder is a model that cannot load
        raise ModelLoadError(str(e)) from e
    meta = read_model_meta(ckpt)
    try:
        cls = MODELS.get(meta["model_type"])
    except Exception as e:  # RegistryError, or an import error of a 'module:attr' model type
        raise ModelLoadError(f"{ckpt / MODEL_META}: model_type {meta['model_type']!r}: {e}") from e
    if not trust_remote_code:
        refuse_remote_code(ckpt)
    kw = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return cls.from_pretrained(ckpt, device=device, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors, transformers and diffusers raise many types for a bad file
        raise ModelLoadError(f"{ckpt}: cannot load {meta['model_type']} model: {type(e).__name__}: {e}") from e
